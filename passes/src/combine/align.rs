//! Aligning same-architecture models: node by node, weight by weight.
//!
//! Passes that combine models (merging, upcycling) need, for every weight of a template
//! graph, the corresponding weight of each other model. Two graphs correspond when they
//! have the same nodes in the same topological order, with the same op settings and
//! weight shapes. A model of another architecture is reported by the first differing
//! hyperparameter (see [`crate::hyperparams`]); otherwise the first difference is an
//! error naming the node or tensor and both shapes.

use std::collections::HashMap;

use upmix_ir::{Module, Op, Weight, WeightExpr, WeightId};

use crate::hyperparams::{first_difference, Hyperparams};
use crate::pass::{graph, weight_err, PassError};

/// For each weight of `models[0]`'s graph, the corresponding weight of every model, in
/// the order of `models`.
pub(crate) fn align(
    m: &Module,
    pass: &str,
    models: &[String],
) -> Result<HashMap<WeightId, Vec<WeightId>>, PassError> {
    let mismatch = |message: String| PassError::Mismatch {
        pass: pass.to_string(),
        message,
    };
    let template = graph(m, pass, &models[0])?;
    same_hyperparams(m, pass, models)?;
    let order = template
        .topo_order()
        .unwrap_or_else(|_| template.node_ids());
    let mut slots: HashMap<WeightId, Vec<Option<WeightId>>> = HashMap::new();
    for (i, other_name) in models.iter().enumerate() {
        let other = graph(m, pass, other_name)?;
        let other_order = other.topo_order().unwrap_or_else(|_| other.node_ids());
        if other_order.len() != order.len() {
            return Err(mismatch(format!(
                "`{}` has {} nodes, `{other_name}` has {}",
                models[0],
                order.len(),
                other_order.len()
            )));
        }
        for (a, b) in order.iter().zip(&other_order) {
            let (na, nb) = (template.node(*a), other.node(*b));
            if na.name != nb.name || !same_settings(&na.op, &nb.op) {
                return Err(mismatch(format!(
                    "node `{}` of `{}` is {}; node `{}` of `{other_name}` is {}",
                    na.name,
                    models[0],
                    settings(&na.op),
                    nb.name,
                    settings(&nb.op)
                )));
            }
            for ((_, wa), (_, wb)) in na.op.weights().iter().zip(nb.op.weights()) {
                let (ta, tb) = (
                    m.weights.get(*wa).map_err(weight_err(pass))?,
                    m.weights.get(wb).map_err(weight_err(pass))?,
                );
                if ta.shape != tb.shape {
                    return Err(mismatch(format!(
                        "tensor `{}` has shape {:?} in `{}` but {:?} in `{other_name}`",
                        ta.name, ta.shape, models[0], tb.shape
                    )));
                }
                let slot = &mut slots.entry(*wa).or_insert_with(|| vec![None; models.len()])[i];
                match slot {
                    None => *slot = Some(wb),
                    Some(seen) if *seen == wb => {}
                    Some(_) => {
                        return Err(mismatch(format!(
                            "tensor `{}` is shared differently in `{other_name}` (e.g. tied embeddings in one model, not in another)",
                            ta.name
                        )))
                    }
                }
            }
        }
    }
    Ok(slots
        .into_iter()
        .map(|(id, s)| {
            (
                id,
                s.into_iter()
                    .map(|w| w.expect("every model visited"))
                    .collect(),
            )
        })
        .collect())
}

/// Checks that every model has the hyperparameters of `models[0]`; the first difference
/// is an error naming it.
fn same_hyperparams(m: &Module, pass: &str, models: &[String]) -> Result<(), PassError> {
    let template = Hyperparams::of(graph(m, pass, &models[0])?, &m.weights);
    for name in &models[1..] {
        let other = Hyperparams::of(graph(m, pass, name)?, &m.weights);
        if let Some(message) = first_difference((&models[0], &template), (name, &other)) {
            return Err(PassError::Mismatch {
                pass: pass.to_string(),
                message,
            });
        }
    }
    Ok(())
}

/// The parameters a combining pass does not turn into experts: for each weight of the
/// template (`models[0]` of `aligned`), model `base`'s weight when given, else a new
/// weighted average over the first `weights.len()` models (normalised by their sum).
pub(crate) fn combined_weights(
    m: &mut Module,
    pass: &str,
    aligned: &HashMap<WeightId, Vec<WeightId>>,
    template: &[WeightId],
    (base, weights): (Option<usize>, &[f32]),
) -> Result<HashMap<WeightId, WeightId>, PassError> {
    let mut out = HashMap::new();
    for &id in template {
        let per_model = &aligned[&id];
        let new = match base {
            Some(b) => per_model[b],
            None => {
                let w = m.weights.get(id).map_err(weight_err(pass))?.clone();
                let terms = weights.iter().copied().zip(per_model.iter().copied());
                m.weights
                    .add(Weight {
                        expr: WeightExpr::WeightedSum {
                            terms: terms.collect(),
                            normalize: true,
                        },
                        dtype: w.dtype.plain(),
                        ..w
                    })
                    .map_err(weight_err(pass))?
            }
        };
        out.insert(id, new);
    }
    Ok(out)
}

/// Equal ops up to the identity of their weights.
pub(crate) fn same_settings(a: &Op, b: &Op) -> bool {
    let strip = |op: &Op| {
        let mut op = op.clone();
        op.map_weights(|_| WeightId(0));
        op
    };
    strip(a) == strip(b)
}

/// An op's kind and settings (not its weights), for mismatch messages.
pub(crate) fn settings(op: &Op) -> String {
    match op {
        Op::Attention(a) => format!(
            "Attention(heads={}, kv_heads={}, head_dim={}, {}, window={:?}, bias={}, qk_norm={})",
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            match &a.rope {
                Some(r) => format!(
                    "rope_theta={}, rope_scaling={:?}, rope_pairs={:?}",
                    r.theta, r.scaling, r.pairs
                ),
                None => "rope=none".into(),
            },
            a.window,
            a.q_bias.is_some(),
            a.qk_norm.is_some()
        ),
        Op::RmsNorm { eps, .. } => format!("RmsNorm(eps={eps})"),
        Op::LayerNorm { eps, bias, .. } => format!("LayerNorm(eps={eps}, bias={})", bias.is_some()),
        Op::Scale { factor } => format!("Scale(factor={factor})"),
        Op::MixtureOfExperts(moe) => format!(
            "MixtureOfExperts(experts={}, top_k={}, shared_expert={})",
            moe.experts.len(),
            moe.routing.top_k,
            moe.shared_expert.is_some()
        ),
        other => other.kind().to_string(),
    }
}
