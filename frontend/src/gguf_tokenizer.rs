//! A tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! `gpt2` models (byte-level BPE) become a `tokenizers` BPE model with the file's
//! vocabulary and merges, the byte-level decoder, and the control tokens (token type 3) as
//! special added tokens; a leading BOS is added when `tokenizer.ggml.add_bos_token` says
//! so. The pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp does: `smollm` splits
//! every digit before the GPT-2 regex. (Hugging Face transformers' GGUF converter skips
//! that digit split, so the two differ on whitespace directly before a digit, e.g.
//! `"a  9"`; they agree on ordinary text.)

use serde_json::{json, Value};

use crate::error::FrontendError;
use crate::gguf::GgufFile;

/// GGUF token type of control tokens.
const CONTROL: u64 = 3;
/// GGUF token type of user-defined tokens.
const USER_DEFINED: u64 = 4;

/// The `tokenizer.json` text equivalent to the GGUF's embedded tokenizer.
pub(crate) fn tokenizer_json(gguf: &GgufFile) -> Result<String, FrontendError> {
    let bad = |message: String| FrontendError::Tokenizer {
        path: gguf.path().to_path_buf(),
        message,
    };
    let model = gguf
        .require("tokenizer.ggml.model")?
        .as_str()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
        )));
    }
    let tokens = gguf.strings("tokenizer.ggml.tokens")?;
    let merges = gguf.strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = match gguf.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default(),
        None => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let merges = merge_pairs(&merges).map_err(bad)?;
    let added = added_tokens(&tokens, &types);
    let pre_tokenizer = pre_tokenizer(gguf).map_err(bad)?;
    let post_processor = post_processor(gguf, &tokens);
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    });
    Ok(doc.to_string())
}

/// The merges as `[a, b]` pairs, split from the GGUF's `"a b"` strings.
fn merge_pairs(merges: &[&str]) -> Result<Vec<Value>, String> {
    merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(format!("merge `{m}` is not two space-separated tokens")),
        })
        .collect()
}

/// The control and user-defined tokens as `added_tokens` entries (control ones special).
fn added_tokens(tokens: &[&str], types: &[u64]) -> Vec<Value> {
    tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .enumerate()
        .filter(|(_, (_, ty))| **ty == CONTROL || **ty == USER_DEFINED)
        .map(|(i, (t, ty))| {
            json!({
                "id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": *ty != CONTROL, "special": *ty == CONTROL,
            })
        })
        .collect()
}

/// The pre-tokenizer that `tokenizer.ggml.pre` names, or why it is not supported.
fn pre_tokenizer(gguf: &GgufFile) -> Result<Value, String> {
    let add_prefix_space = gguf
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true});
    let pre = gguf
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level,
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level,
        ]}),
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (supported: default, gpt2, smollm)"
            ))
        }
    })
}

/// The post-processor: a leading BOS when `tokenizer.ggml.add_bos_token` asks for one,
/// byte-level otherwise.
fn post_processor(gguf: &GgufFile, tokens: &[&str]) -> Value {
    match (
        gguf.get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool()),
        gguf.get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64()),
    ) {
        (Some(true), Some(bos)) => {
            let bos_text = tokens.get(bos as usize).copied().unwrap_or_default();
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos_text, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_text: {"id": bos_text, "ids": [bos], "tokens": [bos_text]}},
            })
        }
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    }
}
