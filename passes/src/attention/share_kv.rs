//! `ShareKv`: the attention experts of a model share one key and one value projection —
//! BAM's KV-sharing variant (Zhang, Gritsch et al. 2024): every expert keeps its own
//! queries and output projection, and one KV cache serves them all, which makes decoding
//! cheaper than with a cache per expert.
//!
//! The shared projections (and their biases) are the mean of the experts' (`from: None`),
//! or those of the same layer of a named dense model (`from: Some("law")`). The paper
//! averages; it says no more for K/V. Applied in place, to every mixture of attention
//! experts of `model`.
//!
//! Function-preserving when the experts' keys and values are already equal (e.g. experts
//! made from copies of one model); otherwise a change of the function.

use serde::Deserialize;
use upmix_ir::{Module, Op, Weight, WeightExpr, WeightId};

use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};

/// Pipeline spec: `ShareKv(model: "bam")` or `ShareKv(model: "bam", from: "law")`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShareKv {
    /// The model whose attention experts share K/V (changed in place).
    pub model: String,
    /// A dense model of the same architecture whose K/V projections are taken (default:
    /// the mean of the experts').
    #[serde(default)]
    pub from: Option<String>,
}

impl ShareKv {
    /// The uniform mean of `ids` as a new weight (the first one itself when all are one).
    fn mean(&self, m: &mut Module, ids: &[WeightId]) -> Result<WeightId, PassError> {
        if ids.windows(2).all(|w| w[0] == w[1]) {
            return Ok(ids[0]);
        }
        let w = m
            .weights
            .get(ids[0])
            .map_err(weight_err(self.name()))?
            .clone();
        m.weights
            .add(Weight {
                name: format!("{}.shared", w.name),
                dtype: w.dtype.plain(),
                expr: WeightExpr::WeightedSum {
                    terms: ids.iter().map(|&id| (1.0, id)).collect(),
                    normalize: true,
                },
                ..w
            })
            .map_err(weight_err(self.name()))
    }

    /// The `(k, v, k_bias, v_bias)` of the attention node `node` of model `from`.
    fn taken(
        &self,
        m: &Module,
        from: &str,
        node: &str,
    ) -> Result<(WeightId, WeightId, Option<WeightId>, Option<WeightId>), PassError> {
        let g = graph(m, self.name(), from)?;
        match g.find(node).map(|id| &g.node(id).op) {
            Some(Op::Attention(a)) => Ok((a.k, a.v, a.k_bias, a.v_bias)),
            _ => Err(self.invalid(format!("`{from}` has no attention node `{node}`"))),
        }
    }
}

impl Pass for ShareKv {
    fn run(&self, m: &mut Module, _cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let g = graph(m, self.name(), &self.model)?;
        let mixtures: Vec<_> = g
            .node_ids()
            .into_iter()
            .filter_map(|id| match &g.node(id).op {
                Op::MixtureOfAttention(x) => Some((id, g.node(id).name.clone(), x.clone())),
                _ => None,
            })
            .collect();
        if mixtures.is_empty() {
            return Err(self.invalid(format!(
                "`{}` has no attention experts (make them with AttentionExperts first)",
                self.model
            )));
        }
        let mut shared = Vec::with_capacity(mixtures.len());
        for (_, name, moa) in &mixtures {
            let kv = match &self.from {
                Some(from) => self.taken(m, from, name)?,
                None => {
                    let col = |f: fn(&upmix_ir::Attention) -> WeightId| -> Vec<WeightId> {
                        moa.experts.iter().map(f).collect()
                    };
                    let bias = |f: fn(&upmix_ir::Attention) -> Option<WeightId>| {
                        moa.experts.iter().map(f).collect::<Option<Vec<_>>>()
                    };
                    let (kb, vb) = (bias(|a| a.k_bias), bias(|a| a.v_bias));
                    (
                        self.mean(m, &col(|a| a.k))?,
                        self.mean(m, &col(|a| a.v))?,
                        kb.map(|ids| self.mean(m, &ids)).transpose()?,
                        vb.map(|ids| self.mean(m, &ids)).transpose()?,
                    )
                }
            };
            shared.push(kv);
        }
        let g = m.graph_mut(&self.model).expect("checked above");
        for ((id, name, mut moa), (k, v, k_bias, v_bias)) in mixtures.into_iter().zip(shared) {
            let first = &moa.experts[0];
            if first.k_bias.is_some() != k_bias.is_some() {
                return Err(self.invalid(format!(
                    "`{name}`: the shared keys' biases do not match the experts'"
                )));
            }
            for a in &mut moa.experts {
                (a.k, a.v, a.k_bias, a.v_bias) = (k, v, k_bias, v_bias);
            }
            g.node_mut(id).op = Op::MixtureOfAttention(moa);
        }
        Ok(vec![self.model.clone()])
    }

    fn reads(&self) -> Vec<String> {
        let mut models = vec![self.model.clone()];
        models.extend(self.from.clone());
        models
    }
}
