//! `Upcycle`: N dense same-architecture models into one mixture-of-experts model —
//! sparse upcycling (Komatsuzaki et al. 2022) and Branch-Train-MiX (Sukhbaatar et al. 2024).
//!
//! Per layer, each input model's SwiGLU FFN becomes one expert of a routed MoE
//! (softmax over experts, top-k, renormalised, as Mixtral routes). Every other parameter
//! (embeddings, norms, attention, lm head) is averaged over the experts (uniformly, or
//! with `weights`), or taken from one `base` model, as mergekit-moe does. A `shared_expert`
//! model's FFN is added to every token's output through a sigmoid gate initialised to
//! zero, i.e. with weight 1/2 until trained (Qwen2-MoE's layout, which always has that
//! gate). Layers outside `layers` stay dense (averaged FFN).
//!
//! Router initialisation: `Random { seed, std }` rows, or `Zeros` (uniform routing).
//!
//! Function-preserving when the experts are copies of one model (any router, any top_k):
//! the renormalised routing weights sum to one over identical experts.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{
    FeedForward, HostTensor, MixtureOfExperts, Module, Op, SharedExpert, Weight, WeightExpr,
    WeightId,
};

use crate::align::align;
use crate::pass::{graph, weight_err, Pass, PassContext, PassError};

/// Pipeline spec:
/// `Upcycle(into: "moe", experts: ["code", "law", "math"], top_k: 2, router: Random(seed: 0, std: 0.02))`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upcycle {
    /// Name of the new MoE model.
    pub into: String,
    /// The models whose FFNs become the experts, in expert order.
    pub experts: Vec<String>,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Router initialisation (default: `Random(seed: 0, std: 0.02)`).
    #[serde(default)]
    pub router: RouterInit,
    /// Take every non-FFN parameter from this model instead of averaging.
    #[serde(default)]
    pub base: Option<String>,
    /// Averaging weights, one per expert model (default: uniform).
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
    /// A model whose FFN is always active besides the routed experts.
    #[serde(default)]
    pub shared_expert: Option<String>,
    /// Layers that become MoE, e.g. `"0..8"` (default: all).
    #[serde(default)]
    pub layers: Option<String>,
}

/// How the router rows start.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub enum RouterInit {
    /// Rows drawn from `N(0, std^2)` with a fixed seed (different per layer).
    Random { seed: u64, std: f32 },
    /// All zero: every expert equally likely until trained.
    Zeros,
}

impl Default for RouterInit {
    fn default() -> Self {
        RouterInit::Random { seed: 0, std: 0.02 }
    }
}

impl Upcycle {
    fn invalid(&self, message: String) -> PassError {
        PassError::Invalid {
            pass: self.name().into(),
            message,
        }
    }

    /// The `layers` range, if given.
    fn layer_range(&self) -> Result<Option<Range<usize>>, PassError> {
        let Some(text) = &self.layers else {
            return Ok(None);
        };
        let parsed = text
            .split_once("..")
            .and_then(|(a, b)| Some(a.trim().parse().ok()?..b.trim().parse().ok()?));
        match parsed {
            Some(r) if r.start < r.end => Ok(Some(r)),
            _ => Err(self.invalid(format!(
                "layers `{text}` is not a range like `0..8` (start < end)"
            ))),
        }
    }
}

impl Pass for Upcycle {
    fn name(&self) -> &'static str {
        "Upcycle"
    }

    fn run(&self, m: &mut Module, _cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let n = self.experts.len();
        if n == 0 {
            return Err(self.invalid("needs at least one expert model".into()));
        }
        if self.top_k == 0 || self.top_k > n {
            return Err(self.invalid(format!(
                "top_k {} must be between 1 and the number of experts ({n})",
                self.top_k
            )));
        }
        if m.graph(&self.into).is_some() {
            return Err(self.invalid(format!("a model named `{}` already exists", self.into)));
        }
        let weights = self.weights.clone().unwrap_or_else(|| vec![1.0; n]);
        if weights.len() != n {
            return Err(self.invalid(format!("{} weights given for {n} experts", weights.len())));
        }
        let layers = self.layer_range()?;

        // Align every model involved: experts, then base and shared expert.
        let mut models = self.experts.clone();
        let base = self.base.as_ref().map(|b| {
            models.push(b.clone());
            models.len() - 1
        });
        let shared = self.shared_expert.as_ref().map(|s| {
            models.push(s.clone());
            models.len() - 1
        });
        let aligned = align(m, self.name(), &models)?;
        let template = graph(m, self.name(), &self.experts[0])?.clone();

        // Non-FFN parameters: the base model's, or the average over the experts.
        let mut shared_params: HashMap<WeightId, WeightId> = HashMap::new();
        for id in template.weight_ids() {
            let per_model = &aligned[&id];
            let new = match base {
                Some(b) => per_model[b],
                None => {
                    let w = m.weights.get(id).map_err(weight_err(self.name()))?.clone();
                    m.weights
                        .add(Weight {
                            expr: WeightExpr::WeightedSum {
                                terms: weights
                                    .iter()
                                    .copied()
                                    .zip(per_model[..n].iter().copied())
                                    .collect(),
                                normalize: true,
                            },
                            dtype: w.dtype.plain(),
                            ..w
                        })
                        .map_err(weight_err(self.name()))?
                }
            };
            shared_params.insert(id, new);
        }

        let mut moe = template;
        moe.name = self.into.clone();
        let order = moe.topo_order().unwrap_or_else(|_| moe.node_ids());
        let mut layer = 0;
        let mut upcycled = 0;
        for node in order {
            let Op::FeedForward(ffn) = moe.node(node).op.clone() else {
                let op = &mut moe.node_mut(node).op;
                op.map_weights(|id| shared_params[&id]);
                continue;
            };
            let index = layer;
            layer += 1;
            if layers.as_ref().is_some_and(|r| !r.contains(&index)) {
                let op = &mut moe.node_mut(node).op;
                op.map_weights(|id| shared_params[&id]);
                continue;
            }
            let expert = |i: usize| FeedForward {
                gate: aligned[&ffn.gate][i],
                up: aligned[&ffn.up][i],
                down: aligned[&ffn.down][i],
            };
            let gate = m.weights.get(ffn.gate).map_err(weight_err(self.name()))?;
            let (hidden, router_dtype) = (gate.shape[1], gate.dtype.plain());
            let router_name = format!("{}.router", moe.node(node).name);
            let router = Weight {
                name: router_name,
                shape: vec![n, hidden],
                dtype: router_dtype,
                expr: match &self.router {
                    RouterInit::Random { seed, std } => WeightExpr::Random {
                        seed: seed.wrapping_add(index as u64),
                        std: *std,
                    },
                    RouterInit::Zeros => WeightExpr::Literal(Arc::new(HostTensor::new(
                        vec![n, hidden],
                        vec![0.0; n * hidden],
                    ))),
                },
            };
            let router = m.weights.add(router).map_err(weight_err(self.name()))?;
            let shared_gate = match shared {
                None => None,
                Some(_) => Some(
                    m.weights
                        .add(Weight {
                            name: format!("{}.shared.gate_proj", moe.node(node).name),
                            shape: vec![1, hidden],
                            dtype: router_dtype,
                            expr: WeightExpr::Literal(Arc::new(HostTensor::new(
                                vec![1, hidden],
                                vec![0.0; hidden],
                            ))),
                        })
                        .map_err(weight_err(self.name()))?,
                ),
            };
            moe.node_mut(node).op = Op::MixtureOfExperts(MixtureOfExperts {
                router,
                experts: (0..n).map(expert).collect(),
                top_k: self.top_k,
                normalize_top_k: true,
                shared_expert: shared.map(|s| SharedExpert {
                    ffn: expert(s),
                    gate: shared_gate,
                }),
            });
            upcycled += 1;
        }
        if upcycled == 0 {
            return Err(self.invalid(format!(
                "no FFN layer of `{}` lies in layers {:?} (it has {layer})",
                self.experts[0], self.layers
            )));
        }
        m.insert(moe);
        Ok(vec![self.into.clone()])
    }
}
