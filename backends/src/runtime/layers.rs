//! The row-wise layers of a lowered graph: their parameter handles and tensor math.
//!
//! Activations are 2-D `[rows, width]` tensors, a batch's sequences stacked row-wise
//! (attention, module `attention`, is the only layer that looks across rows). The math
//! follows Hugging Face transformers' fp32 eager implementations:
//! - [`Projection`]: `x W^T (+ b)`, with `W^T` prepared once at load;
//! - [`SwiGlu`]: `down(silu(gate x) * up x)`;
//! - [`standardize`]: LayerNorm's `(x - mean) / sqrt(var + eps)`, before its weight.
//!
//! RMSNorm and the SwiGLU activation are [`Kernels`] (fused on the CPU).

use super::kernels::Kernels;
use burn_tensor::{Int, Tensor};
use upmix_ir::{FeedForward, WeightId, WeightTable};

use super::params::{Form, Params, Stored, P};
use crate::BackendError;

/// `(x - mean(x)) / sqrt(var(x) + eps)` over each row of `x` (`[rows, width]`), the
/// biased variance, as transformers' Cohere LayerNorm computes it in f32.
pub(crate) fn standardize<B: Kernels>(x: Tensor<B, 2>, eps: f32) -> Tensor<B, 2> {
    let centered = x.clone() - x.mean_dim(1);
    let variance = centered.clone().square().mean_dim(1);
    centered * variance.add_scalar(eps).sqrt().recip()
}

/// A linear map `x W^T (+ b)`.
pub(crate) struct Projection {
    /// `W^T`: `[in, out]`.
    pub weight_t: P,
    /// `[1, out]`, broadcast over rows.
    pub bias: Option<P>,
}

impl Projection {
    /// A projection from an `[out, in]` weight and optional `[out]` bias.
    pub fn new<B: Kernels>(
        params: &mut Params<B>,
        weights: &WeightTable,
        weight: WeightId,
        bias: Option<WeightId>,
    ) -> Result<Self, BackendError> {
        Ok(Projection {
            weight_t: params.request(weights, weight, Form::Transposed)?,
            bias: bias
                .map(|b| params.request(weights, b, Form::Plain))
                .transpose()?,
        })
    }

    /// `x`: `[rows, in]` -> `[rows, out]`.
    pub fn forward<B: Kernels>(&self, params: &Params<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        params.tap(self.weight_t, &x);
        let y = match params.stored(self.weight_t) {
            Stored::Dense(w) => B::project(x, w.clone()),
            Stored::Quantized(w) => B::project_quantized(x, w, params.activations),
        };
        match self.bias {
            Some(b) => y + params.get(b),
            None => y,
        }
    }
}

/// The embedding table's rows for each token id.
pub(crate) struct Embedding {
    pub table: P,
    /// The table is held as `[hidden, vocab]` (shared with a tied lm head).
    pub transposed: bool,
}

impl Embedding {
    pub fn forward<B: Kernels>(
        &self,
        params: &Params<B>,
        tokens: Tensor<B, 1, Int>,
    ) -> Tensor<B, 2> {
        let table = match params.stored(self.table) {
            Stored::Dense(table) => table.clone(),
            Stored::Quantized(table) => return B::quantized_rows(table, tokens),
        };
        if self.transposed {
            table.select(1, tokens).transpose()
        } else {
            table.select(0, tokens)
        }
    }
}

/// A SwiGLU feed-forward block.
pub(crate) struct SwiGlu {
    pub gate: Projection,
    pub up: Projection,
    pub down: Projection,
}

impl SwiGlu {
    pub fn new<B: Kernels>(
        params: &mut Params<B>,
        weights: &WeightTable,
        f: &FeedForward,
    ) -> Result<Self, BackendError> {
        Ok(SwiGlu {
            gate: Projection::new(params, weights, f.gate, None)?,
            up: Projection::new(params, weights, f.up, None)?,
            down: Projection::new(params, weights, f.down, None)?,
        })
    }

    pub fn forward<B: Kernels>(&self, params: &Params<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gated = B::silu_mul(
            self.gate.forward(params, x.clone()),
            self.up.forward(params, x),
        );
        self.down.forward(params, gated)
    }
}
