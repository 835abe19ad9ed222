//! Name tables: Hugging Face and GGUF tensor names <-> canonical IR weight names.
//!
//! This file (and the emitters) is the only place that knows a format's tensor names.
//! Canonical names are `node.field` (`layers.3.attn.q`, `layers.3.ffn.experts.2.gate`);
//! `{L}` stands for the layer index and `{E}` for the expert index.

use upmix_ir::DType;

/// Supported `architectures[0]` values and the family each loads as.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("MixtralForCausalLM", Family::Mixtral),
    ("Qwen2MoeForCausalLM", Family::Qwen2Moe),
];

/// How an architecture's layers are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Dense SwiGLU decoder; q/k/v bias only if `attention_bias` is set.
    Llama,
    /// Dense, with q/k/v bias always present.
    Qwen2,
    /// Sparse MoE FFN in one of two on-disk layouts.
    Mixtral,
    /// Sparse MoE FFN with a gated shared expert; q/k/v bias per `qkv_bias`.
    Qwen2Moe,
}

pub const EMBED: (&str, &str) = ("embed.table", "model.embed_tokens.weight");
pub const FINAL_NORM: (&str, &str) = ("final_norm.weight", "model.norm.weight");
pub const LM_HEAD: (&str, &str) = ("lm_head.weight", "lm_head.weight");

/// Prefix of every per-layer tensor.
pub const LAYER_PREFIX: &str = "model.layers.{L}.";

/// Per-layer tensors shared by every family (names relative to [`LAYER_PREFIX`]).
pub const ATTN_NORM: (&str, &str) = ("layers.{L}.attn_norm.weight", "input_layernorm.weight");
pub const FFN_NORM: (&str, &str) = (
    "layers.{L}.ffn_norm.weight",
    "post_attention_layernorm.weight",
);
pub const ATTN: [(&str, &str); 4] = [
    ("layers.{L}.attn.q", "self_attn.q_proj.weight"),
    ("layers.{L}.attn.k", "self_attn.k_proj.weight"),
    ("layers.{L}.attn.v", "self_attn.v_proj.weight"),
    ("layers.{L}.attn.o", "self_attn.o_proj.weight"),
];
pub const ATTN_BIAS: [(&str, &str); 3] = [
    ("layers.{L}.attn.q_bias", "self_attn.q_proj.bias"),
    ("layers.{L}.attn.k_bias", "self_attn.k_proj.bias"),
    ("layers.{L}.attn.v_bias", "self_attn.v_proj.bias"),
];

/// Dense SwiGLU: gate, up, down.
pub const MLP: [(&str, &str); 3] = [
    ("layers.{L}.ffn.gate", "mlp.gate_proj.weight"),
    ("layers.{L}.ffn.up", "mlp.up_proj.weight"),
    ("layers.{L}.ffn.down", "mlp.down_proj.weight"),
];

/// Mixtral, classic layout: one tensor per expert projection (`w1` gate, `w3` up,
/// `w2` down).
pub const MIXTRAL_ROUTER: (&str, &str) = ("layers.{L}.ffn.router", "block_sparse_moe.gate.weight");
pub const MIXTRAL_EXPERT: [(&str, &str); 3] = [
    (
        "layers.{L}.ffn.experts.{E}.gate",
        "block_sparse_moe.experts.{E}.w1.weight",
    ),
    (
        "layers.{L}.ffn.experts.{E}.up",
        "block_sparse_moe.experts.{E}.w3.weight",
    ),
    (
        "layers.{L}.ffn.experts.{E}.down",
        "block_sparse_moe.experts.{E}.w2.weight",
    ),
];

/// Qwen2-MoE: per-expert projections, the shared expert and its sigmoid gate (the router
/// is `mlp.gate.weight`, as in Mixtral's fused layout).
pub const QWEN2_MOE_EXPERT: [(&str, &str); 3] = [
    (
        "layers.{L}.ffn.experts.{E}.gate",
        "mlp.experts.{E}.gate_proj.weight",
    ),
    (
        "layers.{L}.ffn.experts.{E}.up",
        "mlp.experts.{E}.up_proj.weight",
    ),
    (
        "layers.{L}.ffn.experts.{E}.down",
        "mlp.experts.{E}.down_proj.weight",
    ),
];
pub const QWEN2_MOE_SHARED: [(&str, &str); 3] = [
    (
        "layers.{L}.ffn.shared.gate",
        "mlp.shared_expert.gate_proj.weight",
    ),
    (
        "layers.{L}.ffn.shared.up",
        "mlp.shared_expert.up_proj.weight",
    ),
    (
        "layers.{L}.ffn.shared.down",
        "mlp.shared_expert.down_proj.weight",
    ),
];
pub const QWEN2_MOE_SHARED_GATE: (&str, &str) = (
    "layers.{L}.ffn.shared.gate_proj",
    "mlp.shared_expert_gate.weight",
);

/// Mixtral, fused layout: `gate_up_proj` is `[E, 2F, D]` (gate rows, then up rows),
/// `down_proj` is `[E, D, F]`.
pub const MIXTRAL_FUSED_ROUTER: (&str, &str) = ("layers.{L}.ffn.router", "mlp.gate.weight");
pub const MIXTRAL_FUSED_GATE_UP: &str = "mlp.experts.gate_up_proj";
pub const MIXTRAL_FUSED_DOWN: &str = "mlp.experts.down_proj";

/// GGUF (llama.cpp) architectures upmix loads, and the family each loads as.
pub const GGUF_ARCHITECTURES: &[(&str, Family)] =
    &[("llama", Family::Llama), ("qwen2", Family::Qwen2)];

/// ggml tensor type ids, their names, and the dtype upmix decodes them as (`None`: known
/// but not supported).
pub const GGML_TYPES: &[(u32, &str, Option<DType>)] = &[
    (0, "F32", Some(DType::F32)),
    (1, "F16", Some(DType::F16)),
    (2, "Q4_0", Some(DType::Q4_0)),
    (3, "Q4_1", Some(DType::Q4_1)),
    (6, "Q5_0", None),
    (7, "Q5_1", None),
    (8, "Q8_0", Some(DType::Q8_0)),
    (9, "Q8_1", None),
    (10, "Q2_K", None),
    (11, "Q3_K", None),
    (12, "Q4_K", Some(DType::Q4K)),
    (13, "Q5_K", Some(DType::Q5K)),
    (14, "Q6_K", Some(DType::Q6K)),
    (15, "Q8_K", None),
    (16, "IQ2_XXS", None),
    (17, "IQ2_XS", None),
    (18, "IQ3_XXS", None),
    (19, "IQ1_S", None),
    (20, "IQ4_NL", None),
    (21, "IQ3_S", None),
    (22, "IQ2_S", None),
    (23, "IQ4_XS", None),
    (24, "I8", None),
    (25, "I16", None),
    (26, "I32", None),
    (27, "I64", None),
    (28, "F64", None),
    (29, "IQ1_M", None),
    (30, "BF16", Some(DType::BF16)),
    (34, "TQ1_0", None),
    (35, "TQ2_0", None),
    (39, "MXFP4", None),
];

/// GGUF tensor names: model-level tensors.
pub const GGUF_EMBED: (&str, &str) = ("embed.table", "token_embd.weight");
pub const GGUF_FINAL_NORM: (&str, &str) = ("final_norm.weight", "output_norm.weight");
pub const GGUF_LM_HEAD: (&str, &str) = ("lm_head.weight", "output.weight");

/// GGUF per-layer tensors (full names, `{L}` = layer).
pub const GGUF_ATTN_NORM: (&str, &str) =
    ("layers.{L}.attn_norm.weight", "blk.{L}.attn_norm.weight");
pub const GGUF_FFN_NORM: (&str, &str) = ("layers.{L}.ffn_norm.weight", "blk.{L}.ffn_norm.weight");
pub const GGUF_ATTN: [(&str, &str); 4] = [
    ("layers.{L}.attn.q", "blk.{L}.attn_q.weight"),
    ("layers.{L}.attn.k", "blk.{L}.attn_k.weight"),
    ("layers.{L}.attn.v", "blk.{L}.attn_v.weight"),
    ("layers.{L}.attn.o", "blk.{L}.attn_output.weight"),
];
pub const GGUF_ATTN_BIAS: [(&str, &str); 3] = [
    ("layers.{L}.attn.q_bias", "blk.{L}.attn_q.bias"),
    ("layers.{L}.attn.k_bias", "blk.{L}.attn_k.bias"),
    ("layers.{L}.attn.v_bias", "blk.{L}.attn_v.bias"),
];
pub const GGUF_MLP: [(&str, &str); 3] = [
    ("layers.{L}.ffn.gate", "blk.{L}.ffn_gate.weight"),
    ("layers.{L}.ffn.up", "blk.{L}.ffn_up.weight"),
    ("layers.{L}.ffn.down", "blk.{L}.ffn_down.weight"),
];

/// Fills `{L}` and `{E}` in a name pattern.
pub fn fill(pattern: &str, layer: usize, expert: usize) -> String {
    pattern
        .replace("{L}", &layer.to_string())
        .replace("{E}", &expert.to_string())
}

/// The full Hugging Face name of a per-layer tensor.
pub fn layer_tensor(suffix: &str, layer: usize, expert: usize) -> String {
    fill(&format!("{LAYER_PREFIX}{suffix}"), layer, expert)
}
