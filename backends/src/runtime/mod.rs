//! [`BurnRuntime`]: one graph of a module, executed with burn on any backend.
//!
//! Building a runtime verifies the graph, materialises and uploads every weight it uses
//! once, and lowers the graph into a flat plan (module `plan`) whose layers hold the
//! device tensors (module `layers`). The [`Runtime`] methods then run that plan:
//! - `logits`: one full forward pass over the tokens;
//! - `generate`: greedy decoding; the prompt is prefilled once into per-attention-layer KV
//!   caches kept on the device, then each new token is one single-position pass; the
//!   argmax is taken on the device and only the chosen token id is read back;
//! - `log_likelihood`: log-softmax of the logits, picking each next token's log-probability
//!   on the device;
//! - `hidden_states`: the plan run up to the named node.
//!
//! The code is generic over `B: Backend`, so the same plan runs on the CPU backend and
//! on GPU backends.

mod layers;
mod plan;
#[cfg(test)]
mod tests;

use burn_tensor::activation::log_softmax;
use burn_tensor::backend::Backend;
use burn_tensor::{Int, Tensor, TensorData};
use upmix_ir::{HostTensor, LogLikelihood, Module, Runtime, RuntimeError};

use crate::BackendError;
use layers::KvCache;
use plan::{Plan, Value};

/// A graph lowered for execution on burn backend `B`.
pub struct BurnRuntime<B: Backend> {
    graph: String,
    plan: Plan<B>,
    device: B::Device,
    /// One KV cache per attention layer, filled by `generate`.
    caches: Vec<Option<KvCache<B>>>,
    /// Positions held in `caches`.
    cached: usize,
}

impl<B: Backend> BurnRuntime<B> {
    /// Verifies graph `graph` of `module`, uploads its weights to `device` and lowers it.
    pub fn new(module: &Module, graph: &str, device: &B::Device) -> Result<Self, BackendError> {
        let g = module
            .graph(graph)
            .ok_or_else(|| BackendError::UnknownGraph(graph.to_string()))?;
        upmix_ir::verify(g, &module.weights)?;
        let plan = Plan::lower(g, &module.weights, device)?;
        Ok(BurnRuntime {
            graph: graph.to_string(),
            caches: vec![None; plan.attention_layers],
            cached: 0,
            plan,
            device: device.clone(),
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

    /// Rejects empty input and ids outside the embedding table.
    fn check_tokens(&self, tokens: &[u32]) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        match tokens.iter().find(|&&t| t as usize >= self.plan.vocab) {
            Some(&token) => Err(RuntimeError::TokenOutOfRange {
                token,
                vocab: self.plan.vocab,
            }),
            None => Ok(()),
        }
    }

    fn upload_tokens(&self, tokens: &[u32]) -> Tensor<B, 1, Int> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        Tensor::from_data(TensorData::new(ids, [tokens.len()]), &self.device)
    }

    /// Logits `[tokens, vocab]` of one uncached forward pass.
    fn forward(&self, tokens: &[u32]) -> Tensor<B, 2> {
        let out = self
            .plan
            .run(self.upload_tokens(tokens), 0, None, self.plan.output);
        hidden(out)
    }

    fn clear_cache(&mut self) {
        self.caches.iter_mut().for_each(|c| *c = None);
        self.cached = 0;
    }

    /// Clears the KV caches and runs `tokens` from position 0, filling them.
    pub(crate) fn prefill(&mut self, tokens: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        self.clear_cache();
        self.extend(tokens)
    }

    /// Runs `tokens` at the positions after the cached ones, extending the caches.
    pub(crate) fn extend(&mut self, tokens: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let count = tokens.dims()[0];
        let out = self.plan.run(
            tokens,
            self.cached,
            Some(self.caches.as_mut_slice()),
            self.plan.output,
        );
        self.cached += count;
        hidden(out)
    }

    /// Greedy decoding of up to `max_new` tokens after `prompt` into `out` (non-empty
    /// budget); the argmax stays on the device and feeds the next step directly.
    fn greedy(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
        out: &mut Vec<u32>,
    ) -> Result<(), RuntimeError> {
        let mut logits = self.prefill(self.upload_tokens(prompt));
        loop {
            let [rows, _] = logits.dims();
            let next = logits.narrow(0, rows - 1, 1).argmax(1).reshape([1]);
            let token = read_id(next.clone())?;
            out.push(token);
            if out.len() == max_new || stop == Some(token) {
                return Ok(());
            }
            // The lm head may be wider than the embedding table (padded vocabularies).
            self.check_tokens(&[token])?;
            logits = self.extend(next);
        }
    }
}

fn hidden<B: Backend>(value: Value<B>) -> Tensor<B, 2> {
    match value {
        Value::Hidden(t) => t,
        Value::Tokens(_) => unreachable!("the Output node carries hidden states"),
    }
}

fn backend_error(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Backend(e.to_string())
}

/// Copies a device tensor to the host.
fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<HostTensor, RuntimeError> {
    let shape = t.dims().to_vec();
    let data = t.try_into_data().map_err(backend_error)?;
    let values = data
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(backend_error)?;
    Ok(HostTensor::new(shape, values))
}

/// Reads a one-element id tensor.
fn read_id<B: Backend>(t: Tensor<B, 1, Int>) -> Result<u32, RuntimeError> {
    let data = t.try_into_data().map_err(backend_error)?;
    let ids = data
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(backend_error)?;
    Ok(ids[0] as u32)
}

impl<B: Backend> Runtime for BurnRuntime<B> {
    fn logits(&mut self, tokens: &[u32]) -> Result<HostTensor, RuntimeError> {
        self.check_tokens(tokens)?;
        to_host(self.forward(tokens))
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>, RuntimeError> {
        self.check_tokens(prompt)?;
        let mut out = Vec::with_capacity(max_new);
        if max_new == 0 {
            return Ok(out);
        }
        let result = self.greedy(prompt, max_new, stop, &mut out);
        // Release the cache memory between calls.
        self.clear_cache();
        result.map(|()| out)
    }

    fn log_likelihood(&mut self, tokens: &[u32]) -> Result<LogLikelihood, RuntimeError> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        if n < 2 {
            return Ok(LogLikelihood { nll: 0.0, count: 0 });
        }
        let logits = self.forward(tokens);
        let width = logits.dims()[1];
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= width) {
            return Err(RuntimeError::TokenOutOfRange {
                token,
                vocab: width,
            });
        }
        let log_probs = log_softmax(logits.narrow(0, 0, n - 1), 1);
        let targets = self.upload_tokens(&tokens[1..]).reshape([n - 1, 1]);
        let picked = to_host(log_probs.gather(1, targets))?;
        Ok(LogLikelihood {
            nll: -picked.data.iter().map(|&v| v as f64).sum::<f64>(),
            count: n - 1,
        })
    }

    fn hidden_states(&mut self, tokens: &[u32], node: &str) -> Result<HostTensor, RuntimeError> {
        let mut states = self.hidden_states_at(tokens, &[node])?;
        Ok(states.pop().expect("one node asked, one returned"))
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
        self.check_tokens(tokens)?;
        let values = self
            .plan
            .run_keeping(self.upload_tokens(tokens), 0, None, &slots);
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
