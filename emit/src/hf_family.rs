//! Which Hugging Face architecture expresses a graph: the family chosen from the blocks'
//! ops (dense or mixture FFNs, attention experts, parallel blocks, windows, biases), or
//! why none can.

use upmix_formats::{hf, Family};
use upmix_ir::{MixtureOfExperts, Op, RopePairs, Router};

use super::stack::Stack;
use super::EmitError;

/// The Hugging Face architecture that expresses the stack, and its family. Projected
/// (Nexus) routers need upmix's own layout unless `plain_routers` writes their rows.
pub(crate) fn architecture(
    s: &Stack,
    plain_routers: bool,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<(&'static str, Family), EmitError> {
    let projected = s.layers.iter().any(
        |l| matches!(l.mlp, Op::MixtureOfExperts(m) if matches!(m.router, Router::Projected(_))),
    );
    let mixtures = s.layers.iter().any(|l| l.mixture.is_some()) || projected && !plain_routers;
    let rms_parallel = s.parallel() == Some(true) && s.layers.iter().all(|l| !l.attn_norm.layer);
    let family = match s.parallel() {
        _ if mixtures || rms_parallel => upmix_bam_family(s, unsupported)?,
        None => return Err(unsupported("mixes parallel and sequential blocks".into())),
        Some(true) => cohere_family(s, unsupported)?,
        Some(false) => llama_family(s, unsupported)?,
    };
    let norms = s
        .layers
        .iter()
        .flat_map(|l| [Some(l.attn_norm), l.ffn_norm]);
    let norms: Vec<_> = norms.flatten().chain([s.final_norm]).collect();
    let cohere = family.parallel();
    if norms.iter().any(|n| n.layer != cohere || n.bias.is_some()) {
        return Err(unsupported(match cohere {
            true => "Cohere models use LayerNorms without bias in every norm".into(),
            false => "this architecture is written with RMSNorms only".into(),
        }));
    }
    let pairs = match cohere {
        true => RopePairs::Interleaved,
        false => RopePairs::Halves,
    };
    if s.layers
        .iter()
        .any(|l| l.attn.rope.as_ref().is_some_and(|r| r.pairs != pairs))
    {
        return Err(unsupported(format!(
            "this architecture rotates {pairs:?} pairs; the graph has others"
        )));
    }
    if s.logit_scale.is_some() && !cohere {
        return Err(unsupported("only Cohere models scale their logits".into()));
    }
    Ok((hf::architecture(family).0, family))
}

/// Cohere (every layer with RoPE, no window) or Cohere2 (sliding layers with RoPE, global
/// layers without); dense FFNs only.
fn cohere_family(
    s: &Stack,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Family, EmitError> {
    if s.layers
        .iter()
        .any(|l| !matches!(l.mlp, Op::FeedForward(_)))
    {
        return Err(unsupported(
            "parallel blocks with mixture-of-experts FFNs (an upcycled Cohere model) have no \
             Hugging Face architecture"
                .into(),
        ));
    }
    if s.layers.iter().any(|l| l.attn.q_bias.is_some()) {
        return Err(unsupported(
            "Cohere attention biases are not written".into(),
        ));
    }
    let windowed = s.layers.iter().any(|l| l.attn.window.is_some());
    let nope = s.layers.iter().any(|l| l.attn.rope.is_none());
    if !windowed && !nope {
        return Ok(Family::Cohere);
    }
    if s.layers
        .iter()
        .any(|l| l.attn.window.is_some() != l.attn.rope.is_some())
    {
        return Err(unsupported(
            "Cohere2 layers either slide with RoPE or attend globally without it".into(),
        ));
    }
    if s.layers.iter().any(|l| l.attn.qk_norm.is_some()) {
        return Err(unsupported("Cohere2 has no q/k norms".into()));
    }
    Ok(Family::Cohere2)
}

/// upmix's BAM layout: Llama's attention settings, every layer alike (attention experts
/// or not, FFN experts or not, parallel or not).
fn upmix_bam_family(
    s: &Stack,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Family, EmitError> {
    let refuse = |what: &str| {
        Err(unsupported(format!(
            "the BAM checkpoint format has no {what}"
        )))
    };
    if s.parallel().is_none() {
        return refuse("mix of parallel and sequential blocks");
    }
    let first = &s.layers[0];
    for l in &s.layers {
        let a = l.attn;
        if a.window.is_some() || a.rope.is_none() {
            return refuse("sliding windows or layers without RoPE");
        }
        if a.qk_norm.is_some() || a.q_bias.is_some() || a.k_bias.is_some() || a.v_bias.is_some() {
            return refuse("attention biases or q/k norms");
        }
        let routing = |l: &super::stack::Block| {
            l.mixture
                .map(|m| (m.experts.len(), m.routing, m.shared_kv()))
        };
        if routing(l) != routing(first) {
            return refuse("layers that differ in their attention experts");
        }
        let ffn = |op: &Op| match op {
            Op::MixtureOfExperts(m) => Some((
                m.experts.len(),
                m.routing,
                m.shared_expert.is_some(),
                matches!(m.router, Router::Projected(_)),
            )),
            _ => None,
        };
        if ffn(l.mlp) != ffn(first.mlp) {
            return refuse("layers that differ in their FFN experts or routers");
        }
        if let Op::MixtureOfExperts(m) = l.mlp {
            if m.shared_expert.as_ref().is_some_and(|s| s.gate.is_none()) {
                return refuse("shared FFN expert without a gate");
            }
        }
    }
    Ok(Family::UpmixBam)
}

/// Llama, Qwen2, Mixtral or Qwen2-MoE, from the FFNs and attention biases.
fn llama_family(s: &Stack, unsupported: &dyn Fn(String) -> EmitError) -> Result<Family, EmitError> {
    let n = s.layers.len();
    if s.layers
        .iter()
        .any(|l| l.attn.qk_norm.is_some() || l.attn.rope.is_none())
    {
        return Err(unsupported(
            "q/k norms or layers without RoPE are written only for Cohere models".into(),
        ));
    }
    let moes: Vec<&MixtureOfExperts> = s
        .layers
        .iter()
        .filter_map(|l| match l.mlp {
            Op::MixtureOfExperts(m) => Some(m),
            _ => None,
        })
        .collect();
    let biased = s.layers.iter().filter(|l| l.attn.q_bias.is_some()).count();
    if biased != 0 && biased != n {
        return Err(unsupported("only some layers have attention biases".into()));
    }
    let windowed = s.layers.iter().any(|l| l.attn.window.is_some());
    if s.layers
        .iter()
        .any(|l| l.attn.window != s.layers[0].attn.window)
    {
        return Err(unsupported("layers differ in their sliding windows".into()));
    }
    let shared_experts = moes.iter().any(|m| m.shared_expert.is_some());
    if windowed && (biased != 0 || shared_experts) {
        return Err(unsupported(
            "sliding windows in a Qwen2 or Qwen2-MoE checkpoint (layer-wise windows) are not written"
                .into(),
        ));
    }
    if moes.is_empty() {
        return Ok(match (biased, windowed) {
            (0, false) => Family::Llama,
            (0, true) => Family::Mistral,
            _ => Family::Qwen2,
        });
    }
    if moes.len() < n {
        return Err(unsupported(
            "mixes dense and MoE layers, which no Hugging Face architecture here expresses".into(),
        ));
    }
    let shared = moes.iter().filter(|m| m.shared_expert.is_some()).count();
    let gated = moes
        .iter()
        .filter(|m| m.shared_expert.as_ref().is_some_and(|s| s.gate.is_some()))
        .count();
    let renormalised = moes.iter().all(|m| m.routing.normalize);
    match (shared, gated, biased) {
        (0, _, 0) if renormalised => Ok(Family::Mixtral),
        (0, _, 0) => Err(unsupported(
            "Mixtral renormalises the top-k routing weights; these layers do not".into(),
        )),
        (0, _, _) => Err(unsupported("Mixtral has no attention biases".into())),
        (s, g, _) if s == n && g == n => Ok(Family::Qwen2Moe),
        _ => Err(unsupported(
            "Qwen2-MoE needs a gated shared expert in every layer".into(),
        )),
    }
}
