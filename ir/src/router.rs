//! What a mixture of experts' router is made of.
//!
//! A router turns a token's hidden state `x` into one logit per expert, `x . r_e`, from a
//! router row `r_e` per expert. The rows are either weights of their own
//! ([`Router::Rows`], Mixtral's `gate`) or computed (Nexus, Gritsch et al. 2024:
//! [`Router::Projected`]): each expert has a fixed embedding `d_e` of its domain, and a
//! small SwiGLU network shared by the layer's experts projects it into the hidden space,
//! `r_e = down(silu(gate d_e) * up d_e)`. An expert added later needs only its domain's
//! embedding to get a row ([`ProjectedRouter::rows`]).

use crate::{FeedForward, HostTensor, WeightError, WeightId, WeightTable};

/// A mixture of experts' router.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// `[n_experts, hidden]`: one row per expert.
    Rows(WeightId),
    /// Rows projected from domain embeddings (Nexus).
    Projected(ProjectedRouter),
}

/// Nexus router rows: `r_e = projection(domains[e])`, where `projection` is a SwiGLU
/// block from the embedding width to the hidden width (no biases).
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectedRouter {
    /// `[n_experts, embed]`: the embedding of each expert's domain.
    pub domains: WeightId,
    /// `gate`, `up`: `[width, embed]`; `down`: `[hidden, width]`.
    pub projection: FeedForward,
}

impl Router {
    /// Every weight of the router with its field label (`router`, or `router.domains`,
    /// `router.projection.gate`, `.up`, `.down`).
    pub fn weights(&self) -> Vec<(String, WeightId)> {
        match self {
            Router::Rows(id) => vec![("router".into(), *id)],
            Router::Projected(p) => {
                let f = &p.projection;
                vec![
                    ("router.domains".into(), p.domains),
                    ("router.projection.gate".into(), f.gate),
                    ("router.projection.up".into(), f.up),
                    ("router.projection.down".into(), f.down),
                ]
            }
        }
    }

    /// Rewrites every weight id (same order as [`Router::weights`]).
    pub fn map_weights(&mut self, f: &mut impl FnMut(WeightId) -> WeightId) {
        match self {
            Router::Rows(id) => *id = f(*id),
            Router::Projected(p) => {
                p.domains = f(p.domains);
                p.projection.gate = f(p.projection.gate);
                p.projection.up = f(p.projection.up);
                p.projection.down = f(p.projection.down);
            }
        }
    }

    /// The router rows, `[n_experts, hidden]`, computed for a projected router.
    pub fn rows(&self, weights: &WeightTable) -> Result<HostTensor, WeightError> {
        match self {
            Router::Rows(id) => weights.materialize(*id),
            Router::Projected(p) => p.rows(weights),
        }
    }
}

impl ProjectedRouter {
    /// `projection(domains)`: one router row per domain embedding, `[n, hidden]`, in f64
    /// sums.
    pub fn rows(&self, weights: &WeightTable) -> Result<HostTensor, WeightError> {
        let f = &self.projection;
        let [domains, gate, up, down] =
            [self.domains, f.gate, f.up, f.down].map(|id| weights.materialize(id));
        let (domains, gate, up, down) = (domains?, gate?, up?, down?);
        let n = domains.shape[0];
        let mut out = Vec::with_capacity(n * down.shape[0]);
        for e in 0..n {
            let hidden = swiglu_features(&gate, &up, domains.row(e));
            out.extend((0..down.shape[0]).map(|i| {
                let r: f64 = down
                    .row(i)
                    .iter()
                    .zip(&hidden)
                    .map(|(w, h)| *w as f64 * h)
                    .sum();
                r as f32
            }));
        }
        Ok(HostTensor::new(vec![n, down.shape[0]], out))
    }
}

/// `silu(gate d) * (up d)` for one input `d`, in f64: the hidden layer of a SwiGLU block
/// whose `gate` and `up` are `[width, input]`.
pub fn swiglu_features(gate: &HostTensor, up: &HostTensor, d: &[f32]) -> Vec<f64> {
    (0..gate.shape[0])
        .map(|j| {
            let g = dot(gate.row(j), d);
            g / (1.0 + (-g).exp()) * dot(up.row(j), d)
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}
