//! Element types of stored weights and their byte encodings.

use half::{bf16, f16};

/// The element type a weight is stored in (in a checkpoint file, or when emitted).
/// Computation always happens in f32; a weight's dtype says how it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Short lower-case name, as printed in the IR text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Parses the short name (`f32`, `f16`, `bf16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Decodes little-endian `bytes` of this dtype into f32 values.
    /// `bytes.len()` must be a multiple of [`DType::size`].
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.reserve(bytes.len() / self.size());
        match self {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }

    /// Encodes f32 values as little-endian bytes of this dtype (round to nearest even).
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Rounds f32 values in place to the nearest value representable in this dtype.
    pub fn round_in_place(self, values: &mut [f32]) {
        match self {
            DType::F32 => {}
            DType::F16 => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            DType::BF16 => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
