//! The element-wise hot spots of a forward pass: RMSNorm, the SwiGLU activation, rotary
//! embeddings and the masked softmax of attention scores.
//!
//! [`Kernels`] gives each one backend-generic default built from burn ops (what GPU
//! backends and autodiff use). burn-flex, the CPU backend, runs each as one fused pass
//! over memory instead of several: in place when the input is not shared, parallel over
//! rows, with an `exp` that the compiler vectorises. The fused versions compute the same
//! formulas in the same order as the defaults (RMSNorm accumulates its sum of squares in
//! another order, and `exp` is a polynomial within 2 ulp of the C library's). Under
//! autodiff on the CPU (training), module `flex_autodiff` runs the same fused kernels and
//! gives each a fused backward pass; `weighted_nll` is the training loss's kernel.

use burn_tensor::activation::{log_softmax, silu, softmax};
use burn_tensor::backend::Backend;
use burn_tensor::{Int, Tensor, TensorData};

use super::quantized::{Activations, QuantMatrix};

/// The fused operations a backend may provide.
pub trait Kernels: Backend {
    /// Whether quantized weights stay quantized (in host memory) and are multiplied by
    /// [`Kernels::project_quantized`]; otherwise they are dequantized on upload.
    const KEEPS_QUANTIZED: bool = false;

    /// `x W^T` for activations `x` (`[rows, in]`) and a quantized `[out, in]` weight.
    fn project_quantized(
        x: Tensor<Self, 2>,
        w: &QuantMatrix,
        activations: Activations,
    ) -> Tensor<Self, 2> {
        let _ = (x, w, activations);
        unreachable!("only backends that keep weights quantized hold quantized matrices")
    }

    /// Rows `ids` of a quantized table, dequantized: `[ids.len(), cols]`.
    fn quantized_rows(w: &QuantMatrix, ids: Tensor<Self, 1, Int>) -> Tensor<Self, 2> {
        let _ = (w, ids);
        unreachable!("only backends that keep weights quantized hold quantized matrices")
    }

    /// `x w` for activations `x` (`[rows, in]`) and a prepared `[in, out]` weight.
    fn project(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// `x * 1/sqrt(mean(x^2, last dim) + eps) * weight`; `weight` is `[1, hidden]`.
    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 2>, eps: f32) -> Tensor<Self, 2> {
        let variance = x.clone().square().mean_dim(1);
        let inv_rms = variance.add_scalar(eps).sqrt().recip();
        x * inv_rms * weight
    }

    /// `silu(gate) * up`.
    fn silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        silu(gate) * up
    }

    /// `x * cos + rotate_half(x) * sin` on `[rows, heads, head_dim]`, with `cos` and `sin`
    /// of the same shape; `rotate_half` is the `[head_dim, head_dim]` matrix of
    /// `rotate_half(x) = cat(-x2, x1)` (exact: every output is one input times +-1).
    fn rope(
        x: Tensor<Self, 3>,
        cos: Tensor<Self, 3>,
        sin: Tensor<Self, 3>,
        rotate_half: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        let [rows, heads, d] = x.dims();
        let rotated = x
            .clone()
            .reshape([rows * heads, d])
            .matmul(rotate_half)
            .reshape([rows, heads, d]);
        x * cos + rotated * sin
    }

    /// `x` with a contiguous layout (after a permutation), same values.
    fn contiguous<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        // Backends copy a non-contiguous tensor when an op needs it contiguous.
        x
    }

    /// `cache` with `values` (`[b, h, n, d]`) written at positions `start..start + n` of
    /// its third dimension, in place where the backend can.
    fn write_columns(
        cache: Tensor<Self, 4>,
        start: usize,
        values: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        let [b, h, n, d] = values.dims();
        cache.slice_assign([0..b, 0..h, start..start + n, 0..d], values)
    }

    /// `sum_r weights[r] * -log(softmax(logits_r)[targets[r]])` over the rows of
    /// `[rows, vocab]` logits: a weighted next-token loss (`[1]`).
    fn weighted_nll(logits: Tensor<Self, 2>, targets: &[u32], weights: &[f32]) -> Tensor<Self, 1> {
        let device = logits.device();
        let rows = targets.len();
        let targets: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
        let targets =
            Tensor::<Self, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
        let weights =
            Tensor::<Self, 2>::from_data(TensorData::new(weights.to_vec(), [rows, 1]), &device);
        let picked = log_softmax(logits, 1).gather(1, targets);
        (picked * weights).sum().neg()
    }

    /// `softmax(scores + mask)` over the last dimension.
    fn masked_softmax(scores: Tensor<Self, 4>, mask: Option<Tensor<Self, 4>>) -> Tensor<Self, 4> {
        match mask {
            Some(mask) => softmax(scores + mask, 3),
            None => softmax(scores, 3),
        }
    }
}

#[cfg(feature = "wgpu")]
impl Kernels for burn_wgpu::Wgpu {}

#[cfg(feature = "cuda")]
impl Kernels for burn_cuda::Cuda {}

/// Training on GPUs: autodiff records the defaults, built from burn ops it can
/// differentiate. On the CPU (module `flex_autodiff`) the fused kernels carry their own
/// backward.
#[cfg(feature = "wgpu")]
impl<C: burn_autodiff::checkpoint::strategy::CheckpointStrategy> Kernels
    for burn_autodiff::Autodiff<burn_wgpu::Wgpu, C>
{
}

#[cfg(feature = "cuda")]
impl<C: burn_autodiff::checkpoint::strategy::CheckpointStrategy> Kernels
    for burn_autodiff::Autodiff<burn_cuda::Cuda, C>
{
}

mod axpy;
mod exp;
mod flex;
mod flex_autodiff;
pub(crate) mod qdot;
