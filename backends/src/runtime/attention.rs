//! Causal self-attention with rotary position embeddings, over a batch, with an optional
//! in-place KV cache.
//!
//! The math follows transformers' fp32 eager attention: q/k/v projections, optional
//! per-head q/k LayerNorms (Cohere), rotary embeddings (or none: NoPE), grouped-query
//! heads sharing their KV head, `softmax(q k^T / sqrt(d) + mask) v`, output projection.
//! The mask (causal, padding, sliding window) comes from the call's [`Frame`].
//!
//! Rotation runs in the rotate-half layout. Interleaved pairs (Cohere) are first moved
//! there by one permutation of each head's elements, the same for queries and keys, which
//! leaves every score `q . k` unchanged; the cache then holds permuted keys.
//!
//! The KV cache of a layer is one preallocated `[batch, kv_heads, capacity, head_dim]`
//! tensor each for keys and values, indexed by column (module `frame`); a call writes its
//! columns in place and attends to the filled prefix through a view, so a decode step
//! costs the attention over the past and never copies it. A cache that runs out of
//! capacity doubles.

use super::kernels::Kernels;
use burn_tensor::Tensor;
use upmix_ir::{Attention, RopePairs, WeightTable};

use super::frame::Frame;
use super::layers::{standardize, Projection};
use super::params::{upload, Form, Params, P};
use crate::BackendError;

/// Keys and values of every column seen so far, after RoPE and before GQA repetition:
/// `[batch, kv_heads, capacity, head_dim]` each.
pub(crate) struct KvCache<B: Kernels> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
}

impl<B: Kernels> KvCache<B> {
    fn zeros(shape: [usize; 4], device: &B::Device) -> Self {
        KvCache {
            k: Tensor::zeros(shape, device),
            v: Tensor::zeros(shape, device),
        }
    }

    /// Writes `k`, `v` (`[batch, kv_heads, n, head_dim]`) at columns `start..start + n`,
    /// growing the capacity if needed, and returns views of columns `0..start + n`.
    fn write(
        slot: &mut Option<Self>,
        start: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        capacity: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, n, d] = k.dims();
        let end = start + n;
        let mut cache = slot
            .take()
            .unwrap_or_else(|| Self::zeros([b, h, capacity.max(end), d], &k.device()));
        let held = cache.k.dims()[2];
        if held < end {
            let grown = Self::zeros([b, h, (2 * held).max(end) - held, d], &k.device());
            cache.k = Tensor::cat(vec![cache.k, grown.k], 2);
            cache.v = Tensor::cat(vec![cache.v, grown.v], 2);
        }
        // The cache tensors are uniquely held here, so they are written in place.
        cache.k = B::write_columns(cache.k, start, k);
        cache.v = B::write_columns(cache.v, start, v);
        let filled = [0..b, 0..h, 0..end, 0..d];
        let views = (
            cache.k.clone().slice(filled.clone()),
            cache.v.clone().slice(filled),
        );
        *slot = Some(cache);
        views
    }
}

/// The KV caches of every attention layer of a plan, for one batch.
pub(crate) struct CacheSet<B: Kernels> {
    pub layers: Vec<Option<KvCache<B>>>,
    /// Columns to allocate per layer on first write.
    pub capacity: usize,
}

impl<B: Kernels> CacheSet<B> {
    pub fn new(layers: usize, capacity: usize) -> Self {
        CacheSet {
            layers: (0..layers).map(|_| None).collect(),
            capacity,
        }
    }
}

/// One attention op, lowered.
pub(crate) struct AttentionLayer<B: Kernels> {
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    pub o: Projection,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    /// `None`: no positional encoding.
    rotary: Option<Rotary<B>>,
    /// Per-head LayerNorm weights of queries and keys, flattened to `[1, heads * head_dim]`,
    /// and their epsilon.
    qk_norm: Option<(P, P, f32)>,
    /// Index of this layer's cache in a [`CacheSet`].
    pub cache_slot: usize,
}

/// A layer's rotary embedding.
struct Rotary<B: Kernels> {
    /// Inverse frequencies, `[1, head_dim / 2]`.
    inv_freq: Tensor<B, 2>,
    /// Index of this layer's RoPE setting in a call's [`Frame`].
    slot: usize,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation matrix, so that it runs
    /// as one contiguous matmul (exact: every output is one input times +-1).
    rotate_half: Tensor<B, 2>,
    /// For interleaved pairs: the `[head_dim, head_dim]` permutation matrix taking
    /// `(x0, x1, x2, x3, ..)` to `(x0, x2, .., x1, x3, ..)`.
    deinterleave: Option<Tensor<B, 2>>,
}

impl<B: Kernels> AttentionLayer<B> {
    /// Lowers `a`; `ropes` collects the distinct inverse-frequency tables of a plan.
    pub fn new(
        a: &Attention,
        params: &mut Params<B>,
        weights: &WeightTable,
        ropes: &mut Vec<Vec<f32>>,
        cache_slot: usize,
        device: &B::Device,
    ) -> Result<Self, BackendError> {
        let d = a.head_dim;
        let rotary = a.rope.as_ref().map(|rope| {
            let inv_freq = rope.inv_freq(d);
            let slot = match ropes.iter().position(|r| *r == inv_freq) {
                Some(slot) => slot,
                None => {
                    ropes.push(inv_freq.clone());
                    ropes.len() - 1
                }
            };
            Rotary {
                inv_freq: upload(inv_freq, [1, d / 2], device),
                slot,
                rotate_half: upload(rotate_half_matrix(d), [d, d], device),
                deinterleave: (rope.pairs == RopePairs::Interleaved)
                    .then(|| upload(deinterleave_matrix(d), [d, d], device)),
            }
        });
        let qk_norm = match &a.qk_norm {
            Some(n) => Some((
                params.request(weights, n.q, Form::Flat)?,
                params.request(weights, n.k, Form::Flat)?,
                n.eps,
            )),
            None => None,
        };
        Ok(AttentionLayer {
            q: Projection::new(params, weights, a.q, a.q_bias)?,
            k: Projection::new(params, weights, a.k, a.k_bias)?,
            v: Projection::new(params, weights, a.v, a.v_bias)?,
            o: Projection::new(params, weights, a.o, None)?,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: d,
            window: a.window,
            rotary,
            qk_norm,
            cache_slot,
        })
    }

    /// Attends the rows of `x` (`[batch * tokens, width]`, the columns of `frame`) to the
    /// keys they may see: those of the call itself and, with `cache`, the columns cached
    /// before it; the call's keys and values are written to the cache.
    ///
    /// Grouped-query attention without copying KV heads: the `n_heads / n_kv_heads` query
    /// heads that share a KV head are stacked along the query axis, so each KV head does
    /// one `[repeats * tokens, keys]` score matmul.
    pub fn forward(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        frame: &mut Frame<B>,
        cache: Option<&mut CacheSet<B>>,
    ) -> Tensor<B, 2> {
        let (k, v) = self.keys_values(params, x.clone(), frame, cache);
        self.attend(params, x, (k, v), frame)
    }

    /// The keys and values the rows of `x` may attend to, `[batch, kv_heads, keys,
    /// head_dim]` each: those of the call and, with `cache`, the columns cached before it
    /// (the call's are written to the cache).
    pub fn keys_values(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        frame: &mut Frame<B>,
        cache: Option<&mut CacheSet<B>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (b, n) = (frame.batch(), frame.tokens);
        let (kv_heads, d) = (self.n_kv_heads, self.head_dim);
        let k_norm = self.qk_norm.map(|(_, k, eps)| (k, eps));
        let k = self.k.forward(params, x.clone());
        let k = self.position(params, k, kv_heads, k_norm, frame);
        let v = self.v.forward(params, x);
        // [batch, kv_heads, tokens, head_dim]
        let k = k.reshape([b, n, kv_heads, d]).swap_dims(1, 2);
        let v = v.reshape([b, n, kv_heads, d]).swap_dims(1, 2);
        match cache {
            None => (k, v),
            Some(set) => {
                let capacity = set.capacity;
                let slot = &mut set.layers[self.cache_slot];
                KvCache::write(slot, frame.start, k, v, capacity)
            }
        }
    }

    /// The attention of the rows of `x` over keys and values `(k, v)` from
    /// [`AttentionLayer::keys_values`], through the output projection.
    pub fn attend(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        (k, v): (Tensor<B, 4>, Tensor<B, 4>),
        frame: &mut Frame<B>,
    ) -> Tensor<B, 2> {
        let (b, n) = (frame.batch(), frame.tokens);
        let (heads, kv_heads, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let repeats = heads / kv_heads;
        let q_norm = self.qk_norm.map(|(q, _, eps)| (q, eps));
        let q = self.q.forward(params, x);
        let q = self.position(params, q, heads, q_norm, frame);
        // Head h = g * repeats + r reads KV head g: stack its queries as rows r * tokens + i.
        let q = B::contiguous(
            q.reshape([b, n, kv_heads, repeats, d])
                .permute([0, 2, 3, 1, 4]),
        )
        .reshape([b, kv_heads, repeats * n, d]);
        // Scaling q instead of the scores: fewer elements, and exact for the usual
        // power-of-four head dimensions.
        let scale = (d as f64).powf(-0.5) as f32;
        let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
        let mask = frame.mask(self.window, kv_heads, repeats);
        let context = B::masked_softmax(scores, mask)
            .matmul(v)
            .reshape([b, kv_heads, repeats, n, d])
            .permute([0, 3, 1, 2, 4]);
        let context = B::contiguous(context).reshape([b * n, heads * d]);
        self.o.forward(params, context)
    }

    /// Queries or keys `[rows, count * head_dim]` normalised per head (with `norm`), then
    /// rotated (`x * cos + rotate_half(x) * sin`, after moving interleaved pairs to the
    /// halves layout), as `[rows, count, head_dim]`.
    fn position(
        &self,
        params: &Params<B>,
        x: Tensor<B, 2>,
        count: usize,
        norm: Option<(P, f32)>,
        frame: &mut Frame<B>,
    ) -> Tensor<B, 3> {
        let [rows, width] = x.dims();
        let d = self.head_dim;
        let x = match norm {
            Some((weight, eps)) => {
                standardize(x.reshape([rows * count, d]), eps).reshape([rows, width])
                    * params.get(weight)
            }
            None => x,
        };
        let Some(r) = &self.rotary else {
            return x.reshape([rows, count, d]);
        };
        let x = match &r.deinterleave {
            Some(p) => x.reshape([rows * count, d]).matmul(p.clone()),
            None => x,
        };
        let (cos, sin) = frame.rotary(r.slot, count, &r.inv_freq);
        B::rope(x.reshape([rows, count, d]), cos, sin, r.rotate_half.clone())
    }
}

/// The permutation matrix `P` with `(x P)[j] = x[2j]` and `(x P)[j + head_dim / 2] =
/// x[2j + 1]`: interleaved rotary pairs to rotate-half pairs.
fn deinterleave_matrix(head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut p = vec![0f32; head_dim * head_dim];
    for j in 0..half {
        p[2 * j * head_dim + j] = 1.0;
        p[(2 * j + 1) * head_dim + j + half] = 1.0;
    }
    p
}

/// The matrix `R` with `x R = rotate_half(x) = cat(-x2, x1)` for rows `x` of `head_dim`.
fn rotate_half_matrix(head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut r = vec![0f32; head_dim * head_dim];
    for j in 0..half {
        r[(j + half) * head_dim + j] = -1.0; // output j takes -x[j + half]
        r[j * head_dim + j + half] = 1.0; // output j + half takes x[j]
    }
    r
}
