//! Quantized weights kept quantized in (host) memory, and products with them.
//!
//! A [`QuantMatrix`] holds an `[out, in]` matrix of Q8_0, Q4_0, Q4_1 or int8-per-channel
//! weights exactly as stored (ggml blocks with f16 scales, or per row an f32 scale and
//! i8 values), so resident memory is the file's size. [`QuantMatrix::project`] multiplies activation rows by it, parallel
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

use super::kernels::qdot::{self, ActRow, Block, WeightRow, QK};

/// How activations meet quantized weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations times the dequantized weights.
    #[default]
    Float,
    /// Activations quantized to Q8_0 / Q8_1 blocks first, as llama.cpp's CPU backend does.
    Ggml,
}

/// An `[out, in]` quantized matrix in host memory, its bytes as stored: ggml blocks
/// along each row, or for int8 per channel each row's f32 scale and i8 values.
pub struct QuantMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    bytes: Vec<u8>,
}

/// Whether the runtime keeps weights of `dtype` quantized.
pub(crate) fn keeps(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Int8PerChannel
    )
}

/// A pointer to the output that bands of output columns write through.
struct Out(*mut f32);

// SAFETY: every task writes a disjoint set of elements (its own output columns).
unsafe impl Sync for Out {}

impl QuantMatrix {
    /// A `[rows, cols]` weight of `dtype` (see [`keeps`]) from its stored bytes.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: Vec<u8>) -> QuantMatrix {
        QuantMatrix {
            dtype,
            rows,
            cols,
            bytes,
        }
    }

    fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    /// The stored bytes of row `j`.
    fn row(&self, j: usize) -> &[u8] {
        &self.bytes[j * self.row_bytes()..(j + 1) * self.row_bytes()]
    }

    /// Appends row `r`, dequantized, to `out`.
    pub fn dequantize_row(&self, r: usize, out: &mut Vec<f32>) {
        self.dtype.decode(self.row(r), self.cols, out);
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
        let vector = qdot::vector();
        let block = match self.dtype {
            DType::Q8_0 => Block::Q8_0,
            DType::Q4_0 => Block::Q4_0,
            _ => Block::Q4_1,
        };
        // A weight row (its stored bytes) times activation row `r`.
        let dot = |bytes: &[u8], r: usize| -> f32 {
            let xs = &x[r * self.cols..(r + 1) * self.cols];
            let w = WeightRow { bytes, block };
            match (self.dtype, ggml) {
                (DType::Int8PerChannel, _) => {
                    let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    qdot::i8_f32(&bytes[4..], scale, xs)
                }
                (DType::Q8_0, false) => qdot::q8_f32(w, xs, vector),
                (_, false) => qdot::q4_f32(w, xs, vector),
                (DType::Q8_0, true) => qdot::q8_q8(w, quantized[r].act(), vector),
                (_, true) => qdot::q4_q8(w, quantized[r].act(), vector),
            }
        };
        // Bands of output columns, one task each; a band reads its weight rows once.
        const BAND: usize = 16;
        let mut out = vec![0f32; n * self.rows];
        let at = Out(out.as_mut_ptr());
        let at = &at;
        let band = |band: usize| {
            for j in band * BAND..((band + 1) * BAND).min(self.rows) {
                let bytes = self.row(j);
                for r in 0..n {
                    // SAFETY: `r * rows + j` is in bounds, and column `j` belongs to this
                    // band alone.
                    unsafe { *at.0.add(r * self.rows + j) = dot(bytes, r) };
                }
            }
        };
        let bands = self.rows.div_ceil(BAND);
        // On one thread, run here: handing work to the pool costs a context switch.
        if rayon::current_num_threads() > 1 {
            (0..bands).into_par_iter().for_each(band);
        } else {
            (0..bands).for_each(band);
        }
        out
    }
}

/// One activation row quantized in blocks of 32, as ggml's `quantize_row_q8_0` /
/// `quantize_row_q8_1` on x86: `id = 127 / amax`, rounding to nearest even, scales and
/// sums kept as the f32 values of their f16 copies.
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
                .extend(block.iter().map(|v| nearest_even(v * id) as i8));
            row.d.push(f16::from_f32(d).to_f32());
            if with_sums {
                let sum: i32 = row.q[start..].iter().map(|&v| i32::from(v)).sum();
                row.s.push(f16::from_f32(d * sum as f32).to_f32());
            }
        }
        row
    }

    fn act(&self) -> ActRow<'_> {
        ActRow {
            q: &self.q,
            d: &self.d,
            s: &self.s,
        }
    }
}

/// `x` rounded to the nearest integer, ties to even, for `|x| < 2^22`: adding and
/// subtracting `1.5 * 2^23` leaves no fraction bits, and f32 addition rounds to nearest
/// even (the same as `round_ties_even`, without a library call).
fn nearest_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}
