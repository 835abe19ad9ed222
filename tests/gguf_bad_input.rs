//! Malformed GGUF files: every one is a clear error naming the file (and the tensor or
//! what was being read), never a panic or a huge allocation.

use std::path::Path;

use upmix::frontend::{FrontendError, GgufFile};

/// Writes a minimal GGUF v3 file: one string key, one u32 key and one F32 tensor
/// `t` of `n` elements (type id `ty`), with the real data unless `data` says otherwise.
struct Gguf {
    magic: &'static [u8; 4],
    tensor_count: u64,
    string_len: Option<u64>,
    ty: u32,
    n: u64,
    data_bytes: usize,
}

impl Default for Gguf {
    fn default() -> Self {
        Gguf {
            magic: b"GGUF",
            tensor_count: 1,
            string_len: None,
            ty: 0,
            n: 64,
            data_bytes: 256,
        }
    }
}

impl Gguf {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let string = |b: &mut Vec<u8>, s: &str, len: Option<u64>| {
            b.extend(len.unwrap_or(s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        b.extend(self.magic);
        b.extend(3u32.to_le_bytes());
        b.extend(self.tensor_count.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        string(&mut b, "general.architecture", None);
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama", self.string_len);
        string(&mut b, "llama.block_count", None);
        b.extend(4u32.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        string(&mut b, "t", None);
        b.extend(1u32.to_le_bytes());
        b.extend(self.n.to_le_bytes());
        b.extend(self.ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(vec![0u8; self.data_bytes]);
        b
    }
}

fn open(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufFile, FrontendError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let result = std::panic::catch_unwind(|| GgufFile::open(&path)).expect("no panic");
    (dir, result)
}

fn error(bytes: &[u8]) -> String {
    let (_dir, r) = open(bytes);
    let e = r.expect_err("an error").to_string();
    assert!(e.contains("model.gguf"), "names the file: {e}");
    e
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn the_well_formed_file_opens() {
    let (dir, r) = open(&Gguf::default().bytes());
    let g = r.unwrap();
    assert_eq!(file_name(g.path()), "model.gguf");
    assert_eq!(g.tensors["t"].shape, vec![64]);
    assert_eq!(g.get("llama.block_count").unwrap().as_u64(), Some(1));
    drop(dir);
}

#[test]
fn bad_magic() {
    let e = error(
        &Gguf {
            magic: b"GGML",
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn truncated_header() {
    let bytes = Gguf::default().bytes();
    for cut in [3, 10, 30, 60, 100] {
        let e = error(&bytes[..cut]);
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn tensor_data_past_the_end() {
    let e = error(
        &Gguf {
            data_bytes: 100,
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("`t`") && e.contains("past the end"), "{e}");
}

#[test]
fn absurd_tensor_count_is_rejected_before_allocating() {
    let e = error(
        &Gguf {
            tensor_count: u64::MAX / 2,
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("tensor count"), "{e}");
}

#[test]
fn absurd_string_length_is_rejected_before_allocating() {
    let e = error(
        &Gguf {
            string_len: Some(1 << 60),
            ..Default::default()
        }
        .bytes(),
    );
    assert!(
        e.contains("string length") && e.contains("general.architecture"),
        "{e}"
    );
}

#[test]
fn absurd_dimensions_overflow_cleanly() {
    let e = error(
        &Gguf {
            n: u64::MAX,
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("`t`"), "{e}");
}

#[test]
fn unsupported_quant_type_names_tensor_and_type() {
    // Q5_0 (type 6): a known ggml type upmix does not decode.
    let e = error(
        &Gguf {
            ty: 6,
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("`t`") && e.contains("Q5_0"), "{e}");
    let e = error(
        &Gguf {
            ty: 999,
            ..Default::default()
        }
        .bytes(),
    );
    assert!(e.contains("`t`") && e.contains("999"), "{e}");
}

#[test]
fn loading_a_gguf_without_the_model_tensors_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, Gguf::default().bytes()).unwrap();
    let mut m = upmix::ir::Module::new();
    let e = upmix::frontend::load(&path, "m", &mut m)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("model.gguf"), "{e}");
    assert!(m.graphs.is_empty());
}
