//! [`BurnRuntime`]: one graph of a module, executed with burn on any backend.
//!
//! Building a runtime verifies the graph, materialises and uploads every weight it uses
//! once into a parameter store (module `params`), and lowers the graph into a flat plan
//! (module `plan`) of layers (modules `layers`, `attention`, `moe`). Every call runs a
//! batch: sequences of any lengths, right-padded into `[batch * tokens, width]`
//! activations with a per-sequence causal, padding and sliding-window mask (module
//! `frame`). The [`Runtime`] methods:
//! - `logits_batch`: one forward pass, logits of every real position to the host;
//! - `generate_batch`: greedy decoding of several prompts at once (module `generate`):
//!   one prefill into preallocated KV caches, then one single-column pass per step; the lm
//!   head runs on each sequence's last position only and the argmax is taken on the
//!   device, so only the chosen ids are read back;
//! - `score`: teacher-forced argmax ids and next-token log-probabilities, computed on the
//!   device, `[batch, tokens]` back to the host;
//! - `replace_weights` / `restore_weights`: re-upload a few weights in place;
//! - `hidden_states_at`: the plan run up to the named nodes.
//!
//! The code is generic over `B: Kernels` (a burn `Backend` with the element-wise hot spots
//! of module `kernels`, fused on the CPU), so the same plan runs on the CPU backend, on GPU
//! backends and, given a `Kernels` impl, on `Autodiff<B>`, whose parameters live in the
//! one store.

mod attention;
mod frame;
mod generate;
mod gradients;
mod kernels;
mod layers;
mod mixture_attention;
mod moe;
mod params;
mod plan;
mod quantized;
mod resume;
mod routing;
#[cfg(test)]
mod tests;

use burn_tensor::activation::log_softmax;
use burn_tensor::{Int, Tensor, TensorData};
use upmix_ir::{HostTensor, Module, Runtime, RuntimeError, TokenScores, WeightId};

use crate::BackendError;
use frame::{upload_batch, Columns, Frame};
pub use kernels::Kernels;
pub use moe::MoeDispatch;
use plan::{Plan, RunArgs, Value};
pub use quantized::{Activations, QuantMatrix};
use resume::SavedStates;

/// A graph lowered for execution on burn backend `B`.
pub struct BurnRuntime<B: Kernels> {
    graph: String,
    plan: Plan<B>,
    device: B::Device,
    dispatch: MoeDispatch,
    /// Activations kept by `save_states`.
    saved: Option<SavedStates<B>>,
    /// The weights training computes gradients of (`None`: all).
    trainable: Option<std::collections::HashSet<WeightId>>,
    /// Training's own threads (made by the first backward), see `gradients.rs`.
    training_pool: Option<rayon::ThreadPool>,
}

impl<B: Kernels> BurnRuntime<B> {
    /// Verifies graph `graph` of `module`, uploads its weights to `device` and lowers it.
    pub fn new(module: &Module, graph: &str, device: &B::Device) -> Result<Self, BackendError> {
        let g = module
            .graph(graph)
            .ok_or_else(|| BackendError::UnknownGraph(graph.to_string()))?;
        upmix_ir::verify(g, &module.weights)?;
        let plan = Plan::lower(g, &module.weights, device)?;
        Ok(BurnRuntime {
            graph: graph.to_string(),
            plan,
            device: device.clone(),
            dispatch: MoeDispatch::default(),
            saved: None,
            trainable: None,
            training_pool: None,
        })
    }

    /// The name of the graph this runtime executes.
    pub fn graph_name(&self) -> &str {
        &self.graph
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Number of token ids the embedding table accepts.
    pub fn vocab_size(&self) -> usize {
        self.plan.vocab
    }

    /// How mixture-of-experts layers dispatch rows to experts (sparse by default; dense is
    /// the reference formulation, for tests).
    pub fn set_moe_dispatch(&mut self, dispatch: MoeDispatch) {
        self.dispatch = dispatch;
    }

    /// How activations meet weights kept quantized (see [`Activations`]).
    pub fn set_activations(&mut self, activations: Activations) {
        self.plan.params.activations = activations;
    }

    /// Rejects empty sequences and ids outside the embedding table.
    fn check_tokens(&self, sequences: &[&[u32]]) -> Result<(), RuntimeError> {
        for tokens in sequences {
            if tokens.is_empty() {
                return Err(RuntimeError::EmptyInput);
            }
            if let Some(&token) = tokens.iter().find(|&&t| t as usize >= self.plan.vocab) {
                return Err(RuntimeError::TokenOutOfRange {
                    token,
                    vocab: self.plan.vocab,
                });
            }
        }
        Ok(())
    }

    /// One uncached pass over `sequences` (checked), returning the values of `keep`
    /// (`[batch * width, ...]`, `width` the longest sequence) and the batch's columns.
    fn forward(
        &self,
        sequences: &[&[u32]],
        keep: &[usize],
    ) -> Result<(Vec<Value<B>>, Columns), RuntimeError> {
        let columns = Columns::new(sequences.iter().map(|s| s.len()).collect());
        let tokens = upload_batch::<B>(sequences, columns.prompt, &self.device);
        let mut frame = Frame::new(columns.clone(), 0, columns.prompt, &self.device);
        let values = self.plan.run(
            Some(tokens),
            RunArgs {
                frame: &mut frame,
                cache: None,
                keep,
                rows: None,
                dispatch: self.dispatch,
                resume: None,
                save: None,
            },
        )?;
        Ok((values, columns))
    }

    /// Per-position argmax ids and next-token log-probabilities of `sequences` from their
    /// logits (`[batch * width, vocab]` in the layout of `columns`), computed on the device.
    fn token_scores(
        device: &B::Device,
        logits: Tensor<B, 2>,
        columns: &Columns,
        sequences: &[&[u32]],
    ) -> Result<Vec<TokenScores>, RuntimeError> {
        let [rows, width] = logits.dims();
        // The lm head may be narrower than the embedding table.
        if let Some(&token) = sequences
            .iter()
            .flat_map(|s| &s[1..])
            .find(|&&t| t as usize >= width)
        {
            return Err(RuntimeError::TokenOutOfRange {
                token,
                vocab: width,
            });
        }
        let mut targets = Vec::with_capacity(rows);
        for seq in sequences {
            targets.extend(seq[1..].iter().map(|&t| t as i64));
            targets.extend(std::iter::repeat_n(0, columns.prompt + 1 - seq.len()));
        }
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
        let argmax = ids_to_host(logits.clone().argmax(1))?;
        let picked = to_host(log_softmax(logits, 1).gather(1, targets))?;
        Ok(columns
            .lengths
            .iter()
            .enumerate()
            .map(|(s, &len)| {
                let row = s * columns.prompt;
                TokenScores {
                    argmax: argmax[row..row + len].to_vec(),
                    log_probs: picked.data[row..row + len - 1].to_vec(),
                }
            })
            .collect())
    }

    /// The logits of one uncached pass, `[batch * width, vocab]`.
    fn forward_logits(
        &self,
        sequences: &[&[u32]],
    ) -> Result<(Tensor<B, 2>, Columns), RuntimeError> {
        let (mut values, columns) = self.forward(sequences, &[self.plan.output])?;
        Ok((hidden(values.remove(0)), columns))
    }
}

/// Runs `f` on a thread of rayon's pool. A parallel loop started from outside the pool
/// hands its work to the pool and puts the caller to sleep until it is done (a context
/// switch each way); started from inside, the calling thread takes part. A decode step
/// runs a few hundred such loops, so a whole call runs inside.
fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_num_threads() == 1 || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

fn hidden<B: Kernels>(value: Value<B>) -> Tensor<B, 2> {
    match value {
        Value::Hidden(t) => t,
        Value::Tokens(_) => unreachable!("the Output node carries hidden states"),
    }
}

fn backend_error(e: impl std::fmt::Debug) -> RuntimeError {
    RuntimeError::Backend(format!("{e:?}"))
}

/// Copies a device tensor to the host.
fn to_host<B: Kernels, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor, RuntimeError> {
    let shape = t.dims().to_vec();
    let data = t.try_into_data().map_err(backend_error)?;
    let values = data
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(backend_error)?;
    Ok(HostTensor::new(shape, values))
}

/// Copies an id tensor to the host.
fn ids_to_host<B: Kernels, const D: usize>(t: Tensor<B, D, Int>) -> Result<Vec<u32>, RuntimeError> {
    let data = t.try_into_data().map_err(backend_error)?;
    let ids = data
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(backend_error)?;
    Ok(ids.into_iter().map(|i| i as u32).collect())
}

/// Rows `s * width .. s * width + len` of a host tensor, for each sequence.
fn split_rows(t: &HostTensor, columns: &Columns) -> Vec<HostTensor> {
    let cols: usize = t.shape[1..].iter().product();
    columns
        .lengths
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            let start = s * columns.prompt * cols;
            let mut shape = t.shape.clone();
            shape[0] = len;
            HostTensor::new(shape, t.data[start..start + len * cols].to_vec())
        })
        .collect()
}

impl<B: Kernels> Runtime for BurnRuntime<B> {
    fn logits_batch(&mut self, sequences: &[&[u32]]) -> Result<Vec<HostTensor>, RuntimeError> {
        self.check_tokens(sequences)?;
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let this = &mut *self; // `&mut` moves to the pool thread; `&` would need `Sync`
        in_pool(move || {
            let (logits, columns) = this.forward_logits(sequences)?;
            if let [_] = sequences {
                return Ok(vec![to_host(logits)?]); // no padding rows to drop
            }
            Ok(split_rows(&to_host(logits)?, &columns))
        })
    }

    fn generate_batch(
        &mut self,
        prompts: &[&[u32]],
        max_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<Vec<u32>>, RuntimeError> {
        self.check_tokens(prompts)?;
        if prompts.is_empty() || max_new == 0 {
            return Ok(vec![Vec::new(); prompts.len()]);
        }
        let this = &mut *self;
        in_pool(move || generate::greedy(this, prompts, max_new, stop))
    }

    fn score(&mut self, sequences: &[&[u32]]) -> Result<Vec<TokenScores>, RuntimeError> {
        self.check_tokens(sequences)?;
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let this = &mut *self;
        in_pool(move || {
            let (logits, columns) = this.forward_logits(sequences)?;
            Self::token_scores(&this.device, logits, &columns, sequences)
        })
    }

    fn replace_weights(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError> {
        self.plan.params.replace(weights)
    }

    fn restore_weights(&mut self) {
        self.plan.params.restore();
    }

    fn save_states(&mut self, sequences: &[&[u32]], nodes: &[&str]) -> Result<(), RuntimeError> {
        let this = &mut *self;
        in_pool(move || this.save_states_of(sequences, nodes))
    }

    fn score_saved(&mut self, node: &str) -> Result<Vec<TokenScores>, RuntimeError> {
        let this = &mut *self;
        in_pool(move || this.score_saved_at(node))
    }

    fn linear_input_norms(
        &mut self,
        sequences: &[&[u32]],
    ) -> Result<Vec<(WeightId, Vec<f32>)>, RuntimeError> {
        self.input_norms(sequences)
    }

    fn hidden_states_at(
        &mut self,
        tokens: &[u32],
        nodes: &[&str],
    ) -> Result<Vec<HostTensor>, RuntimeError> {
        let slots = nodes
            .iter()
            .map(|node| {
                self.plan
                    .slot(node)
                    .ok_or_else(|| RuntimeError::UnknownNode(node.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.check_tokens(&[tokens])?;
        let (values, _) = self.forward(&[tokens], &slots)?;
        values
            .into_iter()
            .zip(nodes)
            .map(|(value, node)| match value {
                Value::Hidden(t) => to_host(t),
                Value::Tokens(_) => Err(RuntimeError::Backend(format!(
                    "node `{node}` carries token ids, not hidden states"
                ))),
            })
            .collect()
    }
}
