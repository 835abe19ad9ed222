//! GGUF files written by upmix, as llama.cpp, gguf-py and transformers read them
//! (tests/golden/gguf_out/NAME.json, recorded by scripts/check-gguf.sh from the pipelines
//! NAME.ron beside them).
//!
//! Each pipeline is run again and must write exactly the recorded bytes (so the recorded
//! results are of this file). Then upmix runs the file it wrote:
//! - with ggml activations (quantized per block as llama.cpp's CPU backend does), against
//!   llama.cpp's logits and greedy continuations;
//! - with f32 activations, against transformers' run of the same file (`gguf_file`,
//!   which dequantizes the weights to f32).

mod common;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use upmix::backends::{Activations, DeviceSpec};
use upmix::emit::Emit;
use upmix::ir::{HostTensor, Module};
use upmix::pipeline::{self, Pipeline, RunOptions};
use upmix::Exec;

fn golden_dir() -> PathBuf {
    common::golden_dir().join("gguf_out")
}

/// Runs pipeline `NAME.ron` with its GGUF written into `dir`; the file's path.
fn write(name: &str, dir: &Path) -> PathBuf {
    let ron = golden_dir().join(format!("{name}.ron"));
    let mut p = Pipeline::read(&ron).unwrap();
    let out = dir.join(format!("{name}.gguf"));
    for e in &mut p.emit {
        if let Emit::Gguf { file, .. } = &mut e.value {
            *file = out.clone();
        }
    }
    pipeline::run(&p, &golden_dir(), &RunOptions::default()).unwrap();
    out
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The golden of `name`, after checking that upmix writes the recorded bytes; the
/// written file's module (graph `m`).
fn written(name: &str, dir: &Path) -> (serde_json::Value, Module) {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let path = write(name, dir);
    assert_eq!(
        sha256(&path),
        g["sha256"].as_str().unwrap(),
        "{name}: upmix writes other bytes than llama.cpp was run on; if intended, re-run \
         scripts/check-gguf.sh"
    );
    // gguf-py read and dequantized every tensor, with the shapes upmix wrote.
    let file = upmix::frontend::GgufFile::open(&path).unwrap();
    let gguf_py = &g["gguf_py"];
    assert_eq!(
        gguf_py["tensors_read"].as_u64(),
        Some(file.tensors.len() as u64)
    );
    for (tensor, info) in &file.tensors {
        let shape: Vec<usize> = ids(&gguf_py["shapes"][tensor])
            .into_iter()
            .map(|d| d as usize)
            .collect();
        assert_eq!(shape, info.shape, "{name}: {tensor}");
    }
    let mut m = Module::new();
    upmix::frontend::load(&path, "m", &mut m).unwrap();
    (g, m)
}

fn exec(activations: Activations) -> Exec {
    Exec {
        device: DeviceSpec::Cpu,
        activations,
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    common::ids(v)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Largest difference between `logits` rows and the recorded values at `top_ids`.
fn diff_at(logits: &HostTensor, top_ids: &serde_json::Value, values: &serde_json::Value) -> f32 {
    let mut worst = 0f32;
    for (p, (ids, vals)) in top_ids
        .as_array()
        .unwrap()
        .iter()
        .zip(values.as_array().unwrap())
        .enumerate()
    {
        for (id, v) in ids.as_array().unwrap().iter().zip(floats(vals)) {
            let got = logits.row(p)[id.as_u64().unwrap() as usize];
            worst = worst.max((got - v).abs());
        }
    }
    worst
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Tiny models: every logit of every position, and the greedy continuations.
#[test]
fn tiny_models_run_as_llama_cpp_runs_them() {
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "tiny_f32",
        "tiny_q8_0",
        "tiny_q4_0",
        "tiny_q4_1",
        "tiny_moe_q8_0",
    ] {
        let (g, m) = written(name, tmp.path());
        let mut rt = exec(Activations::Ggml).load(&m, "m").unwrap();
        for (i, s) in g["llama_cpp"]["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let tokens = ids(&s["ids"]);
            let logits = rt.logits(&tokens).unwrap();
            let mut worst = 0f32;
            for (p, row) in s["logits"].as_array().unwrap().iter().enumerate() {
                let want = floats(row);
                for (a, b) in logits.row(p).iter().zip(&want) {
                    worst = worst.max((a - b).abs());
                }
            }
            let greedy = rt.generate(&tokens, ids(&s["greedy"]).len(), None).unwrap();
            println!("{name} sequence {i}: largest logit difference to llama.cpp {worst:e}");
            assert!(worst < 1e-3, "{name} sequence {i}: {worst}");
            assert_eq!(
                greedy,
                ids(&s["greedy"]),
                "{name} sequence {i}: continuation"
            );
        }
    }
}

/// SmolLM2 and its upcycled MoE in Q8_0 (from the model cache).
#[test]
fn smollm2_q8_0_files_run_as_llama_cpp_and_transformers_run_them() {
    if smollm2_missing() {
        eprintln!("skipped: the SmolLM2 GGUF is not in the model cache (scripts/fetch-models.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in ["smollm2_q8_0", "smollm2_moe_q8_0"] {
        let (g, m) = written(name, tmp.path());
        let mut ggml = exec(Activations::Ggml).load(&m, "m").unwrap();
        let mut float = exec(Activations::Float).load(&m, "m").unwrap();
        for (i, s) in g["llama_cpp"]["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let tokens = ids(&s["ids"]);
            let logits = ggml.logits(&tokens).unwrap();
            let worst = diff_at(&logits, &s["top_ids"], &s["top_logits"]);
            let want = ids(&s["greedy"]);
            let greedy = ggml.generate(&tokens, want.len(), None).unwrap();
            let agree = greedy.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let argmax_agree = (0..tokens.len())
                .filter(|&p| argmax(logits.row(p)) == ids(&s["argmax"])[p])
                .count();
            println!(
                "{name} prompt {i}: top-32 logits within {worst:e} of llama.cpp; argmax agrees at {argmax_agree}/{} positions; greedy continuation agrees for {agree}/{} tokens",
                tokens.len(),
                want.len()
            );
            // Thirty layers of activations rounded to 8 bits amplify the last-bit
            // differences of two f32 implementations: a value within an ulp of a rounding
            // boundary lands on either side (the tiny models above, too small for that,
            // agree to 1e-6). The logits stay within 1 of llama.cpp's, and the first
            // token agrees.
            assert!(worst < 1.0, "{name} prompt {i}: {worst}");
            assert!(agree >= 1, "{name} prompt {i}: {greedy:?} against {want:?}");
            if let Some(t) = g["transformers"]["sequences"].get(i) {
                let logits = float.logits(&tokens).unwrap();
                let worst = diff_at(&logits, &s["top_ids"], &t["logits_at_top_ids"]);
                println!("{name} prompt {i}: f32 activations within {worst:e} of transformers");
                assert!(
                    worst < common::tolerance().smollm2_logits,
                    "{name} {i}: {worst}"
                );
            }
        }
    }
}

fn smollm2_missing() -> bool {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    !home
        .join(".cache/upmix/SmolLM2-135M-Instruct.Q4_1.gguf")
        .exists()
}
