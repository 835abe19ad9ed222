//! A routed mixture of SwiGLU experts (Mixtral, Qwen2-MoE, upcycled models).
//!
//! Routing: module `routing`. Dispatch: each expert gathers
//! only the rows routed to it, runs on them, and its outputs, scaled by their routing
//! weights, are added back into their rows (`select_assign` with `Add`). The expert ids are
//! read back to the host to size each expert's gather; the rows and weights stay on the
//! device. A shared expert runs on every row, optionally scaled by `sigmoid(x w)`.
//!
//! [`MoeDispatch::Dense`] keeps the reference formulation, every expert on every row
//! weighted by a mostly-zero `[rows, experts]` matrix, for tests.

use super::kernels::Kernels;
use burn_tensor::activation::sigmoid;
use burn_tensor::{IndexingUpdateOp, Tensor};
use upmix_ir::{MixtureOfExperts, RuntimeError, WeightTable};

use super::frame::upload_rows;
use super::layers::{Projection, SwiGlu};
use super::params::Params;
use super::routing::Router;
use crate::BackendError;

/// How a mixture gives rows to its experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeDispatch {
    /// Each expert runs only on the rows routed to it (the cost of the active parameters).
    #[default]
    Sparse,
    /// Every expert runs on every row; the reference the sparse path is tested against.
    Dense,
}

/// A shared expert: `sigmoid(x gate^T) * ffn(x)`, or `ffn(x)` without gate.
pub(crate) struct SharedExpertLayer {
    pub ffn: SwiGlu,
    /// `[hidden, 1]` (already transposed).
    pub gate: Option<Projection>,
}

/// One mixture-of-experts op, lowered.
pub(crate) struct MoeLayer {
    pub router: Router,
    pub experts: Vec<SwiGlu>,
    pub shared: Option<SharedExpertLayer>,
}

impl MoeLayer {
    pub fn new<B: Kernels>(
        m: &MixtureOfExperts,
        params: &mut Params<B>,
        weights: &WeightTable,
    ) -> Result<Self, BackendError> {
        let shared = match &m.shared_expert {
            None => None,
            Some(s) => Some(SharedExpertLayer {
                ffn: SwiGlu::new(params, weights, &s.ffn)?,
                gate: s
                    .gate
                    .map(|g| Projection::new(params, weights, g, None))
                    .transpose()?,
            }),
        };
        Ok(MoeLayer {
            router: Router::new(params, weights, &m.router, m.routing, m.experts.len())?,
            experts: m
                .experts
                .iter()
                .map(|f| SwiGlu::new(params, weights, f))
                .collect::<Result<_, _>>()?,
            shared,
        })
    }

    pub fn forward<B: Kernels>(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        dispatch: MoeDispatch,
    ) -> Result<Tensor<B, 2>, RuntimeError> {
        let routed = match dispatch {
            MoeDispatch::Sparse => self.sparse(params, x.clone())?,
            MoeDispatch::Dense => self.dense(params, x.clone()),
        };
        Ok(match &self.shared {
            None => routed,
            Some(shared) => {
                let y = shared.ffn.forward(params, x.clone());
                let y = match &shared.gate {
                    Some(gate) => sigmoid(gate.forward(params, x)) * y,
                    None => y,
                };
                routed + y
            }
        })
    }

    /// Token dispatch: each expert on its own rows only.
    fn sparse<B: Kernels>(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>, RuntimeError> {
        let [rows, _] = x.dims();
        let k = self.router.top_k();
        let (top, index) = self.router.route(params, x.clone());
        let ids = super::ids_to_host(index)?;
        // Slots of the flattened [rows * k] routing table, by expert.
        let mut slots = vec![Vec::new(); self.experts.len()];
        for (slot, &e) in ids.iter().enumerate() {
            slots[e as usize].push(slot);
        }
        let device = x.device();
        let top = top.reshape([rows * k]);
        let mut out = x.zeros_like();
        for (expert, slots) in self.experts.iter().zip(&slots) {
            if slots.is_empty() {
                continue;
            }
            let picked: Vec<usize> = slots.iter().map(|s| s / k).collect();
            let picked = upload_rows::<B>(&picked, &device);
            let weight = top
                .clone()
                .select(0, upload_rows::<B>(slots, &device))
                .reshape([slots.len(), 1]);
            let y = expert.forward(params, x.clone().select(0, picked.clone())) * weight;
            out = out.select_assign(0, picked, y, IndexingUpdateOp::Add);
        }
        Ok(out)
    }

    /// The reference: every expert on every row, weighted by a dense `[rows, experts]`
    /// matrix that is zero outside each row's top-k.
    fn dense<B: Kernels>(&self, params: &Params<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let weights = self.router.dense_weights(params, x.clone());
        let mut out = x.zeros_like();
        for (e, expert) in self.experts.iter().enumerate() {
            let w = weights.clone().narrow(1, e, 1);
            out = out + expert.forward(params, x.clone()) * w;
        }
        out
    }
}
