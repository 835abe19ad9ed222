//! `Train`: trains selected weights of a model on text, by gradient descent with AdamW.
//!
//! The loss is the mean next-token cross-entropy of windows of `seq_len` tokens, plus for
//! mixtures of experts `load_balance` times the Switch Transformer load-balancing loss and
//! `z_loss` times the ST-MoE router z-loss (defined at `upmix_ir::RouterLosses`). The data
//! and the order steps draw it in are module `train_data`'s. Each step averages the
//! gradients of `grad_accum` batches of `batch` windows, clips their global norm to
//! `max_grad_norm` (as `torch.nn.utils.clip_grad_norm_`), and takes one AdamW step
//! (module `adamw`) on the weights `trainable` selects; every other weight is frozen and
//! keeps its expression, so it is written back byte for byte. Trained weights become f32
//! literals. The learning rate is constant or, with `schedule: Cosine(warmup: n)`, rises
//! linearly over `n` steps and then follows a cosine down to zero at the last step.
//!
//! Checkpoints (module `train_checkpoint`) hold everything a run needs to continue bit
//! for bit. A non-finite loss or gradient stops the run before it changes a weight; a
//! stop request (Ctrl-C) stops it after the step in progress, with a checkpoint. Not
//! function-preserving.
//!
//! This file holds the pass's settings; module `train_run` runs it (its `Pass`
//! implementation and step loop), with `train_data` (windows of text) and `train_log`
//! (progress, errors, the loss curve).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::settings::LearningRate;

/// Pipeline spec: `Train(model: "moe", into: "moe_trained", data: {"code": "code.txt"},
/// steps: 100, batch: 8, seq_len: 128, trainable: ["*.router"])`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Train {
    /// The model to train.
    pub model: String,
    /// Name of the trained copy; `model` itself is trained when absent.
    #[serde(default)]
    pub into: Option<String>,
    /// Text files by name, tokenized with the model's tokenizer.
    pub data: BTreeMap<String, PathBuf>,
    /// Shares of the batch rows by data name (`{"code": 2, "law": 1}`: two code windows
    /// for every law window, drawn at random); absent: one stream of all the files.
    #[serde(default)]
    pub mix: Option<BTreeMap<String, f64>>,
    /// Start every window with the model's BOS token (the window's first of `seq_len`).
    #[serde(default)]
    pub bos: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Windows per batch.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Batches whose gradients each step averages (default 1): a step sees
    /// `batch * grad_accum` windows in the memory of `batch`.
    #[serde(default)]
    pub grad_accum: Option<usize>,
    /// Weights to train, by name: `"all"`, `re:REGEX` on the whole name, or a pattern with
    /// `*` matching the name or the part after `layers.N.` (`"ffn.router"`,
    /// `"ffn.experts.*"`). Names are those `upmix inspect` prints.
    pub trainable: Vec<String>,
    /// Peak learning rate (default 1e-3).
    #[serde(default)]
    pub lr: Option<LearningRate>,
    #[serde(default)]
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay (default 0.01, PyTorch's).
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Scale the gradient down to this global L2 norm (over every trained weight) when it
    /// is larger, before each step (default: no clipping).
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Weight of the load-balancing loss (default 0.01; mixtures of experts only).
    #[serde(default)]
    pub load_balance: Option<f32>,
    /// Weight of the router z-loss (default 0.001; mixtures of experts only).
    #[serde(default)]
    pub z_loss: Option<f32>,
    /// Seed of the data order (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Held-out text files by name, cut into windows as the data is: their mean
    /// cross-entropy is measured every `eval_every` steps and after the last, and logged.
    #[serde(default)]
    pub eval: Option<BTreeMap<String, PathBuf>>,
    /// Steps between evaluations of `eval` (default: only after the last step).
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// A CSV file for the loss curve: per step the seconds of training so far, learning
    /// rate, loss, cross-entropy, load balancing, z-loss, gradient norm (before clipping)
    /// and each `eval` cross-entropy. Rewritten with every checkpoint and at the end.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// A directory for checkpoints (`step-N.ckpt`): written every `checkpoint_every`
    /// steps, after the last, and when a run is stopped.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    /// Continue from the latest checkpoint in `checkpoint`, bit for bit as if the run had
    /// not stopped (the same pass, model, data and settings); from the start if none.
    #[serde(default)]
    pub resume: bool,
}

/// How the learning rate moves over the steps.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub enum Schedule {
    #[default]
    Constant,
    /// Linear warmup over `warmup` steps, then a cosine down to zero.
    Cosine { warmup: usize },
}

impl Train {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let peak = self.lr.map_or(1e-3, LearningRate::get);
        match self.schedule {
            Schedule::Constant => peak,
            Schedule::Cosine { warmup } if step < warmup => {
                peak * (step + 1) as f64 / warmup as f64
            }
            Schedule::Cosine { warmup } => {
                let span = self.steps.saturating_sub(warmup).max(1) as f64;
                let t = (step - warmup) as f64 / span;
                peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    pub(crate) fn check_settings(&self) -> Result<(), String> {
        if self.steps == 0 || self.batch == 0 || self.seq_len < 2 {
            return Err(
                "`steps` and `batch` must be at least 1 and `seq_len` at least 2".into(),
            );
        }
        if self.grad_accum == Some(0) || self.eval_every == Some(0) {
            return Err("`grad_accum` and `eval_every` must be at least 1".into());
        }
        if self.eval_every.is_some() && self.eval.is_none() {
            return Err("`eval_every` needs `eval` files".into());
        }
        if self.max_grad_norm.is_some_and(|n| n.is_nan() || n <= 0.0) {
            return Err("`max_grad_norm` must be above 0".into());
        }
        if self.data.is_empty() {
            return Err("`data` names no text file".into());
        }
        if self.checkpoint_every == Some(0)
            || (self.checkpoint_every.is_some() || self.resume) && self.checkpoint.is_none()
        {
            return Err(
                "`checkpoint_every` (at least 1) and `resume` need a `checkpoint` directory".into(),
            );
        }
        if let Some(mix) = &self.mix {
            let names: Vec<&String> = mix.keys().collect();
            if names != self.data.keys().collect::<Vec<_>>()
                || mix.values().any(|w| w.is_nan() || *w <= 0.0)
            {
                return Err(format!(
                    "`mix` must give every data name ({}) a share above 0",
                    self.data.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if let Schedule::Cosine { warmup } = self.schedule {
            if warmup >= self.steps {
                return Err(format!(
                    "warmup of {warmup} steps leaves none of the {} to decay over",
                    self.steps
                ));
            }
        }
        Ok(())
    }

    /// What a checkpoint must match to be resumed from: the pass, less the fields that
    /// only say where to write, what to measure and whether to resume.
    pub(crate) fn fingerprint(&self) -> String {
        let core = Train {
            log: None,
            checkpoint: None,
            checkpoint_every: None,
            resume: false,
            eval: None,
            eval_every: None,
            ..self.clone()
        };
        format!("{core:?}")
    }
}
