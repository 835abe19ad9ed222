//! Fuzz test of the safetensors header parser (`SafetensorsFile::open`): a small valid file
//! (F32, F16 and BF16 tensors and a `__metadata__` entry) is mutated, mostly through its
//! header JSON (shapes, dtypes, data_offsets set to extreme, overlapping or past-the-end
//! values; wrong types; nesting; duplicate keys) and the 8-byte header length, then byte by
//! byte. Every case must return `Ok` or an error naming the file, without a panic or an
//! allocation beyond the bound. Case count: `PROPTEST_CASES`; seed: `PROPTEST_RNG_SEED`.

mod fuzz_support;

use proptest::prelude::*;
use upmix_frontend::SafetensorsFile;

use fuzz_support::json::{self, Edit, J};
use fuzz_support::mutate::{self, num, put_int, ByteOp, Num};
use fuzz_support::{check_call, fuzz, rewrite, scratch, show_bytes, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The seed: header JSON and data bytes.
fn seed() -> (J, Vec<u8>) {
    let header = r#"{
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "BF16", "shape": [2, 2, 1], "data_offsets": [32, 40]},
        "d": {"dtype": "F32", "shape": [0, 5], "data_offsets": [40, 40]}
    }"#;
    let data = (0..40u8).collect();
    (J::parse(header), data)
}

/// A mutated file: header edits, a forged header length, then byte edits.
#[derive(Clone, Debug)]
struct Case {
    edits: Vec<Edit>,
    header_len: Option<Num>,
    bytes: Vec<ByteOp>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        json::edits(3),
        prop::option::weighted(0.1, num()),
        mutate::byte_ops(2),
    )
        .prop_map(|(edits, header_len, bytes)| Case {
            edits,
            header_len,
            bytes,
        })
}

fn build(seed: &(J, Vec<u8>), case: &Case) -> Vec<u8> {
    let (header, data) = seed;
    let header = json::apply_all(header, &case.edits, data.len()).text();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(data);
    if let Some(n) = case.header_len {
        let len = file.len();
        put_int(&mut file, 0, 8, n.resolve(len));
    }
    mutate::apply_all(&file, &case.bytes)
}

#[test]
fn fuzz_safetensors_header() {
    let seed = seed();
    let dir = scratch();
    let path = dir.path().join("model.safetensors");
    let name = path.display().to_string();
    let unmutated = Case {
        edits: vec![],
        header_len: None,
        bytes: vec![],
    };
    rewrite(&path, &build(&seed, &unmutated));
    let file = SafetensorsFile::open(&path).expect("the seed is valid");
    assert_eq!(file.tensors.len(), 4);
    fuzz("safetensors", 10_000, case(), |case| {
        let bytes = build(&seed, &case);
        rewrite(&path, &bytes);
        let shown = || show_bytes(&bytes, 4096);
        let opened = check_call(&name, &case, &shown, || SafetensorsFile::open(&path))?;
        if let Some(file) = opened {
            // Every accepted tensor lies inside the file.
            for (tensor, info) in &file.tensors {
                let numel: usize = info.shape.iter().product();
                let end = info.offset + numel * info.dtype.size();
                prop_assert!(
                    end <= bytes.len(),
                    "tensor {tensor} ends at {end}, past the file ({} bytes)",
                    bytes.len()
                );
            }
        }
        Ok(())
    });
}

/// The per-case check itself: a panic, an allocation over the bound and an error that does
/// not name the input each fail a case; an error naming it passes.
#[test]
fn harness_flags_panics_allocations_and_unnamed_errors() {
    let shown = || "input".to_string();
    let check = |call: &dyn Fn() -> Result<(), String>| check_call("x.bin", &"case", &shown, call);
    assert!(check(&|| panic!("boom")).is_err());
    assert!(check(&|| {
        // black_box: an unused allocation may be optimised away in release builds.
        let big = Vec::<u8>::with_capacity(fuzz_support::ALLOC_BOUND + 1);
        drop(std::hint::black_box(big));
        Ok(())
    })
    .is_err());
    assert!(check(&|| Err("bad header".into())).is_err());
    assert!(check(&|| Err("x.bin: bad header".into())).is_ok());
    assert!(check(&|| Ok(())).is_ok());
}
