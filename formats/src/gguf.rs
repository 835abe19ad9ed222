//! GGUF (llama.cpp) files: architecture names, tensor names by [`Role`], and ggml
//! tensor types.

use upmix_ir::DType;

use crate::{lookup, Family, Role};

/// GGUF architectures upmix loads (`general.architecture`), and the family each loads as.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("command-r", Family::Cohere),
    ("cohere2", Family::Cohere2),
];

/// Tensor names; llama.cpp calls a parallel block's one norm `attn_norm` too.
pub const TENSORS: &[(Role, &str)] = &[
    (Role::Embed, "token_embd.weight"),
    (Role::FinalNorm, "output_norm.weight"),
    (Role::LmHead, "output.weight"),
    (Role::AttnNorm, "blk.{L}.attn_norm.weight"),
    (Role::BlockNorm, "blk.{L}.attn_norm.weight"),
    (Role::FfnNorm, "blk.{L}.ffn_norm.weight"),
    (Role::Attn(0), "blk.{L}.attn_q.weight"),
    (Role::Attn(1), "blk.{L}.attn_k.weight"),
    (Role::Attn(2), "blk.{L}.attn_v.weight"),
    (Role::Attn(3), "blk.{L}.attn_output.weight"),
    (Role::AttnBias(0), "blk.{L}.attn_q.bias"),
    (Role::AttnBias(1), "blk.{L}.attn_k.bias"),
    (Role::AttnBias(2), "blk.{L}.attn_v.bias"),
    (Role::QkNorm(0), "blk.{L}.attn_q_norm.weight"),
    (Role::QkNorm(1), "blk.{L}.attn_k_norm.weight"),
    (Role::Mlp(0), "blk.{L}.ffn_gate.weight"),
    (Role::Mlp(1), "blk.{L}.ffn_up.weight"),
    (Role::Mlp(2), "blk.{L}.ffn_down.weight"),
];

/// The name of `role` in `layer`, if GGUF files have such a tensor.
pub fn name(role: Role, layer: usize) -> Option<String> {
    lookup(TENSORS, role).map(|p| crate::fill(p, layer, 0))
}

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
