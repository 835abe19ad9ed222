//! Text <-> token ids through a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`).

use std::path::{Path, PathBuf};

use crate::error::FrontendError;

/// A loaded tokenizer.
pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a file, or from a checkpoint directory.
    pub fn load(path: &Path) -> Result<TextTokenizer, FrontendError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner =
            tokenizers::Tokenizer::from_file(&file).map_err(|e| FrontendError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
        Ok(TextTokenizer { path: file, inner })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, FrontendError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, FrontendError> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    fn error(&self, e: tokenizers::Error) -> FrontendError {
        FrontendError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}
