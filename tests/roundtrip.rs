//! Round trip: load -> emit -> load gives bit-identical tensors, and the emitted files are
//! byte for byte the ones transformers loaded and checked (tests/golden/emitted/*.json,
//! written by `scripts/check-emitted.sh`).

mod common;

use std::path::Path;

use common::{golden, load, FIXTURES};
use sha2::{Digest, Sha256};
use upmix::emitters::{emit_hf, HfEmitOptions};
use upmix::ir::Module;

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn load_emit_load_is_bit_identical() {
    for name in FIXTURES {
        let m = load(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        emit_hf(&m, name, &out, &HfEmitOptions::default()).unwrap();

        let mut back = Module::new();
        upmix::frontend::load(&out, "back", &mut back).unwrap();
        let (a, b) = (
            m.graphs[*name].weight_ids(),
            back.graphs["back"].weight_ids(),
        );
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            let (wx, wy) = (m.weights.get(*x).unwrap(), back.weights.get(*y).unwrap());
            assert_eq!(
                (&wx.name, &wx.shape, wx.dtype),
                (&wy.name, &wy.shape, wy.dtype)
            );
            assert_eq!(
                m.weights.materialize_bytes(*x).unwrap(),
                back.weights.materialize_bytes(*y).unwrap(),
                "{name}: {}",
                wx.name
            );
        }
        // Same graph text, file offsets aside: compare op lines only.
        let ops = |m: &Module, g: &str| -> Vec<String> {
            upmix::ir::print_graph(&m.graphs[g], &m.weights)
                .lines()
                .skip(1)
                .take_while(|l| *l != "weights:")
                .map(str::to_string)
                .collect()
        };
        assert_eq!(ops(&m, name), ops(&back, "back"), "{name}");
    }
}

#[test]
fn emitted_files_are_the_ones_transformers_checked() {
    for name in FIXTURES {
        let check = golden(&format!("emitted/{name}.json"));
        assert!(
            check["max_abs_diff"].as_f64().unwrap() <= 1e-4,
            "{name}: transformers saw a difference of {}",
            check["max_abs_diff"]
        );
        let m = load(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        emit_hf(&m, name, &out, &HfEmitOptions::default()).unwrap();
        let files = check["files"].as_object().unwrap();
        assert!(files.contains_key("config.json") && files.contains_key("model.safetensors"));
        for (file, hash) in files {
            assert_eq!(
                &sha256(&out.join(file)),
                hash.as_str().unwrap(),
                "{name}/{file} differs from what transformers loaded; rerun scripts/check-emitted.sh"
            );
        }
    }
}

#[test]
fn sharded_output_loads_back() {
    let m = load("llama");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = calls.clone();
    let opts = HfEmitOptions {
        max_shard_bytes: 100_000,
        progress: Some(std::sync::Arc::new(move |done, total| {
            seen.lock().unwrap().push((done, total))
        })),
        ..Default::default()
    };
    let r = emit_hf(&m, "llama", &out, &opts).unwrap();
    // Progress: one call per tensor, rising to the total number of bytes written.
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), r.tensors);
    assert!(calls
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 == w[1].1));
    assert_eq!(calls.last().copied(), Some((r.bytes, r.bytes)));
    assert!(r.shards > 1, "{} shards", r.shards);
    assert!(out.join("model.safetensors.index.json").is_file());
    let mut back = Module::new();
    upmix::frontend::load(&out, "back", &mut back).unwrap();
    for (x, y) in m.graphs["llama"]
        .weight_ids()
        .iter()
        .zip(back.graphs["back"].weight_ids())
    {
        assert_eq!(
            m.weights.materialize_bytes(*x).unwrap(),
            back.weights.materialize_bytes(y).unwrap()
        );
    }
}

/// The emitter reads a graph by its wiring: a residual connection rewired to skip the
/// block's input (same ops, same order) is not a decoder stack, and is refused.
#[test]
fn a_graph_rewired_away_from_a_decoder_stack_is_refused() {
    let mut m = load("llama");
    let g = m.graphs.get_mut("llama").unwrap();
    let (add, attn) = (
        g.find("layers.0.attn_residual").unwrap(),
        g.find("layers.0.attn").unwrap(),
    );
    g.disconnect_inputs(add);
    g.connect(attn, add);
    g.connect(attn, add);
    upmix::ir::verify(g, &m.weights).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = emit_hf(&m, "llama", &out, &HfEmitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not a decoder stack: at node `embed`: expected a norm and a residual Add"),
        "{err}"
    );
    assert!(!out.exists());
}
