//! The fused CPU kernels under autodiff, for training: each op runs burn-flex's fused
//! forward kernel and registers a backward that is one fused pass as well, instead of the
//! chain of generic ops (each a pass over memory, with the C library's scalar `exp`)
//! that autodiff would record for the default formulas.
//!
//! Backward formulas, for the upstream gradient `g`:
//! - softmax `y = softmax(x + mask)` per row: `dx = y * (g - sum(g * y))` (the mask is a
//!   constant);
//! - SwiGLU `y = silu(a) * b`, `s = sigmoid(a)`: `da = g * b * s * (1 + a * (1 - s))`,
//!   `db = g * a * s`;
//! - the weighted next-token loss `sum_r w_r * (lse(x_r) - x_r[t_r])`:
//!   `dx_r = g * w_r * (softmax(x_r) - onehot(t_r))`;
//! - rotary embedding `y = x * cos + rotate_half(x) * sin` per head of width `d`
//!   (`rotate_half(x) = cat(-x2, x1)`): `dx1 = g1 * cos1 + g2 * sin2`,
//!   `dx2 = g2 * cos2 - g1 * sin1`;
//! - RMSNorm `y = x * r * w`, `r = 1 / sqrt(mean(x^2) + eps)` per row of width `n`:
//!   `dx = r * (g * w) - x * r^3 / n * sum(g * w * x)`, `dw = sum over rows of g * x * r`.

use std::sync::atomic::{AtomicU64, Ordering};

use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{binary, unary, Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_flex::{Flex, FlexTensor};
use burn_tensor::{DType, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::flex::{map_rows, raw, sigmoids, values, wrap};
use super::{exp, Kernels};

type Ad<C> = Autodiff<Flex, C>;
type Primitive<C> = burn_tensor::ops::FloatTensor<Ad<C>>;

fn parts<C: CheckpointStrategy, const D: usize>(t: Tensor<Ad<C>, D>) -> Primitive<C> {
    t.into_primitive().tensor()
}

fn whole<C: CheckpointStrategy, const D: usize>(t: Primitive<C>) -> Tensor<Ad<C>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// A contiguous f32 copy of `t` (or `t` itself when it already is one).
fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::F32 => t,
        _ => FlexTensor::from_data(t.into_data().convert::<f32>()),
    }
}

impl<C: CheckpointStrategy> Kernels for Ad<C> {
    fn rope(
        x: Tensor<Self, 3>,
        cos: Tensor<Self, 3>,
        sin: Tensor<Self, 3>,
        rotate_half: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        #[derive(Debug)]
        struct RopeBackward;

        impl Backward<Flex, 1> for RopeBackward {
            /// `cos` and `sin`, contiguous, the shape of the input.
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (cos, sin) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let d = *cos.layout().shape().last().expect("3-D");
                    let (cos, sin) = (values(&cos), values(&sin));
                    let half = d / 2;
                    map_rows(contiguous_f32(g), d, |i, row| {
                        let (c, s) = (&cos[i * d..(i + 1) * d], &sin[i * d..(i + 1) * d]);
                        for j in 0..half {
                            let (a, b) = (row[j], row[j + half]);
                            row[j] = a * c[j] + b * s[j + half];
                            row[j + half] = b * c[j + half] - a * s[j];
                        }
                    })
                });
            }
        }

        let x = parts(x);
        let (cos, sin) = (cos.inner(), sin.inner());
        let state = (
            contiguous_f32(raw(cos.clone())),
            contiguous_f32(raw(sin.clone())),
        );
        let y = raw(Flex::rope(
            wrap(x.primitive.clone()),
            cos,
            sin,
            rotate_half.inner(),
        ));
        let y = match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        whole(y)
    }

    fn weighted_nll(logits: Tensor<Self, 2>, targets: &[u32], weights: &[f32]) -> Tensor<Self, 1> {
        #[derive(Debug)]
        struct NllBackward;

        impl Backward<Flex, 1> for NllBackward {
            /// Every row's softmax, the targets and the row weights.
            type State = (FlexTensor, Vec<u32>, Vec<f32>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (p, targets, weights) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let g = contiguous_f32(g);
                    let g = values(&g)[0];
                    let width = p.layout().shape()[1];
                    map_rows(p, width, |r, row| {
                        row[targets[r] as usize] -= 1.0;
                        let scale = g * weights[r];
                        row.iter_mut().for_each(|v| *v *= scale);
                    })
                });
            }
        }

        let x = parts(logits);
        let width = x.primitive.layout().shape()[1];
        // Each row's softmax in place, its loss term kept aside.
        let losses: Vec<AtomicU64> = (0..targets.len()).map(|_| AtomicU64::new(0)).collect();
        let p = map_rows(contiguous_f32(x.primitive.clone()), width, |r, row| {
            let target = row[targets[r] as usize];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|v| *v -= max);
            exp::exp_in_place(row);
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
            let loss = f64::from(max + sum.ln() - target);
            losses[r].store(loss.to_bits(), Ordering::Relaxed);
        });
        let total: f64 = losses
            .iter()
            .zip(weights)
            .map(|(l, &w)| f64::from(w) * f64::from_bits(l.load(Ordering::Relaxed)))
            .sum();
        let y = FlexTensor::from_data(TensorData::new(vec![total as f32], [1]));
        let y = match NllBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((p, targets.to_vec(), weights.to_vec()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        whole(y)
    }

    fn contiguous<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        // The same values in another layout: the gradient passes through as it is.
        #[derive(Debug)]
        struct CopyBackward;

        impl Backward<Flex, 1> for CopyBackward {
            type State = ();

            fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| g);
            }
        }

        let x = parts(x);
        let y = raw(Flex::contiguous(wrap::<D>(x.primitive.clone())));
        let prep = CopyBackward.prepare::<C>([x.node.clone()]).compute_bound();
        whole(prep.stateless(y))
    }

    fn masked_softmax(scores: Tensor<Self, 4>, mask: Option<Tensor<Self, 4>>) -> Tensor<Self, 4> {
        #[derive(Debug)]
        struct SoftmaxBackward;

        impl Backward<Flex, 1> for SoftmaxBackward {
            /// The output `y`, contiguous.
            type State = FlexTensor;

            fn backward(
                self,
                ops: Ops<FlexTensor, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let y = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
                    let width = *y.layout().shape().last().expect("4-D");
                    let y = values(&y);
                    map_rows(contiguous_f32(g), width, |i, row| {
                        let y = &y[i * width..(i + 1) * width];
                        let dot: f32 = row.iter().zip(y).map(|(g, y)| g * y).sum();
                        row.iter_mut().zip(y).for_each(|(g, y)| *g = y * (*g - dot));
                    })
                });
            }
        }

        let x = parts(scores);
        let mask = mask.map(|m| m.inner());
        let forward = |x: FlexTensor| raw(Flex::masked_softmax(wrap(x), mask));
        let y = match SoftmaxBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = contiguous_f32(forward(x.primitive));
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive)),
        };
        whole(y)
    }

    fn silu_mul(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct SiluMulBackward;

        impl Backward<Flex, 2> for SiluMulBackward {
            /// The gate and up inputs, contiguous.
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (a, b) = ops.state;
                let [parent_a, parent_b] = ops.parents;
                let g = contiguous_f32(grads.consume::<Flex>(&ops.node));
                let width = a.layout().shape()[1];
                let (a, b, g) = (values(&a), values(&b), values(&g));
                // Both gradients in one pass over the rows.
                let mut da = vec![0f32; g.len()];
                let mut db = vec![0f32; g.len()];
                da.par_chunks_mut(width)
                    .zip(db.par_chunks_mut(width))
                    .enumerate()
                    .for_each(|(i, (da, db))| {
                        let r = i * width..(i + 1) * width;
                        swiglu_grads(&g[r.clone()], &a[r.clone()], &b[r], da, db);
                    });
                let shape = [g.len() / width, width];
                for (parent, d) in [(parent_a, da), (parent_b, db)] {
                    if let Some(node) = parent {
                        grads.register::<Flex>(
                            node.id,
                            FlexTensor::from_data(TensorData::new(d, shape)),
                        );
                    }
                }
            }
        }

        let (a, b) = (parts(gate), parts(up));
        let forward = |a: FlexTensor, b: FlexTensor| raw(Flex::silu_mul(wrap(a), wrap(b)));
        let y = match SiluMulBackward
            .prepare::<C>([a.node.clone(), b.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (sa, sb) = (contiguous_f32(a.primitive), contiguous_f32(b.primitive));
                // The forward must not write into the saved gate: hand it a copy's handle.
                let y = forward(sa.clone(), sb.clone());
                prep.finish((sa, sb), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(a.primitive, b.primitive)),
        };
        whole(y)
    }

    fn rms_norm(x: Tensor<Self, 2>, weight: Tensor<Self, 2>, eps: f32) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl Backward<Flex, 2> for RmsNormBackward {
            /// The input and the weight (`[1, n]`), contiguous, and `eps`.
            type State = (FlexTensor, FlexTensor, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, w, eps) = ops.state;
                let [rows, n] = [x.layout().shape()[0], x.layout().shape()[1]];
                let (xs, ws) = (values(&x), values(&w));
                let inv_rms = |row: &[f32]| {
                    let mean = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
                    1.0 / (mean + eps).sqrt()
                };
                let d_x = |g: FlexTensor| {
                    map_rows(contiguous_f32(g), n, |i, row| {
                        let x = &xs[i * n..(i + 1) * n];
                        let r = inv_rms(x);
                        let dot: f32 = row.iter().zip(ws).zip(x).map(|((g, w), x)| g * w * x).sum();
                        let k = r * r * r * dot / n as f32;
                        row.iter_mut()
                            .zip(ws)
                            .zip(x)
                            .for_each(|((g, w), x)| *g = r * *g * w - x * k);
                    })
                };
                let d_w = |g: FlexTensor| {
                    let g = contiguous_f32(g);
                    let gs = values(&g);
                    let mut sum = vec![0f32; n];
                    for i in 0..rows {
                        let x = &xs[i * n..(i + 1) * n];
                        let r = inv_rms(x);
                        let g = &gs[i * n..(i + 1) * n];
                        sum.iter_mut()
                            .zip(g)
                            .zip(x)
                            .for_each(|((s, g), x)| *s += g * x * r);
                    }
                    FlexTensor::from_data(TensorData::new(sum, [1, n]))
                };
                binary::<Flex, _, _>(ops.parents, ops.node, grads, d_x, d_w);
            }
        }

        let (x, w) = (parts(x), parts(weight));
        let forward = |x: FlexTensor, w: FlexTensor| raw(Flex::rms_norm(wrap(x), wrap(w), eps));
        let y = match RmsNormBackward
            .prepare::<C>([x.node.clone(), w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (sx, sw) = (contiguous_f32(x.primitive), contiguous_f32(w.primitive));
                let y = forward(sx.clone(), sw.clone());
                prep.finish((sx, sw, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
        };
        whole(y)
    }
}

/// For one row of `silu(a) * b` and its upstream gradient `g`: the gradients of the
/// gate `a` and of `b`.
fn swiglu_grads(g: &[f32], a: &[f32], b: &[f32], da: &mut [f32], db: &mut [f32]) {
    let mut s = [0f32; 64];
    for (i, a) in a.chunks(64).enumerate() {
        sigmoids(a, &mut s);
        for (j, (&x, &s)) in a.iter().zip(s.iter()).enumerate() {
            let k = i * 64 + j;
            da[k] = g[k] * b[k] * s * (1.0 + x * (1.0 - s));
            db[k] = g[k] * x * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use burn_tensor::activation::{log_softmax, silu, softmax};
    use burn_tensor::Int;

    use super::*;

    type B = Autodiff<Flex>;

    /// Values in [-2, 2) from a fixed linear congruential sequence.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn tracked<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
        let n = shape.iter().product();
        Tensor::<B, D>::from_data(TensorData::new(values(n, seed), shape), &Default::default())
            .require_grad()
    }

    fn close<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>, what: &str) {
        let (a, b) = (
            a.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap(),
        );
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{what}: {worst}");
        assert!(b.iter().any(|v| *v != 0.0), "{what}: all zero");
    }

    /// Gradients of `sum(f(inputs) * r)` for a fixed `r`, by the fused op and by the
    /// formula in burn's differentiable ops: equal.
    #[test]
    fn fused_backward_passes_equal_the_composed_ops() {
        let r = |shape: [usize; 2]| tracked(shape, 99).detach();
        // SwiGLU.
        let (a, b) = (tracked([6, 130], 1), tracked([6, 130], 2));
        let fused = (B::silu_mul(a.clone(), b.clone()) * r([6, 130]))
            .sum()
            .backward();
        let (a2, b2) = (tracked([6, 130], 1), tracked([6, 130], 2));
        let composed = (silu(a2.clone()) * b2.clone() * r([6, 130]))
            .sum()
            .backward();
        close(
            a.grad(&fused).unwrap(),
            a2.grad(&composed).unwrap(),
            "silu_mul da",
        );
        close(
            b.grad(&fused).unwrap(),
            b2.grad(&composed).unwrap(),
            "silu_mul db",
        );
        // RMSNorm.
        let (x, w) = (tracked([5, 48], 3), tracked([1, 48], 4));
        let fused = (B::rms_norm(x.clone(), w.clone(), 1e-5) * r([5, 48]))
            .sum()
            .backward();
        let (x2, w2) = (tracked([5, 48], 3), tracked([1, 48], 4));
        let inv = x2
            .clone()
            .square()
            .mean_dim(1)
            .add_scalar(1e-5)
            .sqrt()
            .recip();
        let composed = (x2.clone() * inv * w2.clone() * r([5, 48]))
            .sum()
            .backward();
        close(
            x.grad(&fused).unwrap(),
            x2.grad(&composed).unwrap(),
            "rms_norm dx",
        );
        close(
            w.grad(&fused).unwrap(),
            w2.grad(&composed).unwrap(),
            "rms_norm dw",
        );
        // Masked softmax: causal, with a fully masked row as padding gives.
        let (rows, keys) = (4, 4);
        let mut mask = Vec::new();
        for q in 0..rows {
            for k in 0..keys {
                mask.push(if k <= q && q < 3 { 0.0 } else { f32::MIN });
            }
        }
        let mask = Tensor::<B, 4>::from_data(
            TensorData::new(mask, [1, 1, rows, keys]),
            &Default::default(),
        );
        let s = tracked([1, 1, rows, keys], 5);
        let rr = tracked([1, 1, rows, keys], 98).detach();
        let fused = (B::masked_softmax(s.clone(), Some(mask.clone())) * rr.clone())
            .sum()
            .backward();
        let s2 = tracked([1, 1, rows, keys], 5);
        let composed = (softmax(s2.clone() + mask, 3) * rr).sum().backward();
        close(
            s.grad(&fused).unwrap(),
            s2.grad(&composed).unwrap(),
            "masked_softmax",
        );
        // Rotary embedding, against the default (a product by the rotate-half matrix).
        let (rows, heads, d) = (3, 2, 8);
        let (cos, sin) = (
            tracked([rows, heads, d], 7).detach(),
            tracked([rows, heads, d], 8).detach(),
        );
        let mut rot = vec![0f32; d * d];
        for j in 0..d / 2 {
            rot[(j + d / 2) * d + j] = -1.0;
            rot[j * d + j + d / 2] = 1.0;
        }
        let rot = Tensor::<B, 2>::from_data(TensorData::new(rot, [d, d]), &Default::default());
        let rr = tracked([rows, heads, d], 97).detach();
        let x = tracked([rows, heads, d], 9);
        let fused = (B::rope(x.clone(), cos.clone(), sin.clone(), rot.clone()) * rr.clone())
            .sum()
            .backward();
        let x2 = tracked([rows, heads, d], 9);
        let rotated = x2
            .clone()
            .reshape([rows * heads, d])
            .matmul(rot)
            .reshape([rows, heads, d]);
        let composed = ((x2.clone() * cos + rotated * sin) * rr).sum().backward();
        close(x.grad(&fused).unwrap(), x2.grad(&composed).unwrap(), "rope");
        // Weighted next-token loss.
        let (targets, weights) = ([3u32, 0, 7, 7], [1.0f32, 0.5, 0.0, 2.0]);
        let x = tracked([4, 9], 6);
        let fused = B::weighted_nll(x.clone(), &targets, &weights).backward();
        let x2 = tracked([4, 9], 6);
        let t: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(t, [4, 1]), &Default::default());
        let w = Tensor::<B, 2>::from_data(
            TensorData::new(weights.to_vec(), [4, 1]),
            &Default::default(),
        );
        let composed = (log_softmax(x2.clone(), 1).gather(1, t) * w)
            .sum()
            .neg()
            .backward();
        close(
            x.grad(&fused).unwrap(),
            x2.grad(&composed).unwrap(),
            "weighted_nll",
        );
    }
}
