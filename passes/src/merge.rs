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
use upmix_ir::{Module, Op, Weight, WeightExpr, WeightId};

use crate::pass::{graph, weight_err, Pass, PassContext, PassError};

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
    pub weights: Option<Vec<f32>>,
    /// Divide by the sum of the weights (mergekit's default).
    #[serde(default = "yes")]
    pub normalize: bool,
}

fn yes() -> bool {
    true
}

impl Pass for Merge {
    fn name(&self) -> &'static str {
        "Merge"
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
        let weights = self
            .weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.models.len()]);
        if weights.len() != self.models.len() {
            return Err(invalid(format!(
                "{} weights given for {} models",
                weights.len(),
                self.models.len()
            )));
        }
        if m.graph(&self.into).is_some() {
            return Err(invalid(format!(
                "a model named `{}` already exists",
                self.into
            )));
        }
        let base = graph(m, self.name(), &self.models[0])?;
        // For every weight of the template, the corresponding weight of each model.
        let mut operands: HashMap<WeightId, Vec<WeightId>> = HashMap::new();
        let base_order = base.topo_order().unwrap_or_else(|_| base.node_ids());
        for other_name in &self.models[1..] {
            let other = graph(m, self.name(), other_name)?;
            let other_order = other.topo_order().unwrap_or_else(|_| other.node_ids());
            if other_order.len() != base_order.len() {
                return Err(self.mismatch(format!(
                    "`{}` has {} nodes, `{other_name}` has {}",
                    self.models[0],
                    base_order.len(),
                    other_order.len()
                )));
            }
            for (a, b) in base_order.iter().zip(&other_order) {
                let (na, nb) = (base.node(*a), other.node(*b));
                if na.name != nb.name || !same_settings(&na.op, &nb.op) {
                    return Err(self.mismatch(format!(
                        "node `{}` of `{}` is {}; node `{}` of `{other_name}` is {}",
                        na.name,
                        self.models[0],
                        settings(&na.op),
                        nb.name,
                        settings(&nb.op)
                    )));
                }
                for ((_, wa), (_, wb)) in na.op.weights().iter().zip(nb.op.weights()) {
                    let (ta, tb) = (
                        m.weights.get(*wa).map_err(weight_err(self.name()))?,
                        m.weights.get(wb).map_err(weight_err(self.name()))?,
                    );
                    if ta.shape != tb.shape {
                        return Err(self.mismatch(format!(
                            "tensor `{}` has shape {:?} in `{}` but {:?} in `{other_name}`",
                            ta.name, ta.shape, self.models[0], tb.shape
                        )));
                    }
                    let list = operands.entry(*wa).or_insert_with(|| vec![*wa]);
                    if list.len() < self.models.len() && !list.contains(&wb) {
                        list.push(wb);
                    }
                }
            }
        }
        let mut merged = base.clone();
        merged.name = self.into.clone();
        let mut remap: HashMap<WeightId, WeightId> = HashMap::new();
        for id in base.weight_ids() {
            let ops = &operands[&id];
            if ops.len() != self.models.len() {
                let w = m.weights.get(id).map_err(weight_err(self.name()))?;
                return Err(self.mismatch(format!(
                    "tensor `{}` is shared differently across the models (e.g. tied embeddings in one, not in another)",
                    w.name
                )));
            }
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
}

impl Merge {
    fn mismatch(&self, message: String) -> PassError {
        PassError::Mismatch {
            pass: self.name().into(),
            message,
        }
    }
}

fn new_weight(m: &mut Module, w: Weight, pass: &str) -> Result<WeightId, PassError> {
    m.weights.add(w).map_err(weight_err(pass))
}

/// Equal ops up to the identity of their weights.
fn same_settings(a: &Op, b: &Op) -> bool {
    let strip = |op: &Op| {
        let mut op = op.clone();
        op.map_weights(|_| WeightId(0));
        op
    };
    strip(a) == strip(b)
}

/// An op's kind and settings (not its weights), for mismatch messages.
fn settings(op: &Op) -> String {
    match op {
        Op::Attention(a) => format!(
            "Attention(heads={}, kv_heads={}, head_dim={}, rope_theta={}, rope_scaling={:?}, bias={})",
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.rope.theta,
            a.rope.scaling,
            a.q_bias.is_some()
        ),
        Op::RmsNorm { eps, .. } => format!("RmsNorm(eps={eps})"),
        Op::MixtureOfExperts(moe) => format!(
            "MixtureOfExperts(experts={}, top_k={}, shared_expert={})",
            moe.experts.len(),
            moe.top_k,
            moe.shared_expert.is_some()
        ),
        other => other.kind().to_string(),
    }
}
