//! Layer-level operations: the node kinds of a [`crate::Graph`].
//!
//! Each op names the weights it uses by [`WeightId`]; activations flow along edges. The
//! shapes below are PyTorch `nn.Linear` convention: a projection weight is `[out, in]`.

use crate::WeightId;

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
            Op::Attention(a) => {
                for (label, id) in [("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)] {
                    out.push((label.into(), id));
                }
                for (label, id) in [
                    ("q_bias", a.q_bias),
                    ("k_bias", a.k_bias),
                    ("v_bias", a.v_bias),
                ] {
                    if let Some(id) = id {
                        out.push((label.into(), id));
                    }
                }
                if let Some(n) = &a.qk_norm {
                    out.push(("q_norm".into(), n.q));
                    out.push(("k_norm".into(), n.k));
                }
            }
            Op::FeedForward(f) => f.push_weights("", &mut out),
            Op::MixtureOfExperts(m) => {
                out.push(("router".into(), m.router));
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
            Op::Attention(a) => {
                a.q = f(a.q);
                a.k = f(a.k);
                a.v = f(a.v);
                a.o = f(a.o);
                for b in [&mut a.q_bias, &mut a.k_bias, &mut a.v_bias]
                    .into_iter()
                    .flatten()
                {
                    *b = f(*b);
                }
                if let Some(n) = &mut a.qk_norm {
                    n.q = f(n.q);
                    n.k = f(n.k);
                }
            }
            Op::FeedForward(x) => x.map_weights(&mut f),
            Op::MixtureOfExperts(m) => {
                m.router = f(m.router);
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

/// SwiGLU: `down(silu(gate x) * up x)`; `gate`, `up`: `[ffn, hidden]`, `down`: `[hidden, ffn]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedForward {
    pub gate: WeightId,
    pub up: WeightId,
    pub down: WeightId,
}

impl FeedForward {
    fn map_weights(&mut self, f: &mut impl FnMut(WeightId) -> WeightId) {
        self.gate = f(self.gate);
        self.up = f(self.up);
        self.down = f(self.down);
    }

    fn push_weights(&self, prefix: &str, out: &mut Vec<(String, WeightId)>) {
        out.push((format!("{prefix}gate"), self.gate));
        out.push((format!("{prefix}up"), self.up));
        out.push((format!("{prefix}down"), self.down));
    }
}

/// Token-choice mixture of experts, as Mixtral routes: `p = softmax(router x)`, keep the
/// `top_k` largest, renormalise them to sum to one when `normalize_top_k`, output
/// `sum_e p_e * expert_e(x)` (+ the shared expert, if any).
#[derive(Clone, Debug, PartialEq)]
pub struct MixtureOfExperts {
    /// `[n_experts, hidden]`.
    pub router: WeightId,
    pub experts: Vec<FeedForward>,
    pub top_k: usize,
    pub normalize_top_k: bool,
    pub shared_expert: Option<SharedExpert>,
}

/// An always-active expert (Qwen2-MoE): `sigmoid(gate x) * ffn(x)`, or `ffn(x)` without gate.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedExpert {
    pub ffn: FeedForward,
    /// `[1, hidden]`.
    pub gate: Option<WeightId>,
}
