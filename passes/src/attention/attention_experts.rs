//! `AttentionExperts`: the attention of several same-architecture models becomes one
//! routed mixture of attention experts per layer — BAM's attention upcycling (Zhang,
//! Gritsch et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
//! Mixture of Experts").
//!
//! Per selected layer, each input model's attention (q, k, v, o, biases, q/k norms)
//! becomes one expert, and a router `[experts, hidden]` (initialised as for `Upcycle`:
//! Random, Zeros, Hidden, DomainCentroid) weighs them: `Soft` routing (the default and
//! the paper's best) sends every token to every expert with the softmax's weights;
//! `TopK(k)` keeps the k best, renormalised. Every other parameter (embeddings, norms,
//! FFNs, lm head, the attention of unselected layers) is the average of the models
//! (uniform, or by `weights`), or one `base` model's. FFN experts come from `Upcycle`,
//! run after this pass on its output; keys and values are shared by `ShareKv`.
//!
//! `split_heads: G` on a single model cuts every attention into G experts of
//! `heads / G` query heads and `kv_heads / G` KV heads each, with its slice of q, k, v and
//! of o's columns times G: under uniform routing (weights 1/G, a `Zeros` router) their sum
//! is the dense attention.
//!
//! Function-preserving when the experts are copies of one model under soft routing (any
//! router: the weights sum to one over identical experts), and for `split_heads` under a
//! uniform router.

use std::collections::HashMap;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use upmix_ir::{Attention, MixtureOfAttention, Module, Op, Routing, Weight, WeightExpr, WeightId};

use crate::align::{align, combined_weights};
use crate::settings::{check_experts, layer_indices, ModelLayers, SettingError};
use crate::pass::{graph, weight_err, Pass, PassContext, PassError, PassName};


expert_pass! {
    /// Pipeline spec:
    /// `AttentionExperts(into: "bam", experts: ["code", "law", "math"], routing: Soft)`.
    pub struct AttentionExperts {
        /// `Soft` (default) or `TopK(k)`.
        #[serde(default)]
        pub routing: AttentionRouting,
        /// Cut one model's heads into this many experts.
        #[serde(default)]
        pub split_heads: Option<usize>,
    }
}

/// How attention experts are routed.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum AttentionRouting {
    /// Every token to every expert, weighted by the router's softmax.
    #[default]
    Soft,
    /// The k most likely experts, their weights renormalised to sum to one.
    TopK(usize),
}

impl AttentionExperts {
    /// The expert count: one per model, or `split_heads` of one model.
    fn expert_count(&self) -> Result<usize, PassError> {
        match (self.split_heads, self.experts.len()) {
            (_, 0) => Err(self.invalid("needs at least one expert model".into())),
            (Some(0), _) => Err(self.invalid("split_heads must be at least 1".into())),
            (Some(g), 1) => Ok(g),
            (Some(_), n) => Err(self.invalid(format!(
                "split_heads cuts one model's heads; {n} models are given"
            ))),
            (None, n) => Ok(n),
        }
    }

    fn routing(&self, experts: usize) -> Result<Routing, PassError> {
        match self.routing {
            AttentionRouting::Soft => Ok(Routing::soft(experts)),
            AttentionRouting::TopK(k) if (1..=experts).contains(&k) => Ok(Routing {
                top_k: k,
                normalize: true,
            }),
            AttentionRouting::TopK(k) => Err(self.invalid(format!(
                "TopK({k}) must be between 1 and the number of experts ({experts})"
            ))),
        }
    }

    /// Checks the router request and the layer range; the indices of the attention layers
    /// that become mixtures.
    fn selected_layers(&self, m: &Module) -> Result<Vec<usize>, PassError> {
        if self.split_heads.is_none() {
            self.router.check(self.name(), &self.experts)?;
        } else if self.router.needs_runtime() {
            return Err(self.invalid(
                "split_heads experts have no models of their own to take router rows from; \
                 use Random or Zeros"
                    .into(),
            ));
        }
        let first = graph(m, self.name(), &self.experts[0])?;
        let attention_count = first
            .node_ids()
            .into_iter()
            .filter(|&id| matches!(first.node(id).op, Op::Attention(_)))
            .count();
        layer_indices(self.layers.as_ref(), attention_count, &self.experts[0])
            .map_err(|e| self.invalid(e))
    }

    /// The mixture replacing attention `attn` (layer `index`, node `name`): one expert per
    /// model (or per head group), and a router of rows from `computed` or the init mode.
    fn mixture(
        &self,
        m: &mut Module,
        aligned: &HashMap<WeightId, Vec<WeightId>>,
        (index, name, attn): (usize, &str, &Attention),
        computed: Option<Vec<Vec<f32>>>,
        routing: Routing,
    ) -> Result<Op, PassError> {
        let of_model = |i: usize| {
            let mut a = attn.clone();
            a.map_weights(&mut |id| aligned[&id][i]);
            a
        };
        let experts = match self.split_heads {
            Some(g) => self.split(m, &of_model(0), g)?,
            None => (0..self.experts.len()).map(of_model).collect(),
        };
        let total = experts.len();
        let q = m.weights.get(attn.q).map_err(weight_err(self.name()))?;
        let (hidden, dtype) = (q.shape[1], q.dtype.plain());
        let default_model = self.default_router_model();
        let rows =
            self.router
                .rows(self.name(), (index, total, hidden), computed, default_model)?;
        let router = m
            .weights
            .add(Weight {
                name: format!("{name}.router"),
                shape: vec![total, hidden],
                dtype,
                expr: rows,
            })
            .map_err(weight_err(self.name()))?;
        Ok(Op::MixtureOfAttention(MixtureOfAttention {
            router,
            experts,
            routing,
        }))
    }

    /// The model activation router modes run when they name none.
    fn default_router_model(&self) -> &str {
        let first = self.experts.first().map(String::as_str);
        self.base.as_deref().or(first).unwrap_or_default()
    }

    /// `a` cut into `g` experts of consecutive head groups, o's columns times `g`.
    fn split(&self, m: &mut Module, a: &Attention, g: usize) -> Result<Vec<Attention>, PassError> {
        if !a.n_heads.is_multiple_of(g) || !a.n_kv_heads.is_multiple_of(g) {
            return Err(self.invalid(format!(
                "split_heads {g} must divide both the {} heads and the {} KV heads",
                a.n_heads, a.n_kv_heads
            )));
        }
        if a.qk_norm.is_some() {
            return Err(self.invalid("split_heads of an attention with q/k norms".into()));
        }
        let (heads, kv_heads, d) = (a.n_heads / g, a.n_kv_heads / g, a.head_dim);
        let mut out = Vec::with_capacity(g);
        for e in 0..g {
            let mut rows = |id, per: usize| self.rows(m, id, e * per * d, per * d);
            let mut bias = |b: Option<_>, per| b.map(|b| rows(b, per)).transpose();
            let (q_bias, k_bias, v_bias) = (
                bias(a.q_bias, heads)?,
                bias(a.k_bias, kv_heads)?,
                bias(a.v_bias, kv_heads)?,
            );
            out.push(Attention {
                q: self.rows(m, a.q, e * heads * d, heads * d)?,
                k: self.rows(m, a.k, e * kv_heads * d, kv_heads * d)?,
                v: self.rows(m, a.v, e * kv_heads * d, kv_heads * d)?,
                o: self.columns(m, a.o, e * heads * d, heads * d, g as f32)?,
                q_bias,
                k_bias,
                v_bias,
                n_heads: heads,
                n_kv_heads: kv_heads,
                ..a.clone()
            });
        }
        Ok(out)
    }

    /// Rows (elements, for a 1-D weight) `start..start + count` of `id`.
    fn rows(
        &self,
        m: &mut Module,
        id: WeightId,
        start: usize,
        count: usize,
    ) -> Result<WeightId, PassError> {
        let w = m.weights.get(id).map_err(weight_err(self.name()))?.clone();
        let mut shape = w.shape.clone();
        shape[0] = count;
        let rows: Vec<u32> = (start..start + count).map(|r| r as u32).collect();
        m.weights
            .add(Weight {
                name: format!("{}.rows{start}", w.name),
                shape,
                dtype: w.dtype.plain(),
                expr: WeightExpr::Rows(id, rows.into()),
            })
            .map_err(weight_err(self.name()))
    }

    /// Columns `start..start + width` of `id`, times `scale`.
    fn columns(
        &self,
        m: &mut Module,
        id: WeightId,
        start: usize,
        width: usize,
        scale: f32,
    ) -> Result<WeightId, PassError> {
        let w = m.weights.get(id).map_err(weight_err(self.name()))?.clone();
        let add = |m: &mut Module, name: String, expr| {
            m.weights
                .add(Weight {
                    name,
                    shape: vec![w.shape[0], width],
                    dtype: w.dtype.plain(),
                    expr,
                })
                .map_err(weight_err(self.name()))
        };
        let part = add(
            m,
            format!("{}.columns{start}", w.name),
            WeightExpr::Columns { of: id, start },
        )?;
        add(
            m,
            format!("{}.columns{start}.scaled", w.name),
            WeightExpr::Scale(scale, part),
        )
    }
}

impl Pass for AttentionExperts {
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
        let total = self.expert_count()?;
        let routing = self.routing(total)?;
        if m.graph(&self.into).is_some() {
            return Err(self.invalid(format!("a model named `{}` already exists", self.into)));
        }
        let n = self.experts.len();
        let weights = match &self.weights {
            Some(w) => w.check(n, true).map(|()| w.values.clone()),
            None => Ok(vec![1.0; n]),
        }
        .map_err(|e| self.invalid(e))?;
        let selected = self.selected_layers(m)?;
        let mut models = self.experts.clone();
        let base = self.base.as_ref().map(|b| {
            models.push(b.clone());
            models.len() - 1
        });
        let aligned = align(m, self.name(), &models)?;
        let template = graph(m, self.name(), &self.experts[0])?.clone();
        let mut activation_rows = match self.router.needs_runtime() {
            true => {
                let rows = self.router.activation_rows(
                    m,
                    cx,
                    self.name(),
                    &self.experts,
                    &selected,
                    self.default_router_model(),
                )?;
                selected.iter().copied().zip(rows).collect()
            }
            false => HashMap::new(),
        };
        let ids = template.weight_ids();
        let params = combined_weights(m, self.name(), &aligned, &ids, (base, &weights))?;

        let mut out = template;
        out.name = self.into.clone();
        if let Some(base) = &self.base {
            out.meta = graph(m, self.name(), base)?.meta.clone();
        }
        let order = out.topo_order().unwrap_or_else(|_| out.node_ids());
        let mut index = 0;
        for node in order {
            let Op::Attention(attn) = out.node(node).op.clone() else {
                out.node_mut(node).op.map_weights(|id| params[&id]);
                continue;
            };
            index += 1;
            if !selected.contains(&(index - 1)) {
                out.node_mut(node).op.map_weights(|id| params[&id]);
                continue;
            }
            let name = out.node(node).name.clone();
            let computed = activation_rows.remove(&(index - 1));
            let layer = (index - 1, name.as_str(), &attn);
            out.node_mut(node).op = self.mixture(m, &aligned, layer, computed, routing)?;
        }
        m.insert(out);
        Ok(vec![self.into.clone()])
    }

    fn reads(&self) -> Vec<String> {
        let mut models = self.experts.clone();
        models.extend(self.base.iter().cloned());
        self.router
            .with_router_model(models, self.default_router_model())
    }
}
