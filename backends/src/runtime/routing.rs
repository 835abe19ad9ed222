//! Routing, shared by both mixtures (FFN experts and attention experts): softmax of the
//! router logits, the top-k experts of each row with their probabilities (renormalised to
//! sum to one if the op says so), taken on the device with `topk_with_indices` (which
//! autodiff can differentiate). Soft routing is top-k over every expert without
//! renormalisation: the softmax itself.

use super::kernels::Kernels;
use burn_tensor::activation::softmax;
use burn_tensor::{IndexingUpdateOp, Int, Tensor};
use upmix_ir::{Routing, WeightId, WeightTable};

use super::layers::Projection;
use super::params::Params;
use crate::BackendError;

/// A lowered router.
pub(crate) struct Router {
    /// `[hidden, experts]` (already transposed).
    proj: Projection,
    routing: Routing,
    experts: usize,
}

impl Router {
    pub fn new<B: Kernels>(
        params: &mut Params<B>,
        weights: &WeightTable,
        router: WeightId,
        routing: Routing,
        experts: usize,
    ) -> Result<Self, BackendError> {
        Ok(Router {
            proj: Projection::new(params, weights, router, None)?,
            routing,
            experts,
        })
    }

    pub fn top_k(&self) -> usize {
        self.routing.top_k
    }

    /// The routing weights and expert ids of each row of `x`: `[rows, top_k]` each.
    pub fn route<B: Kernels>(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
        let logits = self.proj.forward(params, x);
        params.record_router(&logits, self.routing.top_k);
        let probs = softmax(logits, 1);
        let (top, index) = probs.topk_with_indices(self.routing.top_k, 1);
        let top = if self.routing.normalize {
            top.clone() / top.sum_dim(1)
        } else {
            top
        };
        (top, index)
    }

    /// Every row's weight for every expert, `[rows, experts]`: zero outside its top-k.
    pub fn dense_weights<B: Kernels>(&self, params: &Params<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let (top, index) = self.route(params, x);
        self.scatter(top, index)
    }

    /// Routing weights `top` of experts `index` (`[rows, top_k]` each, from
    /// [`Router::route`]) spread into `[rows, experts]`.
    pub fn scatter<B: Kernels>(&self, top: Tensor<B, 2>, index: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [rows, _] = top.dims();
        Tensor::<B, 2>::zeros([rows, self.experts], &top.device()).scatter(
            1,
            index,
            top,
            IndexingUpdateOp::Add,
        )
    }

    /// Whether every expert takes every row (soft routing): no expert can be skipped.
    pub fn is_soft(&self) -> bool {
        self.routing.is_soft(self.experts)
    }
}
