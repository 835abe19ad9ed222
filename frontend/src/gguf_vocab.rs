//! A model's tokenizer as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`),
//! for the GGUF emitter.
//!
//! From a GGUF source every `tokenizer.*` key is copied as it is. From a Hugging Face
//! `tokenizer.json`, byte-level BPE tokenizers convert as llama.cpp's converter writes
//! them: model `gpt2`, the tokens in id order (rows of the embedding beyond the
//! vocabulary as `[PADn]`, unused), token types (special added tokens are control, other
//! added tokens user-defined), the merges as `"a b"`, BOS/EOS/unknown ids, BOS added
//! when `tokenizer_config.json` says so, and the chat template (`chat_template.jinja`, or
//! `tokenizer_config.json`'s). `tokenizer.ggml.pre`
//! names llama.cpp's pre-tokenizer; it is recognised from the pre-tokenizer of
//! `tokenizer.json` (GPT-2's byte-level regex, with single digits split first
//! (`smollm`), Llama 3's and Qwen2's split regexes), or given by the caller.

use std::path::Path;

use serde_json::Value;
use upmix_formats::gguf::GgufValue;
use upmix_ir::ModelMeta;

use crate::error::FrontendError;
use crate::gguf::GgufFile;

/// GGUF token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's pre-tokenizer split (`llama-bpe` in llama.cpp).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer metadata of a model with `meta`, whose embedding has `rows` rows;
/// `pre` overrides the recognised pre-tokenizer name. A model without a tokenizer is an
/// error (llama.cpp loads none without one).
pub fn gguf_tokenizer_metadata(
    meta: &ModelMeta,
    rows: usize,
    pre: Option<&str>,
) -> Result<Vec<(String, GgufValue)>, FrontendError> {
    let Some(path) = &meta.tokenizer else {
        return Err(FrontendError::Tokenizer {
            path: meta.config_file.clone().unwrap_or_default(),
            message: "the model has no tokenizer, and llama.cpp loads no GGUF without one".into(),
        });
    };
    let mut out = if path.extension().is_some_and(|e| e == "gguf") {
        let gguf = GgufFile::open(path)?;
        gguf.metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        from_tokenizer_json(path, meta, rows, pre)?
    };
    if let Some(name) = pre {
        out.retain(|(k, _)| k != "tokenizer.ggml.pre");
        out.push(("tokenizer.ggml.pre".into(), GgufValue::String(name.into())));
    }
    Ok(out)
}

/// The tokenizer metadata converted from the byte-level BPE `tokenizer.json` at `path`.
fn from_tokenizer_json(
    path: &Path,
    meta: &ModelMeta,
    rows: usize,
    pre: Option<&str>,
) -> Result<Vec<(String, GgufValue)>, FrontendError> {
    let bad = |message: String| FrontendError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("reading: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let model = &json["model"];
    let byte_level = json["decoder"]["type"] == "ByteLevel";
    if model["type"] != "BPE" || !byte_level {
        return Err(bad(
            "only byte-level BPE tokenizers (GPT-2 style) are converted to GGUF".into(),
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let (list, types) = token_table(&json, vocab, rows).map_err(bad)?;
    let merges = merges(&model["merges"]).ok_or_else(|| bad("unreadable model.merges".into()))?;
    let pre = match pre {
        Some(p) => p.to_string(),
        None => pre_tokenizer(&json["pre_tokenizer"]).ok_or_else(|| {
            bad(format!(
                "cannot tell which llama.cpp pre-tokenizer matches {}; name it (`tokenizer_pre` \
                 in the emit, `--tokenizer-pre` on the command line), e.g. \"gpt-2\"",
                json["pre_tokenizer"]
            ))
        })?,
    };
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            GgufValue::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), GgufValue::String(pre)),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(list)),
        (
            "tokenizer.ggml.token_type".to_string(),
            GgufValue::Array(types),
        ),
        (
            "tokenizer.ggml.merges".to_string(),
            GgufValue::Array(merges),
        ),
    ];
    out.extend(special_token_ids(meta, model, vocab));
    out.extend(bos_and_chat_template(path));
    Ok(out)
}

/// The tokens in id order and their GGUF token types, padded with unused `[PADn]` tokens
/// to the embedding's `rows`.
fn token_table(
    json: &Value,
    vocab: &serde_json::Map<String, Value>,
    rows: usize,
) -> Result<(Vec<GgufValue>, Vec<GgufValue>), String> {
    let mut tokens: Vec<Option<(String, i32)>> = Vec::new();
    let mut set = |id: u64, token: &str, ty: i32| {
        let id = id as usize;
        if id >= tokens.len() {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((token.to_string(), ty));
    };
    for (token, id) in vocab {
        set(id.as_u64().unwrap_or(u64::MAX >> 1), token, NORMAL);
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let ty = match added["special"].as_bool() {
            Some(true) => CONTROL,
            _ => USER_DEFINED,
        };
        set(id, content, ty);
    }
    if tokens.len() > rows {
        return Err(format!(
            "{} tokens, but the embedding has only {rows} rows",
            tokens.len()
        ));
    }
    tokens.resize(rows, None);
    let (mut list, mut types) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (i, t) in tokens.into_iter().enumerate() {
        let (token, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        list.push(GgufValue::String(token));
        types.push(GgufValue::I32(ty));
    }
    Ok((list, types))
}

/// The BOS, EOS and unknown token ids that are known, as `tokenizer.ggml.*_token_id`.
fn special_token_ids(
    meta: &ModelMeta,
    model: &Value,
    vocab: &serde_json::Map<String, Value>,
) -> Vec<(String, GgufValue)> {
    let id = |key: &str, v: Option<u32>| v.map(|v| (key.to_string(), GgufValue::U32(v)));
    let unknown = model["unk_token"]
        .as_str()
        .and_then(|t| vocab.get(t))
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    let mut out = Vec::new();
    out.extend(id("tokenizer.ggml.bos_token_id", meta.bos_token_id));
    out.extend(id("tokenizer.ggml.eos_token_id", meta.eos_token_id));
    out.extend(id("tokenizer.ggml.unknown_token_id", unknown));
    out
}

/// `tokenizer.ggml.add_bos_token` and, when there is one, `tokenizer.chat_template`, from
/// the files beside the `tokenizer.json` at `path`.
fn bos_and_chat_template(path: &Path) -> Vec<(String, GgufValue)> {
    let config = tokenizer_config(path);
    let add_bos = config["add_bos_token"].as_bool().unwrap_or(false);
    let mut out = vec![(
        "tokenizer.ggml.add_bos_token".into(),
        GgufValue::Bool(add_bos),
    )];
    // transformers 5 saves the template as chat_template.jinja beside the tokenizer.
    let jinja = std::fs::read_to_string(path.with_file_name("chat_template.jinja")).ok();
    if let Some(template) = jinja.or_else(|| chat_template(&config["chat_template"])) {
        out.push((
            "tokenizer.chat_template".into(),
            GgufValue::String(template),
        ));
    }
    out
}

/// Merges as `"a b"`, from strings or from pairs.
fn merges(v: &Value) -> Option<Vec<GgufValue>> {
    let Some(list) = v.as_array() else {
        return Some(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Some(GgufValue::String(s.clone())),
            Value::Array(pair) => match &pair[..] {
                [Value::String(a), Value::String(b)] => Some(GgufValue::String(format!("{a} {b}"))),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// llama.cpp's name of a `tokenizer.json` pre-tokenizer, if known.
fn pre_tokenizer(pre: &Value) -> Option<String> {
    let steps: Vec<&Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kind = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    let byte_level_regex = |v: &Value| kind(v) == "ByteLevel" && v["use_regex"] != false;
    let split = |v: &Value| {
        (kind(v) == "Split")
            .then(|| v["pattern"]["Regex"].as_str().map(str::to_string))
            .flatten()
    };
    let name = match &steps[..] {
        [b] if byte_level_regex(b) => "gpt-2",
        [d, b] if kind(d) == "Digits" && d["individual_digits"] == true && byte_level_regex(b) => {
            "smollm"
        }
        [s, b] if kind(b) == "ByteLevel" => match split(s)?.as_str() {
            LLAMA3_SPLIT => "llama-bpe",
            QWEN2_SPLIT => "qwen2",
            _ => return None,
        },
        _ => return None,
    };
    Some(name.to_string())
}

/// `tokenizer_config.json` beside `tokenizer.json`, or null.
fn tokenizer_config(tokenizer: &Path) -> Value {
    let path = tokenizer.with_file_name("tokenizer_config.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// A chat template: a string, or the `default` of a list of named templates.
fn chat_template(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    }
}
