//! Fuzz test of `tokenizer.json` loading: `TextTokenizer::load` on mutations of
//! tests/golden/models/llama/tokenizer.json (vocabulary ids and merges replaced by extreme
//! numbers or wrong types, component types switched, deep nesting, duplicate keys, byte
//! edits), then encoding and decoding a string. Every case must return `Ok` or an error
//! naming the file, without a panic or an allocation beyond the bound.

mod fuzz_support;

use std::path::Path;

use upmix_frontend::TextTokenizer;

use fuzz_support::json::{self, J};
use fuzz_support::{check_call, fuzz, rewrite, scratch, show_bytes, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Parts that turn the golden tokenizer (byte-level BPE without merges) into the second
/// seed: added tokens, a normalizer, a digit-splitting pre-tokenizer, merges and a
/// template post-processor, so that edits reach those components too.
const RICH: &str = r#"{
    "added_tokens": [
        {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
         "normalized": false, "special": true},
        {"id": 259, "content": "<|user|>", "single_word": true, "lstrip": true,
         "rstrip": true, "normalized": true, "special": false}
    ],
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip",
        "strip_left": false, "strip_right": true}]},
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
    "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
    "merges": [["H", "e"], ["l", "l"], ["He", "ll"]]
}"#;

/// The golden tokenizer, and the same with [`RICH`]'s parts (merges go into the model,
/// their results into the vocabulary).
fn seeds(golden: J) -> [J; 2] {
    let mut rich = golden.clone();
    let (J::Obj(entries), J::Obj(parts)) = (&mut rich, J::parse(RICH)) else {
        panic!("tokenizer.json is an object");
    };
    for (key, value) in parts {
        if key == "merges" {
            let Some((_, J::Obj(model))) = entries.iter_mut().find(|(k, _)| k == "model") else {
                panic!("tokenizer.json has a model");
            };
            for (k, v) in model.iter_mut() {
                match (k.as_str(), v) {
                    ("merges", v) => *v = value.clone(),
                    ("vocab", J::Obj(vocab)) => {
                        vocab.push(("He".into(), J::Raw("256".into())));
                        vocab.push(("ll".into(), J::Raw("257".into())));
                        vocab.push(("Hell".into(), J::Raw("258".into())));
                    }
                    _ => {}
                }
            }
        } else if let Some(slot) = entries.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        }
    }
    [golden, rich]
}

#[test]
fn fuzz_tokenizer_json() {
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models/llama/tokenizer.json");
    let seeds = seeds(J::parse(
        &std::fs::read_to_string(golden).expect("golden tokenizer.json"),
    ));
    let dir = scratch();
    let path = dir.path().join("tokenizer.json");
    let name = path.display().to_string();
    for seed in &seeds {
        rewrite(&path, seed.text().as_bytes());
        let tokenizer = TextTokenizer::load(&path).expect("seed tokenizers load");
        tokenizer
            .encode("Hello 42", true)
            .expect("seed tokenizers encode");
    }
    fuzz("tokenizer.json", 5000, json::case(2, 3), |case| {
        let bytes = case.render(&seeds);
        rewrite(&path, &bytes);
        let shown = || show_bytes(&bytes, 8192);
        check_call(&name, &case, &shown, || {
            let tokenizer = TextTokenizer::load(&path)?;
            let ids = tokenizer.encode("Hello, world! 42 ünïcode", true)?;
            tokenizer.decode(&ids)
        })?;
        Ok(())
    });
}
