//! Element types of stored weights and their byte encodings.

use half::{bf16, f16};

/// The element type a weight is stored in (in a checkpoint file, or when emitted).
/// Computation always happens in f32; a weight's dtype says how it is stored.
///
/// Besides plain floats, the block-quantized formats of ggml (as found in GGUF files):
/// values are stored in blocks of 32 or 256 with per-block scales (see [`crate::quant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    /// `(elements, bytes)` of one storage block (1 element for plain floats).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (32, 34),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
        }
    }

    /// Bytes per element of a plain float type.
    ///
    /// # Panics
    /// On block-quantized types, whose size is per block: use [`DType::nbytes`].
    pub fn size(self) -> usize {
        assert!(!self.is_quantized(), "{self} has no per-element size");
        self.block().1
    }

    /// Bytes that `numel` elements take, or `None` when `numel` is not a whole number of
    /// blocks (or overflows).
    pub fn nbytes(self, numel: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        numel
            .is_multiple_of(elems)
            .then(|| (numel / elems).checked_mul(bytes))?
    }

    /// Whether this is a block-quantized type.
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// The plain float type computed results of this type are stored in: itself for plain
    /// floats, f32 for quantized types (a new value is not representable in a block format
    /// without a quantization pass).
    pub fn plain(self) -> DType {
        if self.is_quantized() {
            DType::F32
        } else {
            self
        }
    }

    /// Short lower-case name, as printed in the IR text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
        }
    }

    /// Parses a plain float type's short name (`f32`, `f16`, `bf16`).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Decodes little-endian `bytes` of this dtype into f32 values (dequantizing block
    /// formats). `bytes.len()` must be a whole number of blocks.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        let (elems, block) = self.block();
        out.reserve(bytes.len() / block * elems);
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
            quantized => crate::quant::dequantize(quantized, bytes, out),
        }
    }

    /// Encodes f32 values as little-endian bytes of a plain float type (round to nearest
    /// even).
    ///
    /// # Panics
    /// On block-quantized types (quantizing is a pass's job, not an encoding's).
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
            q => unreachable!("size() rejects {q}"),
        }
    }

    /// Rounds f32 values in place to the nearest value representable in this plain float
    /// type; a no-op for f32 and for quantized types (whose decoded values are exact).
    pub fn round_in_place(self, values: &mut [f32]) {
        match self {
            DType::F32 => {}
            DType::F16 => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            DType::BF16 => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            _ => {}
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
