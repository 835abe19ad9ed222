//! AdamW (Loshchilov & Hutter 2019) on host tensors, with PyTorch's update
//! (`torch.optim.AdamW`, its single-tensor path) so that a step here is a step there:
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)
//! m <- m + (1 - beta1) * (g - m)
//! v <- v * beta2 + (1 - beta2) * g * g
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Scalars are computed in f64 and used as f32, element arithmetic in f32, as torch does
//! for f32 parameters. The defaults are PyTorch's: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
//! weight decay 0.01.

use std::collections::HashMap;

use rayon::prelude::*;
use upmix_ir::{HostTensor, WeightId};

/// Hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer and its state: the moment estimates of every weight it has stepped.
#[derive(Clone, Debug, Default)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// Per weight: the first and second moment estimates, `m` and `v`.
    pub moments: HashMap<WeightId, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            ..AdamW::default()
        }
    }

    /// One step with learning rate `lr` (a schedule's value; `config.lr` for a constant
    /// one): each `(weight, value)` of `params` is updated in place by its gradient in
    /// `grads`. A weight without a gradient is left as it is, as torch leaves a parameter
    /// whose `grad` is `None`.
    ///
    /// # Panics
    /// When a gradient's length differs from its weight's.
    pub fn step(
        &mut self,
        lr: f64,
        params: &mut [(WeightId, HostTensor)],
        grads: &[(WeightId, HostTensor)],
    ) {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let beta2 = c.betas.1 as f32;
        let (one_b1, one_b2) = ((1.0 - c.betas.0) as f32, (1.0 - c.betas.1) as f32);
        let step_size = (lr / (1.0 - c.betas.0.powi(t))) as f32;
        let correction2 = (1.0 - c.betas.1.powi(t)).sqrt() as f32;
        let eps = c.eps as f32;
        let grads: HashMap<WeightId, &[f32]> = grads
            .iter()
            .map(|(id, g)| (*id, g.data.as_slice()))
            .collect();
        for (id, p) in params.iter_mut() {
            let Some(g) = grads.get(id) else { continue };
            assert_eq!(g.len(), p.data.len(), "gradient of weight #{}", id.0);
            let (m, v) = self
                .moments
                .entry(*id)
                .or_insert_with(|| (vec![0.0; g.len()], vec![0.0; g.len()]));
            // Element-wise, so any split gives the same bits: chunks on rayon's threads.
            const CHUNK: usize = 1 << 14;
            p.data
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| {
                    for i in 0..g.len() {
                        p[i] *= decay;
                        m[i] += one_b1 * (g[i] - m[i]);
                        v[i] = v[i] * beta2 + one_b2 * g[i] * g[i];
                        let denom = v[i].sqrt() / correction2 + eps;
                        p[i] += -step_size * m[i] / denom;
                    }
                });
        }
    }
}
