//! Quantized storage formats: the block formats of ggml (GGUF) and weight-only int8 per
//! channel. Quantization to Q8_0, Q4_0, Q4_1 and int8 per channel, dequantization of all.
//!
//! Every ggml format stores values in fixed-size blocks along a row; all multi-byte
//! fields are little-endian and `f16` is IEEE half precision. Decoding follows ggml's
//! reference dequantization in f32 with the same order of operations, so results are
//! bit-identical to it (and to gguf-py's `quants.dequantize`). Encoding follows gguf-py's
//! `quants.quantize` (ggml's reference quantizers, vectorised in numpy), in f32 with each
//! operation rounded on its own, so the bytes equal gguf-py's; the scale is computed in
//! f32 and only its stored copy is rounded to f16:
//!
//! * **Q8_0**: `d = amax / 127`, `q = round(x * (1 / d))`, ties away from zero.
//! * **Q4_0**: `m` = the value of largest magnitude (sign kept, the first of equals),
//!   `d = m / -8`, `q = min(15, trunc(x * (1 / d) + 8.5))`.
//! * **Q4_1**: `d = (max - min) / 15`, `q = min(15, trunc((x - min) * (1 / d) + 0.5))`,
//!   stored with `min` as f16.
//!
//! An all-zero scale gives `1 / d = 0`. ggml's C reference writes the same formulas, but
//! a C compiler may contract `x * id + 8.5` (and `(x - min) * id + 0.5`) into one fused
//! multiply-add, which rounds once instead of twice: where the product lands within half
//! an ulp of a rounding boundary, such a build can store a quant one higher or lower than
//! gguf-py and upmix do (see `tests/golden/quant/README.md`).
//!
//! * **Int8 per channel** (not a ggml format; row of `n` values, `4 + n` bytes):
//!   `scale: f32` then `qs: [i8; n]`; `scale = amax / 127`,
//!   `q = clamp(round(x / scale), -127, 127)` with ties to even (`torch.round`), and a
//!   row of zeros stores scale 0. `x = q * scale`.
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

/// Appends the f32 values of `bytes`, rows of `cols` elements in `dtype`, to `out`.
///
/// # Panics
/// If `dtype` is not quantized or `bytes` is not a whole number of blocks.
pub fn dequantize(dtype: DType, bytes: &[u8], cols: usize, out: &mut Vec<f32>) {
    assert!(dtype.is_quantized(), "{dtype} is not a quantized type");
    if dtype == DType::Int8PerChannel {
        return int8_rows(bytes, cols, out);
    }
    let (elems, block) = dtype.block();
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
        DType::F32 | DType::F16 | DType::BF16 | DType::Int8PerChannel => {
            unreachable!("checked above")
        }
    }
}

/// Appends the bytes of `values`, rows of `cols` elements, quantized to `dtype`.
///
/// # Panics
/// If `dtype` is a plain float or a K-quant, or the rows are not whole blocks.
pub fn quantize(dtype: DType, values: &[f32], cols: usize, out: &mut Vec<u8>) {
    let row_bytes = dtype
        .row_bytes(cols)
        .filter(|_| cols > 0 && values.len().is_multiple_of(cols));
    let Some(row_bytes) = row_bytes else {
        panic!(
            "{} values are not rows of {cols} in whole {dtype} blocks",
            values.len()
        );
    };
    out.reserve(values.len() / cols * row_bytes);
    if dtype == DType::Int8PerChannel {
        values.chunks_exact(cols).for_each(|r| int8_row(r, out));
        return;
    }
    let blocks = values.chunks_exact(32);
    match dtype {
        DType::Q8_0 => blocks.for_each(|b| out.extend_from_slice(&quantize_q8_0(b))),
        DType::Q4_0 => blocks.for_each(|b| out.extend_from_slice(&quantize_q4_0(b))),
        DType::Q4_1 => blocks.for_each(|b| out.extend_from_slice(&quantize_q4_1(b))),
        other => panic!("upmix does not quantize to {other}"),
    }
}

/// `1 / d`, or 0 for a zero scale.
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The stored (f16) bytes of a scale.
fn half_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn quantize_q8_0(x: &[f32]) -> [u8; 34] {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let mut b = [0u8; 34];
    b[..2].copy_from_slice(&half_bytes(d));
    for (q, v) in b[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
    b
}

/// Packs 32 4-bit quants: element `i < 16` in the low nibble of byte `i`, `16 + i` in
/// its high nibble.
fn pack_nibbles(q: impl Fn(usize) -> u8, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = q(i) | (q(16 + i) << 4);
    }
}

fn quantize_q4_0(x: &[f32]) -> [u8; 18] {
    // The first value of largest magnitude, sign kept (of zeros, the first zero's sign).
    let m = x[1..]
        .iter()
        .fold(x[0], |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = m / -8.0;
    let id = inverse(d);
    let mut b = [0u8; 18];
    b[..2].copy_from_slice(&half_bytes(d));
    pack_nibbles(|i| ((x[i] * id + 8.5) as u8).min(15), &mut b[2..]);
    b
}

fn quantize_q4_1(x: &[f32]) -> [u8; 20] {
    let (min, max) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let mut b = [0u8; 20];
    b[..2].copy_from_slice(&half_bytes(d));
    b[2..4].copy_from_slice(&half_bytes(min));
    pack_nibbles(|i| (((x[i] - min) * id + 0.5) as u8).min(15), &mut b[4..]);
    b
}

fn int8_row(x: &[f32], out: &mut Vec<u8>) {
    let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    out.extend(scale.to_le_bytes());
    out.extend(x.iter().map(|v| {
        let q = if scale == 0.0 {
            0.0
        } else {
            (v / scale).round_ties_even().clamp(-127.0, 127.0)
        };
        (q as i8) as u8
    }));
}

fn int8_rows(bytes: &[u8], cols: usize, out: &mut Vec<f32>) {
    let row = cols + 4;
    assert!(
        bytes.len().is_multiple_of(row),
        "{} bytes is not a whole number of int8 rows of {cols}",
        bytes.len()
    );
    out.reserve(bytes.len() / row * cols);
    for r in bytes.chunks_exact(row) {
        let scale = f32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        out.extend(r[4..].iter().map(|&q| f32::from(q as i8) * scale));
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
        dequantize(DType::Q4_0, &b, 32, &mut out);
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
        dequantize(DType::Q8_0, &[0; 33], 32, &mut Vec::new());
    }
}
