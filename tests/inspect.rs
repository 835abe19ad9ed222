//! Snapshots of the IR text (`upmix_ir::print_graph`) of every golden fixture, of a Merge
//! pass's output, and of `upmix inspect`.
//!
//! The printed form is deterministic and independent of where a checkpoint lives, so any
//! change to the frontend's lowering, the printer or a pass shows up as a snapshot diff.

mod common;

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
        weights: Some(vec![0.3, 0.7].into()),
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

/// Runs `upmix inspect --check` on `dir`: (success, stdout, stderr).
fn inspect_check(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(["inspect", "--check"])
        .arg(dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn cli_inspect_check_reports_non_finite_tensors_and_fails() {
    let (_tmp, dir) = common::temp_fixture("llama");
    let q = "model.layers.0.self_attn.q_proj.weight";
    common::write_f32_values(&dir, q, &[f32::NAN, f32::INFINITY, 0.5, f32::NAN]);
    common::write_f32_values(&dir, "model.norm.weight", &[f32::NEG_INFINITY]);
    let (ok, stdout, stderr) = inspect_check(&dir);
    assert!(!ok, "inspect --check succeeded:\n{stdout}");
    let file = dir.join("model.safetensors").display().to_string();
    for line in [
        format!("{file}: `{q}`: 2 NaN, 1 Inf"),
        format!("{file}: `model.norm.weight`: 0 NaN, 1 Inf"),
    ] {
        assert!(stdout.contains(&line), "expected {line:?} in:\n{stdout}");
    }
    // The IR is printed first, as without --check.
    assert!(stdout.starts_with("graph "), "{stdout}");
    assert_eq!(stdout.matches(" NaN, ").count(), 2, "{stdout}");
    assert!(
        stderr.contains("Error: 2 tensors hold non-finite values"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_inspect_check_of_a_clean_checkpoint_exits_zero() {
    let (ok, stdout, stderr) = inspect_check(&fixture("llama"));
    assert!(ok, "inspect --check failed:\n{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(
        last.starts_with("check: all ") && last.ends_with(" tensors are finite"),
        "{stdout}"
    );
}
