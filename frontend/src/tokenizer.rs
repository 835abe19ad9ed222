//! Text <-> token ids: a checkpoint's `tokenizer.json`, or the tokenizer a GGUF file
//! embeds, through Hugging Face's `tokenizers`; chat templates rendered with minijinja.

use std::path::{Path, PathBuf};

use crate::error::{io, FrontendError};
use crate::gguf::GgufFile;

/// A loaded tokenizer.
pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
}

impl TextTokenizer {
    /// Loads a tokenizer from a `tokenizer.json`, a checkpoint directory holding one, or a
    /// GGUF file.
    pub fn load(path: &Path) -> Result<TextTokenizer, FrontendError> {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Self::from_gguf(&GgufFile::open(path)?);
        }
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let json = std::fs::read_to_string(&file).map_err(io(&file))?;
        // `tokenizers` panics on some malformed JSON (e.g. a syntax error inside
        // `decoder`), so the syntax is checked first, for an error with a line and column.
        serde_json::from_str::<serde::de::IgnoredAny>(&json).map_err(|e| {
            FrontendError::Tokenizer {
                path: file.clone(),
                message: format!("not valid JSON: {e}"),
            }
        })?;
        let inner = guarded(&file, "loading", || json.parse::<tokenizers::Tokenizer>())?;
        // transformers keeps the chat template and special tokens beside tokenizer.json.
        let dir = file.parent().unwrap_or(Path::new("")).to_path_buf();
        let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let text = |k: &str| match &config[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        };
        let chat_template = chat_template(&dir, &config)?;
        Ok(TextTokenizer {
            path: file,
            inner,
            chat_template,
            bos: text("bos_token"),
            eos: text("eos_token"),
        })
    }

    /// The tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TextTokenizer, FrontendError> {
        let json = crate::gguf_tokenizer::tokenizer_json(gguf)?;
        let inner = guarded(gguf.path(), "loading", || {
            json.parse::<tokenizers::Tokenizer>()
        })?;
        let token = |k: &str| {
            let id = gguf.get(k)?.as_u64()?;
            inner.id_to_token(id as u32)
        };
        Ok(TextTokenizer {
            path: gguf.path().to_path_buf(),
            chat_template: gguf
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            bos: token("tokenizer.ggml.bos_token_id"),
            eos: token("tokenizer.ggml.eos_token_id"),
            inner,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, FrontendError> {
        let enc = guarded(&self.path, "encoding", || {
            self.inner.encode(text, add_special_tokens)
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String, FrontendError> {
        guarded(&self.path, "decoding", || self.inner.decode(ids, false))
    }

    /// The model's chat template (Jinja), if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` (role, content) with the chat template, ending with the
    /// assistant's turn opened when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String, FrontendError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| self.error("the tokenizer has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template)
            .map_err(|e| self.error(format!("chat template: {e}")))?;
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| minijinja::context! { role => role, content => content })
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos.clone().unwrap_or_default(),
                    eos_token => self.eos.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| self.error(format!("chat template: {e}")))
    }

    fn error(&self, message: String) -> FrontendError {
        FrontendError::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }
}

/// The chat template saved beside a `tokenizer.json`, where transformers looks for it:
/// `chat_template.jinja` (transformers 5), then `chat_template.json`, then the
/// `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates
/// of which `default` is used).
fn chat_template(dir: &Path, config: &serde_json::Value) -> Result<Option<String>, FrontendError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(io(&jinja));
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        let text = std::fs::read_to_string(&json).map_err(io(&json))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| FrontendError::Tokenizer {
                path: json.clone(),
                message: e.to_string(),
            })?;
        return match value["chat_template"].as_str() {
            Some(t) => Ok(Some(t.to_string())),
            None => Err(FrontendError::Tokenizer {
                path: json,
                message: "no string field `chat_template`".into(),
            }),
        };
    }
    Ok(match &config["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}

/// Calls into `tokenizers` for the tokenizer from `path`, turning its error, or a panic
/// (it panics on some malformed tokenizer definitions instead of returning an error), into
/// an error naming the file. `what` says what was being done.
fn guarded<T>(
    path: &Path,
    what: &str,
    call: impl FnOnce() -> tokenizers::Result<T>,
) -> Result<T, FrontendError> {
    let error = |message: String| FrontendError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error(e.to_string())),
        Err(panic) => {
            let message = upmix_ir::panic_message(&*panic).unwrap_or_default();
            Err(error(format!(
                "the tokenizers library failed {what} it: {message}"
            )))
        }
    }
}
