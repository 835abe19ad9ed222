//! Fuzz tests of the GGUF reader: `GgufFile::open`, `upmix_frontend::load` (which goes on
//! to build the model from the metadata and tensor infos) and `TextTokenizer::from_gguf`
//! (the embedded tokenizer), on mutations of three seeds: tiny `llama` and `qwen2` models
//! with a byte-level BPE tokenizer, built here, and tests/golden/gguf/quants.gguf.
//!
//! Mutations are mostly structure-aware: a walker finds every field of the seed (counts,
//! key/string/array lengths, value and array item types, scalar values, n_dims, dims, ggml
//! types, offsets) and one is set to an extreme value, a value just past the end of the
//! file, or a small one; byte edits follow. Every case must return `Ok` or an error naming
//! the file, without a panic or an allocation beyond the bound.

mod fuzz_support;

use proptest::prelude::*;
use upmix_frontend::{GgufFile, TextTokenizer};
use upmix_ir::Module;

use fuzz_support::mutate::{self, num, put_int, ByteOp, Num};
use fuzz_support::{check_call, fuzz, rewrite, scratch, show_bytes, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Metadata value type ids.
const U8: u32 = 0;
const I8: u32 = 1;
const U16: u32 = 2;
const I16: u32 = 3;
const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U64: u32 = 10;
const I64: u32 = 11;
const F64: u32 = 12;

/// A GGUF file under construction.
#[derive(Default)]
struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, usize)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl Writer {
    /// A key with a raw value of type `ty`.
    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.n_kv += 1;
        self
    }

    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, U32, &v.to_le_bytes())
    }

    fn string(&mut self, key: &str, v: &str) -> &mut Self {
        let mut b = Vec::new();
        put_str(&mut b, v);
        self.kv(key, STRING, &b)
    }

    fn array(&mut self, key: &str, item: u32, items: &[Vec<u8>]) -> &mut Self {
        let mut b = item.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        items.iter().for_each(|i| b.extend(i));
        self.kv(key, ARRAY, &b)
    }

    /// A tensor of ggml type `ty` with GGUF dims (innermost first) taking `nbytes`.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, nbytes: usize) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, nbytes));
        self
    }

    fn finish(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kv);
        let mut offset = 0usize;
        for (name, dims, ty, nbytes) in &self.tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
            offset += nbytes.div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend((0..offset).map(|i| (i * 7 % 251) as u8));
        b
    }
}

/// Bytes of `n` elements of ggml type `ty` (F32, F16, Q4_0, Q4_1, Q8_0, BF16).
fn nbytes(ty: u32, n: u64) -> usize {
    let n = n as usize;
    match ty {
        0 => n * 4,
        1 | 30 => n * 2,
        2 => n / 32 * 18,
        3 => n / 32 * 20,
        8 => n / 32 * 34,
        _ => unreachable!("type {ty} not used by the seeds"),
    }
}

/// A gpt2 (byte-level BPE) tokenizer of 16 tokens, with a chat template.
fn tokenizer(w: &mut Writer) {
    let tokens = [
        "<s>", "</s>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "4", "he", "ll", "hell", "hello",
        "Ġw",
    ];
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"];
    let strings = |s: &[&str]| -> Vec<Vec<u8>> {
        s.iter()
            .map(|t| {
                let mut b = Vec::new();
                put_str(&mut b, t);
                b
            })
            .collect()
    };
    let types: Vec<Vec<u8>> = (0..tokens.len())
        .map(|i| (if i < 2 { 3i32 } else { 1 }).to_le_bytes().to_vec())
        .collect();
    w.string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", "smollm")
        .array("tokenizer.ggml.tokens", STRING, &strings(&tokens))
        .array("tokenizer.ggml.merges", STRING, &strings(&merges))
        .array("tokenizer.ggml.token_type", I32, &types)
        .u32("tokenizer.ggml.bos_token_id", 0)
        .u32("tokenizer.ggml.eos_token_id", 1)
        .kv("tokenizer.ggml.add_bos_token", BOOL, &[1])
        .string(
            "tokenizer.chat_template",
            "{{ bos_token }}{{ messages[0].content }}",
        );
}

/// A one-layer model (hidden 32, 4 heads of 8, 2 KV heads, FFN 64, vocab 16) of
/// architecture `arch`, with a gpt2 tokenizer and one key of every value type.
fn model(arch: &str) -> Vec<u8> {
    let mut w = Writer::default();
    let k = |s: &str| format!("{arch}.{s}");
    w.string("general.architecture", arch)
        .u32("general.alignment", 32)
        .u32(&k("block_count"), 1)
        .u32(&k("context_length"), 128)
        .u32(&k("embedding_length"), 32)
        .u32(&k("feed_forward_length"), 64)
        .u32(&k("attention.head_count"), 4)
        .u32(&k("attention.head_count_kv"), 2)
        .u32(&k("attention.key_length"), 8)
        .kv(
            &k("attention.layer_norm_rms_epsilon"),
            F32,
            &1e-5f32.to_le_bytes(),
        )
        .kv(&k("rope.freq_base"), F32, &1e4f32.to_le_bytes())
        .string(&k("rope.scaling.type"), "linear")
        .kv(&k("rope.scaling.factor"), F64, &2f64.to_le_bytes());
    tokenizer(&mut w);
    w.kv("fuzz.u8", U8, &[7])
        .kv("fuzz.i8", I8, &[0xff])
        .kv("fuzz.u16", U16, &[1, 2])
        .kv("fuzz.i16", I16, &[0xff, 0xff])
        .kv("fuzz.u64", U64, &9u64.to_le_bytes())
        .kv("fuzz.i64", I64, &(-9i64).to_le_bytes())
        .array(
            "fuzz.nested",
            ARRAY,
            &[{
                let mut inner = U8.to_le_bytes().to_vec();
                inner.extend(2u64.to_le_bytes());
                inner.extend([1, 2]);
                inner
            }],
        );
    let mut t = |name: &str, dims: &[u64], ty: u32| {
        w.tensor(name, dims, ty, nbytes(ty, dims.iter().product()));
    };
    t("token_embd.weight", &[32, 16], 1);
    t("output_norm.weight", &[32], 0);
    t("output.weight", &[32, 16], 8);
    t("blk.0.attn_norm.weight", &[32], 0);
    t("blk.0.ffn_norm.weight", &[32], 0);
    t("blk.0.attn_q.weight", &[32, 32], 2);
    t("blk.0.attn_k.weight", &[32, 16], 1);
    t("blk.0.attn_v.weight", &[32, 16], 30);
    t("blk.0.attn_output.weight", &[32, 32], 0);
    t("blk.0.ffn_gate.weight", &[32, 64], 3);
    t("blk.0.ffn_up.weight", &[32, 64], 8);
    t("blk.0.ffn_down.weight", &[64, 32], 1);
    if arch == "qwen2" {
        t("blk.0.attn_q.bias", &[32], 0);
        t("blk.0.attn_k.bias", &[16], 0);
        t("blk.0.attn_v.bias", &[16], 0);
    }
    w.finish()
}

/// What a field of a GGUF file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Version,
    TensorCount,
    KvCount,
    StrLen,
    ValueType,
    ArrayType,
    ArrayLen,
    Scalar,
    NDims,
    Dim,
    GgmlType,
    Offset,
}

const KINDS: &[Kind] = &[
    Kind::Version,
    Kind::TensorCount,
    Kind::KvCount,
    Kind::StrLen,
    Kind::ValueType,
    Kind::ArrayType,
    Kind::ArrayLen,
    Kind::Scalar,
    Kind::NDims,
    Kind::Dim,
    Kind::GgmlType,
    Kind::Offset,
];

/// A field: where it is, how wide, what it holds.
#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

/// Walks a valid GGUF file, listing its fields and where the tensor names are.
struct Walker<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
    names: Vec<(usize, usize)>,
}

impl Walker<'_> {
    fn field(&mut self, width: usize, kind: Kind) -> u64 {
        self.fields.push(Field {
            at: self.pos,
            width,
            kind,
        });
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&self.b[self.pos..self.pos + width]);
        self.pos += width;
        u64::from_le_bytes(v)
    }

    /// Skips a string, returning its bytes' range.
    fn string(&mut self) -> (usize, usize) {
        let len = self.field(8, Kind::StrLen) as usize;
        self.pos += len;
        (self.pos - len, self.pos)
    }

    fn value(&mut self, ty: u64) {
        match ty as u32 {
            U8 | I8 | BOOL => _ = self.field(1, Kind::Scalar),
            U16 | I16 => _ = self.field(2, Kind::Scalar),
            U32 | I32 | F32 => _ = self.field(4, Kind::Scalar),
            U64 | I64 | F64 => _ = self.field(8, Kind::Scalar),
            STRING => _ = self.string(),
            ARRAY => {
                let item = self.field(4, Kind::ArrayType);
                let len = self.field(8, Kind::ArrayLen);
                (0..len).for_each(|_| self.value(item));
            }
            other => panic!("seed has value type {other}"),
        }
    }

    fn walk(b: &[u8]) -> Walker<'_> {
        let mut w = Walker {
            b,
            pos: 4,
            fields: Vec::new(),
            names: Vec::new(),
        };
        w.field(4, Kind::Version);
        let n_tensors = w.field(8, Kind::TensorCount);
        let n_kv = w.field(8, Kind::KvCount);
        for _ in 0..n_kv {
            w.string();
            let ty = w.field(4, Kind::ValueType);
            w.value(ty);
        }
        for _ in 0..n_tensors {
            let name = w.string();
            w.names.push(name);
            let n_dims = w.field(4, Kind::NDims);
            (0..n_dims).for_each(|_| _ = w.field(8, Kind::Dim));
            w.field(4, Kind::GgmlType);
            w.field(8, Kind::Offset);
        }
        w
    }
}

/// A seed, its fields and the byte ranges of its tensor names.
struct Seed {
    bytes: Vec<u8>,
    fields: Vec<Field>,
    names: Vec<(usize, usize)>,
}

fn seeds() -> Vec<Seed> {
    let quants =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/gguf/quants.gguf");
    let quants = std::fs::read(&quants).expect("tests/golden/gguf/quants.gguf");
    [model("llama"), model("qwen2"), quants]
        .into_iter()
        .map(|bytes| {
            let Walker { fields, names, .. } = Walker::walk(&bytes);
            Seed {
                bytes,
                fields,
                names,
            }
        })
        .collect()
}

/// Sets the `idx`-th field of `kind` (of any kind if the seed has none) to `value`.
#[derive(Clone, Debug)]
struct FieldEdit {
    kind: Kind,
    idx: usize,
    value: Num,
}

#[derive(Clone, Debug)]
struct Case {
    seed: usize,
    fields: Vec<FieldEdit>,
    /// Tensor `.0` renamed to tensor `.1`'s name, where both names have one length.
    rename: Option<(usize, usize)>,
    bytes: Vec<ByteOp>,
}

fn case(n_seeds: usize) -> impl Strategy<Value = Case> {
    let edit = (prop::sample::select(KINDS), any::<usize>(), num())
        .prop_map(|(kind, idx, value)| FieldEdit { kind, idx, value });
    (
        0..n_seeds,
        prop::collection::vec(edit, 0..=4),
        prop::option::weighted(0.05, (any::<usize>(), any::<usize>())),
        mutate::byte_ops(2),
    )
        .prop_map(|(seed, fields, rename, bytes)| Case {
            seed,
            fields,
            rename,
            bytes,
        })
}

fn build(seeds: &[Seed], case: &Case) -> Vec<u8> {
    let seed = &seeds[case.seed];
    let mut bytes = seed.bytes.clone();
    if let Some((to, from)) = case.rename {
        let n = seed.names.len();
        let ((to, to_end), (from, from_end)) = (seed.names[to % n], seed.names[from % n]);
        if to_end - to == from_end - from {
            bytes.copy_within(from..from_end, to);
        }
    }
    for e in &case.fields {
        let of_kind: Vec<&Field> = seed.fields.iter().filter(|f| f.kind == e.kind).collect();
        let f = match of_kind.len() {
            0 => &seed.fields[e.idx % seed.fields.len()],
            n => of_kind[e.idx % n],
        };
        let len = bytes.len();
        put_int(&mut bytes, f.at, f.width, e.value.resolve(len));
    }
    mutate::apply_all(&bytes, &case.bytes)
}

/// Runs `call` on every mutated file, written to `model.gguf` in a scratch directory,
/// mutating the first `n_seeds` seeds (all of which `call` must accept unmutated).
fn fuzz_gguf<T>(
    parser: &str,
    cases: u32,
    n_seeds: usize,
    call: impl Fn(&std::path::Path) -> Result<T, upmix_frontend::FrontendError>,
) {
    let seeds = seeds();
    let dir = scratch();
    let path = dir.path().join("model.gguf");
    let name = path.display().to_string();
    for (i, seed) in seeds[..n_seeds].iter().enumerate() {
        rewrite(&path, &seed.bytes);
        if let Err(e) = call(&path) {
            panic!("{parser}: seed {i} is rejected: {e}");
        }
    }
    fuzz(parser, cases, case(n_seeds), |case| {
        let bytes = build(&seeds, &case);
        rewrite(&path, &bytes);
        let shown = || show_bytes(&bytes, 4096);
        check_call(&name, &case, &shown, || call(&path))?;
        Ok(())
    });
}

#[test]
fn fuzz_gguf_open() {
    fuzz_gguf("gguf-open", 10_000, 3, GgufFile::open);
}

#[test]
fn fuzz_gguf_load() {
    // quants.gguf has no model to load.
    fuzz_gguf("gguf-load", 8000, 2, |path| {
        upmix_frontend::load(path, "m", &mut Module::new())
    });
}

#[test]
fn fuzz_gguf_tokenizer() {
    // The two built seeds carry a tokenizer; quants.gguf does not.
    fuzz_gguf("gguf-tokenizer", 5000, 2, |path| {
        let tokenizer = TextTokenizer::from_gguf(&GgufFile::open(path)?)?;
        let ids = tokenizer.encode("hello world 42 <s>", true)?;
        tokenizer.decode(&ids)?;
        if tokenizer.chat_template().is_some() {
            tokenizer.apply_chat_template(&[("user", "hello")], true)?;
        }
        Ok(())
    });
}
