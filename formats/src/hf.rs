//! Hugging Face (transformers) checkpoints: `architectures[0]` and `model_type` values,
//! and safetensors tensor names by [`Role`].

use crate::{lookup, Family, Role};

/// Architectures upmix reads and writes: `(architectures[0], model_type, family)`, one
/// row per family.
pub const ARCHITECTURES: &[(&str, &str, Family)] = &[
    ("LlamaForCausalLM", "llama", Family::Llama),
    ("MistralForCausalLM", "mistral", Family::Mistral),
    ("Qwen2ForCausalLM", "qwen2", Family::Qwen2),
    ("MixtralForCausalLM", "mixtral", Family::Mixtral),
    ("Qwen2MoeForCausalLM", "qwen2_moe", Family::Qwen2Moe),
    ("CohereForCausalLM", "cohere", Family::Cohere),
    ("Cohere2ForCausalLM", "cohere2", Family::Cohere2),
    ("UpmixBamForCausalLM", "upmix_bam", Family::UpmixBam),
    ("JetMoeForCausalLM", "jetmoe", Family::JetMoe),
];

/// The `(architectures[0], model_type)` of `family`.
pub fn architecture(family: Family) -> (&'static str, &'static str) {
    ARCHITECTURES
        .iter()
        .find(|(_, _, f)| *f == family)
        .map(|(a, t, _)| (*a, *t))
        .expect("one row per family")
}

/// Tensors every family names alike.
const DECODER: &[(Role, &str)] = &[
    (Role::Embed, "model.embed_tokens.weight"),
    (Role::FinalNorm, "model.norm.weight"),
    (Role::LmHead, "lm_head.weight"),
    (Role::Attn(0), "model.layers.{L}.self_attn.q_proj.weight"),
    (Role::Attn(1), "model.layers.{L}.self_attn.k_proj.weight"),
    (Role::Attn(2), "model.layers.{L}.self_attn.v_proj.weight"),
    (Role::Attn(3), "model.layers.{L}.self_attn.o_proj.weight"),
    (Role::AttnBias(0), "model.layers.{L}.self_attn.q_proj.bias"),
    (Role::AttnBias(1), "model.layers.{L}.self_attn.k_proj.bias"),
    (Role::AttnBias(2), "model.layers.{L}.self_attn.v_proj.bias"),
    (Role::Mlp(0), "model.layers.{L}.mlp.gate_proj.weight"),
    (Role::Mlp(1), "model.layers.{L}.mlp.up_proj.weight"),
    (Role::Mlp(2), "model.layers.{L}.mlp.down_proj.weight"),
];

/// The two norms of a sequential block.
const SEQUENTIAL: &[(Role, &str)] = &[
    (Role::AttnNorm, "model.layers.{L}.input_layernorm.weight"),
    (
        Role::FfnNorm,
        "model.layers.{L}.post_attention_layernorm.weight",
    ),
];

/// Cohere's one block norm and per-head q/k norms (`[heads, head_dim]`).
const COHERE: &[(Role, &str)] = &[
    (Role::BlockNorm, "model.layers.{L}.input_layernorm.weight"),
    (Role::QkNorm(0), "model.layers.{L}.self_attn.q_norm.weight"),
    (Role::QkNorm(1), "model.layers.{L}.self_attn.k_norm.weight"),
];

/// upmix's BAM layout: attention experts (shared keys and values keep the plain
/// `self_attn.k_proj` / `v_proj` names), and the block norm of parallel blocks.
const UPMIX_BAM: &[(Role, &str)] = &[
    (Role::AttnRouter, "model.layers.{L}.self_attn.router.weight"),
    (
        Role::ExpertAttn(0),
        "model.layers.{L}.self_attn.experts.{E}.q_proj.weight",
    ),
    (
        Role::ExpertAttn(1),
        "model.layers.{L}.self_attn.experts.{E}.k_proj.weight",
    ),
    (
        Role::ExpertAttn(2),
        "model.layers.{L}.self_attn.experts.{E}.v_proj.weight",
    ),
    (
        Role::ExpertAttn(3),
        "model.layers.{L}.self_attn.experts.{E}.o_proj.weight",
    ),
    (Role::BlockNorm, "model.layers.{L}.input_layernorm.weight"),
    (Role::RouterDomains, "model.layers.{L}.mlp.router.domains"),
    (
        Role::RouterProjection(0),
        "model.layers.{L}.mlp.router.projection.gate_proj.weight",
    ),
    (
        Role::RouterProjection(1),
        "model.layers.{L}.mlp.router.projection.up_proj.weight",
    ),
    (
        Role::RouterProjection(2),
        "model.layers.{L}.mlp.router.projection.down_proj.weight",
    ),
];

/// JetMoE's per-layer tensors with a role; the stacked expert tensors follow.
const JETMOE: &[(Role, &str)] = &[
    (
        Role::AttnRouter,
        "model.layers.{L}.self_attention.experts.router.layer.weight",
    ),
    (Role::Router, "model.layers.{L}.mlp.router.layer.weight"),
];

/// JetMoE's stacked tensors: attention experts' q (`[E, H * hd, D]`) and o
/// (`[E, D, H * hd]`) and their output bias (`[D]`), the shared `[K; V]` projection
/// (`[2 * H * hd, D]`: JetMoE has as many KV heads as query heads per expert), FFN
/// experts' `[gate; up]` (`[E, 2F, D]`) and down (`[E, D, F]`) and their output bias.
pub const JETMOE_ATTN_Q: &str = "model.layers.{L}.self_attention.experts.input_linear.weight";
pub const JETMOE_ATTN_O: &str = "model.layers.{L}.self_attention.experts.output_linear.weight";
pub const JETMOE_ATTN_BIAS: &str = "model.layers.{L}.self_attention.experts.bias";
pub const JETMOE_KV: &str = "model.layers.{L}.self_attention.kv_proj.weight";
pub const JETMOE_FFN_GATE_UP: &str = "model.layers.{L}.mlp.input_linear.weight";
pub const JETMOE_FFN_DOWN: &str = "model.layers.{L}.mlp.output_linear.weight";
pub const JETMOE_FFN_BIAS: &str = "model.layers.{L}.mlp.bias";

/// The remote-code module written with [`Family::UpmixBam`] checkpoints, as `auto_map`
/// names it.
pub const UPMIX_BAM_AUTO_MAP: &[(&str, &str)] = &[
    ("AutoConfig", "configuration_upmix_bam.UpmixBamConfig"),
    (
        "AutoModelForCausalLM",
        "modeling_upmix_bam.UpmixBamForCausalLM",
    ),
];

/// Mixtral's classic layout: one tensor per expert projection (`w1` gate, `w3` up,
/// `w2` down).
const MIXTRAL: &[(Role, &str)] = &[
    (
        Role::Router,
        "model.layers.{L}.block_sparse_moe.gate.weight",
    ),
    (
        Role::Expert(0),
        "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
    ),
    (
        Role::Expert(1),
        "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
    ),
    (
        Role::Expert(2),
        "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
    ),
];

/// Qwen2-MoE: per-expert projections, the shared expert and its sigmoid gate. Mixtral
/// checkpoints saved in this naming (and in the fused layout) use the same router name.
pub const QWEN2_MOE: &[(Role, &str)] = &[
    (Role::Router, "model.layers.{L}.mlp.gate.weight"),
    (
        Role::Expert(0),
        "model.layers.{L}.mlp.experts.{E}.gate_proj.weight",
    ),
    (
        Role::Expert(1),
        "model.layers.{L}.mlp.experts.{E}.up_proj.weight",
    ),
    (
        Role::Expert(2),
        "model.layers.{L}.mlp.experts.{E}.down_proj.weight",
    ),
    (
        Role::Shared(0),
        "model.layers.{L}.mlp.shared_expert.gate_proj.weight",
    ),
    (
        Role::Shared(1),
        "model.layers.{L}.mlp.shared_expert.up_proj.weight",
    ),
    (
        Role::Shared(2),
        "model.layers.{L}.mlp.shared_expert.down_proj.weight",
    ),
    (
        Role::SharedGate,
        "model.layers.{L}.mlp.shared_expert_gate.weight",
    ),
];

/// Mixtral, fused layout (transformers 5 in memory): `gate_up_proj` is `[E, 2F, D]`
/// (gate rows, then up rows), `down_proj` is `[E, D, F]`; the router is
/// [`QWEN2_MOE`]'s.
pub const MIXTRAL_FUSED_GATE_UP: &str = "model.layers.{L}.mlp.experts.gate_up_proj";
pub const MIXTRAL_FUSED_DOWN: &str = "model.layers.{L}.mlp.experts.down_proj";

/// The parts of a family's table, most specific first.
fn parts(family: Family) -> &'static [&'static [(Role, &'static str)]] {
    match family {
        Family::Llama | Family::Mistral | Family::Qwen2 => &[SEQUENTIAL, DECODER],
        Family::Mixtral => &[MIXTRAL, SEQUENTIAL, DECODER],
        Family::Qwen2Moe => &[QWEN2_MOE, SEQUENTIAL, DECODER],
        Family::Cohere | Family::Cohere2 => &[COHERE, DECODER],
        Family::UpmixBam => &[UPMIX_BAM, QWEN2_MOE, SEQUENTIAL, DECODER],
        Family::JetMoe => &[JETMOE, SEQUENTIAL, DECODER],
    }
}

/// The name pattern of `role` in `family`, if the family has such a tensor.
pub fn pattern(family: Family, role: Role) -> Option<&'static str> {
    parts(family).iter().find_map(|t| lookup(t, role))
}

/// Every `(role, pattern)` of `family`.
pub fn table(family: Family) -> Vec<(Role, &'static str)> {
    parts(family)
        .iter()
        .flat_map(|t| t.iter().copied())
        .collect()
}

/// The name of `role` in `layer` (and `expert`) for `family`.
pub fn name(family: Family, role: Role, layer: usize, expert: usize) -> Option<String> {
    pattern(family, role).map(|p| crate::fill(p, layer, expert))
}
