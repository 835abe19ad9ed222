//! Dequantization against gguf-py: every supported ggml type in a small GGUF written by
//! gguf-py's writer, and slices and sums of SmolLM2's tensors (goldens made by
//! scripts/make_fixtures.py).

mod common;

use common::golden_dir;
use upmix::frontend::{GgufFile, SafetensorsFile};
use upmix::ir::DType;

fn decode(file: &GgufFile, name: &str) -> (DType, Vec<usize>, Vec<f32>) {
    let t = &file.tensors[name];
    let len = t.dtype.nbytes(&t.shape).unwrap();
    let mut out = Vec::new();
    let cols = *t.shape.last().unwrap();
    t.dtype
        .decode(&file.file.bytes()[t.offset..t.offset + len], cols, &mut out);
    (t.dtype, t.shape.clone(), out)
}

#[test]
fn every_type_matches_gguf_py() {
    let file = GgufFile::open(&golden_dir().join("gguf/quants.gguf")).unwrap();
    let expected =
        SafetensorsFile::open(&golden_dir().join("gguf/quants_expected.safetensors")).unwrap();
    assert_eq!(file.tensors.len(), 9);
    for (name, info) in &expected.tensors {
        let (dtype, shape, got) = decode(&file, name);
        assert_eq!(shape, info.shape, "{name}");
        let mut want = Vec::new();
        let n: usize = info.shape.iter().product();
        info.dtype.decode(
            &expected.file.bytes()[info.offset..info.offset + n * 4],
            1,
            &mut want,
        );
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let bound = if matches!(dtype, DType::Q4K | DType::Q5K | DType::Q6K) {
            1e-6
        } else {
            0.0
        };
        assert!(diff <= bound, "{name} ({dtype}): max abs difference {diff}");
    }
}

#[test]
fn metadata_of_every_value_type_reads_back() {
    // The values scripts/make_fixtures.py gave gguf-py's writer.
    use upmix::frontend::GgufValue as V;
    let file = GgufFile::open(&golden_dir().join("gguf/quants.gguf")).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.get("upmix.fixture.u32"), Some(&V::U32(4096)));
    assert_eq!(file.get("upmix.fixture.f32"), Some(&V::F32(0.125)));
    assert_eq!(file.get("upmix.fixture.bool"), Some(&V::Bool(true)));
    assert_eq!(
        file.strings("upmix.fixture.strings").unwrap(),
        ["alpha", "", "naïve ✓"]
    );
    let ints: Vec<V> = [-3, 0, 7, i32::MAX, i32::MIN]
        .into_iter()
        .map(V::I32)
        .collect();
    assert_eq!(file.get("upmix.fixture.i32s"), Some(&V::Array(ints)));
    assert_eq!(
        file.get("general.name").and_then(|v| v.as_str()),
        Some("upmix quant fixture")
    );
}

#[test]
fn smollm2_tensors_match_gguf_py() {
    let path = std::env::var("UPMIX_SMOLLM2_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("UPMIX_MODEL_CACHE")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|_| {
                    std::env::var("XDG_CACHE_HOME")
                        .map(std::path::PathBuf::from)
                        .unwrap_or_else(|_| {
                            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache")
                        })
                        .join("upmix")
                });
            cache.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        path.display()
    );
    let file = GgufFile::open(&path).unwrap();
    let g = common::golden("gguf/smollm2_dequant.json");
    let tensors = g["tensors"].as_object().unwrap();
    assert!(tensors.len() >= 5);
    for (name, want) in tensors {
        let (_, shape, got) = decode(&file, name);
        let want_shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, want_shape, "{name}");
        for (i, v) in want["first64"].as_array().unwrap().iter().enumerate() {
            assert_eq!(got[i], v.as_f64().unwrap() as f32, "{name}[{i}]");
        }
        if let Some(row) = want["row7_cols0_16"].as_array() {
            let cols = shape[1];
            for (j, v) in row.iter().enumerate() {
                assert_eq!(
                    got[7 * cols + j],
                    v.as_f64().unwrap() as f32,
                    "{name}[7][{j}]"
                );
            }
        }
        let sum: f64 = got.iter().map(|v| *v as f64).sum();
        let sum_sq: f64 = got.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let (ws, wq) = (
            want["sum"].as_f64().unwrap(),
            want["sum_sq"].as_f64().unwrap(),
        );
        assert!(
            (sum - ws).abs() <= 1e-6 * (1.0 + ws.abs()) + 1e-3,
            "{name}: sum {sum} vs {ws}"
        );
        assert!(
            (sum_sq - wq).abs() <= 1e-9 * wq.abs() + 1e-6,
            "{name}: sum of squares {sum_sq} vs {wq}"
        );
    }
}
