//! `Train`: trains selected weights of a model on text, by gradient descent with AdamW.
//!
//! The loss is the mean next-token cross-entropy of windows of `seq_len` tokens, plus for
//! mixtures of experts `load_balance` times the Switch Transformer load-balancing loss and
//! `z_loss` times the ST-MoE router z-loss (defined at `upmix_ir::RouterLosses`). The data
//! is every text file tokenized and packed into one stream (with `mix`, one per file),
//! cut into non-overlapping windows (each starting with BOS with `bos: true`); each step
//! takes `batch` windows in an order shuffled with `seed` (reshuffled after every pass
//! over the data), with `mix` from the file drawn by its share for each row. The learning rate is constant or, with
//! `schedule: Cosine(warmup: n)`, rises linearly over `n` steps and then follows a cosine
//! down to zero at the last step. AdamW (module `adamw`) updates the weights `trainable`
//! selects; every other weight is frozen and keeps its expression, so it is written back
//! byte for byte. Trained weights become f32 literals. Not function-preserving.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use upmix_ir::{
    splitmix64, HostTensor, Module, RouterLosses, RuntimeError, TrainingRuntime, WeightId,
};

/// Trained values of the trainable weights, every step's learning rate and losses, and
/// the step the run resumed at (0: it started fresh).
type Trained = (Vec<(WeightId, HostTensor)>, Vec<StepLog>, usize);

/// One step's learning rate and losses.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct StepLog {
    lr: f64,
    loss: f32,
    cross_entropy: f32,
    load_balance: Option<f32>,
    z_loss: Option<f32>,
}

use crate::adamw::{AdamW, AdamWConfig};
use crate::components::Selector;
use crate::pass::{
    graph, insert_remapped, weight_err, write_atomically, Pass, PassContext, PassError,
};
use crate::train_checkpoint;

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
    /// A CSV file to write the loss curve to: step, learning rate, loss, cross-entropy,
    /// load balancing, z-loss (written whole after the last step).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// A directory for checkpoints (`step-N.ckpt`): written every `checkpoint_every`
    /// steps and after the last.
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

    /// The windows of the data: one pool per data name with `mix`, else one.
    fn windows(&self, m: &Module, cx: &mut PassContext) -> Result<Vec<Vec<Vec<u32>>>, PassError> {
        let bos = match self.bos {
            true => Some(
                graph(m, "Train", &self.model)?
                    .meta
                    .bos_token_id
                    .ok_or_else(|| self.invalid(format!("`{}` has no BOS token", self.model)))?,
            ),
            false => None,
        };
        let provider = cx
            .runtimes
            .as_deref_mut()
            .ok_or_else(|| self.invalid("training needs a runtime; run it in a pipeline".into()))?;
        let mut streams: Vec<(String, Vec<u32>)> = Vec::new();
        for (name, path) in &self.data {
            let text = std::fs::read_to_string(path)
                .map_err(|e| self.invalid(format!("data `{name}`: {}: {e}", path.display())))?;
            let ids = provider
                .tokenize(m, &self.model, &text)
                .map_err(|e| self.invalid(format!("data `{name}`: {e}")))?;
            match (&self.mix, streams.last_mut()) {
                (None, Some((_, all))) => all.extend(ids),
                _ => streams.push((name.clone(), ids)),
            }
        }
        let body = self.seq_len - usize::from(bos.is_some());
        let mut pools = Vec::new();
        for (name, stream) in streams {
            let pool: Vec<Vec<u32>> = stream
                .chunks_exact(body)
                .map(|w| bos.into_iter().chain(w.iter().copied()).collect())
                .collect();
            let need = if self.mix.is_some() { 1 } else { self.batch };
            if pool.len() < need {
                return Err(self.invalid(format!(
                    "data{}: {} tokens make {} windows of {}, fewer than {need}",
                    if self.mix.is_some() {
                        format!(" `{name}`")
                    } else {
                        String::new()
                    },
                    stream.len(),
                    pool.len(),
                    self.seq_len,
                )));
            }
            pools.push(pool);
        }
        Ok(pools)
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
        if self.checkpoint_every == Some(0)
            || (self.checkpoint_every.is_some() || self.resume) && self.checkpoint.is_none()
        {
            return Err(self.invalid(
                "`checkpoint_every` (at least 1) and `resume` need a `checkpoint` directory".into(),
            ));
        }
        if let Some(mix) = &self.mix {
            let names: Vec<&String> = mix.keys().collect();
            if names != self.data.keys().collect::<Vec<_>>()
                || mix.values().any(|w| w.is_nan() || *w <= 0.0)
            {
                return Err(self.invalid(format!(
                    "`mix` must give every data name ({}) a share above 0",
                    self.data.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
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
        pools: &[Vec<Vec<u32>>],
        trainable: &[WeightId],
    ) -> Result<Trained, PassError> {
        let runtime_err = |e: RuntimeError| self.invalid(e.to_string());
        let routers = RouterLosses {
            load_balance: self.load_balance.unwrap_or(0.01),
            z_loss: self.z_loss.unwrap_or(0.001),
        };
        let mut state = self.start(m, rt, pools, trainable)?;
        let resumed = state.step;
        let shares: Vec<f64> = match &self.mix {
            Some(mix) => mix.values().copied().collect(),
            None => vec![1.0],
        };
        let total: f64 = shares.iter().sum();
        for step in state.step..self.steps {
            let (orders, draw) = &mut state.orders;
            let mut batch: Vec<&[u32]> = Vec::with_capacity(self.batch);
            for _ in 0..self.batch {
                // A pool by its share, then that pool's next window.
                let mut u = (splitmix64(draw) >> 11) as f64 / (1u64 << 53) as f64 * total;
                let pool = shares
                    .iter()
                    .position(|w| {
                        u -= w;
                        u < 0.0
                    })
                    .unwrap_or(shares.len() - 1);
                batch.push(&pools[pool][orders[pool].next()]);
            }
            let g = rt.loss_gradients(&batch, routers).map_err(runtime_err)?;
            if !g.loss.is_finite() {
                return Err(self.invalid(format!("the loss is {} at step {}", g.loss, step + 1)));
            }
            let lr = self.lr_at(step);
            state.losses.push(StepLog {
                lr,
                loss: g.loss,
                cross_entropy: g.cross_entropy,
                load_balance: g.load_balance,
                z_loss: g.z_loss,
            });
            state.adamw.step(lr, &mut state.params, &g.gradients);
            rt.set_weights(&state.params).map_err(runtime_err)?;
            state.step = step + 1;
            self.save(m, &state)?;
        }
        Ok((state.params, state.losses, resumed))
    }

    /// The state before the first step: fresh, or the latest checkpoint's when resuming
    /// (its values then set in `rt`).
    fn start(
        &self,
        m: &Module,
        rt: &mut dyn TrainingRuntime,
        pools: &[Vec<Vec<u32>>],
        trainable: &[WeightId],
    ) -> Result<State, PassError> {
        let adamw = AdamW::new(AdamWConfig {
            lr: self.lr.unwrap_or(1e-3),
            weight_decay: self.weight_decay.unwrap_or(0.01),
            ..AdamWConfig::default()
        });
        if let (true, Some(dir)) = (self.resume, &self.checkpoint) {
            let latest = train_checkpoint::latest(dir)
                .map_err(|e| self.invalid(format!("reading {}: {e}", dir.display())))?;
            if let Some(step) = latest {
                let path = train_checkpoint::path(dir, step);
                let state: State = train_checkpoint::load(&path, &self.fingerprint(), adamw)
                    .map_err(|e| self.invalid(format!("resuming from {}: {e}", path.display())))?;
                rt.set_weights(&state.params)
                    .map_err(|e| self.invalid(e.to_string()))?;
                return Ok(state);
            }
        }
        let mut params = Vec::with_capacity(trainable.len());
        for &id in trainable {
            params.push((id, m.weights.materialize(id).map_err(weight_err("Train"))?));
        }
        let orders = pools
            .iter()
            .enumerate()
            .map(|(i, p)| Order::new(p.len(), self.seed.wrapping_add(i as u64)))
            .collect();
        Ok(State {
            step: 0,
            params,
            adamw,
            orders: (orders, self.seed ^ 0x5EED),
            losses: Vec::with_capacity(self.steps),
        })
    }

    /// Writes a checkpoint of `state` if one is due.
    fn save(&self, m: &Module, state: &State) -> Result<(), PassError> {
        let Some(dir) = &self.checkpoint else {
            return Ok(());
        };
        let every = self.checkpoint_every.unwrap_or(self.steps);
        if !state.step.is_multiple_of(every) && state.step != self.steps {
            return Ok(());
        }
        let names = state
            .params
            .iter()
            .map(|(id, _)| Ok((*id, m.weights.get(*id)?.name.clone())))
            .collect::<Result<_, upmix_ir::WeightError>>()
            .map_err(weight_err("Train"))?;
        train_checkpoint::save(dir, &self.fingerprint(), state, &names)
            .map_err(|e| self.invalid(format!("writing a checkpoint in {}: {e}", dir.display())))?;
        Ok(())
    }

    /// What a checkpoint must match to be resumed from: the pass, less the fields that
    /// only say where to write and whether to resume.
    fn fingerprint(&self) -> String {
        let core = Train {
            log: None,
            checkpoint: None,
            checkpoint_every: None,
            resume: false,
            ..self.clone()
        };
        format!("{core:?}")
    }
}

/// A run's state: the data order is every pool's order and the state of the generator
/// drawing pools.
type State = train_checkpoint::TrainState<(Vec<Order>, u64), StepLog>;

/// Window indices in a seeded shuffled order, reshuffled after each pass (SplitMix64 and
/// Fisher-Yates).
#[derive(Clone, Debug, Serialize, Deserialize)]
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

    fn next(&mut self) -> usize {
        if self.at == self.indices.len() {
            for i in (1..self.indices.len()).rev() {
                let j = (splitmix64(&mut self.state) % (i as u64 + 1)) as usize;
                self.indices.swap(i, j);
            }
            self.at = 0;
        }
        self.at += 1;
        self.indices[self.at - 1]
    }
}

/// Writes the loss curve to `path` as CSV.
fn write_log(path: &std::path::Path, steps: &[StepLog]) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut text = String::from("step,lr,loss,cross_entropy,load_balance,z_loss\n");
    let opt = |v: Option<f32>| v.map_or(String::new(), |v| v.to_string());
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{}",
            i + 1,
            s.lr,
            s.loss,
            s.cross_entropy,
            opt(s.load_balance),
            opt(s.z_loss)
        );
    }
    write_atomically(path, text.as_bytes())
}

impl Pass for Train {
    fn name(&self) -> &'static str {
        "Train"
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        self.check()?;
        let trainable = self.trainable(m)?;
        let pools = self.windows(m, cx)?;
        let provider = cx.runtimes.as_deref_mut().expect("checked by windows");
        let mut rt = provider
            .training_runtime(m, &self.model)
            .map_err(|e| self.invalid(e.to_string()))?;
        let (trained, losses, resumed) = self.run_steps(m, rt.as_mut(), &pools, &trainable)?;
        if resumed > 0 {
            cx.notes.push(format!(
                "Train: resumed from the checkpoint of step {resumed} in {}",
                self.checkpoint
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            ));
        }
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
            pools.iter().map(Vec::len).sum::<usize>(),
            remap.len(),
            params as f64 / 1e6,
            losses[0].loss,
            losses[losses.len() - 1].loss
        ));
        if let Some(path) = &self.log {
            write_log(path, &losses)
                .map_err(|e| self.invalid(format!("writing {}: {e}", path.display())))?;
        }
        Ok(vec![target])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
