//! Snapshots of the IR text (`upmix_ir::print_graph`) of every golden fixture, of a Merge
//! pass's output, and of `upmix inspect`.
//!
//! The printed form is deterministic and independent of where a checkpoint lives, so any
//! change to the frontend's lowering, the printer or a pass shows up as a snapshot diff.

use std::path::{Path, PathBuf};
use std::process::Command;

use upmix_ir::{print_graph, Module, WeightExpr};
use upmix_passes::{Merge, Pass, PassContext};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/models")
        .join(name)
}

/// Loads fixture `name` as the graph `name` and prints it.
fn ir_of(name: &str) -> String {
    let mut m = Module::new();
    upmix_frontend::load(&fixture(name), name, &mut m)
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"));
    print_graph(&m.graphs[name], &m.weights)
}

#[test]
fn llama() {
    insta::assert_snapshot!(ir_of("llama"));
}

#[test]
fn llama_tied() {
    insta::assert_snapshot!(ir_of("llama_tied"));
}

#[test]
fn qwen2() {
    insta::assert_snapshot!(ir_of("qwen2"));
}

#[test]
fn mixtral() {
    insta::assert_snapshot!(ir_of("mixtral"));
}

#[test]
fn mixtral_fused() {
    insta::assert_snapshot!(ir_of("mixtral_fused"));
}

#[test]
fn merge_of_llama_and_llama_b() {
    let mut m = Module::new();
    for name in ["llama", "llama_b"] {
        upmix_frontend::load(&fixture(name), name, &mut m).unwrap();
    }
    let merge = Merge {
        into: "merged".into(),
        models: vec!["llama".into(), "llama_b".into()],
        weights: Some(vec![0.3, 0.7]),
        normalize: true,
    };
    let changed = merge.run(&mut m, &mut PassContext::default()).unwrap();
    assert_eq!(changed, ["merged"]);
    upmix_ir::verify(&m.graphs["merged"], &m.weights).unwrap();
    // The printout names source files without their directory, so check here that each
    // merged weight reads llama's tensor with 0.3 and llama_b's with 0.7.
    let source_dir = |id| match &m.weights.get(id).unwrap().expr {
        WeightExpr::Source { file, .. } => file.path().parent().unwrap().to_path_buf(),
        other => panic!("expected a source weight, got {other:?}"),
    };
    for id in m.graphs["merged"].weight_ids() {
        let WeightExpr::WeightedSum { terms, normalize } = &m.weights.get(id).unwrap().expr else {
            panic!("merged weight {id:?} is not a weighted sum");
        };
        assert!(*normalize);
        let terms: Vec<_> = terms.iter().map(|(w, t)| (*w, source_dir(*t))).collect();
        assert_eq!(
            terms,
            [(0.3, fixture("llama")), (0.7, fixture("llama_b"))],
            "operands of merged weight {id:?}"
        );
    }
    insta::assert_snapshot!(print_graph(&m.graphs["merged"], &m.weights));
}

#[test]
fn cli_inspect_llama() {
    let out = Command::new(env!("CARGO_BIN_EXE_upmix"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["inspect", "tests/golden/models/llama"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "upmix inspect failed:\n{stderr}");
    assert!(
        stderr.is_empty(),
        "upmix inspect wrote to stderr:\n{stderr}"
    );
    insta::assert_snapshot!(String::from_utf8(out.stdout).unwrap());
}
