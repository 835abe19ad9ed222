//! Name tables: how each checkpoint format names architectures and tensors, and the
//! canonical IR weight names they map to.
//!
//! One table per format, read by the frontend (format -> IR) and the emitters
//! (IR -> format) alike: adding an architecture adds rows here, not code in either.
//! Canonical names are `node.field` (`layers.3.attn.q`, `layers.3.ffn.experts.2.gate`);
//! in a pattern, `{L}` stands for the layer index and `{E}` for the expert index.

pub mod gguf;
pub mod hf;

/// The role of a tensor in a decoder, the key of every name table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embed,
    FinalNorm,
    LmHead,
    /// The norm before attention in a sequential block.
    AttnNorm,
    /// The norm before the FFN in a sequential block.
    FfnNorm,
    /// The one norm of a parallel block, feeding attention and FFN.
    BlockNorm,
    /// Attention projections q, k, v, o (index 0..4).
    Attn(usize),
    /// Attention biases q, k, v (index 0..3).
    AttnBias(usize),
    /// Per-head query and key norms (index 0: q, 1: k).
    QkNorm(usize),
    /// Dense SwiGLU gate, up, down (index 0..3).
    Mlp(usize),
    /// The router of a mixture of experts.
    Router,
    /// A projected (Nexus) router's domain embeddings, `[experts, embed]`.
    RouterDomains,
    /// A projected router's projection: gate, up, down (index 0..3).
    RouterProjection(usize),
    /// Routed expert `{E}`'s gate, up, down (index 0..3).
    Expert(usize),
    /// The shared expert's gate, up, down (index 0..3).
    Shared(usize),
    /// The shared expert's sigmoid gate.
    SharedGate,
    /// The router of a mixture of attention experts.
    AttnRouter,
    /// Attention expert `{E}`'s q, k, v, o (index 0..4); shared keys and values are
    /// `Attn(1)` and `Attn(2)`.
    ExpertAttn(usize),
}

/// Canonical IR weight names by role.
const CANONICAL: &[(Role, &str)] = &[
    (Role::Embed, "embed.table"),
    (Role::FinalNorm, "final_norm.weight"),
    (Role::LmHead, "lm_head.weight"),
    (Role::AttnNorm, "layers.{L}.attn_norm.weight"),
    (Role::FfnNorm, "layers.{L}.ffn_norm.weight"),
    (Role::BlockNorm, "layers.{L}.norm.weight"),
    (Role::Attn(0), "layers.{L}.attn.q"),
    (Role::Attn(1), "layers.{L}.attn.k"),
    (Role::Attn(2), "layers.{L}.attn.v"),
    (Role::Attn(3), "layers.{L}.attn.o"),
    (Role::AttnBias(0), "layers.{L}.attn.q_bias"),
    (Role::AttnBias(1), "layers.{L}.attn.k_bias"),
    (Role::AttnBias(2), "layers.{L}.attn.v_bias"),
    (Role::QkNorm(0), "layers.{L}.attn.q_norm"),
    (Role::QkNorm(1), "layers.{L}.attn.k_norm"),
    (Role::Mlp(0), "layers.{L}.ffn.gate"),
    (Role::Mlp(1), "layers.{L}.ffn.up"),
    (Role::Mlp(2), "layers.{L}.ffn.down"),
    (Role::Router, "layers.{L}.ffn.router"),
    (Role::RouterDomains, "layers.{L}.ffn.router.domains"),
    (
        Role::RouterProjection(0),
        "layers.{L}.ffn.router.projection.gate",
    ),
    (
        Role::RouterProjection(1),
        "layers.{L}.ffn.router.projection.up",
    ),
    (
        Role::RouterProjection(2),
        "layers.{L}.ffn.router.projection.down",
    ),
    (Role::Expert(0), "layers.{L}.ffn.experts.{E}.gate"),
    (Role::Expert(1), "layers.{L}.ffn.experts.{E}.up"),
    (Role::Expert(2), "layers.{L}.ffn.experts.{E}.down"),
    (Role::Shared(0), "layers.{L}.ffn.shared.gate"),
    (Role::Shared(1), "layers.{L}.ffn.shared.up"),
    (Role::Shared(2), "layers.{L}.ffn.shared.down"),
    (Role::SharedGate, "layers.{L}.ffn.shared.gate_proj"),
    (Role::AttnRouter, "layers.{L}.attn.router"),
    (Role::ExpertAttn(0), "layers.{L}.attn.experts.{E}.q"),
    (Role::ExpertAttn(1), "layers.{L}.attn.experts.{E}.k"),
    (Role::ExpertAttn(2), "layers.{L}.attn.experts.{E}.v"),
    (Role::ExpertAttn(3), "layers.{L}.attn.experts.{E}.o"),
];

/// The canonical name of the tensor with `role` in `layer` (and `expert`).
pub fn canonical(role: Role, layer: usize, expert: usize) -> String {
    let pattern = lookup(CANONICAL, role).expect("every role has a canonical name");
    fill(pattern, layer, expert)
}

/// The pattern of `role` in `table`, if the table has it.
pub(crate) fn lookup(table: &[(Role, &'static str)], role: Role) -> Option<&'static str> {
    table.iter().find(|(r, _)| *r == role).map(|(_, p)| *p)
}

/// Fills `{L}` and `{E}` in a name pattern.
pub fn fill(pattern: &str, layer: usize, expert: usize) -> String {
    pattern
        .replace("{L}", &layer.to_string())
        .replace("{E}", &expert.to_string())
}

/// How an architecture's layers are laid out; every format maps its architecture names to
/// one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Dense SwiGLU decoder; q/k/v bias only if `attention_bias` is set.
    Llama,
    /// Llama with a sliding window in every layer (4096 when the config has none).
    Mistral,
    /// Dense, with q/k/v bias always present.
    Qwen2,
    /// Sparse MoE FFN in one of two on-disk layouts.
    Mixtral,
    /// Sparse MoE FFN with a gated shared expert; q/k/v bias per `qkv_bias`.
    Qwen2Moe,
    /// Parallel blocks with one LayerNorm, interleaved RoPE, optional q/k norms and a
    /// logit scale (Command R).
    Cohere,
    /// Cohere with sliding-window layers and global layers without RoPE (Command R7B,
    /// Command A).
    Cohere2,
    /// upmix's own BAM layout: Llama's, with optional parallel blocks, attention experts
    /// and FFN experts; written with a remote-code module for transformers.
    UpmixBam,
    /// JetMoE: a top-k mixture of attention experts with shared keys and values and a
    /// top-k SwiGLU mixture in every layer, their experts stacked in fused tensors.
    JetMoe,
}

impl Family {
    /// Whether blocks are always parallel (one norm feeding attention and FFN).
    pub fn parallel(self) -> bool {
        matches!(self, Family::Cohere | Family::Cohere2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hf_and_gguf_role_has_a_canonical_name() {
        for (_, _, family) in hf::ARCHITECTURES {
            for (role, _) in hf::table(*family) {
                canonical(role, 0, 0);
            }
        }
        for (role, _) in gguf::TENSORS {
            canonical(*role, 0, 0);
        }
    }

    #[test]
    fn names_are_unique_within_a_family() {
        for (_, _, family) in hf::ARCHITECTURES {
            // Only a sequential block's attention norm and a parallel block's one norm
            // share a name (`input_layernorm`).
            let table = hf::table(*family);
            let mut names: Vec<_> = table
                .iter()
                .filter(|(role, _)| *role != Role::BlockNorm)
                .map(|(_, n)| *n)
                .collect();
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "{family:?}");
        }
    }
}
