//! The `Runtime` trait: how passes and the pipeline run a model without knowing the backend.
//!
//! Passes that need activations (hidden-state router initialisation, calibration) receive
//! a `&mut dyn Runtime`; the backends crate implements it.

use thiserror::Error;

use crate::{HostTensor, WeightId};

/// Errors from running a model.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("no tokens given")]
    EmptyInput,
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("no node named `{0}` in the graph")]
    UnknownNode(String),
    #[error("weight `{name}` cannot be replaced: {reason}")]
    Replace { name: String, reason: String },
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

/// What teacher forcing a sequence `t_0 .. t_{n-1}` tells about each position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenScores {
    /// `argmax[i]`: the token the model predicts after `t_0 ..= t_i` (n entries).
    pub argmax: Vec<u32>,
    /// `log_probs[i] = log p(t_{i+1} | t_0 ..= t_i)` (n - 1 entries, natural log).
    pub log_probs: Vec<f32>,
}

impl TokenScores {
    /// The negative log-likelihood of the sequence.
    pub fn log_likelihood(&self) -> LogLikelihood {
        LogLikelihood {
            nll: -self.log_probs.iter().map(|&v| v as f64).sum::<f64>(),
            count: self.log_probs.len(),
        }
    }
}

/// Executes one graph.
///
/// The batched calls take several sequences of any lengths at once; the single-sequence
/// calls are thin wrappers over them.
pub trait Runtime {
    /// Logits for every position of each sequence: `[len, vocab]` per sequence.
    fn logits_batch(&mut self, sequences: &[&[u32]]) -> Result<Vec<HostTensor>, RuntimeError>;

    /// Greedy continuations of several prompts, decoded together: each stops on its own
    /// after emitting `stop` (if given) or `max_new` tokens. Returns only the new tokens.
    fn generate_batch(
        &mut self,
        prompts: &[&[u32]],
        max_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<Vec<u32>>, RuntimeError>;

    /// Teacher-forced scores of each sequence, computed on the device: per-position argmax
    /// ids and the log-probabilities of the sequence's own next tokens.
    fn score(&mut self, sequences: &[&[u32]]) -> Result<Vec<TokenScores>, RuntimeError>;

    /// Replaces the values of the given weights (same shapes) in the built runtime,
    /// uploading only those; the graph is unchanged. The first replacement of a weight
    /// keeps its original for [`restore_weights`](Self::restore_weights).
    fn replace_weights(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError>;

    /// Puts back the original value of every replaced weight.
    fn restore_weights(&mut self);

    /// Runs `sequences` once and keeps, for each of `nodes`, the activations the graph
    /// holds just before that node runs, so that [`score_saved`](Self::score_saved) can
    /// resume there. Replaces states saved before.
    fn save_states(&mut self, sequences: &[&[u32]], nodes: &[&str]) -> Result<(), RuntimeError>;

    /// [`score`](Self::score) of the sequences given to
    /// [`save_states`](Self::save_states), resuming at `node`: the nodes before it are not
    /// run again. Exact as long as the weights replaced since are used only from `node` on.
    fn score_saved(&mut self, node: &str) -> Result<Vec<TokenScores>, RuntimeError>;

    /// For every linear weight `W` (`[out, in]`) the model multiplies by, `||X_j||_2` for
    /// each input feature `j`: the norm of column `j` of its inputs over every position of
    /// every sequence (Wanda's activation norms). A weight used twice sums both uses.
    fn linear_input_norms(
        &mut self,
        sequences: &[&[u32]],
    ) -> Result<Vec<(WeightId, Vec<f32>)>, RuntimeError>;

    /// Logits for every position of `tokens`: `[tokens.len(), vocab]`.
    fn logits(&mut self, tokens: &[u32]) -> Result<HostTensor, RuntimeError> {
        Ok(self.logits_batch(&[tokens])?.remove(0))
    }

    /// Greedy continuation of `prompt` by up to `max_new` tokens (KV-cached); stops early
    /// after emitting `stop`, if given. Returns only the new tokens.
    fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        stop: Option<u32>,
    ) -> Result<Vec<u32>, RuntimeError> {
        Ok(self.generate_batch(&[prompt], max_new, stop)?.remove(0))
    }

    /// Negative log-likelihood of `tokens` under the model (teacher forced).
    fn log_likelihood(&mut self, tokens: &[u32]) -> Result<LogLikelihood, RuntimeError> {
        Ok(self.log_likelihood_batch(&[tokens])?.remove(0))
    }

    /// Negative log-likelihood of each sequence.
    fn log_likelihood_batch(
        &mut self,
        sequences: &[&[u32]],
    ) -> Result<Vec<LogLikelihood>, RuntimeError> {
        Ok(self
            .score(sequences)?
            .iter()
            .map(TokenScores::log_likelihood)
            .collect())
    }

    /// The output of the node called `node` for every position: `[tokens.len(), width]`.
    fn hidden_states(&mut self, tokens: &[u32], node: &str) -> Result<HostTensor, RuntimeError> {
        Ok(self.hidden_states_at(tokens, &[node])?.remove(0))
    }

    /// The outputs of several nodes, in the order asked, from one forward pass.
    fn hidden_states_at(
        &mut self,
        tokens: &[u32],
        nodes: &[&str],
    ) -> Result<Vec<HostTensor>, RuntimeError>;
}

/// Weights of the router terms a training loss adds to the cross-entropy (0: left out).
/// Both are averaged over the model's routers, each router's logits `z` being `[T, E]`
/// over the batch's `T` tokens with top-k routing:
/// - `load_balance` (Switch Transformer, Fedus et al. 2021): `E * sum_i f_i P_i`, `f_i`
///   the share of the `T * k` (token, choice) pairs that go to expert `i` (a constant),
///   `P_i` the mean router probability of expert `i`; 1 when balanced;
/// - `z_loss` (ST-MoE, Zoph et al. 2022): the mean of `logsumexp(z_t)^2`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RouterLosses {
    pub load_balance: f32,
    pub z_loss: f32,
}

/// A training loss and its gradient with respect to every weight a graph uses.
#[derive(Clone, Debug)]
pub struct LossGradients {
    /// `cross_entropy + load_balance * weight + z_loss * weight`.
    pub loss: f32,
    /// The mean next-token cross-entropy.
    pub cross_entropy: f32,
    /// The router terms, averaged over routers (none without routers).
    pub load_balance: Option<f32>,
    pub z_loss: Option<f32>,
    /// In the weight table's layout, by weight, in weight order.
    pub gradients: Vec<(WeightId, HostTensor)>,
}

/// A runtime that also computes gradients, for training.
pub trait TrainingRuntime: Runtime {
    /// The loss of `sequences` (position `p` of each predicts token `p + 1`; every
    /// sequence at least 2 tokens): the mean next-token cross-entropy plus the router
    /// terms weighted by `routers`, and its gradient with respect to every weight.
    fn loss_gradients(
        &mut self,
        sequences: &[&[u32]],
        routers: RouterLosses,
    ) -> Result<LossGradients, RuntimeError>;

    /// Gives `weights` new values for good (an optimizer step), unlike
    /// [`Runtime::replace_weights`], which [`Runtime::restore_weights`] undoes.
    fn set_weights(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError>;

    /// Limits [`loss_gradients`](Self::loss_gradients) to the gradients of `weights`
    /// (at first: every weight); the rest are held constant, which spares the backward
    /// pass their weight gradients.
    fn set_trainable(&mut self, weights: &[WeightId]);
}
