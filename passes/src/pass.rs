//! The `Pass` trait, its context and errors.

use std::path::{Path, PathBuf};

use thiserror::Error;
use upmix_ir::{
    Graph, Module, NonFinite, Runtime, RuntimeError, TrainingRuntime, VerifyErrors, WeightError,
    WeightId,
};

use crate::settings::{ModelLayers, SettingError};

/// A pass's name, equal to its variant name in pipeline files; given to each pass by its
/// line in the registry.
pub trait PassName {
    fn name(&self) -> &'static str;

    /// An error in the pass's settings or inputs, naming the pass.
    fn invalid(&self, message: String) -> PassError {
        PassError::Invalid {
            pass: self.name().into(),
            message,
        }
    }

    /// Models the pass combines that do not match, naming the pass.
    fn mismatch(&self, message: String) -> PassError {
        PassError::Mismatch {
            pass: self.name().into(),
            message,
        }
    }
}

/// A rewrite over a [`Module`].
pub trait Pass: PassName {
    /// Rewrites `m`; returns the names of the graphs it created or changed.
    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError>;

    /// The graphs the pass reads, whose checkpoint values the pass manager checks for
    /// NaN and Inf before running it (default: none).
    fn reads(&self) -> Vec<String> {
        Vec::new()
    }

    /// Checks the settings against what is known of the models before any is loaded
    /// (their layer counts), and records the layers of the models the pass creates, for
    /// the passes after it (default: nothing to check, nothing created).
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        let _ = models;
        Ok(())
    }

    /// Makes the paths in the settings absolute with `resolve` (a pipeline resolves paths
    /// against its own directory); default: the pass takes no paths.
    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        let _ = resolve;
    }

    /// Asks the pass to continue from its latest checkpoint; returns whether it keeps
    /// checkpoints to continue from (default: no).
    fn resume(&mut self) -> bool {
        false
    }
}

/// Builds runtimes for passes that need to execute a model (implemented by the caller,
/// which knows the backend and device).
pub trait RuntimeProvider {
    fn runtime(&mut self, m: &Module, graph: &str) -> Result<Box<dyn Runtime>, RuntimeError>;

    /// Token ids of `text` under the tokenizer of model `graph`, without special tokens.
    fn tokenize(&mut self, m: &Module, graph: &str, text: &str) -> Result<Vec<u32>, RuntimeError>;

    /// A runtime of `graph` that computes gradients, for training.
    fn training_runtime(
        &mut self,
        m: &Module,
        graph: &str,
    ) -> Result<Box<dyn TrainingRuntime>, RuntimeError> {
        let _ = (m, graph);
        Err(RuntimeError::Backend(
            "this caller cannot train models".into(),
        ))
    }
}

/// What a pass may use besides the module.
#[derive(Default)]
pub struct PassContext<'a> {
    /// Present when the caller can execute models.
    pub runtimes: Option<&'a mut dyn RuntimeProvider>,
    /// Warnings and notes for the user, in order.
    pub notes: Vec<String>,
    /// Told how long passes advance (the caller may draw a progress bar).
    pub progress: Option<&'a mut dyn FnMut(Progress)>,
    /// Set by the caller when the user asks to stop (Ctrl-C): long passes then stop at
    /// their next safe point with [`PassError::Interrupted`], leaving what they wrote
    /// (such as `Train`'s checkpoints) whole.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
}

/// How far a long pass has come.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'s> {
    /// What runs, e.g. "Train `moe`".
    pub task: &'s str,
    /// Units done, of `total`.
    pub done: usize,
    pub total: usize,
    /// A short status, e.g. the loss and the throughput.
    pub status: &'s str,
}

/// Errors of passes and the pass manager.
#[derive(Debug, Error)]
pub enum PassError {
    #[error("unknown pass `{name}`; valid passes: {}", valid.join(", "))]
    UnknownPass { name: String, valid: Vec<String> },
    #[error("{pass}: no model named `{model}`; models: {}", available.join(", "))]
    UnknownModel {
        pass: String,
        model: String,
        available: Vec<String>,
    },
    #[error("{pass}: {message}")]
    Invalid { pass: String, message: String },
    #[error("{pass}: {message}")]
    Interrupted { pass: String, message: String },
    #[error("{pass}: models do not match: {message}")]
    Mismatch { pass: String, message: String },
    #[error("after pass {pass}: {errors}")]
    Verify {
        pass: String,
        #[source]
        errors: VerifyErrors,
    },
    #[error("{pass}: computed weight `{weight}` holds non-finite values ({count})")]
    NonFinite {
        pass: String,
        weight: String,
        count: NonFinite,
    },
    #[error("{pass}: {source}")]
    Weight {
        pass: String,
        #[source]
        source: WeightError,
    },
}

/// The graph `name` of `m`, or an error naming the available ones.
pub fn graph<'m>(m: &'m Module, pass: &str, name: &str) -> Result<&'m Graph, PassError> {
    m.graph(name).ok_or_else(|| PassError::UnknownModel {
        pass: pass.to_string(),
        model: name.to_string(),
        available: m.graph_names(),
    })
}

/// Inserts graph `model` with its weights renamed by `remap` as `into` (a new graph), or
/// in place of `model` when `into` is `None`; returns the name written.
pub(crate) fn insert_remapped(
    m: &mut Module,
    pass: &str,
    model: &str,
    into: Option<&str>,
    remap: &std::collections::HashMap<WeightId, WeightId>,
) -> Result<String, PassError> {
    let target = into.unwrap_or(model).to_string();
    let mut g = graph(m, pass, model)?.clone();
    g.name = target.clone();
    for n in g.node_ids() {
        g.node_mut(n)
            .op
            .map_weights(|id| *remap.get(&id).unwrap_or(&id));
    }
    m.insert(g);
    Ok(target)
}

/// Wraps a weight-table error with the pass name.
pub fn weight_err(pass: &str) -> impl Fn(WeightError) -> PassError + '_ {
    move |source| PassError::Weight {
        pass: pass.to_string(),
        source,
    }
}

/// Writes `bytes` to a temporary file beside `path` (creating its directory), then
/// renames it over `path`: a reader sees the old file or the whole new one.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
