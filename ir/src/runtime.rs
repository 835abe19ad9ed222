//! The `Runtime` trait: how passes and the pipeline run a model without knowing the backend.
//!
//! Passes that need activations (hidden-state router initialisation, calibration) receive
//! a `&mut dyn Runtime`; the backends crate implements it.

use thiserror::Error;

use crate::HostTensor;

/// Errors from running a model.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("no tokens given")]
    EmptyInput,
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("no node named `{0}` in the graph")]
    UnknownNode(String),
    #[error("{0}")]
    Backend(String),
}

/// Sum of negative log-likelihoods over the predicted tokens of a sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogLikelihood {
    /// `-sum_i log p(t_i | t_<i)` for i = 1..n (natural log).
    pub nll: f64,
    /// Number of predicted tokens (n - 1).
    pub count: usize,
}

impl LogLikelihood {
    /// `exp(nll / count)`.
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.count.max(1) as f64).exp()
    }
}

/// Executes one graph.
pub trait Runtime {
    /// Logits for every position of `tokens`: `[tokens.len(), vocab]`.
    fn logits(&mut self, tokens: &[u32]) -> Result<HostTensor, RuntimeError>;

    /// Greedy continuation of `prompt` by up to `max_new` tokens (KV-cached); stops early
    /// after emitting `stop`, if given. Returns only the new tokens.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>, RuntimeError>;

    /// Negative log-likelihood of `tokens` under the model (teacher forced).
    fn log_likelihood(&mut self, tokens: &[u32]) -> Result<LogLikelihood, RuntimeError>;

    /// The output of the node called `node` for every position: `[tokens.len(), width]`.
    fn hidden_states(&mut self, tokens: &[u32], node: &str) -> Result<HostTensor, RuntimeError>;

    /// The outputs of several nodes, in the order asked; a runtime that can should compute
    /// them in one forward pass (this default runs one pass per node).
    fn hidden_states_at(
        &mut self,
        tokens: &[u32],
        nodes: &[&str],
    ) -> Result<Vec<HostTensor>, RuntimeError> {
        nodes
            .iter()
            .map(|node| self.hidden_states(tokens, node))
            .collect()
    }
}
