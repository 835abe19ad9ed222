//! What a `Train` run reports: its record of each step, the loss curve written from it
//! as CSV, the progress line, and the errors of a diverged or stopped run.

use std::fmt::Write as _;
use std::path::Path;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::pass::{write_atomically, PassError, PassName};
use crate::train_checkpoint::TrainState;
use crate::{train_checkpoint, Train};

/// One step's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StepLog {
    /// Seconds of training when the step ended (counting a resumed run's earlier parts).
    pub seconds: f64,
    pub lr: f64,
    pub loss: f32,
    pub cross_entropy: f32,
    pub load_balance: Option<f32>,
    pub z_loss: Option<f32>,
    /// The gradient's global norm before clipping.
    pub grad_norm: f32,
    /// Each `eval` set's cross-entropy, when the step was evaluated.
    pub eval: Vec<f32>,
}

/// Writes `losses` to `path` as CSV, atomically: one row per step, one `eval_NAME`
/// column per held-out set in `evals` (empty where a step was not evaluated).
pub(crate) fn write_csv(path: &Path, evals: &[&String], losses: &[StepLog]) -> std::io::Result<()> {
    let mut text = String::from("step,seconds,lr,loss,cross_entropy,load_balance,z_loss,grad_norm");
    for name in evals {
        text += &format!(",eval_{name}");
    }
    text.push('\n');
    let opt = |v: Option<f32>| v.map_or(String::new(), |v| v.to_string());
    for (i, s) in losses.iter().enumerate() {
        let _ = write!(
            text,
            "{},{:.3},{},{},{},{},{},{}",
            i + 1,
            s.seconds,
            s.lr,
            s.loss,
            s.cross_entropy,
            opt(s.load_balance),
            opt(s.z_loss),
            s.grad_norm,
        );
        for k in 0..evals.len() {
            let _ = write!(text, ",{}", opt(s.eval.get(k).copied()));
        }
        text.push('\n');
    }
    write_atomically(path, text.as_bytes())
}

impl Train {
    /// The progress line of a step: its loss, evaluations and throughput.
    pub(crate) fn status(&self, log: &StepLog, tokens: usize, started: Instant) -> String {
        let mut s = format!("loss {:.4}", log.loss);
        let names = self.eval.iter().flat_map(|e| e.keys());
        for (name, v) in names.zip(&log.eval) {
            s += &format!(" · eval {name} {v:.4}");
        }
        let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        s + &format!(" · {rate:.0} tok/s")
    }

    /// The error of a step whose loss or gradient is not finite; the weights are still
    /// those of the step before.
    pub(crate) fn diverged<O>(
        &self,
        state: &TrainState<O, StepLog>,
        step: usize,
        why: &str,
    ) -> PassError {
        let kept = match &self.checkpoint {
            Some(dir) => match train_checkpoint::latest(dir) {
                Ok(Some(k)) => format!(
                    "the last checkpoint, of step {k}, is {}",
                    train_checkpoint::path(dir, k).display()
                ),
                _ => "no checkpoint was written".into(),
            },
            None => "no checkpoint was written (set `checkpoint` to keep them)".into(),
        };
        let _ = self.write_log(state);
        self.invalid(format!(
            "{why} at step {step} of {}; the weights were not updated; {kept}; a lower \
             `lr` or a `max_grad_norm` may help",
            self.steps
        ))
    }

    /// The error of a run stopped on request after `state.step` steps.
    pub(crate) fn stopped<O>(&self, state: &TrainState<O, StepLog>) -> PassError {
        let message = match &self.checkpoint {
            Some(dir) => format!(
                "stopped after step {} of {}; the checkpoint is {}; run again with `--resume` \
                 to continue",
                state.step,
                self.steps,
                train_checkpoint::path(dir, state.step).display()
            ),
            None => format!(
                "stopped after step {} of {}; nothing was kept (set `checkpoint` to be able \
                 to resume)",
                state.step, self.steps
            ),
        };
        PassError::Interrupted {
            pass: "Train".into(),
            message,
        }
    }

    /// Writes the loss curve so far to `log`, if set, as CSV.
    pub(crate) fn write_log<O>(&self, state: &TrainState<O, StepLog>) -> Result<(), PassError> {
        let Some(path) = &self.log else {
            return Ok(());
        };
        let evals: Vec<&String> = self.eval.iter().flat_map(|e| e.keys()).collect();
        write_csv(path, &evals, &state.losses)
            .map_err(|e| self.invalid(format!("writing {}: {e}", path.display())))
    }
}
