//! NaN and Inf checks around passes, run by the [`PassManager`](crate::PassManager).
//!
//! - Before a pass, the checkpoint values of the models it reads ([`Pass::reads`]) are
//!   scanned: only `Source` weights (what the files hold; computed weights are checked
//!   when they are materialised, see [`upmix_ir::NonFinite`]), each at most once per run,
//!   in parallel. Non-finite values there are the checkpoint's own and not an error, but
//!   they spread through every merge or average, so each model that holds some gets a
//!   note naming its tensors, files and counts.
//! - After a pass, the values it computed eagerly (`Literal` weights, e.g. router rows
//!   from hidden states) must be finite; the first that is not stops the run.

use std::collections::HashSet;

use rayon::prelude::*;
use upmix_ir::{Module, NonFinite, WeightExpr, WeightId};

use crate::pass::{weight_err, Pass, PassError};

/// Tensors listed per note before the rest are only counted.
const LISTED: usize = 8;

/// The checks of one run; remembers the source weights already scanned.
#[derive(Default)]
pub(crate) struct NonFiniteChecks {
    scanned: HashSet<WeightId>,
}

impl NonFiniteChecks {
    /// Scans the source weights of the models `pass` reads that no earlier pass of this
    /// run read; returns a note for each such model holding NaN or Inf values.
    pub(crate) fn scan_inputs(
        &mut self,
        m: &Module,
        pass: &dyn Pass,
    ) -> Result<Vec<String>, PassError> {
        let mut notes = Vec::new();
        for model in pass.reads() {
            let Some(g) = m.graph(&model) else {
                continue; // The pass reports unknown models itself.
            };
            let new: Vec<WeightId> = m
                .weights
                .source_weights(&g.weight_ids())
                .into_iter()
                .filter(|id| !self.scanned.contains(id))
                .collect();
            let counts: Vec<(WeightId, NonFinite)> = new
                .par_iter()
                .map(|id| Ok((*id, m.weights.count_non_finite(*id)?)))
                .collect::<Result<_, _>>()
                .map_err(weight_err(pass.name()))?;
            self.scanned.extend(counts.iter().map(|(id, _)| *id));
            let bad: Vec<String> = counts
                .iter()
                .filter(|(_, c)| c.any())
                .map(|(id, c)| describe(m, *id, *c))
                .collect();
            if !bad.is_empty() {
                notes.push(note(pass.name(), &model, &bad));
            }
        }
        Ok(notes)
    }
}

/// Checks the `Literal` weights added to the table from index `first_new` on (by the
/// pass just run): any NaN or Inf value is an error naming the weight.
pub(crate) fn check_created(m: &Module, pass: &str, first_new: usize) -> Result<(), PassError> {
    for index in first_new..m.weights.len() {
        let w = m
            .weights
            .get(WeightId(index as u32))
            .map_err(weight_err(pass))?;
        if let WeightExpr::Literal(t) = &w.expr {
            let count = NonFinite::of(&t.data);
            if count.any() {
                return Err(PassError::NonFinite {
                    pass: pass.to_string(),
                    weight: w.name.clone(),
                    count,
                });
            }
        }
    }
    Ok(())
}

/// "`name` (file): 2 NaN, 0 Inf" for one source weight.
fn describe(m: &Module, id: WeightId, count: NonFinite) -> String {
    match m.weights.get(id) {
        Ok(w) => match &w.expr {
            WeightExpr::Source { file, .. } => {
                format!("`{}` ({}): {count}", w.name, file.path().display())
            }
            _ => format!("`{}`: {count}", w.name),
        },
        Err(_) => format!("{id:?}: {count}"),
    }
}

fn note(pass: &str, model: &str, bad: &[String]) -> String {
    let mut text = format!(
        "{pass}: model `{model}` holds non-finite values in {} checkpoint tensor{} (they \
         carry into every weight computed from them): {}",
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        bad[..bad.len().min(LISTED)].join("; ")
    );
    if bad.len() > LISTED {
        text.push_str(&format!("; and {} more", bad.len() - LISTED));
    }
    text
}
