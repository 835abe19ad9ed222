//! A BAM model as a JetMoE checkpoint (`JetMoeForCausalLM`, which transformers and vLLM
//! load): JetMoE's mixture of attention is BAM's top-k attention experts with shared keys
//! and values (each expert its own q and o, one `kv_proj`, the top-k router logits
//! softmaxed, which renormalises the top-k probabilities), followed in every layer by a
//! top-k mixture of SwiGLU experts with as many experts and the same k.
//!
//! Written when the emit asks for it (`architecture: "JetMoeForCausalLM"`), for graphs
//! JetMoE expresses exactly:
//! - JetMoE has as many KV heads as query heads per expert, so grouped-query K/V rows are
//!   repeated for each query head that reads them;
//! - JetMoE's two block norms have epsilon 1e-6 whatever the config says; another epsilon
//!   is matched exactly by scaling the residual stream by `c = sqrt(1e-6 / eps)` (the
//!   embedding and every attention and FFN output projection times `c`, the final norm's
//!   epsilon 1e-6; with tied embeddings the final norm's weight divided by `c`), since
//!   RMSNorm(c x) with epsilon c^2 eps equals RMSNorm(x) with eps;
//! - the experts' output biases are written as zeros.

use std::sync::Arc;

use upmix_formats::hf::{
    JETMOE_ATTN_BIAS, JETMOE_ATTN_O, JETMOE_ATTN_Q, JETMOE_FFN_BIAS, JETMOE_FFN_DOWN,
    JETMOE_FFN_GATE_UP, JETMOE_KV,
};
use upmix_formats::{fill, Role};
use upmix_ir::{
    HostTensor, MixtureOfAttention, MixtureOfExperts, Op, RopePairs, Weight, WeightExpr, WeightId,
    WeightTable,
};

use super::hf_names::Names;
use super::stack::Stack;
use super::EmitError;

/// JetMoE's fixed block-norm epsilon.
pub(super) const NORM_EPS: f32 = 1e-6;

/// Why JetMoE cannot express `s`, if it cannot.
pub(super) fn check(s: &Stack) -> Result<(), String> {
    if s.parallel() != Some(false) {
        return Err("JetMoE blocks are sequential".into());
    }
    if s.logit_scale.is_some() {
        return Err("JetMoE has no logit scale".into());
    }
    let norms = s
        .layers
        .iter()
        .flat_map(|l| [Some(l.attn_norm), l.ffn_norm]);
    let norms: Vec<_> = norms.flatten().chain([s.final_norm]).collect();
    if norms
        .iter()
        .any(|n| n.layer || n.bias.is_some() || n.eps != s.final_norm.eps)
    {
        return Err("JetMoE has RMSNorms without bias, all of one epsilon".into());
    }
    let (first_moa, _) =
        parts(&s.layers[0]).ok_or("every JetMoE layer has attention experts and FFN experts")?;
    let (e, k) = (first_moa.experts.len(), first_moa.routing.top_k);
    for l in &s.layers {
        let (moa, moe) =
            parts(l).ok_or("every JetMoE layer has attention experts and FFN experts")?;
        let a = l.attn;
        if !moa.shared_kv() {
            return Err("JetMoE's attention experts share keys and values (ShareKv)".into());
        }
        if moa.experts.len() != e || moe.experts.len() != e {
            return Err(format!(
                "JetMoE has one expert count ({e}) for attention and FFN in every layer"
            ));
        }
        if moa.routing.top_k != k || moe.routing.top_k != k {
            return Err(format!(
                "JetMoE routes attention and FFN to one top-k ({k}) in every layer"
            ));
        }
        if !moa.routing.normalize || !moe.routing.normalize {
            return Err(
                "JetMoE renormalises the top-k routing weights (soft routing is not top-k)".into(),
            );
        }
        if moe.shared_expert.is_some() {
            return Err("JetMoE has no shared FFN expert".into());
        }
        let rotary = a
            .rope
            .as_ref()
            .is_some_and(|r| r.pairs == RopePairs::Halves);
        if !rotary
            || a.window.is_some()
            || a.qk_norm.is_some()
            || a.k_bias.is_some()
            || a.q_bias.is_some()
        {
            return Err("JetMoE attention has rotate-half RoPE in every layer, no window, biases or q/k norms".into());
        }
    }
    Ok(())
}

/// The attention and FFN mixtures of a layer.
fn parts<'g>(
    l: &super::stack::Block<'g>,
) -> Option<(&'g MixtureOfAttention, &'g MixtureOfExperts)> {
    match (l.mixture, l.mlp) {
        (Some(moa), Op::MixtureOfExperts(moe)) => Some((moa, moe)),
        _ => None,
    }
}

/// The residual scale `c` for the graph's norm epsilon.
pub(super) fn residual_scale(s: &Stack) -> f32 {
    (NORM_EPS / s.final_norm.eps).sqrt()
}

/// New weights over a table: the stacked, repeated, scaled and zero tensors JetMoE needs.
struct Builder<'t> {
    table: &'t mut WeightTable,
}

impl Builder<'_> {
    fn add(
        &mut self,
        name: String,
        shape: Vec<usize>,
        of: WeightId,
        expr: WeightExpr,
    ) -> Result<WeightId, EmitError> {
        let dtype = self.table.get(of)?.dtype.plain();
        Ok(self.table.add(Weight {
            name,
            shape,
            dtype,
            expr,
        })?)
    }

    fn shape(&self, id: WeightId) -> Result<Vec<usize>, EmitError> {
        Ok(self.table.get(id)?.shape.clone())
    }

    /// `id` times `factor` (`id` itself for 1).
    fn scaled(&mut self, id: WeightId, factor: f32) -> Result<WeightId, EmitError> {
        if factor == 1.0 {
            return Ok(id);
        }
        let (name, shape) = (self.table.get(id)?.name.clone(), self.shape(id)?);
        self.add(
            format!("{name}.jetmoe"),
            shape,
            id,
            WeightExpr::Scale(factor, id),
        )
    }

    /// `parts` one after another, shaped `shape`.
    fn stack(
        &mut self,
        name: String,
        shape: Vec<usize>,
        parts: Vec<WeightId>,
    ) -> Result<WeightId, EmitError> {
        self.add(name, shape, parts[0], WeightExpr::Concat(parts))
    }

    /// The rows of a `[kv_heads * hd, D]` projection repeated so that query head `h` of
    /// `heads` finds its KV head (`h / (heads / kv_heads)`) at row block `h`.
    fn repeated_heads(
        &mut self,
        id: WeightId,
        heads: usize,
        kv_heads: usize,
        hd: usize,
    ) -> Result<WeightId, EmitError> {
        if heads == kv_heads {
            return Ok(id);
        }
        let mut shape = self.shape(id)?;
        shape[0] = heads * hd;
        let group = heads / kv_heads;
        let rows: Vec<u32> = (0..heads)
            .flat_map(|h| ((h / group) * hd..(h / group + 1) * hd).map(|r| r as u32))
            .collect();
        let name = format!("{}.jetmoe_heads", self.table.get(id)?.name);
        self.add(name, shape, id, WeightExpr::Rows(id, rows.into()))
    }

    fn zeros(&mut self, name: String, n: usize, like: WeightId) -> Result<WeightId, EmitError> {
        let zeros = WeightExpr::Literal(Arc::new(HostTensor::new(vec![n], vec![0.0; n])));
        self.add(name, vec![n], like, zeros)
    }
}

/// Tensor names and weights in file order, into `t`; the stacked, repeated and scaled
/// tensors are added to `table`. `check` has passed.
pub(super) fn tensors(s: &Stack, t: &mut Names, table: &mut WeightTable) -> Result<(), EmitError> {
    let c = residual_scale(s);
    let tied = s.lm_head == s.embed;
    let mut b = Builder { table };
    let d = b.shape(s.embed)?[1];
    t.push(Role::Embed, (0, 0), b.scaled(s.embed, c)?);
    for (i, l) in s.layers.iter().enumerate() {
        let (moa, moe) = parts(l).expect("checked");
        let a = l.attn;
        let (e, q, f) = (
            moa.experts.len(),
            a.n_heads * a.head_dim,
            b.shape(moe.experts[0].gate)?[0],
        );
        let name = |pattern| fill(pattern, i, 0);
        t.push(Role::AttnNorm, (i, 0), l.attn_norm.weight);
        t.push(Role::AttnRouter, (i, 0), moa.router);
        let qs = moa.experts.iter().map(|x| x.q).collect();
        let q_stack = b.stack(name(JETMOE_ATTN_Q), vec![e, q, d], qs)?;
        t.list.push((name(JETMOE_ATTN_Q), q_stack));
        let mut os = Vec::with_capacity(e);
        for x in &moa.experts {
            os.push(b.scaled(x.o, c)?);
        }
        let o_stack = b.stack(name(JETMOE_ATTN_O), vec![e, d, q], os)?;
        t.list.push((name(JETMOE_ATTN_O), o_stack));
        let bias = b.zeros(name(JETMOE_ATTN_BIAS), d, moa.router)?;
        t.list.push((name(JETMOE_ATTN_BIAS), bias));
        let k = b.repeated_heads(a.k, a.n_heads, a.n_kv_heads, a.head_dim)?;
        let v = b.repeated_heads(a.v, a.n_heads, a.n_kv_heads, a.head_dim)?;
        let kv = b.stack(name(JETMOE_KV), vec![2 * q, d], vec![k, v])?;
        t.list.push((name(JETMOE_KV), kv));
        t.push(Role::FfnNorm, (i, 0), l.ffn_norm.expect("checked").weight);
        let router = super::router_rows(b.table, i, &moe.router)?;
        t.push(Role::Router, (i, 0), router);
        let gate_up = moe.experts.iter().flat_map(|x| [x.gate, x.up]).collect();
        let gate_up = b.stack(name(JETMOE_FFN_GATE_UP), vec![e, 2 * f, d], gate_up)?;
        t.list.push((name(JETMOE_FFN_GATE_UP), gate_up));
        let mut downs = Vec::with_capacity(e);
        for x in &moe.experts {
            downs.push(b.scaled(x.down, c)?);
        }
        let down = b.stack(name(JETMOE_FFN_DOWN), vec![e, d, f], downs)?;
        t.list.push((name(JETMOE_FFN_DOWN), down));
        let bias = b.zeros(name(JETMOE_FFN_BIAS), d, router)?;
        t.list.push((name(JETMOE_FFN_BIAS), bias));
    }
    let final_norm = match tied {
        true => b.scaled(s.final_norm.weight, 1.0 / c)?,
        false => s.final_norm.weight,
    };
    t.push(Role::FinalNorm, (0, 0), final_norm);
    if !tied {
        t.push(Role::LmHead, (0, 0), s.lm_head);
    }
    Ok(())
}
