//! The layers of a lowered graph: device-resident weights plus the tensor math of each op.
//!
//! Activations are 2-D `[tokens, width]` tensors (one sequence, no batch dimension). The
//! math follows Hugging Face transformers' fp32 eager implementations:
//! - [`Projection`]: `x W^T (+ b)`, with `W^T` prepared once at load;
//! - [`rms_norm`]: `x * 1/sqrt(mean(x^2) + eps) * w`;
//! - [`AttentionLayer`]: q/k/v projections, rotary embeddings in the rotate-half
//!   convention, grouped-query heads sharing their KV head, `softmax(q k^T / sqrt(d) +
//!   causal mask) v`, output projection; with an optional per-layer KV cache;
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

/// Rotary `(cos, sin)` tables.
type CosSin<B> = (Tensor<B, 3>, Tensor<B, 3>);

/// Tensors that every attention layer of one forward call shares, built once per call
/// instead of once per layer: the rotary `cos`/`sin` tables of each distinct RoPE setting
/// and the causal masks.
pub(crate) struct Positions<B: Backend> {
    /// Position of the first token of the call.
    pub start: usize,
    pub tokens: usize,
    /// `(cos, sin)`, each `[tokens, heads, head_dim]`, by RoPE slot and head count.
    /// Expanded over heads so that applying them is a contiguous element-wise op.
    rotary: Vec<((usize, usize), CosSin<B>)>,
    /// Additive causal masks `[kv_heads, repeats * tokens, start + tokens]`, by
    /// `(kv_heads, repeats)`; expanded for the same reason.
    masks: Vec<((usize, usize), Tensor<B, 3>)>,
}

impl<B: Backend> Positions<B> {
    pub fn new(start: usize, tokens: usize) -> Self {
        Positions {
            start,
            tokens,
            rotary: Vec::new(),
            masks: Vec::new(),
        }
    }

    /// `cos` and `sin` of `position * inv_freq`, duplicated over both halves of the head
    /// (`emb = cat(freqs, freqs)`), for `heads` heads: `[tokens, heads, head_dim]`.
    fn rotary(&mut self, slot: usize, heads: usize, inv_freq: &Tensor<B, 2>) -> CosSin<B> {
        if let Some((_, t)) = self.rotary.iter().find(|(k, _)| *k == (slot, heads)) {
            return t.clone();
        }
        let device = inv_freq.device();
        let (start, tokens) = (self.start, self.tokens);
        let positions = Tensor::<B, 1, Int>::arange(start as i64..(start + tokens) as i64, &device)
            .float()
            .reshape([tokens, 1]);
        let freqs = positions * inv_freq.clone();
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 1)
            .unsqueeze_dim::<3>(1)
            .repeat_dim(1, heads);
        let t = (emb.clone().cos(), emb.sin());
        self.rotary.push(((slot, heads), t.clone()));
        t
    }

    /// The additive causal mask for `repeats` query heads stacked per KV head: row
    /// `r * tokens + i` (query position `start + i`) may see keys `0..=start + i`.
    fn mask(&mut self, kv_heads: usize, repeats: usize, device: &B::Device) -> Tensor<B, 3> {
        if let Some((_, m)) = self.masks.iter().find(|(k, _)| *k == (kv_heads, repeats)) {
            return m.clone();
        }
        let keys = self.start + self.tokens;
        let future =
            Tensor::<B, 2, Bool>::tril_mask([self.tokens, keys], self.start as i64, device);
        let mask = Tensor::<B, 2>::zeros([self.tokens, keys], device)
            .mask_fill(future, f32::MIN)
            .repeat_dim(0, repeats)
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, kv_heads);
        self.masks.push(((kv_heads, repeats), mask.clone()));
        mask
    }
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
    /// Index of this layer's RoPE setting in a call's [`Positions`].
    pub rope_slot: usize,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation matrix, so that it runs
    /// as one contiguous matmul (exact: every output is one input times +-1).
    pub rotate_half: Tensor<B, 2>,
    /// Index of this layer's slot in the runtime's KV caches.
    pub cache_slot: usize,
}

impl<B: Backend> AttentionLayer<B> {
    /// Attends the rows of `x` (at positions `pos.start..`) to themselves and, when
    /// `cache` is given, to the positions cached before them; the new keys and values are
    /// appended to the cache.
    ///
    /// Grouped-query attention without copying KV heads: the `n_heads / n_kv_heads` query
    /// heads that share a KV head are stacked along the query axis, so each KV head does
    /// one `[repeats * tokens, keys]` score matmul.
    pub fn forward(
        &self,
        x: Tensor<B, 2>,
        pos: &mut Positions<B>,
        cache: Option<&mut Option<KvCache<B>>>,
    ) -> Tensor<B, 2> {
        let [tokens, _] = x.dims();
        let (heads, kv_heads, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (cos, sin) = pos.rotary(self.rope_slot, heads, &self.inv_freq);
        let q = self.rope(self.q.forward(x.clone()), heads, &cos, &sin);
        let (cos, sin) = pos.rotary(self.rope_slot, kv_heads, &self.inv_freq);
        let k = self.rope(self.k.forward(x.clone()), kv_heads, &cos, &sin);
        let v = self.v.forward(x).reshape([tokens, kv_heads, d]);
        // [kv_heads, tokens, head_dim]
        let (k, v) = (k.swap_dims(0, 1), v.swap_dims(0, 1));

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
        let repeats = heads / kv_heads;
        // Head h = g * repeats + r reads KV head g: stack its queries as rows r * tokens + i.
        let q = q.swap_dims(0, 1).reshape([kv_heads, repeats * tokens, d]);
        let scale = (d as f64).powf(-0.5) as f32;
        let q_device = q.device();
        let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale);
        let scores = if tokens > 1 {
            scores + pos.mask(kv_heads, repeats, &q_device)
        } else {
            // A single query at the newest position sees every cached key.
            scores
        };
        let context = softmax(scores, 2)
            .matmul(v)
            .reshape([heads, tokens, d])
            .swap_dims(0, 1)
            .reshape([tokens, heads * d]);
        self.o.forward(context)
    }

    /// `x * cos + rotate_half(x) * sin` on `[tokens, n * head_dim]`, returning
    /// `[tokens, n, head_dim]`.
    fn rope(
        &self,
        x: Tensor<B, 2>,
        n: usize,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let [tokens, _] = x.dims();
        let d = self.head_dim;
        let rotated = x
            .clone()
            .reshape([tokens * n, d])
            .matmul(self.rotate_half.clone())
            .reshape([tokens, n, d]);
        x.reshape([tokens, n, d]) * cos.clone() + rotated * sin.clone()
    }
}

/// The matrix `R` with `x R = rotate_half(x) = cat(-x2, x1)` for rows `x` of `head_dim`.
pub(crate) fn rotate_half_matrix(head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut r = vec![0f32; head_dim * head_dim];
    for j in 0..half {
        r[(j + half) * head_dim + j] = -1.0; // output j takes -x[j + half]
        r[j * head_dim + j + half] = 1.0; // output j + half takes x[j]
    }
    r
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
