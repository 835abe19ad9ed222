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
//! Router initialisation (see [`RouterInit`]): `Random { seed, std }` rows, `Zeros`
//! (uniform routing), or rows from the base model's hidden states on each expert's prompts
//! (`Hidden`, mergekit-moe's hidden mode) or corpus (`DomainCentroid`), or projected from
//! embeddings of the experts' domains (`Nexus`, module [`crate::nexus_router`]).
//!
//! Fine-grained upcycling (`granularity: G`, He et al. 2024, "Upcycling Large Language
//! Models into Mixture of Experts"): each expert FFN is split into G experts along the
//! intermediate dimension (gate and up rows with the matching down columns), so a layer has
//! E = G x models experts; each model's router row is repeated for its G shards (a
//! "virtual group" that is routed together), and the shards are scaled so that a uniform
//! router gives back the dense FFN: by s = G when the top-k weights are renormalised, by
//! s = E*G/k with the softmax taken over all experts before top-k (the paper's setting).
//! The paper multiplies all three matrices by s^(1/3), which is exact only for a
//! homogeneous activation; SiLU is not, so here `up` and `down` each take sqrt(s), which
//! is exact because the unit is linear in both.
//!
//! Function-preserving when the experts are copies of one model (any router, any top_k;
//! with G > 1, top_k a multiple of G, and a uniform router unless the top-k weights are
//! renormalised): the routing weights then sum to one over identical experts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;


use upmix_ir::{
    DType, FeedForward, HostTensor, MixtureOfExperts, Module, Op, Router, Routing, SharedExpert,
    Weight, WeightExpr, WeightId,
};

use crate::align::{align, combined_weights};
use crate::nexus_router::{self, NexusRouter};
use crate::settings::{check_experts, layer_indices, ModelLayers, SettingError};
use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};
use crate::router_init::RouterInit;

/// What [`Upcycle::plan`] works out from the request.
struct Plan {
    granularity: usize,
    routing: Routing,
    /// Output scale of each FFN shard (see the module doc).
    shard_scale: f32,
    /// Averaging weights, one per expert model.
    weights: Vec<f32>,
    /// Indices of the FFN layers that become MoE layers.
    moe_layers: Vec<usize>,
}

/// One FFN becoming a mixture: its layer index, node name and weights, router rows
/// computed from activations (if the mode does), and the shared expert's model index.
struct MoeLayerParts {
    index: usize,
    name: String,
    ffn: FeedForward,
    computed: Option<Vec<Vec<f32>>>,
    shared: Option<usize>,
}

/// A Nexus router's domain embeddings: the weight and its values (`[experts][embed]`).
type Domains = (WeightId, Vec<Vec<f32>>);

expert_pass! {
    /// Pipeline spec:
    /// `Upcycle(into: "moe", experts: ["code", "law", "math"], top_k: 2, router: Random(seed: 0, std: 0.02))`.
    pub struct Upcycle {
        /// Experts each token is routed to.
        pub top_k: usize,
        /// A model whose FFN is always active besides the routed experts.
        #[serde(default)]
        pub shared_expert: Option<String>,
        /// Fine-grained upcycling: split every expert FFN into this many experts along its
        /// intermediate dimension (default 1, no split). Must divide the intermediate size.
        #[serde(default)]
        pub granularity: Option<usize>,
        /// Renormalise the top-k routing weights to sum to one, as Mixtral does (default
        /// `true`). `false` keeps the softmax over all experts (He et al. 2024; Qwen1.5-MoE's
        /// `norm_topk_prob: false`), which only the Qwen2-MoE output can express.
        #[serde(default)]
        pub normalize_top_k: Option<bool>,
    }
}

impl Pass for Upcycle {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        check_experts(
            models,
            &self.into,
            &self.experts,
            (self.weights.as_ref(), self.layers.as_ref()),
        )
    }

    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        self.router.resolve_paths(resolve);
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let plan = self.plan(m, cx)?;
        // Router rows computed from activations, per MoE layer, when the mode needs them;
        // when the base model embeds a Nexus router's domains, in the same forward passes.
        let joint = self.joint_embedding_node(m)?;
        let (rows, embedded) = match self.router.needs_runtime() {
            true => self.router.activation_rows_and(
                m,
                cx,
                self.name(),
                (&self.experts, &plan.moe_layers, self.default_router_model()),
                joint.as_slice(),
            )?,
            false => (Vec::new(), Vec::new()),
        };
        let mut activation_rows: HashMap<usize, Vec<Vec<f32>>> =
            plan.moe_layers.iter().copied().zip(rows).collect();
        let domains = match &self.router {
            RouterInit::Nexus(nexus) => {
                let embedded = joint.map(|_| embedded.into_iter().flatten().collect());
                Some(self.domains(m, cx, nexus, embedded)?)
            }
            _ => None,
        };

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
        let ids = template.weight_ids();
        let averaged = combined_weights(m, self.name(), &aligned, &ids, (base, &plan.weights))?;

        let mut moe = template;
        moe.name = self.into.clone();
        // Tokenizer files and config fields travel from the base model, when there is one.
        if let Some(base) = &self.base {
            moe.meta = graph(m, self.name(), base)?.meta.clone();
        }
        let order = moe.topo_order().unwrap_or_else(|_| moe.node_ids());
        let mut index = 0;
        for node in order {
            let op = moe.node(node).op.clone();
            let ffn = match op {
                Op::FeedForward(ffn) => {
                    index += 1;
                    Some(ffn).filter(|_| plan.moe_layers.contains(&(index - 1)))
                }
                _ => None,
            };
            let Some(ffn) = ffn else {
                moe.node_mut(node).op.map_weights(|id| averaged[&id]);
                continue;
            };
            let layer = MoeLayerParts {
                index: index - 1,
                name: moe.node(node).name.clone(),
                ffn,
                computed: activation_rows.remove(&(index - 1)),
                shared,
            };
            moe.node_mut(node).op = self.moe_layer(m, &plan, &aligned, layer, domains.as_ref())?;
        }
        m.insert(moe);
        Ok(vec![self.into.clone()])
    }

    fn reads(&self) -> Vec<String> {
        let mut models = self.experts.clone();
        models.extend(self.base.iter().chain(&self.shared_expert).cloned());
        self.router
            .with_router_model(models, self.default_router_model())
    }
}

impl Upcycle {
    /// Checks the request and works out the expert layout.
    fn plan(&self, m: &Module, cx: &mut PassContext) -> Result<Plan, PassError> {
        let n = self.experts.len();
        if n == 0 {
            return Err(self.invalid("needs at least one expert model".into()));
        }
        let granularity = self.granularity.unwrap_or(1);
        if granularity == 0 {
            return Err(self.invalid("granularity must be at least 1".into()));
        }
        let total = n * granularity;
        if self.top_k == 0 || self.top_k > total {
            return Err(self.invalid(format!(
                "top_k {} must be between 1 and the number of experts ({total})",
                self.top_k
            )));
        }
        if !self.top_k.is_multiple_of(granularity) {
            cx.notes.push(format!(
                "{}: top_k {} is not a multiple of granularity {granularity}, so a token \
                 cannot take whole virtual groups and the upcycled model does not start \
                 from the dense models' function",
                self.name(),
                self.top_k
            ));
        }
        let routing = Routing {
            top_k: self.top_k,
            normalize: self.normalize_top_k.unwrap_or(true),
        };
        // Output scale of each shard; see the module doc.
        let shard_scale = if routing.normalize {
            granularity as f32
        } else {
            (total * granularity) as f32 / self.top_k as f32
        };
        if m.graph(&self.into).is_some() {
            return Err(self.invalid(format!("a model named `{}` already exists", self.into)));
        }
        let weights = match &self.weights {
            Some(w) => w.check(n, true).map(|()| w.values.clone()),
            None => Ok(vec![1.0; n]),
        }
        .map_err(|e| self.invalid(e))?;
        self.router.check(self.name(), &self.experts)?;
        if let RouterInit::Nexus(nexus) = &self.router {
            if nexus.width == Some(0) {
                return Err(self.invalid("router Nexus: width must be at least 1".into()));
            }
            let base = self.default_router_model();
            let embedder = nexus.embedder.as_deref().unwrap_or(base);
            nexus_router::tokenizer_model(m, self.name(), embedder, base)?;
        }
        let others = self.base.iter().chain(&self.shared_expert);
        for name in self.experts.iter().chain(others) {
            graph(m, self.name(), name)?;
        }
        // Indices of the FFN layers that become MoE layers.
        let first = graph(m, self.name(), &self.experts[0])?;
        let ffn_count = first
            .node_ids()
            .into_iter()
            .filter(|&n| matches!(first.node(n).op, Op::FeedForward(_)))
            .count();
        let moe_layers = layer_indices(self.layers.as_ref(), ffn_count, &self.experts[0])
            .map_err(|e| self.invalid(e))?;
        Ok(Plan {
            granularity,
            routing,
            shard_scale,
            weights,
            moe_layers,
        })
    }

    /// The mixture of experts replacing one FFN: each model's FFN (in shards), its router,
    /// and the shared expert behind a gate that starts at zero.
    fn moe_layer(
        &self,
        m: &mut Module,
        plan: &Plan,
        aligned: &HashMap<WeightId, Vec<WeightId>>,
        layer: MoeLayerParts,
        domains: Option<&Domains>,
    ) -> Result<Op, PassError> {
        let (n, g) = (self.experts.len(), plan.granularity);
        let MoeLayerParts {
            index,
            name,
            ffn,
            computed,
            shared,
        } = layer;
        let expert = |i: usize| FeedForward {
            gate: aligned[&ffn.gate][i],
            up: aligned[&ffn.up][i],
            down: aligned[&ffn.down][i],
        };
        let mut experts = Vec::with_capacity(n * g);
        for i in 0..n {
            experts.extend(self.shards(m, &expert(i), g, plan.shard_scale, &name)?);
        }
        let gate = m.weights.get(ffn.gate).map_err(weight_err(self.name()))?;
        let ((_, hidden), dtype) = (self.matrix(gate)?, gate.dtype.plain());
        let router = self.router_of(m, plan, (index, &name, hidden, dtype), computed, domains)?;
        let mut add = |name: String, shape: Vec<usize>, expr| self.add(m, name, shape, dtype, expr);
        let shared_expert = match shared {
            None => None,
            Some(s) => {
                let zeros = HostTensor::new(vec![1, hidden], vec![0.0; hidden]);
                let zeros = WeightExpr::Literal(Arc::new(zeros));
                let gate = add(format!("{name}.shared.gate_proj"), vec![1, hidden], zeros)?;
                Some(SharedExpert {
                    ffn: expert(s),
                    gate: Some(gate),
                })
            }
        };
        Ok(Op::MixtureOfExperts(MixtureOfExperts {
            router,
            experts,
            routing: plan.routing,
            shared_expert,
        }))
    }

    /// The router of mixture layer `index` (node `name`), its weights stored as `dtype`:
    /// one row (or, for Nexus, one domain) per model, repeated for its shards.
    fn router_of(
        &self,
        m: &mut Module,
        plan: &Plan,
        (index, name, hidden, dtype): (usize, &str, usize, DType),
        computed: Option<Vec<Vec<f32>>>,
        domains: Option<&Domains>,
    ) -> Result<Router, PassError> {
        let (n, g) = (self.experts.len(), plan.granularity);
        let repeat = || -> Arc<[u32]> { (0..n * g).map(|e| (e / g) as u32).collect() };
        let mut add = |name: String, shape: Vec<usize>, expr| self.add(m, name, shape, dtype, expr);
        if let (Some((domains, values)), RouterInit::Nexus(nexus)) = (domains, &self.router) {
            let centroids = computed.ok_or_else(|| {
                self.invalid(format!("no domain centroids for mixture layer {index}"))
            })?;
            let mut domains = *domains;
            if g > 1 {
                let embed = values[0].len();
                let rows = WeightExpr::Rows(domains, repeat());
                domains = add(format!("{name}.router.domains"), vec![n * g, embed], rows)?;
            }
            let width = nexus.width.unwrap_or(nexus_router::DEFAULT_WIDTH);
            let seed = nexus.seed.unwrap_or(0).wrapping_add(index as u64);
            let fit = nexus_router::fit(values, &centroids, width, seed);
            let router = nexus_router::add_router(m, self.name(), (name, dtype), domains, fit)?;
            return Ok(Router::Projected(router));
        }
        let default_model = self.default_router_model();
        let rows = self
            .router
            .rows(self.name(), (index, n, hidden), computed, default_model)?;
        let mut router = add(format!("{name}.router"), vec![n, hidden], rows)?;
        if g > 1 {
            let rows = WeightExpr::Rows(router, repeat());
            router = add(format!("{name}.router.grouped"), vec![n * g, hidden], rows)?;
        }
        Ok(Router::Rows(router))
    }

    /// The node whose pooled output embeds a Nexus router's domains, when the model that
    /// computes the centroids (the base) is also the embedder.
    fn joint_embedding_node(&self, m: &Module) -> Result<Option<String>, PassError> {
        let base = self.default_router_model();
        match &self.router {
            RouterInit::Nexus(n) if n.embedder.as_deref().is_none_or(|e| e == base) => {
                Ok(nexus_router::final_hidden(graph(m, self.name(), base)?))
            }
            _ => Ok(None),
        }
    }

    /// A Nexus router's domain embeddings, one per expert model (`embedded` when already
    /// computed with the centroids), added to `m` as one weight shared by every layer.
    fn domains(
        &self,
        m: &mut Module,
        cx: &mut PassContext,
        nexus: &NexusRouter,
        embedded: Option<Vec<Vec<f32>>>,
    ) -> Result<Domains, PassError> {
        let values = match embedded {
            Some(values) => values,
            None => {
                let base = self.default_router_model();
                let embedder = nexus.embedder.as_deref().unwrap_or(base);
                let texts: Vec<PathBuf> = self
                    .experts
                    .iter()
                    .map(|e| nexus.texts[e].clone())
                    .collect();
                let (models, windows) = ((embedder, base), nexus.windows());
                nexus_router::domain_embeddings(m, cx, self.name(), models, &texts, windows)?
            }
        };
        let (n, embed) = (values.len(), values[0].len());
        let tensor = HostTensor::new(vec![n, embed], values.concat());
        let id = m
            .weights
            .add(Weight {
                name: format!("{}.router.domains", self.into),
                shape: vec![n, embed],
                dtype: DType::F32,
                expr: WeightExpr::Literal(Arc::new(tensor)),
            })
            .map_err(weight_err(self.name()))?;
        Ok((id, values))
    }

    /// Adds a weight stored as `dtype` to `m`.
    fn add(
        &self,
        m: &mut Module,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        expr: WeightExpr,
    ) -> Result<WeightId, PassError> {
        m.weights
            .add(Weight {
                name,
                shape,
                dtype,
                expr,
            })
            .map_err(weight_err(self.name()))
    }

    /// The model activation router modes run when they name none.
    fn default_router_model(&self) -> &str {
        let first = self.experts.first().map(String::as_str);
        self.base.as_deref().or(first).unwrap_or_default()
    }

    /// `(rows, columns)` of a 2-D weight; another rank is an error naming the weight.
    fn matrix(&self, w: &Weight) -> Result<(usize, usize), PassError> {
        match w.shape[..] {
            [rows, cols] => Ok((rows, cols)),
            _ => Err(self.invalid(format!(
                "weight `{}` has shape {:?}, expected a matrix",
                w.name, w.shape
            ))),
        }
    }

    /// `ffn` split into `g` experts along the intermediate dimension, `up` and `down` of
    /// each multiplied by `sqrt(scale)`; with `g == 1` and `scale == 1`, `ffn` itself.
    fn shards(
        &self,
        m: &mut Module,
        ffn: &FeedForward,
        g: usize,
        scale: f32,
        name: &str,
    ) -> Result<Vec<FeedForward>, PassError> {
        let up = m
            .weights
            .get(ffn.up)
            .map_err(weight_err(self.name()))?
            .clone();
        let down = m
            .weights
            .get(ffn.down)
            .map_err(weight_err(self.name()))?
            .clone();
        let gate = m
            .weights
            .get(ffn.gate)
            .map_err(weight_err(self.name()))?
            .clone();
        let (inter, hidden) = self.matrix(&up)?;
        let (down_rows, _) = self.matrix(&down)?;
        if !inter.is_multiple_of(g) {
            return Err(self.invalid(format!(
                "granularity {g} does not divide the intermediate size {inter} of `{name}`"
            )));
        }
        let width = inter / g;
        let factor = scale.sqrt();
        let mut add = |w: Weight| m.weights.add(w).map_err(weight_err(self.name()));
        let mut out = Vec::with_capacity(g);
        for j in 0..g {
            let part = |w: &Weight, what: &str, shape: Vec<usize>, expr: WeightExpr| Weight {
                name: format!("{name}.shard{j}.{what}"),
                shape,
                dtype: w.dtype.plain(),
                expr,
            };
            let (gate_j, mut up_j, mut down_j) = if g == 1 {
                (ffn.gate, ffn.up, ffn.down)
            } else {
                let rows: Arc<[u32]> = (j * width..(j + 1) * width).map(|r| r as u32).collect();
                let columns = WeightExpr::Columns {
                    of: ffn.down,
                    start: j * width,
                };
                (
                    add(part(
                        &gate,
                        "gate",
                        vec![width, hidden],
                        WeightExpr::Rows(ffn.gate, rows.clone()),
                    ))?,
                    add(part(
                        &up,
                        "up",
                        vec![width, hidden],
                        WeightExpr::Rows(ffn.up, rows),
                    ))?,
                    add(part(&down, "down", vec![down_rows, width], columns))?,
                )
            };
            if factor != 1.0 {
                let scale = WeightExpr::Scale(factor, up_j);
                up_j = add(part(&up, "up.scaled", vec![width, hidden], scale))?;
                let scale = WeightExpr::Scale(factor, down_j);
                down_j = add(part(&down, "down.scaled", vec![down_rows, width], scale))?;
            }
            out.push(FeedForward {
                gate: gate_j,
                up: up_j,
                down: down_j,
            });
        }
        Ok(out)
    }
}
