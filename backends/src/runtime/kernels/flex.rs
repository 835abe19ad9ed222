//! The fused burn-flex (CPU) versions of the [`Kernels`]: one pass over memory, in place
//! when the input buffer is not shared, parallel over rows.

use burn_flex::{Flex, FlexTensor};
use burn_tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::{axpy, exp, Kernels};
use crate::runtime::quantized::{Activations, QuantMatrix};

/// Rows of at least this many elements in all are worth spreading over threads.
const PARALLEL_ELEMENTS: usize = 1 << 15;

pub(super) fn raw<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor()
}

pub(super) fn wrap<const D: usize>(t: FlexTensor) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The values of a contiguous f32 tensor.
pub(super) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// Runs `f(row index, row)` over the rows (length `width`) of `t`'s values, in place
/// when `t` is its buffer's only owner, else on a copy.
pub(super) fn map_rows(
    t: FlexTensor,
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> FlexTensor {
    let mut t = {
        // Drop the input's handle, so that a contiguous input stays uniquely owned.
        let contiguous = t.to_contiguous();
        drop(t);
        contiguous
    };
    let (start, end) = t.layout().contiguous_offsets().expect("contiguous");
    let shape = t.layout().shape().clone();
    if let Some(data) = t.try_storage_mut::<f32>() {
        for_each_row(&mut data[start..end], width, f);
        return t;
    }
    let mut data = values(&t).to_vec();
    for_each_row(&mut data, width, f);
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Runs `f(row index, row)` over the rows (length `width`) of `data`, on several
/// threads when there is enough of it.
fn for_each_row(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if data.len() >= PARALLEL_ELEMENTS && rayon::current_num_threads() > 1 {
        data.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    }
}

/// Whether every tensor is f32 (the fused kernels' only dtype).
fn all_f32(ts: &[&FlexTensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
}

/// Up to this many rows, [`Kernels::project`] streams the weight once for all rows
/// instead of calling gemm, which packs the whole weight before multiplying: for a
/// decode step that copy costs more than the product.
const STREAMED_ROWS: usize = 4;

impl Kernels for Flex {
    const KEEPS_QUANTIZED: bool = true;

    fn project_quantized(
        x: Tensor<Flex, 2>,
        w: &QuantMatrix,
        activations: Activations,
    ) -> Tensor<Flex, 2> {
        let [rows, _] = x.dims();
        if activations == Activations::Float && rows > STREAMED_ROWS {
            return dequantized_tiles(x, w);
        }
        let x = raw(x).to_contiguous();
        let out = w.project(values(&x), activations);
        wrap(FlexTensor::from_data(TensorData::new(out, [rows, w.rows])))
    }

    fn quantized_rows(w: &QuantMatrix, ids: Tensor<Flex, 1, Int>) -> Tensor<Flex, 2> {
        let mut out = Vec::new();
        for id in ids.into_data().iter::<i64>() {
            w.dequantize_row(id as usize, &mut out);
        }
        let n = out.len() / w.cols;
        wrap(FlexTensor::from_data(TensorData::new(out, [n, w.cols])))
    }

    fn project(x: Tensor<Flex, 2>, w: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let ([rows, k], [_, n]) = (x.dims(), w.dims());
        let (x, w) = (raw(x).to_contiguous(), raw(w));
        let streamable = rows <= STREAMED_ROWS
            && all_f32(&[&x, &w])
            && w.layout().contiguous_offsets().is_some();
        if !streamable {
            return wrap::<2>(x).matmul(wrap(w));
        }
        let (xs, ws) = (values(&x), values(&w));
        // The weight is read once, front to back: each thread streams a band of its
        // rows into its own `[rows, out]` sums, and the bands' sums are added.
        let threads = rayon::current_num_threads();
        let bands = if threads > 1 && n * k >= PARALLEL_ELEMENTS {
            threads
        } else {
            1
        };
        let band = k.div_ceil(bands);
        let band_sums = |&first: &usize| {
            let mut acc = vec![0f32; rows * n];
            let last = (first + band).min(k);
            axpy::rows_times_band(xs, ws, k, n, first..last, &mut acc);
            acc
        };
        let firsts: Vec<usize> = (0..k).step_by(band).collect();
        // One band runs here: handing it to the pool costs a context switch.
        let sums: Vec<Vec<f32>> = match bands {
            1 => firsts.iter().map(band_sums).collect(),
            _ => firsts.par_iter().map(band_sums).collect(),
        };
        let mut sums = sums.into_iter();
        let mut out = sums.next().expect("at least one band");
        for sum in sums {
            out.iter_mut().zip(&sum).for_each(|(o, s)| *o += s);
        }
        wrap(FlexTensor::from_data(TensorData::new(out, [rows, n])))
    }

    fn rms_norm(x: Tensor<Flex, 2>, weight: Tensor<Flex, 2>, eps: f32) -> Tensor<Flex, 2> {
        let [_, width] = x.dims();
        let (x, weight) = (raw(x), raw(weight).to_contiguous());
        if !all_f32(&[&x, &weight]) {
            let (x, weight) = (wrap(x), wrap(weight));
            let variance = x.clone().square().mean_dim(1);
            return x * variance.add_scalar(eps).sqrt().recip() * weight;
        }
        let w = values(&weight);
        wrap(map_rows(x, width, |_, row| {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv_rms = 1.0 / (mean + eps).sqrt();
            row.iter_mut()
                .zip(w)
                .for_each(|(v, w)| *v = *v * inv_rms * w);
        }))
    }

    fn silu_mul(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let [_, width] = gate.dims();
        let (gate, up) = (raw(gate), raw(up).to_contiguous());
        if !all_f32(&[&gate, &up]) {
            return burn_tensor::activation::silu(wrap::<2>(gate)) * wrap(up);
        }
        let up = values(&up);
        wrap(map_rows(gate, width, |i, row| {
            let up = &up[i * width..(i + 1) * width];
            silu_mul_row(row, up);
        }))
    }

    fn rope(
        x: Tensor<Flex, 3>,
        cos: Tensor<Flex, 3>,
        sin: Tensor<Flex, 3>,
        _rotate_half: Tensor<Flex, 2>,
    ) -> Tensor<Flex, 3> {
        let [_, _, d] = x.dims();
        let (x, cos, sin) = (raw(x), raw(cos).to_contiguous(), raw(sin).to_contiguous());
        assert!(all_f32(&[&x, &cos, &sin]), "rotary embeddings run in f32");
        let (cos, sin) = (values(&cos), values(&sin));
        let half = d / 2;
        wrap(map_rows(x, d, |i, v| {
            let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
            for j in 0..half {
                let (a, b) = (v[j], v[j + half]);
                v[j] = a * c[j] + -b * s[j];
                v[j + half] = b * c[j + half] + a * s[j + half];
            }
        }))
    }

    fn contiguous<const D: usize>(x: Tensor<Flex, D>) -> Tensor<Flex, D> {
        let x = raw(x);
        if x.is_contiguous() || x.dtype() != DType::F32 {
            return wrap(x.to_contiguous());
        }
        wrap(copy_rows(&x).unwrap_or_else(|| x.to_contiguous()))
    }

    fn write_columns(
        cache: Tensor<Flex, 4>,
        start: usize,
        values: Tensor<Flex, 4>,
    ) -> Tensor<Flex, 4> {
        let [b, h, n, d] = values.dims();
        let capacity = cache.dims()[2];
        let mut cache = raw(cache);
        let values = raw(values);
        let fits = cache.dtype() == DType::F32
            && values.dtype() == DType::F32
            && cache.layout().contiguous_offsets() == Some((0, b * h * capacity * d));
        if !fits {
            let range = [0..b, 0..h, start..start + n, 0..d];
            return wrap::<4>(cache).slice_assign(range, wrap(values));
        }
        let values = values.to_contiguous();
        let src = values.as_slice::<f32>().expect("contiguous f32");
        // Unique: written in place; shared (never, in the runtime): copied once first.
        let dst = cache.storage_mut::<f32>();
        for (i, rows) in src.chunks(n * d).enumerate() {
            let at = (i * capacity + start) * d;
            dst[at..at + n * d].copy_from_slice(rows);
        }
        wrap(cache)
    }

    fn masked_softmax(scores: Tensor<Flex, 4>, mask: Option<Tensor<Flex, 4>>) -> Tensor<Flex, 4> {
        let width = scores.dims()[3];
        let scores = raw(scores);
        let mask = mask.map(|m| raw(m).to_contiguous());
        if scores.dtype() != DType::F32 || mask.as_ref().is_some_and(|m| m.dtype() != DType::F32) {
            let scores = wrap::<4>(scores);
            let scores = match mask {
                Some(m) => scores + wrap(m),
                None => scores,
            };
            return burn_tensor::activation::softmax(scores, 3);
        }
        let mask = mask.as_ref().map(values);
        wrap(map_rows(scores, width, |i, row| match mask {
            Some(mask) => {
                let m = &mask[i * width..(i + 1) * width];
                row.iter_mut().zip(m).for_each(|(v, m)| *v += m);
                // Keys after the last visible one (the causal future) get exactly 0,
                // as exp of the mask value would give; no need to compute them.
                let visible = m
                    .iter()
                    .rposition(|&m| m != f32::MIN)
                    .map_or(width, |l| l + 1);
                softmax_row(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            None => softmax_row(row),
        }))
    }
}

/// A contiguous copy of an f32 tensor whose last dimension is contiguous, one row
/// copy at a time; `None` for other layouts.
fn copy_rows(t: &FlexTensor) -> Option<FlexTensor> {
    let layout = t.layout();
    let (shape, strides) = (layout.shape().to_vec(), layout.strides());
    let (&width, outer) = shape.split_last()?;
    if strides.last() != Some(&1) || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let src = t.storage::<f32>();
    let start = layout.start_offset();
    let rows: usize = outer.iter().product();
    let mut out = vec![0f32; rows * width];
    let copy = |row: usize, dst: &mut [f32]| {
        // The source offset of `row`: its outer index digits times their strides.
        let (mut rest, mut offset) = (row, start);
        for (&n, &stride) in outer.iter().zip(strides).rev() {
            offset += (rest % n) * stride as usize;
            rest /= n;
        }
        dst.copy_from_slice(&src[offset..offset + width]);
    };
    for_each_row(&mut out, width, copy);
    Some(FlexTensor::from_data(TensorData::new(out, shape)))
}

/// `row = silu(row) * up`.
fn silu_mul_row(row: &mut [f32], up: &[f32]) {
    let mut s = [0f32; 64];
    for (g, u) in row.chunks_mut(64).zip(up.chunks(64)) {
        sigmoids(g, &mut s);
        for ((x, s), u) in g.iter_mut().zip(s).zip(u) {
            *x = *x * s * u;
        }
    }
}

/// `sigmoid(x)` of up to 64 values into `out`, split by sign as burn-flex computes it:
/// `1 / (1 + e^-x)` for `x >= 0`, `e^x / (1 + e^x)` otherwise.
pub(super) fn sigmoids(x: &[f32], out: &mut [f32; 64]) {
    for (e, &v) in out.iter_mut().zip(x) {
        *e = -v.abs();
    }
    exp::exp_in_place(&mut out[..x.len()]);
    for (e, &v) in out.iter_mut().zip(x) {
        *e = if v >= 0.0 {
            1.0 / (1.0 + *e)
        } else {
            *e / (1.0 + *e)
        };
    }
}

/// `row = softmax(row)`: max, then `exp(v - max)` and its sum, then the division.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|v| *v -= max);
    exp::exp_in_place(row);
    let sum: f32 = row.iter().sum();
    row.iter_mut().for_each(|v| *v /= sum);
}

/// `x W^T` for many rows of f32 activations: the quantized weight dequantized a tile of
/// output rows at a time (never all of it at once), each tile multiplied by gemm, the
/// products of dequantized weights as an f32 checkpoint gives them.
fn dequantized_tiles(x: Tensor<Flex, 2>, w: &QuantMatrix) -> Tensor<Flex, 2> {
    const TILE: usize = 256;
    let [n, _] = x.dims();
    let mut out = vec![0f32; n * w.rows];
    for start in (0..w.rows).step_by(TILE) {
        let end = (start + TILE).min(w.rows);
        let mut rows = Vec::with_capacity((end - start) * w.cols);
        for r in start..end {
            w.dequantize_row(r, &mut rows);
        }
        let tile = FlexTensor::from_data(TensorData::new(rows, [end - start, w.cols]));
        let product = raw(x.clone().matmul(wrap::<2>(tile).transpose())).to_contiguous();
        for (r, row) in values(&product).chunks_exact(end - start).enumerate() {
            out[r * w.rows + start..r * w.rows + end].copy_from_slice(row);
        }
    }
    wrap(FlexTensor::from_data(TensorData::new(out, [n, w.rows])))
}

#[cfg(test)]
mod tests {
    use burn_flex::{Flex, FlexDevice};
    use burn_tensor::{Tensor, TensorData, TensorPrimitive};

    use super::super::Kernels;

    fn buffer<const D: usize>(t: &Tensor<Flex, D>) -> *const u8 {
        match t.clone().into_primitive() {
            TensorPrimitive::Float(t) => t.bytes().as_ptr(),
            TensorPrimitive::QFloat(_) => unreachable!(),
        }
    }

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::from_data(TensorData::new(values, shape), &FlexDevice)
    }

    #[test]
    fn cache_writes_and_norms_reuse_the_buffer_they_are_given() {
        let cache = Tensor::<Flex, 4>::zeros([2, 3, 10, 4], &FlexDevice);
        let before = buffer(&cache);
        let values = tensor((0..48).map(|v| v as f32).collect(), [2, 3, 2, 4]);
        let cache = Flex::write_columns(cache, 5, values.clone());
        assert_eq!(buffer(&cache), before, "the cache was copied");
        let written = cache.clone().slice([0..2, 0..3, 5..7, 0..4]);
        assert_eq!(written.into_data(), values.into_data());

        let x = tensor((0..12).map(|v| v as f32).collect(), [3, 4]);
        let before = buffer(&x);
        let weight = Tensor::<Flex, 2>::ones([1, 4], &FlexDevice);
        assert_eq!(buffer(&Flex::rms_norm(x, weight, 1e-5)), before);
    }

    #[test]
    fn fused_kernels_equal_the_composed_ops() {
        let x = tensor(
            (0..24).map(|v| (v as f32 * 0.37).sin() * 3.0).collect(),
            [4, 6],
        );
        let y = tensor((0..24).map(|v| (v as f32 * 0.11).cos()).collect(), [4, 6]);
        let w = tensor((0..6).map(|v| 1.0 + v as f32 * 0.1).collect(), [1, 6]);
        let close = |a: Tensor<Flex, 2>, b: Tensor<Flex, 2>| {
            let diff = (a - b).abs().max().into_scalar();
            assert!(diff < 1e-6, "{diff}");
        };
        // The streamed projection of a few rows (9 input rows: two bands of four and one).
        let few = tensor((0..27).map(|v| (v as f32 * 0.29).sin()).collect(), [3, 9]);
        let w9 = tensor((0..54).map(|v| (v as f32 * 0.13).cos()).collect(), [9, 6]);
        close(Flex::project(few.clone(), w9.clone()), few.matmul(w9));
        let variance = x.clone().square().mean_dim(1);
        let norm = x.clone() * variance.add_scalar(1e-5).sqrt().recip() * w.clone();
        close(Flex::rms_norm(x.clone(), w, 1e-5), norm);
        let swiglu = burn_tensor::activation::silu(x.clone()) * y.clone();
        close(Flex::silu_mul(x.clone(), y.clone()), swiglu);
        let mask = tensor(
            (0..24)
                .map(|i| if i % 6 > i / 6 { f32::MIN } else { 0.0 })
                .collect(),
            [1, 1, 4, 6],
        );
        let scores = x.reshape([1, 1, 4, 6]);
        let want = burn_tensor::activation::softmax(scores.clone() + mask.clone(), 3);
        let got = Flex::masked_softmax(scores, Some(mask));
        close(got.reshape([4, 6]), want.reshape([4, 6]));
    }
}
