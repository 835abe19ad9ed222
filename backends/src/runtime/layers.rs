//! The layers of a lowered graph: device-resident weights plus the tensor math of each op.
//!
//! Activations are 2-D `[tokens, width]` tensors (one sequence, no batch dimension). The
//! math follows Hugging Face transformers' fp32 eager implementations:
//! - [`Projection`]: `x W^T (+ b)`, with `W^T` prepared once at load;
//! - [`rms_norm`]: `x * 1/sqrt(mean(x^2) + eps) * w`;
//! - [`AttentionLayer`]: q/k/v projections, rotary embeddings in the rotate-half
//!   convention, grouped-query heads repeated to the query heads, `softmax(q k^T /
//!   sqrt(d) + causal mask) v`, output projection; with an optional per-layer KV cache;
//! - [`SwiGlu`]: `down(silu(gate x) * up x)`;
//! - [`MoeLayer`]: softmax router, top-k (optionally renormalised) mixing weights scattered
//!   into a dense `[tokens, experts]` matrix, weighted sum of expert outputs, plus the
//!   (optionally sigmoid-gated) shared expert.
//!
//! Everything stays on the device: routing, top-k and cache updates are tensor ops.

use burn_tensor::activation::{sigmoid, silu, softmax};
use burn_tensor::backend::Backend;
use burn_tensor::{Bool, IndexingUpdateOp, Int, Tensor};

/// A linear map `x W^T (+ b)`.
pub(crate) struct Projection<B: Backend> {
    /// `W^T`: `[in, out]`.
    pub weight_t: Tensor<B, 2>,
    /// `[1, out]`, broadcast over tokens.
    pub bias: Option<Tensor<B, 2>>,
}

impl<B: Backend> Projection<B> {
    /// `x`: `[tokens, in]` -> `[tokens, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.weight_t.clone());
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
}

/// `x * 1/sqrt(mean(x^2, last dim) + eps) * weight`; `weight` is `[1, hidden]`.
pub(crate) fn rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    eps: f32,
) -> Tensor<B, 2> {
    let variance = x.clone().square().mean_dim(1);
    let inv_rms = variance.add_scalar(eps).sqrt().recip();
    x * inv_rms * weight.clone()
}

/// Table lookup: rows of `table` (`[vocab, hidden]`) for each token id.
pub(crate) fn embed<B: Backend>(table: &Tensor<B, 2>, tokens: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    table.clone().select(0, tokens)
}

/// A SwiGLU feed-forward block.
pub(crate) struct SwiGlu<B: Backend> {
    pub gate: Projection<B>,
    pub up: Projection<B>,
    pub down: Projection<B>,
}

impl<B: Backend> SwiGlu<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gated = silu(self.gate.forward(x.clone())) * self.up.forward(x);
        self.down.forward(gated)
    }
}

/// The keys and values an attention layer has seen so far: `[n_kv_heads, positions, head_dim]`
/// each, after RoPE and before the heads are repeated for GQA.
#[derive(Clone)]
pub(crate) struct KvCache<B: Backend> {
    pub k: Tensor<B, 3>,
    pub v: Tensor<B, 3>,
}

/// Causal self-attention with rotary position embeddings.
pub(crate) struct AttentionLayer<B: Backend> {
    pub q: Projection<B>,
    pub k: Projection<B>,
    pub v: Projection<B>,
    pub o: Projection<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rotary inverse frequencies, `[1, head_dim / 2]`.
    pub inv_freq: Tensor<B, 2>,
    /// Index of this layer's slot in the runtime's KV caches.
    pub cache_slot: usize,
}

impl<B: Backend> AttentionLayer<B> {
    /// Attends the `tokens` rows of `x` (at positions `start..start + tokens`) to themselves
    /// and, when `cache` is given, to the positions cached before them; the new keys and
    /// values are appended to the cache.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        start: usize,
        cache: Option<&mut Option<KvCache<B>>>,
    ) -> Tensor<B, 2> {
        let [tokens, _] = x.dims();
        let (cos, sin) = self.rotary(start, tokens, &x.device());

        let q = self.split_heads(self.q.forward(x.clone()), self.n_heads);
        let k = self.split_heads(self.k.forward(x.clone()), self.n_kv_heads);
        let v = self.split_heads(self.v.forward(x), self.n_kv_heads);
        let q = apply_rope(q, &cos, &sin);
        let k = apply_rope(k, &cos, &sin);

        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some(past) => (
                        Tensor::cat(vec![past.k, k], 1),
                        Tensor::cat(vec![past.v, v], 1),
                    ),
                    None => (k, v),
                };
                *slot = Some(KvCache {
                    k: k.clone(),
                    v: v.clone(),
                });
                (k, v)
            }
        };
        let keys = k.dims()[1];
        let repeats = self.n_heads / self.n_kv_heads;
        let k = repeat_kv(k, repeats);
        let v = repeat_kv(v, repeats);

        let scale = (self.head_dim as f64).powf(-0.5) as f32;
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale);
        let scores = if tokens > 1 {
            let mask = causal_mask::<B>(tokens, keys, start, &scores.device());
            scores + mask.unsqueeze_dim(0)
        } else {
            // A single query at the newest position sees every cached key.
            scores
        };
        let probs = softmax(scores, 2);
        let context = probs
            .matmul(v)
            .swap_dims(0, 1)
            .reshape([tokens, self.n_heads * self.head_dim]);
        self.o.forward(context)
    }

    /// `[tokens, heads * head_dim]` -> `[heads, tokens, head_dim]`.
    fn split_heads(&self, x: Tensor<B, 2>, heads: usize) -> Tensor<B, 3> {
        let [tokens, _] = x.dims();
        x.reshape([tokens, heads, self.head_dim]).swap_dims(0, 1)
    }

    /// `cos` and `sin` of `position * inv_freq`, duplicated to `[tokens, head_dim]`
    /// (`emb = cat(freqs, freqs)`).
    fn rotary(
        &self,
        start: usize,
        tokens: usize,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let positions = Tensor::<B, 1, Int>::arange(start as i64..(start + tokens) as i64, device)
            .float()
            .reshape([tokens, 1]);
        let freqs = positions * self.inv_freq.clone();
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 1);
        (emb.clone().cos(), emb.sin())
    }
}

/// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = cat(-x2, x1)` over the two
/// halves of the head dimension; `x` is `[heads, tokens, head_dim]`.
fn apply_rope<B: Backend>(x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
    let half = x.dims()[2] / 2;
    let x1 = x.clone().narrow(2, 0, half);
    let x2 = x.clone().narrow(2, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
    x * cos.clone().unsqueeze_dim(0) + rotated * sin.clone().unsqueeze_dim(0)
}

/// Repeats each KV head `repeats` times in place (`[kv, s, d]` -> `[kv * repeats, s, d]`),
/// so query head `h` reads KV head `h / repeats`.
fn repeat_kv<B: Backend>(x: Tensor<B, 3>, repeats: usize) -> Tensor<B, 3> {
    if repeats == 1 {
        return x;
    }
    let [kv, s, d] = x.dims();
    x.unsqueeze_dim::<4>(1)
        .repeat_dim(1, repeats)
        .reshape([kv * repeats, s, d])
}

/// Additive mask `[queries, keys]`: 0 where query `i` (at position `start + i`) may see key
/// `j`, the lowest f32 where `j > start + i`.
fn causal_mask<B: Backend>(
    queries: usize,
    keys: usize,
    start: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let future = Tensor::<B, 2, Bool>::tril_mask([queries, keys], start as i64, device);
    Tensor::<B, 2>::zeros([queries, keys], device).mask_fill(future, f32::MIN)
}

/// A shared expert: `sigmoid(x gate^T) * ffn(x)`, or `ffn(x)` without gate.
pub(crate) struct SharedExpertLayer<B: Backend> {
    pub ffn: SwiGlu<B>,
    /// `[hidden, 1]` (already transposed).
    pub gate: Option<Projection<B>>,
}

/// A routed mixture of SwiGLU experts.
pub(crate) struct MoeLayer<B: Backend> {
    /// Router `[hidden, experts]` (already transposed).
    pub router: Projection<B>,
    pub experts: Vec<SwiGlu<B>>,
    pub top_k: usize,
    pub normalize_top_k: bool,
    pub shared: Option<SharedExpertLayer<B>>,
}

impl<B: Backend> MoeLayer<B> {
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let weights = self.routing_weights(x.clone());
        let mut out = x.zeros_like();
        // Every expert runs on every token; unselected ones get weight exactly zero.
        for (e, expert) in self.experts.iter().enumerate() {
            let w = weights.clone().narrow(1, e, 1);
            out = out + expert.forward(x.clone()) * w;
        }
        if let Some(shared) = &self.shared {
            let y = shared.ffn.forward(x.clone());
            let y = match &shared.gate {
                Some(gate) => sigmoid(gate.forward(x)) * y,
                None => y,
            };
            out = out + y;
        }
        out
    }

    /// Dense `[tokens, experts]` mixing weights: softmax router probabilities at each
    /// token's top-k experts (renormalised to sum to one if asked), zero elsewhere.
    pub fn routing_weights(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let probs = softmax(self.router.forward(x), 1);
        let (top, index) = probs.clone().topk_with_indices(self.top_k, 1);
        let top = if self.normalize_top_k {
            top.clone() / top.sum_dim(1)
        } else {
            top
        };
        probs
            .zeros_like()
            .scatter(1, index, top, IndexingUpdateOp::Add)
    }
}
