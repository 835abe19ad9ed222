//! GGUF output: written and read back (function and bytes preserved, llama.cpp's Q/K row
//! order undone again), quantized weights in memory, and bad requests as clear errors.
//! What llama.cpp itself makes of upmix's files is checked in tests/gguf_llama_cpp.rs.

mod common;

use std::path::Path;

use common::{device, load, load_all, run_pass};
use upmix::backends::load_runtime;
use upmix::emitters::{emit_gguf, emit_hf, GgufEmitOptions, HfEmitOptions};
use upmix::frontend::{gguf_tokenizer_metadata, GgufFile};
use upmix::ir::{DType, Module};
use upmix::passes::{Quantize, QuantizeTarget, Upcycle};

/// Writes graph `graph` of `m` to `path` with its tokenizer.
fn write(m: &Module, graph: &str, path: &Path) -> Result<(), String> {
    let g = m.graph(graph).unwrap();
    let tokenizer = gguf_tokenizer_metadata(&g.meta, g.meta.vocab_size, None).unwrap();
    let opts = GgufEmitOptions {
        tokenizer,
        ..GgufEmitOptions::default()
    };
    emit_gguf(m, graph, path, &opts)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn read(path: &Path) -> Module {
    let mut m = Module::new();
    upmix::frontend::load(path, "back", &mut m).unwrap();
    m
}

fn logits(m: &Module, graph: &str, tokens: &[u32]) -> upmix::ir::HostTensor {
    load_runtime(m, graph, &device())
        .unwrap()
        .logits(tokens)
        .unwrap()
}

const TOKENS: [u32; 8] = [5, 60, 71, 200, 13, 99, 100, 101];

fn quantize_all(model: &str, dtype: &str) -> Quantize {
    Quantize {
        model: model.into(),
        into: None,
        dtype: Some(dtype.parse().unwrap()),
        targets: vec![QuantizeTarget {
            select: vec!["embed".parse().unwrap(), "lm_head".parse().unwrap()],
            layers: None,
            dtype: dtype.parse().unwrap(),
        }],
        ignore: Vec::new(),
    }
}

#[test]
fn dense_and_moe_models_read_back_with_their_function() {
    let mut m = load_all(&[("a", "llama"), ("b", "llama_b"), ("q", "qwen2")]);
    let upcycle: Upcycle = ron::from_str(
        r#"(into: "moe", experts: ["a", "b"], top_k: 1, base: Some("a"), router: Random(seed: 3, std: 0.5))"#,
    )
    .unwrap();
    run_pass(&mut m, upcycle).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for graph in ["a", "q", "moe"] {
        let path = tmp.path().join(format!("{graph}.gguf"));
        write(&m, graph, &path).unwrap();
        let back = read(&path);
        let diff = logits(&m, graph, &TOKENS).max_abs_diff(&logits(&back, "back", &TOKENS));
        println!("{graph}: largest logit difference after a GGUF round trip {diff:e}");
        assert!(diff < 1e-5, "{graph}: {diff}");
    }
}

#[test]
fn quantized_weights_are_written_and_read_back_byte_for_byte() {
    for dtype in ["q8_0", "q4_0", "q4_1"] {
        let mut m = load("llama");
        run_pass(&mut m, quantize_all("llama", dtype)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.gguf");
        write(&m, "llama", &path).unwrap();
        let back = read(&path);
        let (a, b) = (
            m.graphs["llama"].weight_ids(),
            back.graphs["back"].weight_ids(),
        );
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            let (wx, wy) = (m.weights.get(*x).unwrap(), back.weights.get(*y).unwrap());
            assert_eq!((&wx.name, wx.dtype), (&wy.name, wy.dtype), "{dtype}");
            assert_eq!(
                m.weights.materialize_bytes(*x).unwrap(),
                back.weights.materialize_bytes(*y).unwrap(),
                "{dtype}: {}",
                wx.name
            );
        }
        // Kept quantized in memory or dequantized, the weights compute the same.
        let diff = logits(&m, "llama", &TOKENS).max_abs_diff(&logits(&back, "back", &TOKENS));
        assert!(diff < 1e-5, "{dtype}: {diff}");
    }
}

/// The kept-quantized CPU path computes what the dequantized weights compute.
#[test]
fn quantized_execution_equals_dequantized_weights() {
    let mut m = load("llama");
    run_pass(&mut m, quantize_all("llama", "q4_1")).unwrap();
    // The same values as plain f32 weights: a Cast of every quantized weight.
    let mut plain = m.clone();
    let g = plain.graph("llama").unwrap().clone();
    let mut remap = std::collections::HashMap::new();
    for id in g.weight_ids() {
        let w = plain.weights.get(id).unwrap().clone();
        if w.dtype.is_quantized() {
            let values = plain.weights.materialize(id).unwrap();
            let new = plain.weights.literal(&w.name, values).unwrap();
            remap.insert(id, new);
        }
    }
    let mut g2 = g.clone();
    g2.name = "plain".into();
    for n in g2.node_ids() {
        g2.node_mut(n)
            .op
            .map_weights(|id| *remap.get(&id).unwrap_or(&id));
    }
    plain.insert(g2);
    assert!(!remap.is_empty());
    let diff = logits(&m, "llama", &TOKENS).max_abs_diff(&logits(&plain, "plain", &TOKENS));
    println!("q4_1 kept quantized against dequantized f32 weights: {diff:e}");
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn a_gguf_read_and_written_again_is_byte_identical() {
    let Some(path) = smollm2_gguf() else {
        eprintln!("skipped: the SmolLM2 GGUF is not in the model cache (scripts/fetch-models.sh)");
        return;
    };
    let m = read(&path);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("copy.gguf");
    write(&m, "back", &out).unwrap();
    let (a, b) = (
        GgufFile::open(&path).unwrap(),
        GgufFile::open(&out).unwrap(),
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        assert_eq!((t.dtype, &t.shape), (u.dtype, &u.shape), "{name}");
        let len = t.dtype.nbytes(&t.shape).unwrap();
        assert!(
            a.file.bytes()[t.offset..t.offset + len] == b.file.bytes()[u.offset..u.offset + len],
            "{name} differs"
        );
    }
    for (key, value) in &a.metadata {
        if key.starts_with("tokenizer.") || key.starts_with("llama.") {
            assert_eq!(Some(value), b.metadata.get(key), "{key}");
        }
    }
}

fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("UPMIX_MODEL_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|c| std::path::PathBuf::from(c).join("upmix"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/upmix"))
        })?;
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    path.exists().then_some(path)
}

#[test]
fn q4_0_on_rows_not_a_multiple_of_32_is_refused() {
    let mut m = load("llama");
    common::add_rewidthed_copy(&mut m, "llama", "narrow", 40);
    let pass = Quantize {
        model: "narrow".into(),
        ..quantize_all("narrow", "q4_0")
    };
    let err = run_pass(&mut m, pass).unwrap_err();
    for needle in [
        "`embed.table` [256, 40]",
        "rows of 40 elements",
        "q4_0 blocks of 32",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
}

#[test]
fn architectures_llama_cpp_has_no_name_for_are_refused() {
    let m = load("cohere");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("c.gguf");
    let err = write(&m, "cohere", &path).unwrap_err();
    assert!(
        err.contains("llama.cpp has no architecture for Cohere"),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn int8_per_channel_has_no_gguf_type() {
    let mut m = load("llama");
    run_pass(&mut m, quantize_all("llama", "int8_channel")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("i.gguf");
    let err = write(&m, "llama", &path).unwrap_err();
    assert!(
        err.contains("int8_channel, which GGUF has no type for"),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn writing_over_an_input_or_a_foreign_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("m.gguf");
    write(&load("llama"), "llama", &first).unwrap();
    // The written file as the model's input, and as the output.
    let m = read(&first);
    let before = std::fs::read(&first).unwrap();
    let err = write(&m, "back", &first).unwrap_err();
    assert!(err.contains("holds an input of the model"), "{err}");
    assert_eq!(std::fs::read(&first).unwrap(), before);
    // A file upmix did not write is kept; one it wrote is replaced.
    let foreign = tmp.path().join("notes.gguf");
    std::fs::write(&foreign, b"mine").unwrap();
    let err = write(&load("llama"), "llama", &foreign).unwrap_err();
    assert!(err.contains("not an upmix output"), "{err}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"mine");
    let ours = tmp.path().join("again.gguf");
    write(&load("llama"), "llama", &ours).unwrap();
    write(&load("llama_b"), "llama_b", &ours).unwrap();
}

#[test]
fn hugging_face_output_of_quantized_weights_is_refused_unless_dequantized() {
    let mut m = load("llama");
    run_pass(&mut m, quantize_all("llama", "q8_0")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let err = emit_hf(&m, "llama", &out, &HfEmitOptions::default())
        .unwrap_err()
        .to_string();
    for needle in ["quantized", "layers.0.attn.q: q8_0", "dequantize: true"] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(!out.exists());
    let opts = HfEmitOptions {
        dequantize: true,
        ..HfEmitOptions::default()
    };
    let report = emit_hf(&m, "llama", &out, &opts).unwrap();
    assert_eq!(report.dequantized, m.graphs["llama"].weight_ids().len() - 5);
    let back = read(&out);
    for id in back.graphs["back"].weight_ids() {
        assert_eq!(back.weights.get(id).unwrap().dtype, DType::F32);
    }
    let diff = logits(&m, "llama", &TOKENS).max_abs_diff(&logits(&back, "back", &TOKENS));
    assert!(diff < 1e-4, "{diff}");
}

/// A real byte-level BPE tokenizer.json (SmolLM2's, as transformers 5 saves it:
/// tests/golden/smollm2_hf) converts to the tokenizer metadata llama.cpp's own converter
/// wrote into SmolLM2's GGUF: the same tokens, token types, merges, special ids and chat
/// template. Only `tokenizer.ggml.pre` differs, and rightly: transformers' conversion
/// dropped SmolLM2's digit split, so this tokenizer.json is plain GPT-2 (`gpt-2`), where
/// the original is `smollm`.
#[test]
fn a_hugging_face_bpe_tokenizer_converts_as_llama_cpp_converted_it() {
    let Some(gguf) = smollm2_gguf() else {
        eprintln!("skipped: the SmolLM2 GGUF is not in the model cache (scripts/fetch-models.sh)");
        return;
    };
    let dir = common::golden_dir().join("smollm2_hf");
    let meta = upmix::ir::ModelMeta {
        vocab_size: 49152,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        tokenizer: Some(dir.join("tokenizer.json")),
        ..Default::default()
    };
    let ours: std::collections::BTreeMap<String, upmix::frontend::GgufValue> =
        gguf_tokenizer_metadata(&meta, 49152, None)
            .unwrap()
            .into_iter()
            .collect();
    let original = GgufFile::open(&gguf).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ] {
        assert_eq!(ours.get(key), original.metadata.get(key), "{key}");
    }
    let pre = ours["tokenizer.ggml.pre"].as_str();
    assert_eq!(pre, Some("gpt-2"));
}
