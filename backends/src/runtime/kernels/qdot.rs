//! Dot products of one quantized weight row with one activation row, the inner loop of
//! every product with a quantized matrix (module `quantized`).
//!
//! Weight rows are ggml blocks of 32 as stored: Q8_0 `[d: f16][32 x i8]`, Q4_0
//! `[d: f16][16 bytes]`, Q4_1 `[d: f16][m: f16][16 bytes]`, element `i` of a 4-bit block
//! in the low nibble of byte `i` and `16 + i` in the high one.
//! Activations are either f32 (each weight dequantized, `(q - offset) * d + m`, then
//! multiplied by its activation and summed) or quantized blocks of 32 i8 with an f32 scale
//! (integer dot products, scaled by both scales; Q4_1 adds `m * s` per block, `s` being
//! the activation block's scaled sum, as ggml's Q8_1 carries it).
//!
//! Each kernel has a portable form and, on x86-64 with AVX2, FMA and F16C, one that keeps
//! eight partial sums in a vector (as llama.cpp's do) and adds them at the end: the same
//! products, summed in another order.

use half::f16;

/// Values per block.
pub const QK: usize = 32;

/// Whether the vector kernels can run here (checked once per product).
pub fn vector() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn half(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// The three ggml block types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Block {
    /// Bytes per block, and where its quants start.
    fn layout(self) -> (usize, usize) {
        match self {
            Block::Q8_0 => (34, 2),
            Block::Q4_0 => (18, 2),
            Block::Q4_1 => (20, 4),
        }
    }
}

/// A weight row: its blocks as stored.
#[derive(Clone, Copy)]
pub struct WeightRow<'a> {
    pub bytes: &'a [u8],
    pub block: Block,
}

impl<'a> WeightRow<'a> {
    fn blocks(self) -> usize {
        self.bytes.len() / self.block.layout().0
    }

    /// Block `b`'s scale, minimum (Q4_1; else 0) and quants.
    fn at(self, b: usize) -> (u16, Option<u16>, &'a [u8]) {
        let (size, start) = self.block.layout();
        let x = &self.bytes[b * size..(b + 1) * size];
        let bits = |at: usize| u16::from_le_bytes([x[at], x[at + 1]]);
        let m = (self.block == Block::Q4_1).then(|| bits(2));
        (bits(0), m, &x[start..])
    }

    fn offset(self) -> u8 {
        if self.block == Block::Q4_0 {
            8
        } else {
            0
        }
    }
}

/// An activation row quantized in blocks: i8 values, scales, and per block (Q8_1) the
/// scaled sum.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// Q8_0 weights times f32 activations.
pub fn q8_f32(w: WeightRow, x: &[f32], vector: bool) -> f32 {
    assert!(
        x.len() >= QK * w.blocks(),
        "activations shorter than the row"
    );
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vector` is true only where the CPU has the features.
        return unsafe { avx2::q8_f32(w, x) };
    }
    let _ = vector;
    let mut acc = 0f32;
    for (b, x) in x.chunks_exact(QK).enumerate().take(w.blocks()) {
        let (d, _, q) = w.at(b);
        let d = half(d);
        for (&q, x) in q.iter().zip(x) {
            acc += f32::from(q as i8) * d * x;
        }
    }
    acc
}

/// Q4_0 / Q4_1 weights times f32 activations.
pub fn q4_f32(w: WeightRow, x: &[f32], vector: bool) -> f32 {
    assert!(
        x.len() >= QK * w.blocks(),
        "activations shorter than the row"
    );
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { avx2::q4_f32(w, x) };
    }
    let _ = vector;
    let offset = f32::from(w.offset());
    let mut acc = 0f32;
    for (b, x) in x.chunks_exact(QK).enumerate().take(w.blocks()) {
        let (d, m, q) = w.at(b);
        let (d, m) = (half(d), m.map_or(0.0, half));
        let value = |n: u8| (f32::from(n) - offset) * d + m;
        for i in 0..QK / 2 {
            acc += value(q[i] & 0x0F) * x[i];
        }
        for i in 0..QK / 2 {
            acc += value(q[i] >> 4) * x[QK / 2 + i];
        }
    }
    acc
}

/// Int8 weights with one scale times f32 activations.
pub fn i8_f32(q: &[u8], scale: f32, x: &[f32]) -> f32 {
    q.iter()
        .zip(x)
        .map(|(&q, x)| f32::from(q as i8) * scale * x)
        .sum()
}

/// Checks that `x` covers every block of `w` (the vector kernels read by pointer).
fn check(w: WeightRow, x: ActRow) {
    let sums = w.block != Block::Q4_1 || x.s.len() >= w.blocks();
    assert!(
        x.q.len() >= QK * w.blocks() && x.d.len() >= w.blocks() && sums,
        "activations shorter than the row"
    );
}

/// Q8_0 weights times Q8_0 activations.
pub fn q8_q8(w: WeightRow, x: ActRow, vector: bool) -> f32 {
    check(w, x);
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { avx2::q8_q8(w, x) };
    }
    let _ = vector;
    let mut acc = 0f32;
    for (b, y) in x.q.chunks_exact(QK).enumerate().take(w.blocks()) {
        let (d, _, q) = w.at(b);
        let dot: i32 = q
            .iter()
            .zip(y)
            .map(|(&q, &y)| i32::from(q as i8) * i32::from(y))
            .sum();
        acc += half(d) * x.d[b] * dot as f32;
    }
    acc
}

/// Q4_0 weights times Q8_0 activations, or Q4_1 weights times Q8_1 activations.
pub fn q4_q8(w: WeightRow, x: ActRow, vector: bool) -> f32 {
    check(w, x);
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { avx2::q4_q8(w, x) };
    }
    let _ = vector;
    let offset = i32::from(w.offset());
    let (mut acc, mut mins) = (0f32, 0f32);
    for (b, y) in x.q.chunks_exact(QK).enumerate().take(w.blocks()) {
        let (d, m, q) = w.at(b);
        let mut dot = 0i32;
        for i in 0..QK / 2 {
            dot += (i32::from(q[i] & 0x0F) - offset) * i32::from(y[i]);
            dot += (i32::from(q[i] >> 4) - offset) * i32::from(y[QK / 2 + i]);
        }
        acc += half(d) * x.d[b] * dot as f32;
        if let Some(m) = m {
            mins += half(m) * x.s[b];
        }
    }
    acc + mins
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActRow, WeightRow, QK};

    #[inline(always)]
    unsafe fn half(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Block `b` of `w`: pointers to its scale, its minimum (Q4_1) and its quants. The
    /// row holds `w.blocks()` whole blocks, so every pointer is in bounds.
    #[inline(always)]
    unsafe fn block(w: WeightRow, b: usize) -> (f32, f32, *const u8) {
        let (size, start) = w.block.layout();
        let p = w.bytes.as_ptr().add(b * size);
        let bits = |at: usize| u16::from_le_bytes([*p.add(at), *p.add(at + 1)]);
        let m = if start == 4 { half(bits(2)) } else { 0.0 };
        (half(bits(0)), m, p.add(start))
    }

    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// Eight i8 at `p` as f32.
    #[inline(always)]
    unsafe fn i8x8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_f32(w: WeightRow, x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..w.blocks() {
            let (d, _, q) = block(w, b);
            let d = _mm256_set1_ps(d);
            for k in 0..4 {
                let weight = _mm256_mul_ps(i8x8(q.add(8 * k)), d);
                let xs = _mm256_loadu_ps(x.as_ptr().add(QK * b + 8 * k));
                acc = _mm256_fmadd_ps(weight, xs, acc);
            }
        }
        sum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_f32(w: WeightRow, x: &[f32]) -> f32 {
        let mask = _mm_set1_epi8(0x0F);
        let offset = _mm256_set1_ps(f32::from(w.offset()));
        let mut acc = _mm256_setzero_ps();
        for b in 0..w.blocks() {
            let (d, m, q) = block(w, b);
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let bytes = _mm_loadu_si128(q as *const __m128i);
            let low = _mm_and_si128(bytes, mask);
            let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            // Elements 0..8, 8..16 (low nibbles), 16..24, 24..32 (high nibbles).
            let parts = [low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)];
            for (k, part) in parts.into_iter().enumerate() {
                let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
                let weight = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(q, offset), d), m);
                let xs = _mm256_loadu_ps(x.as_ptr().add(QK * b + 8 * k));
                acc = _mm256_fmadd_ps(weight, xs, acc);
            }
        }
        sum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_q8(w: WeightRow, x: ActRow) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for b in 0..w.blocks() {
            let (d, _, q) = block(w, b);
            let q = _mm256_loadu_si256(q as *const __m256i);
            let y = _mm256_loadu_si256(x.q.as_ptr().add(QK * b) as *const __m256i);
            // |q| * (y with q's sign): u8 times i8, as maddubs multiplies.
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            let d = _mm256_set1_ps(d * *x.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(d, dot, acc);
        }
        sum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_q8(w: WeightRow, x: ActRow) -> f32 {
        let mask = _mm256_set1_epi8(0x0F);
        let ones16 = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(w.offset() as i8);
        let (mut acc, mut mins) = (_mm256_setzero_ps(), 0f32);
        let q4_1 = w.block == super::Block::Q4_1;
        for b in 0..w.blocks() {
            let (d, m, q) = block(w, b);
            let bytes = _mm_loadu_si128(q as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
            let q = _mm256_and_si256(both, mask);
            let y = _mm256_loadu_si256(x.q.as_ptr().add(QK * b) as *const __m256i);
            let pairs = if q4_1 {
                _mm256_maddubs_epi16(q, y)
            } else {
                // q - 8 in -8..7: |q - 8| times y with its sign, as for Q8_0.
                let q = _mm256_sub_epi8(q, offset);
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
            };
            let dot = _mm256_madd_epi16(pairs, ones16);
            let d = _mm256_set1_ps(d * *x.d.get_unchecked(b));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot), acc);
            if q4_1 {
                mins += m * *x.s.get_unchecked(b);
            }
        }
        sum(acc) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes.
    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 24) as u8
            })
            .collect()
    }

    /// Blocks of `block` with random quants and scales around 0.01 (minimums around
    /// -0.075).
    fn row(block: Block, blocks: usize) -> Vec<u8> {
        let (size, start) = block.layout();
        // Quants in ggml's range: no -128.
        let mut out: Vec<u8> = bytes(size * blocks, block as u32 + 1)
            .into_iter()
            .map(|b| if b == 0x80 { 0x81 } else { b })
            .collect();
        for (b, x) in out.chunks_exact_mut(size).enumerate() {
            let d = 0.01 + b as f32 * 1e-4;
            x[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            if start == 4 {
                x[2..4].copy_from_slice(&f16::from_f32(-7.5 * d).to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn vector_kernels_equal_portable_ones() {
        if !vector() {
            return;
        }
        let blocks = 18;
        let x: Vec<f32> = bytes(QK * blocks, 4)
            .iter()
            .map(|b| f32::from(*b) / 64.0 - 2.0)
            .collect();
        let xq: Vec<i8> = bytes(QK * blocks, 5)
            .iter()
            .map(|b| (*b as i8).max(-127))
            .collect();
        let xd: Vec<f32> = (0..blocks).map(|b| 0.02 + b as f32 * 1e-3).collect();
        let xs: Vec<f32> = (0..blocks).map(|b| b as f32 * 0.5 - 3.0).collect();
        let act = ActRow {
            q: &xq,
            d: &xd,
            s: &xs,
        };
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        for block in [Block::Q8_0, Block::Q4_0, Block::Q4_1] {
            let bytes = row(block, blocks);
            let w = WeightRow {
                bytes: &bytes,
                block,
            };
            let (f, q) = match block {
                Block::Q8_0 => (
                    (q8_f32(w, &x, true), q8_f32(w, &x, false)),
                    (q8_q8(w, act, true), q8_q8(w, act, false)),
                ),
                _ => (
                    (q4_f32(w, &x, true), q4_f32(w, &x, false)),
                    (q4_q8(w, act, true), q4_q8(w, act, false)),
                ),
            };
            assert!(close(f.0, f.1), "{block:?} f32: {f:?}");
            assert!(close(q.0, q.1), "{block:?} q8: {q:?}");
        }
    }
}
