//! Name tables: Hugging Face tensor names <-> canonical IR weight names.
//!
//! This file (and the emitters) is the only place that knows a format's tensor names.
//! Canonical names are `node.field` (`layers.3.attn.q`, `layers.3.ffn.experts.2.gate`);
//! `{L}` stands for the layer index and `{E}` for the expert index.

/// Supported `architectures[0]` values and the family each loads as.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("MixtralForCausalLM", Family::Mixtral),
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

/// Mixtral, fused layout: `gate_up_proj` is `[E, 2F, D]` (gate rows, then up rows),
/// `down_proj` is `[E, D, F]`.
pub const MIXTRAL_FUSED_ROUTER: (&str, &str) = ("layers.{L}.ffn.router", "mlp.gate.weight");
pub const MIXTRAL_FUSED_GATE_UP: &str = "mlp.experts.gate_up_proj";
pub const MIXTRAL_FUSED_DOWN: &str = "mlp.experts.down_proj";

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
