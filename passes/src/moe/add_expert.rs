//! `AddExpert`: one more expert for an existing mixture-of-experts model — Nexus's
//! extension step (Gritsch, Zhang et al. 2024), for any MoE upmix reads (a Nexus model,
//! an upcycled one, a Mixtral or Qwen2-MoE checkpoint).
//!
//! A dense model of the MoE's architecture, trained on a new domain, gives its FFN of
//! each layer as that layer's new expert. The new expert's router row ([`NewRow`]):
//! - `Projection`: the MoE's projected (Nexus) router maps the new domain's embedding
//!   through each layer's projection, `r = down(silu(gate d) * up d)`; the embedding is
//!   made as for the MoE's own domains (module `nexus`), by the same `embedder`.
//! - `Centroid`: the MoE's own mean hidden state at each mixture's input over the new
//!   domain's text (`DomainCentroid`'s row), scaled to the mean length of the layer's
//!   existing rows so that it competes with them on equal terms (ours).
//! - `Random`: `N(0, std^2)` with a fixed seed; `std` defaults to the root mean square of
//!   the existing rows.
//!
//! The latter two turn a projected router into plain rows. Routing settings, the shared
//! expert and every other parameter stay the MoE's, and the new expert is stored in the
//! other experts' float type (an f32 branch joins a bf16 Mixtral as bf16). The dense model's non-FFN parameters
//! must equal the MoE's within `tolerance` (the largest absolute difference relative to
//! the tensor's largest magnitude), since they are dropped (so must the FFNs of layers
//! the MoE keeps dense): a branch trained on more than its FFNs is refused unless
//! `keep_moe` says to drop them anyway. Its FFNs must have the experts' shape (a
//! fine-grained MoE's experts are slices of an FFN, and a whole FFN does not fit).
//!
//! Function-preserving when the new expert is a copy of the experts it joins and routing
//! renormalises its top-k (or is soft): its weights still sum to one over equal experts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{
    normal_samples, DType, FeedForward, Graph, HostTensor, Module, Op, ProjectedRouter, Router,
    Weight, WeightExpr, WeightId,
};

use crate::align::{same_settings, settings};
use crate::hyperparams::{first_difference, Hyperparams};
use crate::nexus_router;
use crate::settings::{ModelLayers, SettingError};
use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};
use crate::hidden_states::Windows;
use crate::router_init::RouterInit;

/// Largest relative difference of a non-FFN tensor that `AddExpert` accepts by default.
pub const DEFAULT_TOLERANCE: f32 = 1e-3;

/// Pipeline spec:
/// `AddExpert(into: "moe4", model: "moe", expert: "bio", text: "data/bio.txt", router: Projection(embedder: "seed"))`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddExpert {
    /// Name of the new MoE model.
    pub into: String,
    /// The mixture-of-experts model to extend.
    pub model: String,
    /// The dense model whose FFNs become the new expert.
    pub expert: String,
    /// The new domain's text (relative paths are resolved against the pipeline file).
    pub text: PathBuf,
    /// How the new expert's router row is made (default `Centroid`).
    #[serde(default)]
    pub router: NewRow,
    /// Drop the dense model's non-FFN parameters even where they differ from the MoE's
    /// beyond `tolerance` (default `false`: such a model is refused).
    #[serde(default)]
    pub keep_moe: bool,
    /// Largest accepted difference of a non-FFN tensor, relative to its largest
    /// magnitude (default 1e-3).
    #[serde(default)]
    pub tolerance: Option<f32>,
    /// At most this many tokens of the text (default 8192).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Tokens per window, BOS included (default: the model's max positions, at most 512).
    #[serde(default)]
    pub window: Option<usize>,
}

/// Where the new expert's router row comes from.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub enum NewRow {
    /// Through the MoE's projected (Nexus) router, from the text's embedding by
    /// `embedder` (the model that embedded the MoE's domains).
    Projection { embedder: String },
    /// The MoE's mean hidden state at each mixture's input over the text, scaled to the
    /// existing rows' mean length.
    #[default]
    Centroid,
    /// Normal samples; `std` defaults to the existing rows' root mean square.
    Random {
        seed: u64,
        #[serde(default)]
        std: Option<f32>,
    },
}

/// One mixture of the MoE: its node and the dense model's FFN at the same position.
struct Slot {
    node: upmix_ir::NodeId,
    /// Index among the MoE's FFN and mixture layers.
    layer: usize,
    ffn: FeedForward,
}

impl Pass for AddExpert {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        models.derive(&self.into, &self.model);
        Ok(())
    }

    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        self.text = resolve(&self.text);
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        if m.graph(&self.into).is_some() {
            return Err(self.invalid(format!("a model named `{}` already exists", self.into)));
        }
        let slots = self.slots(m)?;
        if let NewRow::Projection { embedder } = &self.router {
            nexus_router::tokenizer_model(m, self.name(), embedder, &self.model)?;
        }
        let rows = self.new_rows(m, cx, &slots)?;
        let mut moe = graph(m, self.name(), &self.model)?.clone();
        moe.name = self.into.clone();
        let mut domains: HashMap<WeightId, WeightId> = HashMap::new();
        // The new FFNs' dtype and the experts' when they differ.
        let mut recast = None;
        for (slot, row) in slots.iter().zip(rows) {
            let name = moe.node(slot.node).name.clone();
            let Op::MixtureOfExperts(mix) = &mut moe.node_mut(slot.node).op else {
                unreachable!("slots are mixtures")
            };
            mix.router = match row {
                Row::Projected(embedding) => {
                    let Router::Projected(p) = &mix.router else {
                        unreachable!("checked by `new_rows`")
                    };
                    let grown = match domains.get(&p.domains) {
                        Some(id) => *id,
                        None => {
                            let id = self.grown_domains(m, p.domains, &embedding, &name)?;
                            domains.insert(p.domains, id);
                            id
                        }
                    };
                    Router::Projected(ProjectedRouter {
                        domains: grown,
                        projection: p.projection.clone(),
                    })
                }
                Row::Plain(row) => Router::Rows(self.grown_rows(m, &mix.router, row, &name)?),
            };
            let like = mix.experts[0].gate;
            let (ffn, cast) = self.stored_like(m, &slot.ffn, like)?;
            recast = recast.or(cast);
            let Op::MixtureOfExperts(mix) = &mut moe.node_mut(slot.node).op else {
                unreachable!("slots are mixtures")
            };
            mix.experts.push(ffn);
        }
        m.insert(moe);
        if let Some((from, to)) = recast {
            cx.notes.push(format!(
                "AddExpert: `{}`'s FFNs ({from}) are stored as {to} in `{}`, as its other \
                 experts are",
                self.expert, self.into
            ));
        }
        Ok(vec![self.into.clone()])
    }

    fn reads(&self) -> Vec<String> {
        let mut models = vec![self.model.clone(), self.expert.clone()];
        if let NewRow::Projection { embedder } = &self.router {
            if !models.contains(embedder) {
                models.push(embedder.clone());
            }
        }
        models
    }
}

/// A new router row of one mixture.
enum Row {
    /// Projected from the new domain's embedding (`[embed]`), which joins the router's
    /// domain embeddings.
    Projected(Arc<Vec<f32>>),
    /// Its values, `[hidden]`.
    Plain(Vec<f32>),
}

impl AddExpert {
    /// Pairs the MoE's mixtures with the dense model's FFNs after checking that the two
    /// are one architecture and that their other parameters agree.
    fn slots(&self, m: &Module) -> Result<Vec<Slot>, PassError> {
        let moe = graph(m, self.name(), &self.model)?;
        let dense = graph(m, self.name(), &self.expert)?;
        self.same_hyperparams(
            Hyperparams::of(moe, &m.weights),
            Hyperparams::of(dense, &m.weights),
        )?;
        let order = |g: &Graph| g.topo_order().unwrap_or_else(|_| g.node_ids());
        let (moe_nodes, dense_nodes) = (order(moe), order(dense));
        if moe_nodes.len() != dense_nodes.len() {
            return Err(self.mismatch(format!(
                "`{}` has {} nodes, `{}` has {}: another architecture",
                self.model,
                moe_nodes.len(),
                self.expert,
                dense_nodes.len()
            )));
        }
        let mut slots = Vec::new();
        // The other parameters: (node, field, the MoE's, the dense model's).
        let mut others = Vec::new();
        let mut layer = 0;
        for (&a, &b) in moe_nodes.iter().zip(&dense_nodes) {
            let (na, nb) = (moe.node(a), dense.node(b));
            match (&na.op, &nb.op) {
                (Op::MixtureOfExperts(mix), Op::FeedForward(ffn)) => {
                    let expert = Op::FeedForward(mix.experts[0].clone());
                    let label = format!("experts.{}", mix.experts.len());
                    for ((what, wa), (_, wb)) in expert.weights().into_iter().zip(nb.op.weights()) {
                        self.same_shape(m, (&na.name, &format!("{label}.{what}")), (wa, wb))?;
                    }
                    slots.push(Slot {
                        node: a,
                        layer,
                        ffn: ffn.clone(),
                    });
                    layer += 1;
                }
                // Every other op, a dense FFN of the MoE included, stays the MoE's: the new
                // model's must agree.
                (x, y) if same_settings(x, y) => {
                    if matches!(x, Op::FeedForward(_)) {
                        layer += 1;
                    }
                    for ((label, wa), (_, wb)) in x.weights().into_iter().zip(y.weights()) {
                        self.same_shape(m, (&na.name, &label), (wa, wb))?;
                        others.push((na.name.clone(), label, wa, wb));
                    }
                }
                (x, y) => {
                    return Err(self.mismatch(format!(
                        "`{}` is another architecture: node `{}` of `{}` is {}, node `{}` of \
                         `{}` is {}",
                        self.expert,
                        na.name,
                        self.model,
                        settings(x),
                        nb.name,
                        self.expert,
                        settings(y)
                    )))
                }
            }
        }
        let tolerance = self.tolerance.unwrap_or(DEFAULT_TOLERANCE);
        for (node, label, a, b) in others {
            self.agree(m, (&node, &label), (a, b), tolerance)?;
        }
        Ok(slots)
    }

    /// Checks the hyperparameters of the MoE (`a`) and the dense model (`b`): the MoE has
    /// experts, the dense model none, and the rest agree, the experts' FFN size with the
    /// dense FFN's.
    fn same_hyperparams(&self, a: Hyperparams, b: Hyperparams) -> Result<(), PassError> {
        if a.experts == 0 {
            return Err(self.invalid(format!(
                "`{}` has no mixture of experts to add an expert to",
                self.model
            )));
        }
        if b.experts != 0 {
            return Err(self.mismatch(format!(
                "`{}` is itself a mixture of experts; the new expert must be a dense model",
                self.expert
            )));
        }
        let dense_hp = Hyperparams {
            experts: a.experts,
            ffn: a.ffn,
            ..b
        };
        if let Some(d) = first_difference((&self.model, &a), (&self.expert, &dense_hp)) {
            return Err(self.mismatch(format!("`{}` is another architecture: {d}", self.expert)));
        }
        if a.ffn != b.ffn {
            return Err(self.mismatch(format!(
                "the experts of `{}` have an FFN size of {}, `{}`'s FFN has {}: a new expert \
                 must have the experts' size (those of a fine-grained MoE are slices of an FFN)",
                self.model, a.ffn, self.expert, b.ffn
            )));
        }
        Ok(())
    }

    /// Checks that tensor `label` of node `node` has one shape in both models.
    fn same_shape(
        &self,
        m: &Module,
        (node, label): (&str, &str),
        (a, b): (WeightId, WeightId),
    ) -> Result<(), PassError> {
        let err = weight_err(self.name());
        let (wa, wb) = (
            m.weights.get(a).map_err(&err)?,
            m.weights.get(b).map_err(&err)?,
        );
        if wa.shape == wb.shape {
            return Ok(());
        }
        Err(self.mismatch(format!(
            "`{}` is another architecture: `{node}.{label}` has shape {:?} in `{}` but {:?} \
             in `{}`",
            self.expert, wa.shape, self.model, wb.shape, self.expert
        )))
    }

    /// Checks that tensor `label` of node `node` has the same values in both models,
    /// within `tolerance` (unless `keep_moe`).
    fn agree(
        &self,
        m: &Module,
        (node, label): (&str, &str),
        (a, b): (WeightId, WeightId),
        tolerance: f32,
    ) -> Result<(), PassError> {
        let err = weight_err(self.name());
        if a == b || self.keep_moe {
            return Ok(());
        }
        let (x, y) = (
            m.weights.materialize(a).map_err(&err)?,
            m.weights.materialize(b).map_err(&err)?,
        );
        let scale = x
            .data
            .iter()
            .fold(0f32, |s, v| s.max(v.abs()))
            .max(f32::MIN_POSITIVE);
        let diff = x
            .data
            .iter()
            .zip(&y.data)
            .fold(0f32, |d, (p, q)| d.max((p - q).abs()));
        if diff <= tolerance * scale {
            return Ok(());
        }
        Err(self.mismatch(format!(
            "`{node}.{label}` of `{}` differs from the MoE `{}`'s by up to {diff:.3e} ({:.2e} of \
             its largest value; the tolerance is {tolerance:.0e}): the new expert was trained \
             beyond its FFNs, and those changes would be lost; say `keep_moe: true` to add it \
             anyway with the MoE's parameters, or raise `tolerance`",
            self.expert,
            self.model,
            diff / scale
        )))
    }

    /// The new router row of each mixture in `slots`.
    fn new_rows(
        &self,
        m: &Module,
        cx: &mut PassContext,
        slots: &[Slot],
    ) -> Result<Vec<Row>, PassError> {
        let moe = graph(m, self.name(), &self.model)?;
        let routers: Vec<&Router> = slots
            .iter()
            .map(|s| match &moe.node(s.node).op {
                Op::MixtureOfExperts(mix) => &mix.router,
                _ => unreachable!("slots are mixtures"),
            })
            .collect();
        let existing = |r: &Router| r.rows(&m.weights).map_err(weight_err(self.name()));
        match &self.router {
            NewRow::Projection { embedder } => {
                if routers.iter().any(|r| matches!(r, Router::Rows(_))) {
                    return Err(self.invalid(format!(
                        "router Projection: `{}` routes by plain rows, not a Nexus projection; \
                         use `Centroid` or `Random`",
                        self.model
                    )));
                }
                let windows = Windows {
                    max_tokens: self.max_tokens,
                    window: self.window,
                };
                let mut embedding = nexus_router::domain_embeddings(
                    m,
                    cx,
                    self.name(),
                    (embedder, &self.model),
                    std::slice::from_ref(&self.text),
                    windows,
                )?;
                let embedding = Arc::new(embedding.remove(0));
                Ok(slots
                    .iter()
                    .map(|_| Row::Projected(embedding.clone()))
                    .collect())
            }
            NewRow::Centroid => {
                let layers: Vec<usize> = slots.iter().map(|s| s.layer).collect();
                let init = RouterInit::DomainCentroid {
                    texts: [(self.expert.clone(), self.text.clone())].into(),
                    model: Some(self.model.clone()),
                    max_tokens: self.max_tokens,
                    window: self.window,
                };
                let centroids = init.activation_rows(
                    m,
                    cx,
                    self.name(),
                    std::slice::from_ref(&self.expert),
                    &layers,
                    &self.model,
                )?;
                let mut out = Vec::with_capacity(slots.len());
                for (router, mut c) in routers.iter().zip(centroids) {
                    let rows = existing(router)?;
                    let length = mean_row_length(&rows);
                    let mut row = c.remove(0);
                    row.iter_mut().for_each(|x| *x *= length);
                    out.push(Row::Plain(row));
                }
                Ok(out)
            }
            NewRow::Random { seed, std } => {
                let mut out = Vec::with_capacity(slots.len());
                for (i, router) in routers.iter().enumerate() {
                    let rows = existing(router)?;
                    let rms = (rows.data.iter().map(|x| x * x).sum::<f32>()
                        / rows.data.len().max(1) as f32)
                        .sqrt();
                    let seed = seed.wrapping_add(i as u64);
                    let row = normal_samples(seed, std.unwrap_or(rms), rows.shape[1]);
                    out.push(Row::Plain(row));
                }
                Ok(out)
            }
        }
    }

    /// `ffn` stored in the float type of the weight `like` (an existing expert's), so that
    /// the new expert is written as the others are, and the two dtypes if they differed;
    /// quantized experts leave it as it is.
    fn stored_like(
        &self,
        m: &mut Module,
        ffn: &FeedForward,
        like: WeightId,
    ) -> Result<(FeedForward, Option<(DType, DType)>), PassError> {
        let err = weight_err(self.name());
        let dtype = m.weights.get(like).map_err(&err)?.dtype;
        let mut out = ffn.clone();
        let mut cast = None;
        for id in [&mut out.gate, &mut out.up, &mut out.down] {
            let mut w = m.weights.get(*id).map_err(&err)?.clone();
            if w.dtype == dtype || dtype.is_quantized() || w.dtype.is_quantized() {
                continue;
            }
            cast = Some((w.dtype, dtype));
            w.dtype = dtype;
            *id = m.weights.add(w).map_err(&err)?;
        }
        Ok((out, cast))
    }

    /// Domain embeddings `domains` with `embedding` appended, as a new weight.
    fn grown_domains(
        &self,
        m: &mut Module,
        domains: WeightId,
        embedding: &[f32],
        name: &str,
    ) -> Result<WeightId, PassError> {
        let err = weight_err(self.name());
        let old = m.weights.get(domains).map_err(&err)?.clone();
        let [n, width] = old.shape[..] else {
            return Err(self.invalid(format!("`{}` is not a matrix", old.name)));
        };
        if embedding.len() != width {
            let NewRow::Projection { embedder } = &self.router else {
                unreachable!("only projections grow the domains")
            };
            return Err(self.invalid(format!(
                "embedder `{embedder}` gives embeddings of width {}, but the domains of `{}` \
                 are {width} wide: name the embedder that `{}` was built with",
                embedding.len(),
                self.model,
                self.model
            )));
        }
        let row = HostTensor::new(vec![1, width], embedding.to_vec());
        let row = m
            .weights
            .add(Weight {
                name: format!("{name}.router.domains.new"),
                shape: vec![1, width],
                dtype: old.dtype.plain(),
                expr: WeightExpr::Literal(Arc::new(row)),
            })
            .map_err(&err)?;
        m.weights
            .add(Weight {
                name: format!("{name}.router.domains"),
                shape: vec![n + 1, width],
                dtype: old.dtype.plain(),
                expr: WeightExpr::Concat(vec![domains, row]),
            })
            .map_err(err)
    }

    /// The router rows of `router` with `row` appended, as a new weight.
    fn grown_rows(
        &self,
        m: &mut Module,
        router: &Router,
        row: Vec<f32>,
        name: &str,
    ) -> Result<WeightId, PassError> {
        let err = weight_err(self.name());
        let mut rows = router.rows(&m.weights).map_err(&err)?;
        let dtype = match router {
            Router::Rows(id) => m.weights.get(*id).map_err(&err)?.dtype.plain(),
            Router::Projected(p) => m
                .weights
                .get(p.projection.down)
                .map_err(&err)?
                .dtype
                .plain(),
        };
        rows.data.extend(row);
        rows.shape[0] += 1;
        m.weights
            .add(Weight {
                name: format!("{name}.router"),
                shape: rows.shape.clone(),
                dtype,
                expr: WeightExpr::Literal(Arc::new(rows)),
            })
            .map_err(err)
    }
}

/// The mean Euclidean length of the rows of `rows` (`[n, hidden]`); 1 for all-zero rows.
fn mean_row_length(rows: &HostTensor) -> f32 {
    let n = rows.shape[0].max(1);
    let total: f32 = (0..rows.shape[0])
        .map(|r| rows.row(r).iter().map(|x| x * x).sum::<f32>().sqrt())
        .sum();
    match total / n as f32 {
        l if l > 0.0 => l,
        _ => 1.0,
    }
}
