//! Routing, shared by both mixtures (FFN experts and attention experts): softmax of the
//! router logits, the top-k experts of each row with their probabilities (renormalised to
//! sum to one if the op says so), taken on the device with `topk_with_indices` (which
//! autodiff can differentiate). Soft routing is top-k over every expert without
//! renormalisation: the softmax itself.
//!
//! The logits are `x R^T` for router rows `R` (`[experts, hidden]`): a weight of their own,
//! or (Nexus) projected from the experts' domain embeddings on every call, `R =
//! projection(domains)`, so that training reaches the projection and an expert added
//! later routes through the same projection.

use super::kernels::Kernels;
use burn_tensor::activation::softmax;
use burn_tensor::{IndexingUpdateOp, Int, Tensor};
use upmix_ir::{Routing, WeightTable};

use super::layers::{Projection, SwiGlu};
use super::params::{Form, Params, P};
use crate::BackendError;

/// Where a lowered router's rows come from.
enum Rows {
    /// `[hidden, experts]` (already transposed).
    Plain(Projection),
    /// `domains`: `[experts, embed]`, projected to `[experts, hidden]` on every call.
    Projected { domains: P, projection: SwiGlu },
}

/// A lowered router.
pub(crate) struct Router {
    rows: Rows,
    routing: Routing,
    experts: usize,
}

impl Router {
    pub fn new<B: Kernels>(
        params: &mut Params<B>,
        weights: &WeightTable,
        router: &upmix_ir::Router,
        routing: Routing,
        experts: usize,
    ) -> Result<Self, BackendError> {
        let rows = match router {
            upmix_ir::Router::Rows(id) => Rows::Plain(Projection::new(params, weights, *id, None)?),
            upmix_ir::Router::Projected(p) => Rows::Projected {
                domains: params.request(weights, p.domains, Form::Plain)?,
                projection: SwiGlu::new(params, weights, &p.projection)?,
            },
        };
        Ok(Router {
            rows,
            routing,
            experts,
        })
    }

    /// The router logits of each row of `x`, `[rows, experts]`.
    fn logits<B: Kernels>(&self, params: &Params<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.rows {
            Rows::Plain(proj) => proj.forward(params, x),
            Rows::Projected {
                domains,
                projection,
            } => {
                let rows = projection.forward(params, params.get(*domains));
                x.matmul(rows.transpose())
            }
        }
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
        let logits = self.logits(params, x);
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
