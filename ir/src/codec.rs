//! Values in and out of a type's bytes: decoding stored bytes to f32, encoding f32 values
//! as a type's bytes, and rounding values to what a type stores. Plain floats convert
//! here; ggml's block formats and int8 per channel are module `quant`'s.

use half::{bf16, f16};

use crate::DType;

impl DType {
    /// Decodes little-endian `bytes` of this dtype, rows of `cols` elements, into f32
    /// values (dequantizing quantized types). `bytes.len()` must be a whole number of rows.
    pub fn decode(self, bytes: &[u8], cols: usize, out: &mut Vec<f32>) {
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
            quantized => crate::quant::dequantize(quantized, bytes, cols, out),
        }
    }

    /// Encodes f32 values, rows of `cols` elements, as little-endian bytes of this type:
    /// plain floats round to nearest even, quantized types quantize (see [`crate::quant`]).
    ///
    /// # Panics
    /// On the K-quants (see [`DType::can_encode`]), or when `values` is not a whole number
    /// of rows of whole blocks.
    pub fn encode(self, values: &[f32], cols: usize, out: &mut Vec<u8>) {
        if self.is_quantized() {
            return crate::quant::quantize(self, values, cols, out);
        }
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

    /// Rounds f32 values (rows of `cols` elements) in place to the values this type
    /// stores: the nearest for plain floats, quantized and dequantized for quantized types
    /// (a no-op for f32 and for the K-quants, which upmix does not encode).
    pub fn round_in_place(self, values: &mut [f32], cols: usize) {
        match self {
            DType::F32 => {}
            DType::F16 => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            DType::BF16 => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            q if q.can_encode() => {
                let mut bytes = Vec::new();
                crate::quant::quantize(q, values, cols, &mut bytes);
                let mut decoded = Vec::with_capacity(values.len());
                crate::quant::dequantize(q, &bytes, cols, &mut decoded);
                values.copy_from_slice(&decoded);
            }
            _ => {}
        }
    }
}
