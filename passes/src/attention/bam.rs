//! `Bam`: Branch-Attend-Mix (Zhang, Gritsch et al. 2024), dense branches into a model with
//! both FFN experts and attention experts, by composing the passes that make each part:
//!
//! 1. [`Upcycle`]: each branch's FFN becomes an expert of a top-k mixture, every other
//!    parameter averaged (or `base`'s);
//! 2. [`AttentionExperts`]: each branch's attention becomes an expert (`attention`: soft
//!    routing by default, the paper's best), put in place of the averaged attention;
//! 3. [`ShareKv`] when `kv` is `Shared` (the mean of the experts' K/V) or `From(model)`;
//! 4. [`ParallelAttention`] when `parallel` names the norm to keep.
//!
//! Both routers start as `router` says. Function-preserving when the branches are copies
//! of one model (soft attention routing, any FFN top-k) and `parallel` is not set.

use std::path::{Path, PathBuf};

use upmix_ir::{Module, Op};

use crate::attention_experts::{AttentionExperts, AttentionRouting};
use crate::parallel_attention::{KeptNorm, ParallelAttention};
use crate::settings::{check_experts, ModelLayers, SettingError};
use crate::pass::{Pass, PassContext, PassError, PassName};

use crate::share_kv::ShareKv;
use crate::upcycle::Upcycle;

expert_pass! {
    /// Pipeline spec: `Bam(into: "bam", experts: ["code", "law", "math"], top_k: 2, kv:
    /// Shared)`.
    pub struct Bam {
        /// FFN experts each token is routed to.
        pub top_k: usize,
        /// Attention routing: `Soft` (default) or `TopK(k)`.
        #[serde(default)]
        pub attention: AttentionRouting,
        /// Keys and values: `Expert` (default, each expert its own), `Shared` (their mean) or
        /// `From("model")`.
        #[serde(default)]
        pub kv: KvSource,
        /// Make blocks parallel, keeping this norm (default: blocks stay as they are).
        #[serde(default)]
        pub parallel: Option<KeptNorm>,
    }
}

/// Where the attention experts' keys and values come from.
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq, Eq)]
pub enum KvSource {
    /// Each expert its own (one KV cache per expert).
    #[default]
    Expert,
    /// The mean of the experts' (one shared cache).
    Shared,
    /// The same layer of this model (one shared cache).
    From(String),
}

impl Pass for Bam {
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
        if m.graph(&self.into).is_some() {
            return Err(PassError::Invalid {
                pass: self.name().into(),
                message: format!("a model named `{}` already exists", self.into),
            });
        }
        let attention_part = format!("{}.attention-experts", self.into);
        let result = self.compose(m, cx, &attention_part);
        m.graphs.remove(&attention_part);
        if result.is_err() {
            m.graphs.remove(&self.into);
        }
        result.map(|()| vec![self.into.clone()])
    }

    fn reads(&self) -> Vec<String> {
        let mut models = self.experts.clone();
        models.extend(self.base.iter().cloned());
        if let KvSource::From(model) = &self.kv {
            models.push(model.clone());
        }
        let first = self.experts.first().map(String::as_str);
        let default_model = self.base.as_deref().or(first).unwrap_or_default();
        self.router.with_router_model(models, default_model)
    }
}

impl Bam {
    /// Runs the steps of the module doc; `attention_part` names the model of step 2.
    fn compose(
        &self,
        m: &mut Module,
        cx: &mut PassContext,
        attention_part: &str,
    ) -> Result<(), PassError> {
        let upcycle = Upcycle {
            into: self.into.clone(),
            experts: self.experts.clone(),
            top_k: self.top_k,
            router: self.router.clone(),
            base: self.base.clone(),
            weights: self.weights.clone(),
            shared_expert: None,
            layers: self.layers.clone(),
            granularity: None,
            normalize_top_k: None,
        };
        upcycle.run(m, cx)?;
        let attention = AttentionExperts {
            into: attention_part.to_string(),
            experts: self.experts.clone(),
            routing: self.attention,
            router: self.router.clone(),
            base: self.base.clone(),
            weights: self.weights.clone(),
            layers: self.layers.clone(),
            split_heads: None,
        };
        attention.run(m, cx)?;
        // Attention experts replace the averaged attention, node by node name.
        let mixtures: Vec<(String, Op)> = {
            let g = &m.graphs[attention_part];
            g.node_ids()
                .into_iter()
                .filter(|&n| matches!(g.node(n).op, Op::MixtureOfAttention(_)))
                .map(|n| (g.node(n).name.clone(), g.node(n).op.clone()))
                .collect()
        };
        let g = m.graph_mut(&self.into).expect("made by Upcycle");
        for (name, op) in mixtures {
            let id = g
                .find(&name)
                .expect("both parts come from the same template");
            g.node_mut(id).op = op;
        }
        let share = |from| ShareKv {
            model: self.into.clone(),
            from,
        };
        match &self.kv {
            KvSource::Expert => Vec::new(),
            KvSource::Shared => share(None).run(m, cx)?,
            KvSource::From(model) => share(Some(model.clone())).run(m, cx)?,
        };
        if let Some(keep) = self.parallel {
            let parallel = ParallelAttention {
                model: self.into.clone(),
                keep,
            };
            parallel.run(m, cx)?;
        }
        Ok(())
    }
}
