//! Dequantization of single ggml blocks against gguf-py's values
//! (tests/golden/gguf/blocks.json, written by scripts/make_fixtures.py).

use std::path::PathBuf;

use serde_json::Value;
use upmix_ir::DType;

/// Allowed absolute difference from gguf-py: exact for the 32-element formats; K-quants
/// are allowed 1e-6 (they are expected to be exact too, as the operation order matches).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::Q4K | DType::Q5K | DType::Q6K => 1e-6,
        _ => 0.0,
    }
}

fn dtype_of(ggml_name: &str) -> DType {
    match ggml_name {
        "Q8_0" => DType::Q8_0,
        "Q4_0" => DType::Q4_0,
        "Q4_1" => DType::Q4_1,
        "Q4_K" => DType::Q4K,
        "Q5_K" => DType::Q5K,
        "Q6_K" => DType::Q6K,
        other => panic!("unexpected ggml type {other} in blocks.json"),
    }
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex string");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

struct Block {
    dtype: DType,
    bytes: Vec<u8>,
    expected: Vec<f32>,
}

fn golden_blocks() -> Vec<Block> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/gguf/blocks.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("blocks.json is JSON");
    let blocks = json["blocks"].as_object().expect("a `blocks` object");
    blocks
        .iter()
        .map(|(name, block)| Block {
            dtype: dtype_of(name),
            bytes: hex_bytes(block["hex"].as_str().expect("hex string")),
            expected: block["values"]
                .as_array()
                .expect("values array")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect(),
        })
        .collect()
}

fn decode(block: &Block) -> Vec<f32> {
    let mut out = Vec::new();
    block
        .dtype
        .decode(&block.bytes, block.dtype.block().0, &mut out);
    out
}

#[test]
fn blocks_match_gguf_py() {
    let blocks = golden_blocks();
    let mut names: Vec<_> = blocks.iter().map(|b| b.dtype).collect();
    names.sort();
    let mut want = vec![
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];
    want.sort();
    assert_eq!(names, want, "blocks.json covers every quantized type");

    for block in &blocks {
        let (elems, size) = block.dtype.block();
        assert_eq!(
            block.bytes.len(),
            size,
            "{}: one block of bytes",
            block.dtype
        );
        assert_eq!(
            block.expected.len(),
            elems,
            "{}: one block of values",
            block.dtype
        );
        let got = decode(block);
        assert_eq!(got.len(), elems, "{}", block.dtype);
        let tol = tolerance(block.dtype);
        for (i, (g, e)) in got.iter().zip(&block.expected).enumerate() {
            let diff = (g - e).abs();
            let ok = if tol == 0.0 {
                g.to_bits() == e.to_bits()
            } else {
                diff <= tol
            };
            assert!(
                ok,
                "{} element {i}: got {g:e}, gguf-py {e:e} (|diff| {diff:e}, allowed {tol:e})",
                block.dtype
            );
        }
    }
}

/// Decoding several blocks at once appends them in order.
#[test]
fn consecutive_blocks_concatenate() {
    for block in golden_blocks() {
        let one = decode(&block);
        let mut twice = Vec::from([1.5f32]);
        let bytes: Vec<u8> = block.bytes.repeat(2);
        block
            .dtype
            .decode(&bytes, block.dtype.block().0, &mut twice);
        assert_eq!(twice[0], 1.5, "{}: existing values kept", block.dtype);
        assert_eq!(&twice[1..=one.len()], &one[..], "{}", block.dtype);
        assert_eq!(&twice[1 + one.len()..], &one[..], "{}", block.dtype);
    }
}

/// The comparison is not vacuous: the golden blocks carry signal (nonzero values of both
/// signs), and corrupting the bytes of a K-quant block changes what it decodes to.
#[test]
fn golden_blocks_are_informative() {
    for block in golden_blocks() {
        let got = decode(&block);
        let expect_pos = block.expected.iter().any(|v| *v > 0.0);
        let expect_neg = block.expected.iter().any(|v| *v < 0.0);
        assert!(
            expect_pos && expect_neg,
            "{}: golden spans both signs",
            block.dtype
        );
        assert!(
            got.iter().any(|v| *v > 0.0),
            "{}: decoded positives",
            block.dtype
        );
        assert!(
            got.iter().any(|v| *v < 0.0),
            "{}: decoded negatives",
            block.dtype
        );
        let distinct = {
            let mut bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            bits.sort_unstable();
            bits.dedup();
            bits.len()
        };
        assert!(
            distinct >= 8,
            "{}: only {distinct} distinct values",
            block.dtype
        );
    }

    let q4k = golden_blocks()
        .into_iter()
        .find(|b| b.dtype == DType::Q4K)
        .expect("a Q4_K block");
    let reference = decode(&q4k);
    // Byte 4 is the first packed scale byte (sub-block 0, and the high bits of
    // sub-block 4's scale); byte 16 the first quant byte (sub-blocks 0 and 1).
    for at in [4, 16] {
        let mut corrupted = Block {
            dtype: q4k.dtype,
            bytes: q4k.bytes.clone(),
            expected: Vec::new(),
        };
        corrupted.bytes[at] ^= 0x11;
        assert_ne!(decode(&corrupted), reference, "flipping bits of byte {at}");
    }
}
