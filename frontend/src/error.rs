//! Frontend errors: every variant names the file, tensor or field at fault.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: not a valid GGUF file: {message}", path.display())]
    Gguf { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: unknown architecture `{arch}`; supported: {}", path.display(), supported.join(", "))]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        supported: Vec<String>,
    },
    #[error("{}: tensor `{tensor}` is missing from the checkpoint", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor `{tensor}` has shape {found:?}, the config implies {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}: not a checkpoint: expected a .gguf file or a directory with config.json and model.safetensors (or model.safetensors.index.json)", path.display())]
    NotACheckpoint { path: PathBuf },
    #[error(transparent)]
    Weight(#[from] upmix_ir::WeightError),
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FrontendError + '_ {
    move |source| FrontendError::Io {
        path: path.to_path_buf(),
        source,
    }
}
