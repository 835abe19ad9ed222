//! The `config.json` fields of each architecture family beyond those every family
//! writes (module `hf_config`): one function per family, picked by [`family_fields`].

use serde_json::{json, Map, Value};
use upmix_formats::{hf, Family};
use upmix_ir::{Attention, MixtureOfAttention, MixtureOfExperts, Router, WeightTable};

use super::stack::Stack;
use super::EmitError;

/// The settings of the first layer (every layer shares them) the family fields read.
pub(super) struct Layout<'s> {
    pub attn: &'s Attention,
    pub window: Option<usize>,
    /// The FFN size (of each expert, in a mixture).
    pub ffn: usize,
    pub moe: Option<&'s MixtureOfExperts>,
    pub mixture: Option<&'s MixtureOfAttention>,
}

/// Adds the fields of `family` to `c`.
pub(super) fn family_fields(
    family: Family,
    c: &mut Value,
    s: &Stack,
    w: &WeightTable,
    l: &Layout,
) -> Result<(), EmitError> {
    match (family, l.moe) {
        (Family::JetMoe, Some(moe)) => jetmoe(c, l, moe),
        (Family::UpmixBam, _) => return upmix_bam(c, s, w, l),
        (Family::Qwen2Moe, Some(moe)) => return qwen2_moe(c, w, l, moe),
        (_, Some(moe)) => mixtral(c, l, moe),
        (Family::Mistral, None) => c["sliding_window"] = json!(l.window),
        (Family::Cohere, None) => c["use_qk_norm"] = json!(l.attn.qk_norm.is_some()),
        (Family::Cohere2, None) => cohere2(c, s, l),
        (Family::Qwen2, None) => c["use_sliding_window"] = json!(false),
        _ => {}
    }
    Ok(())
}

/// JetMoE: as many KV heads as query heads per expert (`kv_channels` each), its own
/// names for the activation and the expert counts.
fn jetmoe(c: &mut Value, l: &Layout, moe: &MixtureOfExperts) {
    let c = c.as_object_mut().expect("an object");
    for field in [
        "num_attention_heads",
        "head_dim",
        "hidden_act",
        "mlp_bias",
        "attention_bias",
    ] {
        c.remove(field);
    }
    c.insert("num_key_value_heads".into(), json!(l.attn.n_heads));
    c.insert("kv_channels".into(), json!(l.attn.head_dim));
    c.insert("num_local_experts".into(), json!(moe.experts.len()));
    c.insert("num_experts_per_tok".into(), json!(moe.routing.top_k));
    c.insert("activation_function".into(), json!("silu"));
    c.insert("rms_norm_eps".into(), json!(super::jetmoe::NORM_EPS));
}

/// upmix's own layout (BAM, Nexus): attention experts, FFN experts, a shared expert,
/// a projected router, and the remote code that runs them.
fn upmix_bam(c: &mut Value, s: &Stack, w: &WeightTable, l: &Layout) -> Result<(), EmitError> {
    let (mixture, moe) = (l.mixture, l.moe);
    let routing = mixture.map(|m| m.routing);
    c["parallel_blocks"] = json!(s.parallel() == Some(true));
    c["attention_experts"] = json!(mixture.map_or(0, |m| m.experts.len()));
    c["attention_top_k"] = json!(routing.map_or(0, |r| r.top_k));
    c["attention_normalize"] = json!(routing.is_some_and(|r| r.normalize));
    c["shared_kv"] = json!(mixture.is_some_and(|m| m.shared_kv()));
    c["num_experts"] = json!(moe.map_or(0, |m| m.experts.len()));
    c["num_experts_per_tok"] = json!(moe.map_or(0, |m| m.routing.top_k));
    c["norm_topk_prob"] = json!(moe.is_some_and(|m| m.routing.normalize));
    let shared = moe.and_then(|m| m.shared_expert.as_ref());
    let shared = shared.map(|s| w.get(s.ffn.gate)).transpose()?;
    c["shared_expert_intermediate_size"] = json!(shared.map_or(0, |s| s.shape[0]));
    // A Nexus router: domain embeddings of this width, projected through a SwiGLU of
    // this width (0 and 0: a plain router matrix).
    let (embed, width) = match moe.map(|m| &m.router) {
        Some(Router::Projected(p)) => (
            w.get(p.domains)?.shape[1],
            w.get(p.projection.gate)?.shape[0],
        ),
        _ => (0, 0),
    };
    c["router_embed_size"] = json!(embed);
    c["router_projection_size"] = json!(width);
    let auto_map: Map<String, Value> = hf::UPMIX_BAM_AUTO_MAP
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    c["auto_map"] = Value::Object(auto_map);
    Ok(())
}

/// Qwen2-MoE: routed experts of `moe_intermediate_size` and the shared expert's size as
/// `intermediate_size`.
fn qwen2_moe(
    c: &mut Value,
    w: &WeightTable,
    l: &Layout,
    moe: &MixtureOfExperts,
) -> Result<(), EmitError> {
    let shared = match &moe.shared_expert {
        Some(s) => w.get(s.ffn.gate)?.shape[0],
        None => unreachable!("architecture() requires shared experts"),
    };
    c["num_experts"] = json!(moe.experts.len());
    c["num_experts_per_tok"] = json!(moe.routing.top_k);
    c["moe_intermediate_size"] = json!(l.ffn);
    c["shared_expert_intermediate_size"] = json!(shared);
    c["intermediate_size"] = json!(shared);
    c["norm_topk_prob"] = json!(moe.routing.normalize);
    c["decoder_sparse_step"] = json!(1);
    c["mlp_only_layers"] = json!([]);
    c["qkv_bias"] = json!(l.attn.q_bias.is_some());
    c["use_sliding_window"] = json!(false);
    Ok(())
}

/// Mixtral (and any other family's mixture of experts).
fn mixtral(c: &mut Value, l: &Layout, moe: &MixtureOfExperts) {
    c["num_local_experts"] = json!(moe.experts.len());
    c["num_experts_per_tok"] = json!(moe.routing.top_k);
    c["sliding_window"] = json!(l.window);
}

/// Cohere2: which layers slide (`layer_types`) and how far.
fn cohere2(c: &mut Value, s: &Stack, l: &Layout) {
    c["sliding_window"] = json!(l.window);
    let types: Vec<_> = s
        .layers
        .iter()
        .map(|layer| match layer.attn.window {
            Some(_) => "sliding_attention",
            None => "full_attention",
        })
        .collect();
    c["layer_types"] = json!(types);
}
