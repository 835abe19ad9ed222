//! The IR text form reads back what it prints: every fixture checkpoint's IR, printed
//! with `print_module` and parsed with `parse_module`, is structurally the module
//! printed, the real SmolLM2 GGUF included. (The output of every pass reads back too: `tests/filetests.rs` checks it for
//! the module each filetest's pass leaves.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

mod common;

use upmix::ir::{
    parse_module, print_module, structural_diff, MappedFile, Module, WeightExpr, WeightId,
};

/// The files `m`'s weights read, by file name (as the printer names them).
fn source_files(m: &Module) -> HashMap<String, Arc<MappedFile>> {
    let mut files = HashMap::new();
    for i in 0..m.weights.len() {
        let w = m.weights.get(WeightId(i as u32)).unwrap();
        if let WeightExpr::Source { file, .. } = &w.expr {
            let name = file
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            files.insert(name, file.clone());
        }
    }
    files
}

/// Prints `m`, parses the text, and checks the result against `m`.
fn round_trip(m: &Module, what: &str) {
    let files = source_files(m);
    let text = print_module(m);
    let parsed = parse_module(&text, &|name| files.get(name).cloned())
        .unwrap_or_else(|e| panic!("{what}: its text does not parse: {e}"));
    if let Some(diff) = structural_diff(&parsed, m) {
        panic!("{what}: read back differently: {diff}");
    }
    assert_eq!(print_module(&parsed), text, "{what}: prints differently");
}

#[test]
fn every_fixture_checkpoint_round_trips() {
    let models = common::golden_dir().join("models");
    let mut checkpoints: Vec<PathBuf> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    checkpoints.push(common::gguf_path());
    checkpoints.sort();
    for path in &checkpoints {
        let mut m = Module::new();
        upmix::frontend::load(path, "model", &mut m)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        round_trip(&m, &path.display().to_string());
    }
    assert!(checkpoints.len() >= 15, "{} checkpoints", checkpoints.len());
}
