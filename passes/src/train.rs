//! `Train`: trains selected weights of a model on text, by gradient descent with AdamW.
//!
//! The loss is the mean next-token cross-entropy of windows of `seq_len` tokens, plus for
//! mixtures of experts `load_balance` times the Switch Transformer load-balancing loss and
//! `z_loss` times the ST-MoE router z-loss (defined at `upmix_ir::RouterLosses`). The data
//! is every text file tokenized and packed into one stream, cut into non-overlapping
//! windows; each step takes `batch` windows in an order shuffled with `seed` (reshuffled
//! after every pass over the data). The learning rate is constant or, with
//! `schedule: Cosine(warmup: n)`, rises linearly over `n` steps and then follows a cosine
//! down to zero at the last step. AdamW (module `adamw`) updates the weights `trainable`
//! selects; every other weight is frozen and keeps its expression, so it is written back
//! byte for byte. Trained weights become f32 literals. Not function-preserving.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Deserialize;
use upmix_ir::{HostTensor, Module, RouterLosses, RuntimeError, TrainingRuntime, WeightId};

/// Trained values of the trainable weights, and the loss of every step.
type Trained = (Vec<(WeightId, HostTensor)>, Vec<f32>);

use crate::adamw::{AdamW, AdamWConfig};
use crate::components::Selector;
use crate::pass::{graph, insert_remapped, weight_err, Pass, PassContext, PassError};

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
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Weights to train, by name: `"all"`, `re:REGEX` on the whole name, or a pattern with
    /// `*` matching the name or the part after `layers.N.` (`"ffn.router"`,
    /// `"ffn.experts.*"`). Names are those `upmix inspect` prints.
    pub trainable: Vec<String>,
    /// Peak learning rate (default 1e-3).
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub schedule: Schedule,
    /// AdamW's decoupled weight decay (default 0.01, PyTorch's).
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Weight of the load-balancing loss (default 0.01; mixtures of experts only).
    #[serde(default)]
    pub load_balance: Option<f32>,
    /// Weight of the router z-loss (default 0.001; mixtures of experts only).
    #[serde(default)]
    pub z_loss: Option<f32>,
    /// Seed of the data order (default 0).
    #[serde(default)]
    pub seed: u64,
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
    fn invalid(&self, message: String) -> PassError {
        PassError::Invalid {
            pass: "Train".into(),
            message,
        }
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let peak = self.lr.unwrap_or(1e-3);
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

    /// The trainable weights of `model`, by the selectors.
    fn trainable(&self, m: &Module) -> Result<Vec<WeightId>, PassError> {
        let g = graph(m, "Train", &self.model)?;
        let selectors: Vec<Selector> = self
            .trainable
            .iter()
            .filter(|t| *t != "all")
            .map(|t| Selector::parse(t).map_err(|e| self.invalid(e)))
            .collect::<Result<_, _>>()?;
        let all = self.trainable.iter().any(|t| t == "all");
        let mut chosen = Vec::new();
        let mut used = vec![false; selectors.len()];
        for id in g.weight_ids() {
            let name = &m.weights.get(id).map_err(weight_err("Train"))?.name;
            let part = name
                .strip_prefix("layers.")
                .and_then(|r| r.split_once('.'))
                .map_or(name.as_str(), |(_, part)| part);
            let mut hit = all;
            for (s, used) in selectors.iter().zip(&mut used) {
                if s.matches_name(name, part) {
                    (hit, *used) = (true, true);
                }
            }
            if hit {
                chosen.push(id);
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(self.invalid(format!(
                "trainable `{}` matches no weight of `{}` (`upmix inspect` lists the names)",
                selectors[i].text(),
                self.model
            )));
        }
        if chosen.is_empty() {
            return Err(self.invalid("`trainable` is empty: nothing to train".into()));
        }
        Ok(chosen)
    }

    /// The packed windows of the data.
    fn windows(&self, m: &Module, cx: &mut PassContext) -> Result<Vec<Vec<u32>>, PassError> {
        let provider = cx
            .runtimes
            .as_deref_mut()
            .ok_or_else(|| self.invalid("training needs a runtime; run it in a pipeline".into()))?;
        let mut stream = Vec::new();
        for (name, path) in &self.data {
            let text = std::fs::read_to_string(path)
                .map_err(|e| self.invalid(format!("data `{name}`: {}: {e}", path.display())))?;
            let ids = provider
                .tokenize(m, &self.model, &text)
                .map_err(|e| self.invalid(format!("data `{name}`: {e}")))?;
            stream.extend(ids);
        }
        let windows: Vec<Vec<u32>> = stream
            .chunks_exact(self.seq_len)
            .map(|w| w.to_vec())
            .collect();
        if windows.len() < self.batch {
            return Err(self.invalid(format!(
                "the data holds {} tokens: {} windows of {}, fewer than a batch of {}",
                stream.len(),
                windows.len(),
                self.seq_len,
                self.batch
            )));
        }
        Ok(windows)
    }

    fn check(&self) -> Result<(), PassError> {
        if self.steps == 0 || self.batch == 0 || self.seq_len < 2 {
            return Err(self.invalid(
                "`steps` and `batch` must be at least 1 and `seq_len` at least 2".into(),
            ));
        }
        if self.data.is_empty() {
            return Err(self.invalid("`data` names no text file".into()));
        }
        if let Schedule::Cosine { warmup } = self.schedule {
            if warmup >= self.steps {
                return Err(self.invalid(format!(
                    "warmup of {warmup} steps leaves none of the {} to decay over",
                    self.steps
                )));
            }
        }
        Ok(())
    }

    /// Runs the steps on `rt`; returns the trained values and each step's loss.
    fn run_steps(
        &self,
        m: &Module,
        rt: &mut dyn TrainingRuntime,
        windows: &[Vec<u32>],
        trainable: &[WeightId],
    ) -> Result<Trained, PassError> {
        let runtime_err = |e: RuntimeError| self.invalid(e.to_string());
        let mut params = Vec::with_capacity(trainable.len());
        for &id in trainable {
            params.push((id, m.weights.materialize(id).map_err(weight_err("Train"))?));
        }
        let routers = RouterLosses {
            load_balance: self.load_balance.unwrap_or(0.01),
            z_loss: self.z_loss.unwrap_or(0.001),
        };
        let mut adamw = AdamW::new(AdamWConfig {
            lr: self.lr.unwrap_or(1e-3),
            weight_decay: self.weight_decay.unwrap_or(0.01),
            ..AdamWConfig::default()
        });
        let mut order = Order::new(windows.len(), self.seed);
        let mut losses = Vec::with_capacity(self.steps);
        for step in 0..self.steps {
            let batch: Vec<&[u32]> = (0..self.batch)
                .map(|_| windows[order.next()].as_slice())
                .collect();
            let g = rt.loss_gradients(&batch, routers).map_err(runtime_err)?;
            if !g.loss.is_finite() {
                return Err(self.invalid(format!("the loss is {} at step {}", g.loss, step + 1)));
            }
            losses.push(g.loss);
            adamw.step(self.lr_at(step), &mut params, &g.gradients);
            rt.set_weights(&params).map_err(runtime_err)?;
        }
        Ok((params, losses))
    }
}

/// Window indices in a seeded shuffled order, reshuffled after each pass (SplitMix64 and
/// Fisher-Yates).
struct Order {
    state: u64,
    indices: Vec<usize>,
    at: usize,
}

impl Order {
    fn new(n: usize, seed: u64) -> Order {
        Order {
            state: seed,
            indices: (0..n).collect(),
            at: n,
        }
    }

    fn random(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next(&mut self) -> usize {
        if self.at == self.indices.len() {
            for i in (1..self.indices.len()).rev() {
                let j = (self.random() % (i as u64 + 1)) as usize;
                self.indices.swap(i, j);
            }
            self.at = 0;
        }
        self.at += 1;
        self.indices[self.at - 1]
    }
}

impl Pass for Train {
    fn name(&self) -> &'static str {
        "Train"
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        self.check()?;
        let trainable = self.trainable(m)?;
        let windows = self.windows(m, cx)?;
        let provider = cx.runtimes.as_deref_mut().expect("checked by windows");
        let mut rt = provider
            .training_runtime(m, &self.model)
            .map_err(|e| self.invalid(e.to_string()))?;
        let (trained, losses) = self.run_steps(m, rt.as_mut(), &windows, &trainable)?;
        let mut remap = HashMap::new();
        let mut params = 0;
        for (id, tensor) in trained {
            let name = m.weights.get(id).map_err(weight_err("Train"))?.name.clone();
            params += tensor.data.len();
            let new = m
                .weights
                .literal(&name, tensor)
                .map_err(weight_err("Train"))?;
            remap.insert(id, new);
        }
        let target = insert_remapped(m, "Train", &self.model, self.into.as_deref(), &remap)?;
        cx.notes.push(format!(
            "Train: `{target}`: {} steps of {} x {} tokens ({} windows), {} weights ({:.2}M parameters) trained; loss {:.4} at the first step, {:.4} at the last",
            self.steps,
            self.batch,
            self.seq_len,
            windows.len(),
            remap.len(),
            params as f64 / 1e6,
            losses[0],
            losses[losses.len() - 1]
        ));
        Ok(vec![target])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
