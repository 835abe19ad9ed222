//! Fuzz test of the RON pipeline parser (`Pipeline::parse`) on mutations of the example
//! pipelines (examples/*.ron and the one in src/pipeline/mod.rs's docs): tokens replaced by
//! extreme numbers, values of the wrong type or stray delimiters, tokens deleted, lines
//! duplicated (duplicate fields and map keys), deep nesting, byte edits. Every case must
//! return `Ok` or an error that starts with `origin:line:col:`, without a panic or an
//! allocation beyond the bound.

#[path = "../frontend/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::path::Path;

use proptest::prelude::*;
use upmix::pipeline::Pipeline;

use fuzz_support::mutate::{self, num, ByteOp, Num};
use fuzz_support::{check_call, fuzz, show_bytes, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const DOC_EXAMPLE: &str = r#"Pipeline(
    device: "cpu",
    models: { "a": Hf("models/a"), "b": Gguf("models/b.gguf") },
    passes: [ Merge(into: "merged", models: ["a", "b"], weights: [0.3, 0.7]),
              Cast(model: "merged", dtype: "bf16") ],
    eval: [ Perplexity(model: "merged", text: "data/sample.txt", window: 64),
            Generate(model: "merged", prompt: "Hi", max_new_tokens: Some(4)) ],
    emit: [ Hf(model: "merged", dir: "out/merged", max_shard_mb: 1, moe_layout: "fused") ],
)"#;

/// Texts that replace a token.
const REPLACEMENTS: &[&str] = &[
    "18446744073709551616",
    "-1",
    "-9223372036854775809",
    "1e400",
    "NaN",
    "inf",
    "0x",
    "\"\"",
    "\"\\u{d800}\"",
    "\"unterminated",
    "r#\"raw\"#",
    "b\"bytes\"",
    "'c'",
    "[]",
    "{}",
    "()",
    "None",
    "Some(",
    "Some(())",
    "true",
    "Hf",
    "Upcycle",
    "Pipeline",
    ":",
    ",",
    ")",
    "]",
    "}",
    "/*",
    "//",
    "#![enable(implicit_some)]",
];

/// Token spans of a RON text: identifiers/numbers, strings, and single delimiters.
fn tokens(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        match b[i] {
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                while !text.is_char_boundary(i) {
                    i += 1;
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"_.-".contains(&b[i])) {
                    i += 1;
                }
            }
            _ => i += text[i..].chars().next().map_or(1, char::len_utf8),
        }
        out.push((start, i));
    }
    out
}

/// A token-level edit; tokens and lines are picked modulo their count.
#[derive(Clone, Debug)]
enum TokenOp {
    Replace(usize, usize),
    Number(usize, Num),
    Delete(usize),
    DuplicateLine(usize),
    /// Opens `depth` brackets of one kind (`[`, `(`, `{`, `Some(`) before the token.
    Nest(usize, u16, u8),
}

fn token_op() -> impl Strategy<Value = TokenOp> {
    let t = any::<usize>();
    prop_oneof![
        4 => (t, any::<usize>()).prop_map(|(t, r)| TokenOp::Replace(t, r)),
        3 => (t, num()).prop_map(|(t, n)| TokenOp::Number(t, n)),
        2 => t.prop_map(TokenOp::Delete),
        2 => t.prop_map(TokenOp::DuplicateLine),
        1 => (t, 1u16..2000, 0u8..4).prop_map(|(t, d, k)| TokenOp::Nest(t, d, k)),
    ]
}

impl TokenOp {
    fn apply(&self, text: &str) -> String {
        let toks = tokens(text);
        let splice = |i: usize, with: &str| {
            let (s, e) = toks[i % toks.len()];
            format!("{}{with}{}", &text[..s], &text[e..])
        };
        if toks.is_empty() {
            return text.to_string();
        }
        match self {
            TokenOp::Replace(i, r) => splice(*i, REPLACEMENTS[r % REPLACEMENTS.len()]),
            TokenOp::Number(i, n) => splice(*i, &n.resolve(text.len()).to_string()),
            TokenOp::Delete(i) => splice(*i, ""),
            TokenOp::DuplicateLine(i) => {
                let lines: Vec<&str> = text.lines().collect();
                let i = i % lines.len();
                let mut out: Vec<&str> = lines[..=i].to_vec();
                out.extend(&lines[i..]);
                out.join("\n")
            }
            TokenOp::Nest(i, depth, kind) => {
                let open = ["[", "(", "{", "Some("][*kind as usize % 4];
                let (s, _) = toks[i % toks.len()];
                format!(
                    "{}{}{}",
                    &text[..s],
                    open.repeat(*depth as usize),
                    &text[s..]
                )
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    seed: usize,
    tokens: Vec<TokenOp>,
    bytes: Vec<ByteOp>,
}

fn case(n_seeds: usize) -> impl Strategy<Value = Case> {
    (
        0..n_seeds,
        prop::collection::vec(token_op(), 0..=3),
        mutate::byte_ops(2),
    )
        .prop_map(|(seed, tokens, bytes)| Case {
            seed,
            tokens,
            bytes,
        })
}

/// Whether `error` starts with `origin:line:col:`.
fn has_position(error: &str, origin: &str) -> bool {
    let Some(rest) = error.strip_prefix(origin).and_then(|r| r.strip_prefix(':')) else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let number =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    number(parts.next()) && number(parts.next()) && parts.next().is_some()
}

#[test]
fn fuzz_pipeline_ron() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seeds = vec![DOC_EXAMPLE.to_string()];
    for f in [
        "merge.ron",
        "upcycle.ron",
        "cohere2.ron",
        "quantize-smollm2.ron",
        "quantize-dtm-smollm2.ron",
        "btx.ron",
    ] {
        seeds.push(std::fs::read_to_string(examples.join(f)).expect("example pipeline"));
    }
    for seed in &seeds {
        Pipeline::parse(seed, Path::new("seed.ron")).expect("seeds parse");
    }
    let origin = Path::new("fuzz/pipeline.ron");
    let name = origin.display().to_string();
    fuzz("pipeline", 10_000, case(seeds.len()), |case| {
        let mut text = seeds[case.seed].clone();
        for op in &case.tokens {
            text = op.apply(&text);
        }
        let bytes = mutate::apply_all(text.as_bytes(), &case.bytes);
        let text = String::from_utf8_lossy(&bytes);
        let shown = || show_bytes(text.as_bytes(), 8192);
        check_call(&name, &case, &shown, || {
            Pipeline::parse(&text, origin).map_err(|e| {
                let e = e.to_string();
                if has_position(&e, &name) {
                    e
                } else {
                    format!(
                        "no `origin:line:col:` prefix: {}",
                        e.replace(&name, "<origin>")
                    )
                }
            })
        })?;
        Ok(())
    });
}
