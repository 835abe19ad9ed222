//! Pipeline files: which models to load, which passes to run, what to evaluate and what to
//! write, in RON.
//!
//! ```ron
//! Pipeline(
//!     device: "cpu",
//!     models: { "a": Hf("models/a"), "b": Hf("models/b") },
//!     passes: [ Merge(into: "merged", models: ["a", "b"], weights: [0.3, 0.7]) ],
//!     eval: [ Perplexity(model: "merged", text: "data/sample.txt") ],
//!     emit: [ Hf(model: "merged", dir: "out/merged") ],
//! )
//! ```
//!
//! Enums are externally tagged (`Hf("...")`, `Merge(...)`); optional fields may be written
//! bare (`weights: [..]`) or omitted. Relative paths are resolved against the directory of
//! the pipeline file; `~/` starts a path in the home directory.
//!
//! Reading a file checks it whole before anything runs: its syntax, every setting's type
//! (module `upmix_passes::settings`), and then, from the checkpoints' headers alone, what
//! needs the models (a layer range past a model's last layer, two emits to one path).
//! Each error names the file, line and column of the setting. [`run`] then loads the
//! models, runs the passes, evaluates and emits.

mod run;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer};
use upmix_backends::{Activations, DeviceSpec};
use upmix_passes::settings::{fail_at, ron_options, spotted, ModelLayers, SettingError, Spotted};
use upmix_passes::PassSpec;

use crate::emit::Emit;
pub use crate::eval::{generate, perplexities, perplexity, tokenizer_of, PerplexityOptions};
pub use run::{run, run_file, DeviceRuntimes};

/// A whole pipeline file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Where models run for evaluation and for passes that execute them: `"cpu"`
    /// (default), `"wgpu"`, `"cuda:N"`.
    #[serde(default, deserialize_with = "device")]
    pub device: Option<DeviceSpec>,
    /// How activations meet quantized weights: `"float"` (default: f32 activations times
    /// the dequantized weights) or `"ggml"` (quantized per block first, as llama.cpp's
    /// CPU backend does, so results are llama.cpp's; cpu only).
    #[serde(default, deserialize_with = "activations")]
    pub activations: Option<Activations>,
    /// Models to load, by the name passes refer to them with.
    pub models: BTreeMap<String, ModelSource>,
    /// Passes, run in the order written.
    #[serde(default)]
    pub passes: Vec<Spotted<PassSpec>>,
    /// Evaluations, run after all passes.
    #[serde(default)]
    pub eval: Vec<Eval>,
    /// Checkpoints to write, after evaluation.
    #[serde(default)]
    pub emit: Vec<Spotted<Emit>>,
}

fn device<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DeviceSpec>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| text.parse::<DeviceSpec>())
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn activations<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Activations>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| crate::parse_activations(&text))
        .transpose()
        .map_err(serde::de::Error::custom)
}

/// Where a model comes from.
#[derive(Clone, Debug, Deserialize)]
pub enum ModelSource {
    /// A Hugging Face checkpoint directory (config.json + safetensors).
    Hf(PathBuf),
    /// A GGUF file (llama.cpp).
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        let (ModelSource::Hf(path) | ModelSource::Gguf(path)) = self;
        path
    }
}

/// An evaluation.
#[derive(Clone, Debug, Deserialize)]
pub enum Eval {
    /// Perplexity of `model` on the text file `text`, in windows of at most
    /// `window` tokens (default: the model's max positions, capped at 1024), each starting
    /// with BOS when `bos` (default: when the model's tokenizer adds one).
    Perplexity {
        model: String,
        text: PathBuf,
        #[serde(default)]
        window: Option<usize>,
        /// Start every window with BOS (default: when the tokenizer adds one).
        #[serde(default)]
        bos: Option<bool>,
    },
    /// Perplexity of each of `models` on each text of `texts` (a name per text, e.g. a
    /// domain), printed as one table; `window` and `bos` as for `Perplexity`.
    PerplexityTable {
        models: Vec<String>,
        texts: BTreeMap<String, PathBuf>,
        #[serde(default)]
        window: Option<usize>,
        #[serde(default)]
        bos: Option<bool>,
    },
    /// Divergent Token Metrics of `candidate` against `base` on the prompts of the text
    /// file `prompts` (one per line) over `max_new_tokens` (default 64) tokens.
    Divergence {
        base: String,
        candidate: String,
        prompts: PathBuf,
        #[serde(default)]
        max_new_tokens: Option<usize>,
    },
    /// Greedy continuation of `prompt` by `max_new_tokens` (default 20) tokens.
    Generate {
        model: String,
        prompt: String,
        #[serde(default)]
        max_new_tokens: Option<usize>,
    },
}

/// How to run a pipeline beyond what the file says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Overrides the file's device.
    pub device: Option<DeviceSpec>,
    /// Overrides the file's activations.
    pub activations: Option<Activations>,
    pub dump_ir: upmix_passes::DumpIr,
    /// Skip verification after each pass.
    pub no_verify: bool,
    /// Let every emit replace its destination even when it holds files upmix did not
    /// write (as `overwrite: true` on each emit).
    pub overwrite: bool,
    /// Continue every `Train` pass that has a `checkpoint` directory from its latest
    /// checkpoint (as `resume: true` on each).
    pub resume: bool,
    /// Set when the user asks to stop (Ctrl-C); long passes then stop at a safe point.
    pub stop: Option<&'static std::sync::atomic::AtomicBool>,
}

impl Pipeline {
    /// Parses pipeline text and checks it against the models' headers; `origin` names the
    /// file in errors, and relative paths are resolved against its directory.
    pub fn parse(text: &str, origin: &Path) -> Result<Pipeline> {
        let read = || ron_options().from_str::<Pipeline>(text);
        let at = |e: ron::error::SpannedError| {
            anyhow::anyhow!(
                "{}:{}:{}: {}",
                origin.display(),
                e.span.start.line,
                e.span.start.col,
                e.code
            )
        };
        let pipeline = spotted(read).map_err(at)?;
        let base = origin.parent().unwrap_or(Path::new(""));
        match pipeline.check(base) {
            Ok(()) => Ok(pipeline),
            Err(e) => match fail_at(read, e.spot, &e.message) {
                Some(located) => Err(at(located)),
                None => Err(anyhow::anyhow!("{}: {}", origin.display(), e.message)),
            },
        }
    }

    /// Reads and parses a pipeline file.
    pub fn read(path: &Path) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline {}", path.display()))?;
        Pipeline::parse(&text, path)
    }

    /// The checks that need the models, from their headers alone (relative paths against
    /// `base`): each pass's settings against the layers of the models it reads, then
    /// that no two emits write one path. An error without a spot of its own is placed
    /// at its pass.
    pub fn check(&self, base: &Path) -> Result<(), SettingError> {
        let mut layers = ModelLayers::new();
        for (name, source) in &self.models {
            if let Some(n) = upmix_frontend::layer_count(&resolve(base, source.path())) {
                layers.insert(name, n);
            }
        }
        for pass in &self.passes {
            let p = pass.value.as_pass();
            p.check(&mut layers).map_err(|e| SettingError {
                spot: e.spot.or(pass.spot),
                message: format!("{}: {}", p.name(), e.message),
            })?;
        }
        let mut written: HashMap<PathBuf, (usize, &str)> = HashMap::new();
        for (i, emit) in self.emit.iter().enumerate() {
            let path = lexical(&resolve(base, emit.value.path()));
            if let Some((first, model)) = written.get(&path) {
                return Err(SettingError {
                    spot: emit.spot,
                    message: format!(
                        "emit {} writes {} like emit {} (of `{model}`) does: the one would replace the other; give each its own path",
                        i + 1,
                        path.display(),
                        first + 1,
                    ),
                });
            }
            written.insert(path, (i, emit.value.model()));
        }
        Ok(())
    }
}

/// `path` made absolute: against `base`, or the home directory for `~/`.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ if path.is_absolute() => path.to_path_buf(),
        _ => base.join(path),
    }
}

/// `path` with its `.` and `..` components folded away, without asking the file system
/// (so that `out/x` and `out/../out/x` are one path before either exists).
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
