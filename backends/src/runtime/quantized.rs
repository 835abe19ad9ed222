//! Quantized weights kept quantized in (host) memory, and products with them.
//!
//! A [`QuantMatrix`] holds an `[out, in]` matrix of Q8_0, Q4_0, Q4_1 or int8-per-channel
//! weights with its scales widened to f32 once and its quants as stored (one byte per
//! value, or two 4-bit values per byte in ggml's order), so resident memory stays near
//! the file's size. [`QuantMatrix::project`] multiplies activation rows by it, parallel
//! over output rows, one of two ways ([`Activations`]):
//! - `Float`: activations stay f32; each block's quants are widened and dotted with them
//!   (the values of dequantize-then-multiply, which transformers computes from a
//!   dequantized checkpoint, up to summation order);
//! - `Ggml`: each activation row is first quantized in blocks of 32 as llama.cpp's CPU
//!   backend does (Q8_1 for Q4_1 weights, Q8_0 otherwise: `d = amax / 127` stored as
//!   f16, `q = round(x * (127 / amax))` with ties to even, Q8_1's `s = d * sum(q)` as
//!   f16), and each block's product is an integer dot product scaled by both scales
//!   (plus `m * s` for Q4_1): the numbers llama.cpp computes. Int8 per channel has no
//!   ggml form and runs as `Float`.

use half::f16;
use rayon::prelude::*;
use upmix_ir::DType;

/// How activations meet quantized weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations times the dequantized weights.
    #[default]
    Float,
    /// Activations quantized to Q8_0 / Q8_1 blocks first, as llama.cpp's CPU backend does.
    Ggml,
}

/// Values per ggml block.
const QK: usize = 32;

/// An `[out, in]` quantized matrix in host memory.
pub struct QuantMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    /// Per block (rows one after another): the scale `d`; per row for int8 per channel.
    scales: Vec<f32>,
    /// Q4_1: per block, the minimum `m`.
    mins: Vec<f32>,
    /// Q8_0 and int8: one i8 per value; Q4_0 and Q4_1: 16 bytes per block, element `i`
    /// in the low nibble of byte `i`, element `16 + i` in the high one.
    quants: Vec<u8>,
}

/// Whether the runtime keeps weights of `dtype` quantized.
pub(crate) fn keeps(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Int8PerChannel
    )
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// Unpacks the stored bytes of a `[rows, cols]` weight of `dtype` (see [`keeps`]).
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> QuantMatrix {
        let mut m = QuantMatrix {
            dtype,
            rows,
            cols,
            scales: Vec::new(),
            mins: Vec::new(),
            quants: Vec::with_capacity(bytes.len()),
        };
        let (_, block) = dtype.block();
        match dtype {
            DType::Int8PerChannel => {
                for row in bytes.chunks_exact(cols + 4) {
                    m.scales
                        .push(f32::from_le_bytes([row[0], row[1], row[2], row[3]]));
                    m.quants.extend_from_slice(&row[4..]);
                }
            }
            DType::Q8_0 | DType::Q4_0 => {
                for b in bytes.chunks_exact(block) {
                    m.scales.push(half(b, 0));
                    m.quants.extend_from_slice(&b[2..]);
                }
            }
            DType::Q4_1 => {
                for b in bytes.chunks_exact(block) {
                    m.scales.push(half(b, 0));
                    m.mins.push(half(b, 2));
                    m.quants.extend_from_slice(&b[4..]);
                }
            }
            other => unreachable!("{other} is not kept quantized"),
        }
        m
    }

    /// Quant bytes per row.
    fn row_quants(&self) -> usize {
        match self.dtype {
            DType::Q4_0 | DType::Q4_1 => self.cols / 2,
            _ => self.cols,
        }
    }

    /// Appends row `r`, dequantized, to `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        let q = &self.quants[r * self.row_quants()..(r + 1) * self.row_quants()];
        let blocks = self.cols / QK;
        match self.dtype {
            DType::Int8PerChannel => {
                let d = self.scales[r];
                out.extend(q.iter().map(|&v| f32::from(v as i8) * d));
            }
            DType::Q8_0 => {
                for (b, qs) in q.chunks_exact(QK).enumerate() {
                    let d = self.scales[r * blocks + b];
                    out.extend(qs.iter().map(|&v| f32::from(v as i8) * d));
                }
            }
            _ => {
                for (b, qs) in q.chunks_exact(QK / 2).enumerate() {
                    let at = r * blocks + b;
                    let d = self.scales[at];
                    let (m, offset) = match self.dtype {
                        DType::Q4_1 => (self.mins[at], 0.0),
                        _ => (0.0, 8.0),
                    };
                    let value = |n: u8| (f32::from(n) - offset) * d + m;
                    out.extend(qs.iter().map(|&v| value(v & 0x0F)));
                    out.extend(qs.iter().map(|&v| value(v >> 4)));
                }
            }
        }
    }

    /// `x W^T` for activation rows `x` (`[n, cols]`, row-major): `[n, rows]`.
    pub fn project(&self, x: &[f32], activations: Activations) -> Vec<f32> {
        let n = x.len() / self.cols;
        let ggml = activations == Activations::Ggml && self.dtype != DType::Int8PerChannel;
        let quantized: Vec<QuantRow> = match ggml {
            true => x
                .chunks_exact(self.cols)
                .map(|r| QuantRow::new(r, self.dtype == DType::Q4_1))
                .collect(),
            false => Vec::new(),
        };
        // Output rows in bands, each band's `[rows, n]` sums computed by one task.
        const BAND: usize = 16;
        let mut out_t = vec![0f32; self.rows * n];
        out_t
            .par_chunks_mut(BAND * n)
            .enumerate()
            .for_each(|(band, sums)| {
                for (i, row_sums) in sums.chunks_mut(n).enumerate() {
                    let j = band * BAND + i;
                    for (r, s) in row_sums.iter_mut().enumerate() {
                        *s = match ggml {
                            true => self.dot_quantized(j, &quantized[r]),
                            false => self.dot(j, &x[r * self.cols..(r + 1) * self.cols]),
                        };
                    }
                }
            });
        // `[rows, n]` -> `[n, rows]`.
        let mut out = vec![0f32; n * self.rows];
        for (j, sums) in out_t.chunks_exact(n).enumerate() {
            for (r, s) in sums.iter().enumerate() {
                out[r * self.rows + j] = *s;
            }
        }
        out
    }

    /// Row `j` of the weight dotted with f32 activations `x`: each value dequantized
    /// (as [`QuantMatrix::dequantize_row`] gives it) times its activation, summed.
    fn dot(&self, j: usize, x: &[f32]) -> f32 {
        let q = &self.quants[j * self.row_quants()..(j + 1) * self.row_quants()];
        let blocks = self.cols / QK;
        match self.dtype {
            DType::Int8PerChannel => dot_i8_f32(q, x, self.scales[j]),
            DType::Q8_0 => {
                let mut acc = 0f32;
                for (b, (qs, xs)) in q.chunks_exact(QK).zip(x.chunks_exact(QK)).enumerate() {
                    acc += dot_i8_f32(qs, xs, self.scales[j * blocks + b]);
                }
                acc
            }
            dtype => {
                let mut acc = 0f32;
                for (b, (qs, xs)) in q.chunks_exact(QK / 2).zip(x.chunks_exact(QK)).enumerate() {
                    let at = j * blocks + b;
                    let (m, offset) = match dtype {
                        DType::Q4_1 => (self.mins[at], 0.0),
                        _ => (0.0, 8.0),
                    };
                    acc += dot_nibbles_f32(qs, xs, self.scales[at], m, offset);
                }
                acc
            }
        }
    }

    /// Row `j` of the weight dotted with a quantized activation row, as ggml does.
    fn dot_quantized(&self, j: usize, x: &QuantRow) -> f32 {
        let q = &self.quants[j * self.row_quants()..(j + 1) * self.row_quants()];
        let blocks = self.cols / QK;
        let mut acc = 0f32;
        match self.dtype {
            DType::Q8_0 => {
                for (b, (qs, xs)) in q.chunks_exact(QK).zip(x.q.chunks_exact(QK)).enumerate() {
                    let d = self.scales[j * blocks + b] * x.d[b];
                    acc += d * dot_i8(qs, xs) as f32;
                }
            }
            dtype => {
                let q4_1 = dtype == DType::Q4_1;
                for (b, (qs, xs)) in q.chunks_exact(QK / 2).zip(x.q.chunks_exact(QK)).enumerate() {
                    let at = j * blocks + b;
                    let d = self.scales[at] * x.d[b];
                    acc += d * dot_nibbles_i8(qs, xs, if q4_1 { 0 } else { 8 }) as f32;
                    if q4_1 {
                        acc += self.mins[at] * x.s[b];
                    }
                }
            }
        }
        acc
    }
}

/// One activation row quantized in blocks of 32, as ggml's `quantize_row_q8_0` /
/// `quantize_row_q8_1` on x86: scales and sums as the f32 values of their f16 copies.
struct QuantRow {
    q: Vec<i8>,
    d: Vec<f32>,
    /// Q8_1: `d * sum(q)` per block.
    s: Vec<f32>,
}

impl QuantRow {
    fn new(x: &[f32], with_sums: bool) -> QuantRow {
        let blocks = x.len() / QK;
        let mut row = QuantRow {
            q: Vec::with_capacity(x.len()),
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(if with_sums { blocks } else { 0 }),
        };
        for block in x.chunks_exact(QK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let start = row.q.len();
            row.q
                .extend(block.iter().map(|v| (v * id).round_ties_even() as i8));
            row.d.push(f16::from_f32(d).to_f32());
            if with_sums {
                let sum: i32 = row.q[start..].iter().map(|&v| i32::from(v)).sum();
                row.s.push(f16::from_f32(d * sum as f32).to_f32());
            }
        }
        row
    }
}

fn dot_i8(a: &[u8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
        .sum()
}

/// `sum((q * d) * x)` over int8 quants.
fn dot_i8_f32(q: &[u8], x: &[f32], d: f32) -> f32 {
    q.iter()
        .zip(x)
        .map(|(&v, x)| f32::from(v as i8) * d * x)
        .sum()
}

/// `sum((q - offset) * x)` over a block of 4-bit quants.
fn dot_nibbles_i8(qs: &[u8], x: &[i8], offset: i32) -> i32 {
    let (lo, hi) = x.split_at(QK / 2);
    let mut s = 0i32;
    for i in 0..QK / 2 {
        s += (i32::from(qs[i] & 0x0F) - offset) * i32::from(lo[i]);
        s += (i32::from(qs[i] >> 4) - offset) * i32::from(hi[i]);
    }
    s
}

/// `sum(((q - offset) * d + m) * x)` over a block of 4-bit quants.
fn dot_nibbles_f32(qs: &[u8], x: &[f32], d: f32, m: f32, offset: f32) -> f32 {
    let (lo, hi) = x.split_at(QK / 2);
    let value = |n: u8| (f32::from(n) - offset) * d + m;
    let mut s = 0f32;
    for i in 0..QK / 2 {
        s += value(qs[i] & 0x0F) * lo[i];
    }
    for i in 0..QK / 2 {
        s += value(qs[i] >> 4) * hi[i];
    }
    s
}
