//! Builds the IR graph of a pre-norm decoder from hyper-parameters and a source of
//! tensors; every checkpoint format supplies the tensors through [`TensorSource`].

use std::path::Path;

use upmix_formats::{Family, Role};
use upmix_ir::{
    Attention, DecoderBlock, FeedForward, Graph, GraphBuilder, MixtureOfAttention, ModelMeta, Op,
    ParallelBlock, QkNorm, Rope, Routing, WeightId,
};

use crate::config::Windows;
use crate::error::FrontendError;

/// The family of architecture `arch` in a format's `table`, or an error listing the
/// supported ones.
pub(crate) fn family(
    table: &[(&str, Family)],
    arch: &str,
    path: &std::path::Path,
) -> Result<Family, FrontendError> {
    table
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, f)| *f)
        .ok_or_else(|| FrontendError::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: arch.to_string(),
            supported: {
                let mut names: Vec<String> = Vec::new();
                for (a, _) in table {
                    if !names.iter().any(|n| n == a) {
                        names.push(a.to_string());
                    }
                }
                names
            },
        })
}

/// The shape-determining settings of a decoder.
#[derive(Clone, Debug)]
pub(crate) struct Hyper {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// The epsilon of every norm.
    pub eps: f32,
    pub rope: Rope,
    /// q/k/v projections carry biases.
    pub attn_bias: bool,
    /// Which layers attend through a sliding window.
    pub windows: Windows,
    /// Cohere's layout: LayerNorms, a logit scale; see [`CohereParts`].
    pub cohere: Option<CohereParts>,
    /// One norm feeds attention and FFN (Cohere; upmix's BAM layout when asked).
    pub parallel: bool,
    /// Every layer's attention is a mixture of experts (upmix's BAM layout).
    pub attention_experts: Option<AttentionMix>,
}

/// A layer's attention experts: how many, their routing, whether they share K/V.
#[derive(Clone, Debug)]
pub(crate) struct AttentionMix {
    pub experts: usize,
    pub routing: Routing,
    pub shared_kv: bool,
}

/// What a Cohere-family decoder adds to a Llama-style one: parallel blocks with one
/// LayerNorm (no bias; the final norm too), optional per-head q/k LayerNorms, logits times
/// `logit_scale`; Cohere2's layers without a window have no positional encoding.
#[derive(Clone, Debug)]
pub(crate) struct CohereParts {
    pub qk_norm: bool,
    pub logit_scale: f32,
    pub nope_global: bool,
}

impl Hyper {
    /// The norm op over `weight` (LayerNorm in Cohere models, else RMSNorm).
    fn norm(&self, weight: WeightId) -> Op {
        match self.cohere {
            Some(_) => Op::LayerNorm {
                weight,
                bias: None,
                eps: self.eps,
            },
            None => Op::RmsNorm {
                weight,
                eps: self.eps,
            },
        }
    }
}

impl Hyper {
    /// Rejects settings no decoder can have (a zero size, an odd head dimension, KV heads
    /// that do not divide the heads, projection sizes that overflow, a negative or
    /// non-finite epsilon) before any shape is computed from them, with an error naming
    /// `path`, the file they come from.
    pub fn check(&self, path: &Path) -> Result<(), FrontendError> {
        let bad = |message: String| {
            Err(FrontendError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        let sizes = [
            ("layer count", self.layers),
            ("hidden size", self.hidden),
            ("FFN size", self.ffn),
            ("attention head count", self.heads),
            ("KV head count", self.kv_heads),
            ("head dimension", self.head_dim),
            ("vocabulary size", self.vocab),
        ];
        if let Some((what, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{what} is 0; it must be positive"));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd; rotary embeddings need an even one",
                self.head_dim
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if self.heads.checked_mul(self.head_dim).is_none() {
            return bad(format!(
                "{} heads of dimension {} overflow",
                self.heads, self.head_dim
            ));
        }
        if !self.eps.is_finite() || self.eps < 0.0 {
            return bad(format!(
                "norm epsilon {} is not a finite non-negative number",
                self.eps
            ));
        }
        if let Some(scale) = self.cohere.as_ref().map(|c| c.logit_scale) {
            if !scale.is_finite() {
                return bad(format!("logit_scale {scale} is not a finite number"));
            }
        }
        if self.windows.span() == Some(0) {
            return bad("sliding_window is 0; it must be positive".into());
        }
        Ok(())
    }
}

/// Where a format's tensors come from.
pub(crate) trait TensorSource {
    /// The tensor for `role` in `layer`, checked to have `shape`, as a new weight.
    fn tensor(
        &mut self,
        role: Role,
        layer: usize,
        shape: &[usize],
    ) -> Result<WeightId, FrontendError>;

    /// The tensor for `role` of expert `expert` in `layer`; only formats with attention
    /// experts have such tensors.
    fn expert_tensor(
        &mut self,
        role: Role,
        (layer, expert): (usize, usize),
        shape: &[usize],
    ) -> Result<WeightId, FrontendError> {
        let _ = (layer, expert, shape);
        unreachable!("{role:?}: only formats with attention experts are asked for them")
    }

    /// Whether the checkpoint has a separate lm head (otherwise it is tied).
    fn has_lm_head(&self) -> bool;

    /// The FFN op of `layer`; dense SwiGLU unless the format overrides it.
    fn mlp(&mut self, layer: usize, h: &Hyper) -> Result<Op, FrontendError> {
        dense_mlp(self, layer, h)
    }
}

/// The dense SwiGLU FFN of `layer`.
pub(crate) fn dense_mlp<S: TensorSource + ?Sized>(
    src: &mut S,
    layer: usize,
    h: &Hyper,
) -> Result<Op, FrontendError> {
    Ok(Op::FeedForward(FeedForward {
        gate: src.tensor(Role::Mlp(0), layer, &[h.ffn, h.hidden])?,
        up: src.tensor(Role::Mlp(1), layer, &[h.ffn, h.hidden])?,
        down: src.tensor(Role::Mlp(2), layer, &[h.hidden, h.ffn])?,
    }))
}

/// Builds the graph `name`: embedding, `h.layers` pre-norm blocks, final norm, lm head
/// (the embedding table when `tied`). `h` is checked first ([`Hyper::check`]); `path`
/// names the file it comes from.
pub(crate) fn build_decoder(
    name: &str,
    meta: ModelMeta,
    (h, path): (&Hyper, &Path),
    tied: bool,
    src: &mut dyn TensorSource,
) -> Result<Graph, FrontendError> {
    h.check(path)?;
    let d = h.hidden;
    let mut b = GraphBuilder::new(name, meta);
    let embed = src.tensor(Role::Embed, 0, &[h.vocab, d])?;
    let input = b.input();
    let mut x = b.embedding(input, embed);
    for layer in 0..h.layers {
        let attn = attention(src, layer, h)?;
        x = match h.parallel {
            true => {
                let block = ParallelBlock {
                    norm: h.norm(src.tensor(Role::BlockNorm, layer, &[d])?),
                    attn,
                    mlp: src.mlp(layer, h)?,
                };
                b.parallel_block(layer, x, block)
            }
            false => {
                let block = DecoderBlock {
                    attn_norm: src.tensor(Role::AttnNorm, layer, &[d])?,
                    attn,
                    ffn_norm: src.tensor(Role::FfnNorm, layer, &[d])?,
                    mlp: src.mlp(layer, h)?,
                    eps: h.eps,
                };
                b.decoder_block(layer, x, block)
            }
        };
    }
    let final_norm = src.tensor(Role::FinalNorm, 0, &[d])?;
    x = b.node("final_norm", h.norm(final_norm), &[x]);
    let head = if tied || !src.has_lm_head() {
        embed
    } else {
        src.tensor(Role::LmHead, 0, &[h.vocab, d])?
    };
    x = b.linear("lm_head", x, head);
    if let Some(c) = &h.cohere {
        x = b.scale("logit_scale", x, c.logit_scale);
    }
    Ok(b.output(x))
}

/// The attention op of `layer`: one attention, or a mixture of attention experts.
fn attention(src: &mut dyn TensorSource, layer: usize, h: &Hyper) -> Result<Op, FrontendError> {
    let Some(mix) = &h.attention_experts else {
        return Ok(Op::Attention(one_attention(src, layer, h)?));
    };
    let (d, q, kv) = (
        h.hidden,
        h.heads.saturating_mul(h.head_dim),
        h.kv_heads.saturating_mul(h.head_dim),
    );
    let router = src.tensor(Role::AttnRouter, layer, &[mix.experts, d])?;
    let shared = match mix.shared_kv {
        true => Some((
            src.tensor(Role::Attn(1), layer, &[kv, d])?,
            src.tensor(Role::Attn(2), layer, &[kv, d])?,
        )),
        false => None,
    };
    let template = Attention {
        q: router,
        k: router,
        v: router,
        o: router,
        q_bias: None,
        k_bias: None,
        v_bias: None,
        n_heads: h.heads,
        n_kv_heads: h.kv_heads,
        head_dim: h.head_dim,
        rope: Some(h.rope.clone()),
        qk_norm: None,
        window: h.windows.of(layer),
    };
    let mut experts = Vec::with_capacity(mix.experts);
    for e in 0..mix.experts {
        let mut one =
            |i: usize, shape: &[usize]| src.expert_tensor(Role::ExpertAttn(i), (layer, e), shape);
        let (k, v) = match shared {
            Some(kv) => kv,
            None => (one(1, &[kv, d])?, one(2, &[kv, d])?),
        };
        experts.push(Attention {
            q: one(0, &[q, d])?,
            k,
            v,
            o: one(3, &[d, q])?,
            ..template.clone()
        });
    }
    Ok(Op::MixtureOfAttention(MixtureOfAttention {
        router,
        experts,
        routing: mix.routing,
    }))
}

/// One attention of `layer`.
fn one_attention(
    src: &mut dyn TensorSource,
    layer: usize,
    h: &Hyper,
) -> Result<Attention, FrontendError> {
    // kv_heads <= heads once checked, so neither product overflows.
    let (d, q, kv) = (
        h.hidden,
        h.heads.saturating_mul(h.head_dim),
        h.kv_heads.saturating_mul(h.head_dim),
    );
    let mut bias = |i: usize, n: usize| -> Result<Option<WeightId>, FrontendError> {
        h.attn_bias
            .then(|| src.tensor(Role::AttnBias(i), layer, &[n]))
            .transpose()
    };
    let (q_bias, k_bias, v_bias) = (bias(0, q)?, bias(1, kv)?, bias(2, kv)?);
    let window = h.windows.of(layer);
    let cohere = h.cohere.as_ref();
    let qk_norm = match cohere.filter(|c| c.qk_norm) {
        Some(_) => Some(QkNorm {
            q: src.tensor(Role::QkNorm(0), layer, &[h.heads, h.head_dim])?,
            k: src.tensor(Role::QkNorm(1), layer, &[h.kv_heads, h.head_dim])?,
            eps: h.eps,
        }),
        None => None,
    };
    let nope = cohere.is_some_and(|c| c.nope_global) && window.is_none();
    Ok(Attention {
        q: src.tensor(Role::Attn(0), layer, &[q, d])?,
        k: src.tensor(Role::Attn(1), layer, &[kv, d])?,
        v: src.tensor(Role::Attn(2), layer, &[kv, d])?,
        o: src.tensor(Role::Attn(3), layer, &[d, q])?,
        q_bias,
        k_bias,
        v_bias,
        n_heads: h.heads,
        n_kv_heads: h.kv_heads,
        head_dim: h.head_dim,
        rope: (!nope).then(|| h.rope.clone()),
        qk_norm,
        window,
    })
}
