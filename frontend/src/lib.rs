//! upmix-frontend: checkpoints into the IR.
//!
//! Hugging Face checkpoint directories (config.json + safetensors, sharded or not) and GGUF
//! files load into a [`upmix_ir::Module`] as graphs whose weights point into memory-mapped
//! files; tensor bytes are read only when a weight is materialised. Tensor and
//! architecture names of each format live in the `upmix-formats` name tables, which the
//! emitters read too.

mod config;
mod decoder;
mod error;
pub mod gguf;
mod gguf_model;
mod gguf_tokenizer;
mod gguf_vocab;
mod hf;
mod safetensors;
mod tokenizer;

pub use config::{HfConfig, RopeParams};
pub use error::FrontendError;
pub use gguf::{GgufFile, GgufTensor};
pub use gguf_model::load_gguf;
pub use gguf_vocab::gguf_tokenizer_metadata;
pub use hf::load_hf;
pub use safetensors::{SafetensorsFile, TensorInfo};
pub use tokenizer::TextTokenizer;
pub use upmix_formats::gguf::GgufValue;

use std::path::Path;

/// Loads the checkpoint at `path` into `module` as the graph `name`, picking the format
/// from what is on disk.
pub fn load(path: &Path, name: &str, module: &mut upmix_ir::Module) -> Result<(), FrontendError> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path, name, module)
    } else {
        load_hf(path, name, module)
    }
}

/// The layer count a checkpoint declares (`num_hidden_layers` of an HF config, a GGUF
/// file's `block_count`), read from its header alone; `None` when it cannot be read
/// (loading the checkpoint then says why).
pub fn layer_count(path: &Path) -> Option<usize> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let gguf = GgufFile::open(path).ok()?;
        let arch = gguf.get("general.architecture")?.as_str()?.to_string();
        gguf.get(&format!("{arch}.block_count"))?
            .as_u64()
            .map(|n| n as usize)
    } else {
        HfConfig::read(&path.join("config.json"))
            .ok()
            .map(|c| c.num_hidden_layers)
    }
}
