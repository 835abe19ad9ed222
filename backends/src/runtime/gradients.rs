//! Gradients of a training loss with respect to a graph's weights, by burn's autodiff
//! (`Autodiff<B>` over any backend): what training builds on.
//!
//! The loss is the mean next-token cross-entropy, plus for mixtures of experts the load
//! balancing and z-loss terms on every router's logits ([`RouterLosses`] defines them).
//!
//! The forward pass is the runtime's own, generic over the backend. On `Autodiff<B>`
//! every weight's device tensor is tracked, the loss is built with burn ops, and
//! `backward` gives the gradient of each tracked tensor, which is put back into the
//! weight table's layout (the transposed projection layout undone) and summed over the
//! layouts one weight is used in.

use std::collections::BTreeMap;

use burn_tensor::activation::softmax;
use burn_tensor::backend::AutodiffBackend;
use burn_tensor::{Tensor, TensorData};
use upmix_ir::{HostTensor, LossGradients, RouterLosses, RuntimeError, TrainingRuntime, WeightId};

use super::params::{Form, RouterRecord};
use super::{backend_error, BurnRuntime, Kernels};

impl<B: Kernels + AutodiffBackend> TrainingRuntime for BurnRuntime<B> {
    fn loss_gradients(
        &mut self,
        sequences: &[&[u32]],
        routers: RouterLosses,
    ) -> Result<LossGradients, RuntimeError> {
        self.check_tokens(sequences)?;
        if sequences.iter().any(|s| s.len() < 2) {
            return Err(RuntimeError::Backend(
                "a training sequence needs at least 2 tokens".into(),
            ));
        }
        let trainable = &self.trainable;
        for (id, _, t) in self.plan.params.iter_mut() {
            *t = match trainable {
                Some(ids) if !ids.contains(&id) => t.clone().detach(),
                _ => t.clone().require_grad(),
            };
        }
        // Autodiff holds a process-wide lock through `backward`, and the fused backward
        // passes run parallel loops inside it. On a shared pool, a thread waiting for its
        // loop could pick up another training's call and wait for that lock forever; on
        // threads of its own, a call only ever waits for its own work.
        let threads = rayon::current_num_threads();
        let pool = match self.training_pool.take() {
            Some(pool) => pool,
            None => rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(backend_error)?,
        };
        let this = &mut *self;
        let result = pool.install(move || {
            this.plan.params.start_router_records();
            let forward = this.forward_logits(sequences);
            let records = this.plan.params.take_router_records();
            let (logits, columns) = forward?;
            let device = &this.device;
            let ce = cross_entropy(logits, sequences, columns.prompt);
            let mut loss = ce.clone();
            let (mut lb, mut z) = (None, None);
            if !records.is_empty() {
                let (balance, z_loss) = router_terms(records, sequences, columns.prompt, device)?;
                loss = loss
                    + balance.clone().mul_scalar(routers.load_balance)
                    + z_loss.clone().mul_scalar(routers.z_loss);
                (lb, z) = (Some(scalar(balance)?), Some(scalar(z_loss)?));
            }
            let (value, cross_entropy) = (scalar(loss.clone())?, scalar(ce)?);
            let grads = loss.backward();
            Ok(LossGradients {
                loss: value,
                cross_entropy,
                load_balance: lb,
                z_loss: z,
                gradients: gradients(this, &grads)?,
            })
        });
        self.training_pool = Some(pool);
        result
    }

    fn set_weights(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError> {
        self.plan.params.set(weights)
    }

    fn set_trainable(&mut self, weights: &[WeightId]) {
        self.trainable = Some(weights.iter().copied().collect());
    }
}

/// Mean next-token cross-entropy over the valid positions of the padded batch (`logits`:
/// `[batch * width, vocab]`).
fn cross_entropy<B: Kernels + AutodiffBackend>(
    logits: Tensor<B, 2>,
    sequences: &[&[u32]],
    width: usize,
) -> Tensor<B, 1> {
    let [rows, _] = logits.dims();
    let (mut targets, mut counted) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for seq in sequences {
        for p in 0..width {
            let next = seq.get(p + 1).copied();
            targets.push(next.unwrap_or(0));
            counted.push(if next.is_some() { 1f32 } else { 0.0 });
        }
    }
    let n: f32 = counted.iter().sum();
    B::weighted_nll(logits, &targets, &counted).div_scalar(n)
}

/// The load-balancing loss and the z-loss of the recorded routers, averaged over them;
/// only rows of real tokens count (`[batch * width, experts]` logits each).
fn router_terms<B: Kernels + AutodiffBackend>(
    records: Vec<RouterRecord<B>>,
    sequences: &[&[u32]],
    width: usize,
    device: &B::Device,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RuntimeError> {
    let valid: Vec<bool> = sequences
        .iter()
        .flat_map(|s| (0..width).map(move |p| p < s.len()))
        .collect();
    let tokens = valid.iter().filter(|&&v| v).count() as f32;
    let mask: Vec<f32> = valid.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [valid.len(), 1]), device);
    let layers = records.len() as f32;
    let (mut balance, mut z_loss) = (Vec::new(), Vec::new());
    for (z, k) in records {
        let [_, experts] = z.dims();
        // f_i from the top-k choices, a constant.
        let values = z
            .clone()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(backend_error)?;
        let mut chosen = vec![0f32; experts];
        for (row, _) in values.chunks_exact(experts).zip(&valid).filter(|(_, &v)| v) {
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            order[..k].iter().for_each(|&e| chosen[e] += 1.0);
        }
        let f: Vec<f32> = chosen.iter().map(|c| c / (tokens * k as f32)).collect();
        let f = Tensor::<B, 2>::from_data(TensorData::new(f, [1, experts]), device);
        let p = (softmax(z.clone(), 1) * mask.clone())
            .sum_dim(0)
            .div_scalar(tokens);
        balance.push((p * f).sum().mul_scalar(experts as f32));
        // logsumexp with the row maximum held constant: the same value and gradient.
        let top = z.clone().detach().max_dim(1);
        let lse = (z - top.clone()).exp().sum_dim(1).log() + top;
        z_loss.push((lse.powi_scalar(2) * mask.clone()).sum().div_scalar(tokens));
    }
    let mean = |terms: Vec<Tensor<B, 1>>| Tensor::cat(terms, 0).sum().div_scalar(layers);
    Ok((mean(balance), mean(z_loss)))
}

/// A one-element tensor's value.
fn scalar<B: Kernels>(t: Tensor<B, 1>) -> Result<f32, RuntimeError> {
    let values = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(backend_error)?;
    Ok(values[0])
}

/// Every tracked weight's gradient in the weight table's layout, summed over its layouts.
fn gradients<B: Kernels + AutodiffBackend>(
    rt: &BurnRuntime<B>,
    grads: &B::Gradients,
) -> Result<Vec<(WeightId, HostTensor)>, RuntimeError> {
    let mut sums: BTreeMap<WeightId, HostTensor> = BTreeMap::new();
    for (id, form, shape, t) in rt.plan.params.iter_shaped() {
        let Some(g) = t.grad(grads) else { continue };
        let [r, c] = g.dims();
        let data = g
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(backend_error)?;
        let data = match form {
            Form::Transposed => super::params::transpose(&data, r, c),
            Form::Plain | Form::Flat => data,
        };
        match sums.get_mut(&id) {
            Some(sum) => sum.data.iter_mut().zip(&data).for_each(|(s, v)| *s += v),
            None => {
                sums.insert(id, HostTensor::new(shape.to_vec(), data));
            }
        }
    }
    Ok(sums.into_iter().collect())
}
