//! `Merge`: a weighted average of same-architecture models into a new model —
//! mergekit's `linear` method.
//!
//! Every parameter of the output is `sum_i w_i * theta_i`, divided by `sum_i w_i` when
//! `normalize` is set (the default), computed in that order as mergekit does. The inputs
//! must have the same graph: the same nodes, op settings and weight shapes; the first
//! difference is reported with the tensor's name and both shapes. Not function-preserving
//! in general; merging copies of one model returns that model.

use std::collections::HashMap;

use serde::Deserialize;
use upmix_ir::{Module, Weight, WeightExpr, WeightId};

use crate::align::align;
use crate::settings::{ModelLayers, SettingError, Weights};
use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};

/// Pipeline spec: `Merge(into: "merged", models: ["a", "b"], weights: Some([0.3, 0.7]))`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Merge {
    /// Name of the new model.
    pub into: String,
    /// Models to merge (two or more); the first one's graph is the template.
    pub models: Vec<String>,
    /// One weight per model; uniform when absent.
    #[serde(default)]
    pub weights: Option<Weights>,
    /// Divide by the sum of the weights (mergekit's default).
    #[serde(default = "yes")]
    pub normalize: bool,
}

fn yes() -> bool {
    true
}

impl Pass for Merge {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        if let Some(w) = &self.weights {
            w.check_setting(self.models.len(), self.normalize)?;
        }
        if let Some(first) = self.models.first() {
            models.derive(&self.into, first);
        }
        Ok(())
    }

    fn run(&self, m: &mut Module, _cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let invalid = |message: String| PassError::Invalid {
            pass: self.name().into(),
            message,
        };
        if self.models.len() < 2 {
            return Err(invalid(format!(
                "needs at least two models, got {}",
                self.models.len()
            )));
        }
        let weights = match &self.weights {
            Some(w) => w
                .check(self.models.len(), self.normalize)
                .map(|()| w.values.clone()),
            None => Ok(vec![1.0; self.models.len()]),
        }
        .map_err(invalid)?;
        if m.graph(&self.into).is_some() {
            return Err(invalid(format!(
                "a model named `{}` already exists",
                self.into
            )));
        }
        let operands = align(m, self.name(), &self.models)?;
        let base = graph(m, self.name(), &self.models[0])?;
        let mut merged = base.clone();
        merged.name = self.into.clone();
        let mut remap: HashMap<WeightId, WeightId> = HashMap::new();
        for id in base.weight_ids() {
            let ops = &operands[&id];
            let template = m.weights.get(id).map_err(weight_err(self.name()))?;
            let new = Weight {
                name: template.name.clone(),
                shape: template.shape.clone(),
                dtype: template.dtype.plain(),
                expr: WeightExpr::WeightedSum {
                    terms: weights.iter().copied().zip(ops.iter().copied()).collect(),
                    normalize: self.normalize,
                },
            };
            remap.insert(id, new_weight(m, new, self.name())?);
        }
        for n in merged.node_ids() {
            merged.node_mut(n).op.map_weights(|id| remap[&id]);
        }
        m.insert(merged);
        Ok(vec![self.into.clone()])
    }

    fn reads(&self) -> Vec<String> {
        self.models.clone()
    }
}

fn new_weight(m: &mut Module, w: Weight, pass: &str) -> Result<WeightId, PassError> {
    m.weights.add(w).map_err(weight_err(pass))
}
