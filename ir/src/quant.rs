//! Block-quantized storage formats of ggml (GGUF): dequantization to f32.
//!
//! Every format stores values in fixed-size blocks; all multi-byte fields are
//! little-endian and `f16` is IEEE half precision. Decoding follows ggml's reference
//! dequantization in f32 with the same order of operations, so results are bit-identical
//! to it (and to gguf-py's `quants.dequantize`).
//!
//! * **Q8_0** (32 values, 34 bytes): `d: f16`, `qs: [i8; 32]`. `x[i] = qs[i] * d`.
//! * **Q4_0** (32 values, 18 bytes): `d: f16`, `qs: [u8; 16]`. Element `i < 16` is the
//!   low nibble of `qs[i]`, element `16 + i` its high nibble; `x = (q - 8) * d`.
//! * **Q4_1** (32 values, 20 bytes): `d: f16`, `m: f16`, `qs: [u8; 16]` laid out as in
//!   Q4_0; `x = q * d + m`.
//! * **Q4_K** (256 values, 144 bytes): `d: f16`, `dmin: f16`, `scales: [u8; 12]`,
//!   `qs: [u8; 128]`. The block is 8 sub-blocks of 32, each with a 6-bit scale `sc[j]`
//!   and a 6-bit min `m[j]` packed in `scales` (see [`k_scale_min`]). Sub-blocks `2c`
//!   and `2c + 1` are the low and high nibbles of `qs[32c..32c + 32]`;
//!   `x = (d * sc) * q - (dmin * m)`.
//! * **Q5_K** (256 values, 176 bytes): `d: f16`, `dmin: f16`, `scales: [u8; 12]`,
//!   `qh: [u8; 32]`, `qs: [u8; 128]`. As Q4_K, plus a fifth (high) bit: bit `j` of
//!   `qh[l]` belongs to element `l` of sub-block `j`.
//! * **Q6_K** (256 values, 210 bytes): `ql: [u8; 128]`, `qh: [u8; 64]`,
//!   `scales: [i8; 16]`, `d: f16` (last). Two halves of 128 values; in half `h`, element
//!   `r` takes its low 4 bits from `ql[64h + r % 64]` (low nibble for `r < 64`, high
//!   nibble otherwise) and its high 2 bits from `qh[32h + r % 32]` at bit `2 * (r / 32)`.
//!   Each run of 16 values has its own scale: `x = (d * scales[i / 16]) * (q - 32)`.

use half::f16;

use crate::DType;

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// Appends the f32 values of `bytes`, a whole number of `dtype` blocks, to `out`.
///
/// # Panics
/// If `dtype` is not block-quantized or `bytes` is not a whole number of blocks.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    let (elems, block) = dtype.block();
    assert!(
        dtype.is_quantized(),
        "{dtype} is not a block-quantized type"
    );
    assert!(
        bytes.len().is_multiple_of(block),
        "{} bytes is not a whole number of {dtype} blocks ({block} bytes each)",
        bytes.len()
    );
    out.reserve(bytes.len() / block * elems);
    let blocks = bytes.chunks_exact(block);
    match dtype {
        DType::Q8_0 => blocks.for_each(|b| out.extend_from_slice(&q8_0(b))),
        DType::Q4_0 => blocks.for_each(|b| out.extend_from_slice(&q4_0(b))),
        DType::Q4_1 => blocks.for_each(|b| out.extend_from_slice(&q4_1(b))),
        DType::Q4K => blocks.for_each(|b| out.extend_from_slice(&q4_k(b))),
        DType::Q5K => blocks.for_each(|b| out.extend_from_slice(&q5_k(b))),
        DType::Q6K => blocks.for_each(|b| out.extend_from_slice(&q6_k(b))),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("checked above"),
    }
}

/// The f16 at `b[at..at + 2]`, widened (exactly) to f32.
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q8_0(b: &[u8]) -> [f32; 32] {
    let d = half(b, 0);
    let qs = &b[2..34];
    std::array::from_fn(|i| f32::from(qs[i] as i8) * d)
}

fn q4_0(b: &[u8]) -> [f32; 32] {
    let d = half(b, 0);
    let qs = &b[2..18];
    std::array::from_fn(|i| {
        let q = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
        (f32::from(q) - 8.0) * d
    })
}

fn q4_1(b: &[u8]) -> [f32; 32] {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    std::array::from_fn(|i| {
        let q = (qs[i % 16] >> (4 * (i / 16))) & 0x0F;
        f32::from(q) * d + m
    })
}

/// The 6-bit scales and mins of the 8 sub-blocks of a Q4_K/Q5_K block, from its 12
/// packed bytes. Bytes 0..4 hold the low 6 bits of scales 0..4 (top 2 bits: high bits
/// of scales 4..8), bytes 4..8 likewise for mins; bytes 8..12 hold the low 4 bits of
/// scales 4..8 (low nibble) and of mins 4..8 (high nibble).
fn k_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let sc = std::array::from_fn(|j| match j {
        0..4 => s[j] & 0x3F,
        _ => (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30),
    });
    let min = std::array::from_fn(|j| match j {
        0..4 => s[j + 4] & 0x3F,
        _ => (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30),
    });
    (sc, min)
}

/// Shared tail of Q4_K and Q5_K: `q(j, l)` is the quant of element `l` of sub-block `j`.
fn k_quant_4_5(b: &[u8], q: impl Fn(usize, usize) -> u8) -> [f32; QK_K] {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (sc, min) = k_scale_min(&b[4..16]);
    let mut out = [0.0; QK_K];
    for (j, sub) in out.chunks_exact_mut(32).enumerate() {
        let scale = d * f32::from(sc[j]);
        let offset = dmin * f32::from(min[j]);
        for (l, x) in sub.iter_mut().enumerate() {
            *x = scale * f32::from(q(j, l)) - offset;
        }
    }
    out
}

fn q4_k(b: &[u8]) -> [f32; QK_K] {
    let qs = &b[16..144];
    k_quant_4_5(b, |j, l| (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F)
}

fn q5_k(b: &[u8]) -> [f32; QK_K] {
    let (qh, qs) = (&b[16..48], &b[48..176]);
    k_quant_4_5(b, |j, l| {
        let low = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
        let high = (qh[l] >> j) & 1;
        low | (high << 4)
    })
}

fn q6_k(b: &[u8]) -> [f32; QK_K] {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    let mut out = [0.0; QK_K];
    for (g, run) in out.chunks_exact_mut(16).enumerate() {
        let scale = d * f32::from(scales[g] as i8);
        for (k, x) in run.iter_mut().enumerate() {
            let (h, r) = ((16 * g + k) / 128, (16 * g + k) % 128);
            let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
            let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
            let q = i16::from(low | (high << 4)) - 32;
            *x = scale * f32::from(q);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_nibble_order() {
        // d = 1.0 (0x3C00); byte i holds element i (low) and 16 + i (high).
        let mut b = vec![0x00, 0x3C];
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let mut out = Vec::new();
        dequantize(DType::Q4_0, &b, &mut out);
        let want: Vec<f32> = (0..16)
            .map(|i| i as f32 - 8.0)
            .chain((0..16).map(|i| 7.0 - i as f32))
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn k_scales_unpack() {
        // Scales j and mins j set to distinct 6-bit values; pack them as ggml does.
        let sc: [u8; 8] = [1, 22, 33, 44, 50, 61, 7, 63];
        let mn: [u8; 8] = [63, 2, 13, 24, 35, 46, 57, 8];
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
        }
        assert_eq!(k_scale_min(&s), (sc, mn));
    }

    #[test]
    #[should_panic(expected = "whole number")]
    fn partial_block_panics() {
        dequantize(DType::Q8_0, &[0; 33], &mut Vec::new());
    }
}
