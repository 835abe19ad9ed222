//! A routed mixture of attention experts (BAM), lowered: every expert is an
//! [`AttentionLayer`] over the same input, weighted per row by the router (module
//! `routing`; soft routing weights every expert by the softmax).
//!
//! Keys and values: with expert KV each expert projects its own and keeps its own cache;
//! with shared KV (every expert's k/v are the same weights) they are projected once into
//! one cache and every expert attends to them with its own queries. Every expert sees
//! every key, so each one's keys are computed for all rows whatever the routing; an expert
//! also runs its queries on every row (top-k routing zeroes the weights of the others),
//! which is exact and leaves sparse query dispatch as a later optimisation.

use super::kernels::Kernels;
use burn_tensor::Tensor;
use upmix_ir::{MixtureOfAttention, WeightTable};

use super::attention::{AttentionLayer, CacheSet};
use super::frame::Frame;
use super::params::Params;
use super::routing::Router;
use crate::BackendError;

/// One mixture-of-attention op, lowered.
pub(crate) struct MixtureOfAttentionLayer<B: Kernels> {
    router: Router,
    experts: Vec<AttentionLayer<B>>,
    shared_kv: bool,
}

impl<B: Kernels> MixtureOfAttentionLayer<B> {
    /// Lowers `m`; its caches take the slots from `*cache_slots` on, which it advances
    /// (one slot with shared KV, one per expert otherwise).
    pub fn new(
        m: &MixtureOfAttention,
        params: &mut Params<B>,
        weights: &WeightTable,
        ropes: &mut Vec<Vec<f32>>,
        cache_slots: &mut usize,
        device: &B::Device,
    ) -> Result<Self, BackendError> {
        let shared_kv = m.shared_kv();
        let mut experts = Vec::with_capacity(m.experts.len());
        for (e, a) in m.experts.iter().enumerate() {
            let slot = if shared_kv {
                *cache_slots
            } else {
                *cache_slots + e
            };
            experts.push(AttentionLayer::new(
                a, params, weights, ropes, slot, device,
            )?);
        }
        *cache_slots += if shared_kv { 1 } else { m.experts.len() };
        let router = Router::new(params, weights, m.router, m.routing, m.experts.len())?;
        Ok(MixtureOfAttentionLayer {
            router,
            experts,
            shared_kv,
        })
    }

    pub fn forward(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        frame: &mut Frame<B>,
        mut cache: Option<&mut CacheSet<B>>,
    ) -> Tensor<B, 2> {
        let weights = self.router.dense_weights(params, x.clone());
        let shared = match self.shared_kv {
            true => {
                Some(self.experts[0].keys_values(params, x.clone(), frame, cache.as_deref_mut()))
            }
            false => None,
        };
        let mut out = x.zeros_like();
        for (e, expert) in self.experts.iter().enumerate() {
            let kv = match &shared {
                Some(kv) => kv.clone(),
                None => expert.keys_values(params, x.clone(), frame, cache.as_deref_mut()),
            };
            let y = expert.attend(params, x.clone(), kv, frame);
            out = out + y * weights.clone().narrow(1, e, 1);
        }
        out
    }
}
