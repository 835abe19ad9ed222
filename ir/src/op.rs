//! Layer-level operations: the node kinds of a [`crate::Graph`].
//!
//! Each op names the weights it uses by [`WeightId`]; activations flow along edges. The
//! shapes below are PyTorch `nn.Linear` convention: a projection weight is `[out, in]`.

use crate::{FeedForward, Router, WeightId};

/// A node's operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Token ids enter here. No inputs; its output is the id sequence.
    Input,
    /// Table lookup: `table` is `[vocab, hidden]`.
    Embedding { table: WeightId },
    /// `x / sqrt(mean(x^2) + eps) * weight`; `weight` is `[hidden]`.
    RmsNorm { weight: WeightId, eps: f32 },
    /// `(x - mean(x)) / sqrt(var(x) + eps) * weight (+ bias)`, computed in f32;
    /// `weight` and `bias` are `[hidden]` (Cohere's norms have no bias).
    LayerNorm {
        weight: WeightId,
        bias: Option<WeightId>,
        eps: f32,
    },
    /// Causal self-attention with rotary position embeddings.
    Attention(Attention),
    /// A SwiGLU feed-forward block.
    FeedForward(FeedForward),
    /// A routed mixture of SwiGLU experts.
    MixtureOfExperts(MixtureOfExperts),
    /// A routed mixture of attention experts (BAM).
    MixtureOfAttention(MixtureOfAttention),
    /// Element-wise sum of its two inputs (the residual connection).
    Add,
    /// `x W^T (+ b)`; `weight` is `[out, in]` (the lm head: `[vocab, hidden]`, possibly the
    /// embedding table itself when embeddings are tied).
    Linear {
        weight: WeightId,
        bias: Option<WeightId>,
    },
    /// `x * factor` (Cohere's `logit_scale` on the logits).
    Scale { factor: f32 },
    /// The graph's result (logits). One input.
    Output,
}

impl Op {
    /// The op's kind name, as printed.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input => "Input",
            Op::Embedding { .. } => "Embedding",
            Op::RmsNorm { .. } => "RmsNorm",
            Op::LayerNorm { .. } => "LayerNorm",
            Op::Scale { .. } => "Scale",
            Op::Attention(_) => "Attention",
            Op::FeedForward(_) => "FeedForward",
            Op::MixtureOfExperts(_) => "MixtureOfExperts",
            Op::MixtureOfAttention(_) => "MixtureOfAttention",
            Op::Add => "Add",
            Op::Linear { .. } => "Linear",
            Op::Output => "Output",
        }
    }

    /// Every weight the op uses, with a field label, in a fixed order.
    pub fn weights(&self) -> Vec<(String, WeightId)> {
        let mut out = Vec::new();
        match self {
            Op::Input | Op::Add | Op::Scale { .. } | Op::Output => {}
            Op::Embedding { table } => out.push(("table".into(), *table)),
            Op::RmsNorm { weight, .. } => out.push(("weight".into(), *weight)),
            Op::Linear { weight, bias } | Op::LayerNorm { weight, bias, .. } => {
                out.push(("weight".into(), *weight));
                if let Some(b) = bias {
                    out.push(("bias".into(), *b));
                }
            }
            Op::Attention(a) => a.push_weights("", &mut out),
            Op::MixtureOfAttention(m) => {
                out.push(("router".into(), m.router));
                for (e, a) in m.experts.iter().enumerate() {
                    a.push_weights(&format!("experts.{e}."), &mut out);
                }
            }
            Op::FeedForward(f) => f.push_weights("", &mut out),
            Op::MixtureOfExperts(m) => {
                out.extend(m.router.weights());
                for (e, expert) in m.experts.iter().enumerate() {
                    expert.push_weights(&format!("experts.{e}."), &mut out);
                }
                if let Some(shared) = &m.shared_expert {
                    shared.ffn.push_weights("shared.", &mut out);
                    if let Some(g) = shared.gate {
                        out.push(("shared.gate_proj".into(), g));
                    }
                }
            }
        }
        out
    }

    /// Rewrites every weight id the op uses (same order as [`Op::weights`]).
    pub fn map_weights(&mut self, mut f: impl FnMut(WeightId) -> WeightId) {
        match self {
            Op::Input | Op::Add | Op::Scale { .. } | Op::Output => {}
            Op::Embedding { table } => *table = f(*table),
            Op::RmsNorm { weight, .. } => *weight = f(*weight),
            Op::Linear { weight, bias } | Op::LayerNorm { weight, bias, .. } => {
                *weight = f(*weight);
                if let Some(b) = bias {
                    *b = f(*b);
                }
            }
            Op::Attention(a) => a.map_weights(&mut f),
            Op::MixtureOfAttention(m) => {
                m.router = f(m.router);
                m.experts.iter_mut().for_each(|a| a.map_weights(&mut f));
            }
            Op::FeedForward(x) => x.map_weights(&mut f),
            Op::MixtureOfExperts(m) => {
                m.router.map_weights(&mut f);
                m.experts.iter_mut().for_each(|x| x.map_weights(&mut f));
                if let Some(shared) = &mut m.shared_expert {
                    shared.ffn.map_weights(&mut f);
                    if let Some(g) = &mut shared.gate {
                        *g = f(*g);
                    }
                }
            }
        }
    }
}

/// Causal multi-head / grouped-query attention.
///
/// `q`: `[n_heads * head_dim, hidden]`, `k`, `v`: `[n_kv_heads * head_dim, hidden]`,
/// `o`: `[hidden, n_heads * head_dim]`; optional biases on q, k, v (Qwen2). Queries and
/// keys are normalised per head (`qk_norm`, Cohere), then rotated (`rope`), in that order.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    pub q: WeightId,
    pub k: WeightId,
    pub v: WeightId,
    pub o: WeightId,
    pub q_bias: Option<WeightId>,
    pub k_bias: Option<WeightId>,
    pub v_bias: Option<WeightId>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rotary position embedding; `None` is no positional encoding at all (NoPE: the
    /// global layers of Cohere2).
    pub rope: Option<Rope>,
    pub qk_norm: Option<QkNorm>,
    /// Sliding-window attention: a query at position `p` sees only keys at positions
    /// `p - window < k <= p` (transformers' `sliding_window`); `None` sees every earlier key.
    pub window: Option<usize>,
}

impl Attention {
    /// Rewrites every weight id the attention uses.
    pub fn map_weights(&mut self, f: &mut impl FnMut(WeightId) -> WeightId) {
        self.q = f(self.q);
        self.k = f(self.k);
        self.v = f(self.v);
        self.o = f(self.o);
        for b in [&mut self.q_bias, &mut self.k_bias, &mut self.v_bias]
            .into_iter()
            .flatten()
        {
            *b = f(*b);
        }
        if let Some(n) = &mut self.qk_norm {
            n.q = f(n.q);
            n.k = f(n.k);
        }
    }

    fn push_weights(&self, prefix: &str, out: &mut Vec<(String, WeightId)>) {
        for (label, id) in [("q", self.q), ("k", self.k), ("v", self.v), ("o", self.o)] {
            out.push((format!("{prefix}{label}"), id));
        }
        for (label, id) in [
            ("q_bias", self.q_bias),
            ("k_bias", self.k_bias),
            ("v_bias", self.v_bias),
        ] {
            if let Some(id) = id {
                out.push((format!("{prefix}{label}"), id));
            }
        }
        if let Some(n) = &self.qk_norm {
            out.push((format!("{prefix}q_norm"), n.q));
            out.push((format!("{prefix}k_norm"), n.k));
        }
    }

    /// The same attention settings (heads, positions, window, norms' presence and eps),
    /// whatever the weights.
    pub fn same_settings(&self, other: &Attention) -> bool {
        let strip = |a: &Attention| {
            let mut a = a.clone();
            a.map_weights(&mut |_| WeightId(0));
            (
                a.q_bias.is_some(),
                a.k_bias.is_some(),
                a.v_bias.is_some(),
                a,
            )
        };
        strip(self) == strip(other)
    }
}

/// A routed mixture of attention experts (BAM, Zhang et al. 2024): every expert is an
/// attention over the same input with its own weights, and the output is
/// `sum_e p_e * attention_e(x)` with [`Routing`] weights from `router`. Soft routing (the
/// paper's best) sends every token to every expert.
///
/// Experts share their settings (heads, head dimension, positions, window). Key/value
/// sharing is expressed by the weights: when every expert's `k` and `v` (and their biases)
/// are the same weights, the experts share one KV cache ([`MixtureOfAttention::shared_kv`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureOfAttention {
    /// `[n_experts, hidden]`.
    pub router: WeightId,
    pub experts: Vec<Attention>,
    pub routing: Routing,
}

impl MixtureOfAttention {
    /// Whether all experts read keys and values through the same weights.
    pub fn shared_kv(&self) -> bool {
        let kv = |a: &Attention| (a.k, a.v, a.k_bias, a.v_bias);
        self.experts.windows(2).all(|w| kv(&w[0]) == kv(&w[1]))
    }
}

/// Per-head LayerNorm of queries and keys over `head_dim`, without bias, each head with its
/// own weights: `q`: `[n_heads, head_dim]`, `k`: `[n_kv_heads, head_dim]` (Cohere's
/// `use_qk_norm`).
#[derive(Clone, Debug, PartialEq)]
pub struct QkNorm {
    pub q: WeightId,
    pub k: WeightId,
    pub eps: f32,
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: RopeScaling,
    pub pairs: RopePairs,
}

/// Which elements of a head RoPE rotates together; frequency `i` turns the pair in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopePairs {
    /// `(x[i], x[i + head_dim / 2])`: Llama's "rotate half" (llama.cpp's NEOX mode).
    #[default]
    Halves,
    /// `(x[2i], x[2i + 1])`: Cohere (llama.cpp's normal mode).
    Interleaved,
}

/// RoPE frequency scaling schemes.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's band-wise frequency scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
}

impl Rope {
    /// Inverse frequencies for the `head_dim / 2` rotary pairs, computed in f32 as
    /// Hugging Face transformers does.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old = *original_max_position as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// How a mixture weighs its experts for each token: `p = softmax(router x)` over all
/// experts, keep the `top_k` largest, renormalise them to sum to one when `normalize`.
/// Soft routing (every token to every expert, weighted by `p`) is `top_k` equal to the
/// expert count without renormalisation ([`Routing::soft`]). Both mixtures use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    pub top_k: usize,
    pub normalize: bool,
}

impl Routing {
    /// Every token to all `experts`, weighted by the softmax.
    pub fn soft(experts: usize) -> Self {
        Routing {
            top_k: experts,
            normalize: false,
        }
    }

    /// Whether this sends every token to all `experts` with the softmax's weights.
    pub fn is_soft(&self, experts: usize) -> bool {
        self.top_k == experts && !self.normalize
    }

    /// Whether every routed token's weight is 1 whatever the router says (one expert,
    /// renormalised): the router then only picks, and gets no gradient from the output.
    pub fn picks_only(&self) -> bool {
        self.top_k == 1 && self.normalize
    }
}

/// Token-choice mixture of experts, as Mixtral routes ([`Routing`]): output
/// `sum_e p_e * expert_e(x)` over the routed experts (+ the shared expert, if any).
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureOfExperts {
    pub router: Router,
    pub experts: Vec<FeedForward>,
    pub routing: Routing,
    pub shared_expert: Option<SharedExpert>,
}

/// An always-active expert (Qwen2-MoE): `sigmoid(gate x) * ffn(x)`, or `ffn(x)` without gate.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedExpert {
    pub ffn: FeedForward,
    /// `[1, hidden]`.
    pub gate: Option<WeightId>,
}
