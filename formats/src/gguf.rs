//! GGUF (llama.cpp) files: architecture names, tensor names by [`Role`], metadata value
//! types, and ggml tensor types, read by the frontend and written by the GGUF emitter.

use upmix_ir::DType;

use crate::{lookup, Family, Role};

/// GGUF architectures (`general.architecture`) and the family each is read as (the
/// first row of a name); the writer names a family by its first row. llama.cpp reads a
/// Mixtral-style mixture of experts as `llama` with `llama.expert_count`.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("llama", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("command-r", Family::Cohere),
    ("cohere2", Family::Cohere2),
    ("llama", Family::Mixtral),
];

/// The architecture name of `family`, if GGUF has one here.
pub fn architecture(family: Family) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(_, f)| *f == family)
        .map(|(name, _)| *name)
}

/// Value type ids of GGUF metadata.
pub const T_U8: u32 = 0;
pub const T_I8: u32 = 1;
pub const T_U16: u32 = 2;
pub const T_I16: u32 = 3;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;
pub const T_I64: u32 = 11;
pub const T_F64: u32 = 12;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufValue {
    /// The value type id this value is written with (an array: [`T_ARRAY`]).
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => T_U8,
            GgufValue::I8(_) => T_I8,
            GgufValue::U16(_) => T_U16,
            GgufValue::I16(_) => T_I16,
            GgufValue::U32(_) => T_U32,
            GgufValue::I32(_) => T_I32,
            GgufValue::U64(_) => T_U64,
            GgufValue::I64(_) => T_I64,
            GgufValue::F32(_) => T_F32,
            GgufValue::F64(_) => T_F64,
            GgufValue::Bool(_) => T_BOOL,
            GgufValue::String(_) => T_STRING,
            GgufValue::Array(_) => T_ARRAY,
        }
    }
}

/// Tensor names; llama.cpp calls a parallel block's one norm `attn_norm` too. The experts
/// of a mixture are stacked into one 3-D tensor per projection, `[experts, out, in]`, so
/// their names have no `{E}`.
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
    (Role::Router, "blk.{L}.ffn_gate_inp.weight"),
    (Role::Expert(0), "blk.{L}.ffn_gate_exps.weight"),
    (Role::Expert(1), "blk.{L}.ffn_up_exps.weight"),
    (Role::Expert(2), "blk.{L}.ffn_down_exps.weight"),
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
