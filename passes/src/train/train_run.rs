//! Running `Train` (module `train` holds its settings): the `Pass` implementation, the
//! step loop with gradient accumulation, clipping and AdamW, held-out evaluation, and
//! checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use upmix_ir::{HostTensor, Module, RouterLosses, TrainingRuntime, WeightId};

use crate::adamw::{AdamW, AdamWConfig};
use crate::components::Selector;
use crate::pass::{
    graph, insert_remapped, weight_err, Pass, PassContext, PassError, PassName, Progress,
};
use crate::settings::{LearningRate, ModelLayers, SettingError};
use crate::train::Train;
use crate::train_checkpoint;
use crate::train_data::{DataOrder, EvalSet};
use crate::train_log::StepLog;

/// A run's state: what a checkpoint holds.
pub(crate) type State = train_checkpoint::TrainState<DataOrder, StepLog>;

/// The data a run draws from: training pools, their shares, held-out sets.
struct Data {
    pools: Vec<Vec<Vec<u32>>>,
    shares: Vec<f64>,
    eval: Vec<EvalSet>,
}

impl Train {
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

    /// Runs the steps on `rt` from a fresh or resumed state; returns the final state and
    /// the step the run resumed at (0: it started fresh).
    fn run_steps(
        &self,
        m: &Module,
        rt: &mut dyn TrainingRuntime,
        data: &Data,
        trainable: &[WeightId],
        cx: &mut PassContext,
    ) -> Result<(State, usize), PassError> {
        rt.set_trainable(trainable);
        let mut state = self.start(m, rt, &data.pools, trainable)?;
        let resumed = state.step;
        let before = state.losses.last().map_or(0.0, |s| s.seconds);
        let started = Instant::now();
        let task = format!("Train `{}`", self.into.as_deref().unwrap_or(&self.model));
        let tokens_per_step = self.batch * self.grad_accum.unwrap_or(1) * self.seq_len;
        for step in state.step..self.steps {
            let (mut log, gradients) = self.gradients(rt, data, &mut state.order)?;
            let why = match (log.loss.is_finite(), log.grad_norm.is_finite()) {
                (false, _) => Some(format!("the loss is {}", log.loss)),
                (true, false) => Some(format!("the gradient's norm is {}", log.grad_norm)),
                (true, true) => None,
            };
            if let Some(why) = why {
                return Err(self.diverged(&state, step + 1, &why));
            }
            log.lr = self.lr_at(step);
            state.adamw.step(log.lr, &mut state.params, &gradients);
            rt.set_weights(&state.params)
                .map_err(|e| self.invalid(e.to_string()))?;
            state.step = step + 1;
            let every = self.eval_every.unwrap_or(self.steps);
            if state.step.is_multiple_of(every) || state.step == self.steps {
                log.eval = self.evaluate(rt, &data.eval)?;
            }
            log.seconds = before + started.elapsed().as_secs_f64();
            let status = self.status(&log, (state.step - resumed) * tokens_per_step, started);
            state.losses.push(log);
            let stop = cx.stop.is_some_and(|s| s.load(Ordering::Relaxed));
            self.save(m, &state, stop)?;
            if let Some(report) = cx.progress.as_deref_mut() {
                report(Progress {
                    task: &task,
                    done: state.step,
                    total: self.steps,
                    status: &status,
                });
            }
            if stop && state.step < self.steps {
                return Err(self.stopped(&state));
            }
        }
        Ok((state, resumed))
    }

    /// The gradient of one step (averaged over `grad_accum` batches and clipped) and its
    /// record so far.
    fn gradients(
        &self,
        rt: &mut dyn TrainingRuntime,
        data: &Data,
        order: &mut DataOrder,
    ) -> Result<(StepLog, Vec<(WeightId, HostTensor)>), PassError> {
        let routers = RouterLosses {
            load_balance: self.load_balance.unwrap_or(0.01),
            z_loss: self.z_loss.unwrap_or(0.001),
        };
        let accum = self.grad_accum.unwrap_or(1);
        let mut sum: Option<upmix_ir::LossGradients> = None;
        for _ in 0..accum {
            let batch = order.next_batch(&data.pools, &data.shares, self.batch);
            let g = rt
                .loss_gradients(&batch, routers)
                .map_err(|e| self.invalid(e.to_string()))?;
            sum = Some(match sum {
                None => g,
                Some(mut s) => {
                    s.loss += g.loss;
                    s.cross_entropy += g.cross_entropy;
                    s.load_balance = s.load_balance.zip(g.load_balance).map(|(a, b)| a + b);
                    s.z_loss = s.z_loss.zip(g.z_loss).map(|(a, b)| a + b);
                    for ((_, a), (_, b)) in s.gradients.iter_mut().zip(&g.gradients) {
                        a.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += y);
                    }
                    s
                }
            });
        }
        let mut g = sum.expect("grad_accum is at least 1");
        if accum > 1 {
            let n = accum as f32;
            (g.loss, g.cross_entropy) = (g.loss / n, g.cross_entropy / n);
            g.load_balance = g.load_balance.map(|v| v / n);
            g.z_loss = g.z_loss.map(|v| v / n);
            for (_, t) in &mut g.gradients {
                t.data.iter_mut().for_each(|x| *x /= n);
            }
        }
        let grad_norm = clip(&mut g.gradients, self.max_grad_norm);
        let log = StepLog {
            seconds: 0.0,
            lr: 0.0,
            loss: g.loss,
            cross_entropy: g.cross_entropy,
            load_balance: g.load_balance,
            z_loss: g.z_loss,
            grad_norm,
            eval: Vec::new(),
        };
        Ok((log, g.gradients))
    }

    /// The mean next-token cross-entropy of each held-out set.
    fn evaluate(
        &self,
        rt: &mut dyn TrainingRuntime,
        sets: &[EvalSet],
    ) -> Result<Vec<f32>, PassError> {
        let mut out = Vec::with_capacity(sets.len());
        for (_, windows) in sets {
            let (mut nll, mut count) = (0.0, 0);
            for chunk in windows.chunks(self.batch) {
                let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                for ll in rt
                    .log_likelihood_batch(&refs)
                    .map_err(|e| self.invalid(e.to_string()))?
                {
                    (nll, count) = (nll + ll.nll, count + ll.count);
                }
            }
            out.push((nll / count.max(1) as f64) as f32);
        }
        Ok(out)
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
            lr: self.lr.map_or(1e-3, LearningRate::get),
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
        Ok(State {
            step: 0,
            params,
            adamw,
            order: DataOrder::new(pools, self.seed),
            losses: Vec::with_capacity(self.steps),
        })
    }

    /// Writes a checkpoint of `state` and the log if one is due, or `now`.
    fn save(&self, m: &Module, state: &State, now: bool) -> Result<(), PassError> {
        let every = self.checkpoint_every.unwrap_or(self.steps);
        if !(now || state.step.is_multiple_of(every) || state.step == self.steps) {
            return Ok(());
        }
        self.write_log(state)?;
        let Some(dir) = &self.checkpoint else {
            return Ok(());
        };
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
}

/// Scales `gradients` to a global L2 norm of at most `max` (by `max / (norm + 1e-6)`, as
/// `torch.nn.utils.clip_grad_norm_` does); returns the norm before.
fn clip(gradients: &mut [(WeightId, HostTensor)], max: Option<f64>) -> f32 {
    let squares: f64 = gradients
        .iter()
        .flat_map(|(_, g)| &g.data)
        .map(|&x| f64::from(x) * f64::from(x))
        .sum();
    let norm = squares.sqrt();
    if let Some(max) = max {
        let scale = (max / (norm + 1e-6)) as f32;
        if scale < 1.0 {
            for (_, g) in gradients.iter_mut() {
                g.data.iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    norm as f32
}

impl Pass for Train {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        self.check_settings().map_err(SettingError::new)?;
        if let Some(into) = &self.into {
            models.derive(into, &self.model);
        }
        Ok(())
    }

    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        self.data.values_mut().for_each(|f| *f = resolve(f));
        for files in self.eval.iter_mut() {
            files.values_mut().for_each(|f| *f = resolve(f));
        }
        self.log = self.log.as_deref().map(resolve);
        self.checkpoint = self.checkpoint.as_deref().map(resolve);
    }

    fn resume(&mut self) -> bool {
        self.resume |= self.checkpoint.is_some();
        self.checkpoint.is_some()
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        self.check_settings().map_err(|e| self.invalid(e))?;
        let trainable = self.trainable(m)?;
        if self.trains_picking_routers(m, &trainable)? {
            cx.notes.push(format!(
                "Train: `{}` routes each token to one expert with weight 1 (top_k 1, \
                 renormalised), so its routers get no gradient from the cross-entropy, only \
                 from the load-balancing and z-loss terms; route to 2 or more experts, or \
                 upcycle with `normalize_top_k: false`, to train them",
                self.model
            ));
        }
        let data = Data {
            pools: self.windows(m, cx)?,
            shares: match &self.mix {
                Some(mix) => mix.values().copied().collect(),
                None => vec![1.0],
            },
            eval: self.eval_windows(m, cx)?,
        };
        let provider = cx.runtimes.as_deref_mut().expect("checked by windows");
        let mut rt = provider
            .training_runtime(m, &self.model)
            .map_err(|e| self.invalid(e.to_string()))?;
        let (state, resumed) = self.run_steps(m, rt.as_mut(), &data, &trainable, cx)?;
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
        for (id, tensor) in state.params {
            let name = m.weights.get(id).map_err(weight_err("Train"))?.name.clone();
            params += tensor.data.len();
            let new = m
                .weights
                .literal(&name, tensor)
                .map_err(weight_err("Train"))?;
            remap.insert(id, new);
        }
        let target = insert_remapped(m, "Train", &self.model, self.into.as_deref(), &remap)?;
        let (first, last) = (&state.losses[0], &state.losses[state.losses.len() - 1]);
        let ran = self.steps - resumed;
        let tokens = ran * self.batch * self.grad_accum.unwrap_or(1) * self.seq_len;
        let earlier = match resumed {
            0 => 0.0,
            k => state.losses[k - 1].seconds,
        };
        let seconds = last.seconds - earlier;
        let mut note = format!(
            "Train: `{target}`: {} steps of {} x {} tokens ({} windows), {} weights ({:.2}M parameters) trained; loss {:.4} at the first step, {:.4} at the last",
            self.steps,
            self.batch * self.grad_accum.unwrap_or(1),
            self.seq_len,
            data.pools.iter().map(Vec::len).sum::<usize>(),
            remap.len(),
            params as f64 / 1e6,
            first.loss,
            last.loss
        );
        for ((name, _), v) in data.eval.iter().zip(&last.eval) {
            note += &format!("; eval {name} {v:.4}");
        }
        if ran > 0 {
            note += &format!("; {:.0} tokens/s", tokens as f64 / seconds.max(1e-9));
        }
        cx.notes.push(note);
        Ok(vec![target])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}

impl Train {
    /// Whether a trained weight is the router of a mixture whose routing only picks.
    fn trains_picking_routers(
        &self,
        m: &Module,
        trainable: &[WeightId],
    ) -> Result<bool, PassError> {
        let g = crate::pass::graph(m, "Train", &self.model)?;
        Ok(g.node_ids().into_iter().any(|n| match &g.node(n).op {
            upmix_ir::Op::MixtureOfExperts(mix) if mix.routing.picks_only() => mix
                .router
                .weights()
                .iter()
                .any(|(_, id)| trainable.contains(id)),
            _ => false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_scales_to_the_cap_as_torch_does() {
        let grads = || {
            vec![
                (WeightId(0), HostTensor::new(vec![1], vec![3.0])),
                (WeightId(1), HostTensor::new(vec![1], vec![4.0])),
            ]
        };
        // Norm 5 over both tensors; scaled by 1 / (5 + 1e-6).
        let mut g = grads();
        assert_eq!(clip(&mut g, Some(1.0)), 5.0);
        let scale = (1.0 / (5.0 + 1e-6)) as f32;
        assert_eq!(g[0].1.data, [3.0 * scale]);
        assert_eq!(g[1].1.data, [4.0 * scale]);
        // Under the cap, or without one: untouched.
        for cap in [Some(5.1), None] {
            let mut g = grads();
            assert_eq!(clip(&mut g, cap), 5.0);
            assert_eq!(g, grads());
        }
    }
}
