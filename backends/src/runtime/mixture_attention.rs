//! A routed mixture of attention experts (BAM), lowered: every expert is an
//! [`AttentionLayer`] over the same input, weighted per row by the router (module
//! `routing`; soft routing weights every expert by the softmax).
//!
//! Keys and values: with expert KV each expert projects its own and keeps its own cache;
//! with shared KV (every expert's k/v are the same weights) they are projected once into
//! one cache and every expert attends to them with its own queries. Every expert sees
//! every key, so each one's keys are computed for all rows whatever the routing. With
//! top-k routing and sparse dispatch, an expert no row is routed to skips its queries,
//! attention and output projection (in decoding, most experts); an expert that is routed
//! to runs on every row of the call and its output is weighted by the routing (zero for
//! the rows that did not pick it). [`MoeDispatch::Dense`] runs every expert, the
//! reference the sparse path is tested against.

use super::kernels::Kernels;
use burn_tensor::Tensor;
use upmix_ir::{MixtureOfAttention, WeightTable};

use super::attention::{AttentionLayer, CacheSet};
use super::frame::Frame;
use super::moe::MoeDispatch;
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
        let router = Router::new(
            params,
            weights,
            &upmix_ir::Router::Rows(m.router),
            m.routing,
            m.experts.len(),
        )?;
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
        dispatch: MoeDispatch,
    ) -> Result<Tensor<B, 2>, upmix_ir::RuntimeError> {
        let (top, index) = self.router.route(params, x.clone());
        let mut routed = vec![true; self.experts.len()];
        if dispatch == MoeDispatch::Sparse && !self.router.is_soft() {
            routed.fill(false);
            for e in super::ids_to_host(index.clone())? {
                routed[e as usize] = true;
            }
        }
        let weights = self.router.scatter(top, index);
        let shared = match self.shared_kv {
            true => {
                Some(self.experts[0].keys_values(params, x.clone(), frame, cache.as_deref_mut()))
            }
            false => None,
        };
        let mut out = x.zeros_like();
        for (e, expert) in self.experts.iter().enumerate() {
            // Keys and values go to the cache whether or not any row picks the expert.
            let kv = match &shared {
                Some(kv) => kv.clone(),
                None => expert.keys_values(params, x.clone(), frame, cache.as_deref_mut()),
            };
            if routed[e] {
                let y = expert.attend(params, x.clone(), kv, frame);
                out = out + y * weights.clone().narrow(1, e, 1);
            }
        }
        Ok(out)
    }
}
