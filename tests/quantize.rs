//! Quantizers against independent goldens (tests/golden/quant, scripts/make_quant_goldens.py):
//! Q8_0, Q4_0 and Q4_1 bytes equal gguf-py's `quants.quantize` and decode to its
//! `quants.dequantize`; int8 per channel equals torch's absmax-per-row quantization. Then
//! the `Quantize` pass: what it selects, and its errors.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{golden_dir, load, run_pass};
use upmix::ir::DType;
use upmix::passes::{Quantize, QuantizeTarget};

/// Every tensor of a safetensors file as `(dtype, shape, bytes)`, by name.
fn raw_tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let shape = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let [start, end] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
        let dtype = info["dtype"].as_str().unwrap().to_string();
        out.insert(name.clone(), (dtype, shape, data[start..end].to_vec()));
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn inputs() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    raw_tensors(&golden_dir().join("quant/input.safetensors"))
        .into_iter()
        .map(|(name, (dtype, shape, bytes))| {
            assert_eq!(dtype, "F32");
            (name, shape, f32s(&bytes))
        })
        .collect()
}

#[test]
fn ggml_blocks_equal_gguf_py_byte_for_byte() {
    for (dtype, file) in [
        (DType::Q8_0, "q8_0"),
        (DType::Q4_0, "q4_0"),
        (DType::Q4_1, "q4_1"),
    ] {
        let golden = raw_tensors(&golden_dir().join(format!("quant/{file}.safetensors")));
        for (name, shape, values) in inputs() {
            let cols = shape[1];
            let mut ours = Vec::new();
            dtype.encode(&values, cols, &mut ours);
            let (_, _, want) = &golden[&name];
            let differing = ours.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!(ours.len(), want.len(), "{dtype} {name}: length");
            assert_eq!(differing, 0, "{dtype} {name}: {differing} bytes differ");
            // Decoding gives gguf-py's dequantized values, bit for bit (signed zeros too).
            let mut decoded = Vec::new();
            dtype.decode(&ours, cols, &mut decoded);
            let want = f32s(&golden[&format!("{name}.dequant")].2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&decoded), bits(&want), "{dtype} {name}: dequantized");
            // Rounding in place is quantizing and decoding.
            let mut rounded = values.clone();
            dtype.round_in_place(&mut rounded, cols);
            assert_eq!(bits(&rounded), bits(&want), "{dtype} {name}: rounded");
        }
    }
}

#[test]
fn int8_per_channel_equals_torch() {
    let golden = raw_tensors(&golden_dir().join("quant/int8_channel.safetensors"));
    for (name, shape, values) in inputs() {
        let (rows, cols) = (shape[0], shape[1]);
        let mut ours = Vec::new();
        DType::Int8PerChannel.encode(&values, cols, &mut ours);
        assert_eq!(ours.len(), rows * (cols + 4), "{name}");
        let scales = f32s(&golden[&format!("{name}.scale")].2);
        let (dtype, _, q) = &golden[&format!("{name}.q")];
        assert_eq!(dtype, "I8");
        for r in 0..rows {
            let row = &ours[r * (cols + 4)..(r + 1) * (cols + 4)];
            let scale = f32::from_le_bytes(row[..4].try_into().unwrap());
            assert_eq!(
                scale.to_bits(),
                scales[r].to_bits(),
                "{name} row {r}: scale"
            );
            assert_eq!(
                &row[4..],
                &q[r * cols..(r + 1) * cols],
                "{name} row {r}: values"
            );
        }
        let mut decoded = Vec::new();
        DType::Int8PerChannel.decode(&ours, cols, &mut decoded);
        for (i, v) in decoded.iter().enumerate() {
            let want = f32::from(q[i] as i8) * scales[i / cols];
            assert_eq!(v.to_bits(), want.to_bits(), "{name} element {i}");
        }
    }
}

fn quantize(dtype: Option<&str>) -> Quantize {
    Quantize {
        model: "llama".into(),
        into: Some("q".into()),
        dtype: dtype.map(|d| d.parse().unwrap()),
        targets: Vec::new(),
        ignore: Vec::new(),
    }
}

/// Types of the weights of graph `g` by name.
fn types(m: &upmix::ir::Module, g: &str) -> BTreeMap<String, DType> {
    let g = m.graph(g).unwrap();
    g.weight_ids()
        .into_iter()
        .map(|id| {
            let w = m.weights.get(id).unwrap();
            (w.name.clone(), w.dtype)
        })
        .collect()
}

#[test]
fn quantize_selects_components_and_keeps_the_rest() {
    let mut m = load("llama");
    let mut pass = quantize(Some("q8_0"));
    pass.ignore = vec!["layers.1.ffn.*".parse().unwrap()];
    pass.targets = vec![QuantizeTarget {
        select: vec!["attn.v".parse().unwrap(), "embed".parse().unwrap()],
        layers: None,
        dtype: "q4_0".parse().unwrap(),
    }];
    run_pass(&mut m, pass).unwrap();
    let before = types(&m, "llama");
    let after = types(&m, "q");
    assert!(
        before.values().all(|d| *d == DType::F32),
        "the source is untouched"
    );
    for (name, dtype) in &after {
        let want = if name.ends_with("attn.v") || name == "embed.table" {
            DType::Q4_0
        } else if name.starts_with("layers.1.ffn.") {
            DType::F32
        } else if name.ends_with(".attn.q")
            || name.ends_with(".attn.k")
            || name.ends_with(".attn.o")
            || name.ends_with(".ffn.gate")
            || name.ends_with(".ffn.up")
            || name.ends_with(".ffn.down")
        {
            DType::Q8_0
        } else {
            DType::F32 // norms, biases, the lm head
        };
        assert_eq!(*dtype, want, "{name}");
    }
    // Materialised values are the quantized ones.
    let g = m.graph("q").unwrap();
    let id = g
        .weight_ids()
        .into_iter()
        .find(|id| m.weights.get(*id).unwrap().name == "layers.0.attn.q")
        .unwrap();
    let values = m.weights.materialize(id).unwrap();
    let bytes = m.weights.materialize_bytes(id).unwrap();
    let mut decoded = Vec::new();
    DType::Q8_0.decode(&bytes, values.shape[1], &mut decoded);
    assert_eq!(values.data, decoded);
}

#[test]
fn quantize_errors_name_the_problem() {
    let cases: Vec<(Quantize, &str)> = vec![
        (quantize(None), "nothing to quantize"),
        (quantize(Some("q5_k")), "unknown type `q5_k`"),
        (
            Quantize {
                targets: vec![QuantizeTarget {
                    select: vec!["attn.x".parse().unwrap()],
                    layers: None,
                    dtype: "q8_0".parse().unwrap(),
                }],
                ..quantize(None)
            },
            "selector `attn.x` matches no weight",
        ),
    ];
    for (pass, want) in cases {
        let mut m = load("llama");
        let err = run_pass(&mut m, pass).unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}

/// upmix's quantizers equal ggml's C reference as llama.cpp runs it: the tiny Llama,
/// written as an f32 GGUF by upmix and quantized by `llama_model_quantize` (pure mode,
/// every matrix), against the same model quantized by upmix and written as GGUF
/// (scripts/make_llama_cpp_quant_goldens.py).
#[test]
fn ggml_blocks_equal_llama_cpps_quantizer() {
    use upmix::emitters::{emit_gguf, GgufEmitOptions};
    use upmix::frontend::{gguf_tokenizer_metadata, GgufFile};
    for dtype in ["q8_0", "q4_0", "q4_1"] {
        let golden =
            raw_tensors(&golden_dir().join(format!("quant/llama_cpp_{dtype}.safetensors")));
        let mut m = load("llama");
        let pass = Quantize {
            targets: vec![QuantizeTarget {
                select: vec!["embed".parse().unwrap(), "lm_head".parse().unwrap()],
                layers: None,
                dtype: dtype.parse().unwrap(),
            }],
            ..quantize(Some(dtype))
        };
        run_pass(&mut m, pass).unwrap();
        let g = m.graph("q").unwrap();
        let opts = GgufEmitOptions {
            tokenizer: gguf_tokenizer_metadata(&g.meta, g.meta.vocab_size, None).unwrap(),
            ..GgufEmitOptions::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("q.gguf");
        emit_gguf(&m, "q", &path, &opts).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert!(!golden.is_empty());
        for (name, (_, _, want)) in &golden {
            let t = &file.tensors[name];
            let len = t.dtype.nbytes(&t.shape).unwrap();
            let ours = &file.file.bytes()[t.offset..t.offset + len];
            assert_eq!(ours.len(), want.len(), "{dtype} {name}: length");
            let differing = ours.iter().zip(want).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{dtype} {name}: {differing} bytes differ");
        }
    }
}
