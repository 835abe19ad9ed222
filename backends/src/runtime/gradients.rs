//! Gradients of the next-token cross-entropy with respect to a graph's weights, by burn's
//! autodiff (`Autodiff<B>` over any backend): what training builds on.
//!
//! The forward pass is the runtime's own, generic over the backend. On `Autodiff<B>`
//! every weight's device tensor is tracked, the loss is built from the logits with burn
//! ops, and `backward` gives the gradient of each tracked tensor, which is put back into
//! the weight table's layout (the transposed projection layout undone) and summed over
//! the layouts one weight is used in.

use std::collections::BTreeMap;

use burn_tensor::activation::log_softmax;
use burn_tensor::backend::AutodiffBackend;
use burn_tensor::{Int, Tensor, TensorData};
use upmix_ir::{HostTensor, RuntimeError, WeightId};

use super::params::Form;
use super::{backend_error, in_pool, BurnRuntime, Kernels};

/// A loss and its gradient with respect to every weight the graph uses.
#[derive(Clone, Debug)]
pub struct LossGradients {
    pub loss: f32,
    /// In the weight table's layout, by weight, in weight order.
    pub gradients: Vec<(WeightId, HostTensor)>,
}

impl<B: Kernels + AutodiffBackend> BurnRuntime<B> {
    /// The mean next-token cross-entropy of `sequences` (position `p` of each predicts
    /// token `p + 1`; every sequence at least 2 tokens) and its gradient.
    pub fn cross_entropy_gradients(
        &mut self,
        sequences: &[&[u32]],
    ) -> Result<LossGradients, RuntimeError> {
        self.check_tokens(sequences)?;
        if sequences.iter().any(|s| s.len() < 2) {
            return Err(RuntimeError::Backend(
                "a training sequence needs at least 2 tokens".into(),
            ));
        }
        for (_, _, t) in self.plan.params.iter_mut() {
            *t = t.clone().require_grad();
        }
        let this = &mut *self;
        in_pool(move || {
            let (logits, columns) = this.forward_logits(sequences)?;
            let [rows, _] = logits.dims();
            // Targets and a 0/1 weight per row of the padded batch.
            let (mut targets, mut counted) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            for seq in sequences {
                for p in 0..columns.prompt {
                    let next = seq.get(p + 1).copied();
                    targets.push(next.map_or(0, i64::from));
                    counted.push(if next.is_some() { 1f32 } else { 0.0 });
                }
            }
            let n: f32 = counted.iter().sum();
            let device = &this.device;
            let targets =
                Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
            let counted = Tensor::<B, 2>::from_data(TensorData::new(counted, [rows, 1]), device);
            let picked = log_softmax(logits, 1).gather(1, targets);
            let loss = (picked * counted).sum().neg().div_scalar(n);
            let value = loss
                .clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(backend_error)?[0];
            let grads = loss.backward();
            let mut sums: BTreeMap<WeightId, HostTensor> = BTreeMap::new();
            for (id, form, shape, t) in this.plan.params.iter_shaped() {
                let Some(g) = t.grad(&grads) else { continue };
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
            Ok(LossGradients {
                loss: value,
                gradients: sums.into_iter().collect(),
            })
        })
    }
}
