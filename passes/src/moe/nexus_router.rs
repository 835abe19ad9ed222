//! Nexus routers (Gritsch, Zhang et al. 2024, "Nexus: Specialization meets Adaptability
//! for Efficiently Training Mixture of Experts"): each expert's router row is projected
//! from an embedding of its domain, `r_i = down(silu(gate d_i) * up d_i)`, by a SwiGLU
//! projection per layer shared by the layer's experts ([`upmix_ir::ProjectedRouter`]).
//! An expert trained later on a new domain gets its row from that domain's embedding
//! through the same projection (`AddExpert`).
//!
//! From the paper: the projection's form, routing by `softmax(x . r_i)` and top-k, domain
//! embeddings as the mean embedding of each domain's data under a fixed embedder, the seed
//! model's FFN as a shared expert, the other parameters averaged.
//!
//! Ours (the paper publishes no code, and its embedder is an external model):
//! - **Domain embeddings.** By default the base model is the embedder: its final hidden
//!   states (the output of its final norm) mean-pooled over the domain's text, read in
//!   windows as `DomainCentroid` reads it, then scaled to unit length. Any model upmix
//!   loads can be named as `embedder`; it reads the text with its own tokenizer.
//! - **The starting projection**, which routes sensibly before any training: `gate` and
//!   `up` are drawn from `N(0, 1)` with a fixed seed, and `down` is fitted in closed form
//!   so that each domain's projection equals that domain's `DomainCentroid` row at the
//!   layer (the base model's normalised mean hidden state at the layer's input on the
//!   text). With features `H = silu(D gate^T) * (D up^T)` (`[experts, width]`) and
//!   centroids `C` (`[experts, hidden]`), `down = C^T (H H^T + lambda I)^-1 H`, the
//!   least-squares solution of least norm (`lambda` a 1e-6 ridge relative to the mean
//!   diagonal, for a well-posed solve). It fits every domain exactly when their features
//!   are independent (at most `width` experts). A new domain's row is then a combination
//!   of the old centroids, weighted by how alike the domains' features are.
//! - **The shared expert** is Qwen2-MoE's, behind a sigmoid gate that starts at zero
//!   (weight 1/2), as `Upcycle`'s `shared_expert` always is, rather than the paper's
//!   unscaled sum, so that the model is written exactly as a Qwen2-MoE checkpoint.
//!
//! Not function-preserving: the experts are different models.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{
    normal_samples, swiglu_features, DType, FeedForward, Graph, HostTensor, Module, Op,
    ProjectedRouter, Weight, WeightExpr, WeightId,
};

use crate::hidden_states::{normalized, pooled, Pool, Windows};
use crate::pass::{graph, weight_err, PassContext, PassError};

/// Projection width when the pipeline gives none.
pub const DEFAULT_WIDTH: usize = 64;

/// Ridge of the closed-form fit, relative to the mean diagonal of `H H^T`.
const RIDGE: f64 = 1e-6;

/// `Upcycle`'s `router: Nexus(...)`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NexusRouter {
    /// One text file per expert model: its domain's data (relative paths are resolved
    /// against the pipeline file).
    pub texts: BTreeMap<String, PathBuf>,
    /// The model whose mean-pooled final hidden states embed the domains (default: the
    /// base model, else the first expert).
    #[serde(default)]
    pub embedder: Option<String>,
    /// Width of the projection's hidden layer (default 64).
    #[serde(default)]
    pub width: Option<usize>,
    /// Seed of the projection's `gate` and `up` (default 0; layer `l` uses `seed + l`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// At most this many tokens of each text (default 8192).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Tokens per window, BOS included (default: the model's max positions, at most 512).
    #[serde(default)]
    pub window: Option<usize>,
}

impl NexusRouter {
    /// How the texts are read.
    pub(crate) fn windows(&self) -> Windows {
        Windows {
            max_tokens: self.max_tokens,
            window: self.window,
        }
    }
}

/// The unit-length domain embedding of each text in `texts`, by `embedder`: its final
/// hidden states mean-pooled over the text. `experts` names the model the embeddings are
/// for (its tokenizer serves an embedder that has none, if their vocabularies agree).
pub(crate) fn domain_embeddings(
    m: &Module,
    cx: &mut PassContext,
    pass: &str,
    (embedder, experts): (&str, &str),
    texts: &[PathBuf],
    windows: Windows,
) -> Result<Vec<Vec<f32>>, PassError> {
    let invalid = |message: String| PassError::Invalid {
        pass: pass.to_string(),
        message,
    };
    let g = graph(m, pass, embedder)?;
    let reader = tokenizer_model(m, pass, embedder, experts)?;
    let node = final_hidden(g).ok_or_else(|| {
        invalid(format!(
            "embedder `{embedder}` has no final norm whose output could embed a text"
        ))
    })?;
    let Some(provider) = cx.runtimes.as_deref_mut() else {
        return Err(invalid(
            "Nexus embeds the domains' texts with a model, but no runtime is available here".into(),
        ));
    };
    let run_err = |e: upmix_ir::RuntimeError| invalid(format!("running `{embedder}`: {e}"));
    let mut rt = provider.runtime(m, embedder).map_err(run_err)?;
    let mut out = Vec::with_capacity(texts.len());
    for path in texts {
        let sequences = windows.read(&mut *provider, m, reader, pass, path)?;
        let mut v = pooled(
            rt.as_mut(),
            std::slice::from_ref(&node),
            &sequences,
            Pool::MeanAfterFirst,
        )
        .map_err(run_err)?;
        out.push(normalized(v.remove(0)));
    }
    Ok(out)
}

/// The model whose tokenizer reads texts for `embedder`: its own; else, when it has the
/// vocabulary of `experts`, theirs. An embedder of another vocabulary without a
/// tokenizer is an error: its token ids would mean nothing.
pub(crate) fn tokenizer_model<'a>(
    m: &'a Module,
    pass: &str,
    embedder: &'a str,
    experts: &'a str,
) -> Result<&'a str, PassError> {
    let e = graph(m, pass, embedder)?;
    if e.meta.tokenizer.is_some() {
        return Ok(embedder);
    }
    let x = graph(m, pass, experts)?;
    let vocab = |g: &Graph| crate::hyperparams::Hyperparams::of(g, &m.weights).vocab;
    if vocab(e) == vocab(x) && x.meta.tokenizer.is_some() {
        return Ok(experts);
    }
    Err(PassError::Invalid {
        pass: pass.to_string(),
        message: format!(
            "embedder `{embedder}` has no tokenizer of its own and a vocabulary of {} tokens \
             where `{experts}` has {}: its texts cannot be tokenized; put the embedder's \
             tokenizer.json beside its checkpoint, or name an embedder that has one",
            vocab(e),
            vocab(x)
        ),
    })
}

/// The node whose output is the final hidden state: the last norm before the lm head.
pub(crate) fn final_hidden(g: &Graph) -> Option<String> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    order
        .into_iter()
        .rev()
        .find(|&n| matches!(g.node(n).op, Op::RmsNorm { .. } | Op::LayerNorm { .. }))
        .map(|n| g.node(n).name.clone())
}

/// A starting projection for one layer: `gate` and `up` (`[width, embed]`) from `N(0, 1)`
/// seeded by `seed`, `down` (`[hidden, width]`) fitted so that each domain embedding's
/// projection is its centroid (see the module doc).
pub(crate) struct Fit {
    pub gate: HostTensor,
    pub up: HostTensor,
    pub down: HostTensor,
}

/// Fits a projection from `domains` (`[experts][embed]`) to `centroids`
/// (`[experts][hidden]`).
pub(crate) fn fit(domains: &[Vec<f32>], centroids: &[Vec<f32>], width: usize, seed: u64) -> Fit {
    let (n, embed, hidden) = (domains.len(), domains[0].len(), centroids[0].len());
    let draw =
        |seed: u64| HostTensor::new(vec![width, embed], normal_samples(seed, 1.0, width * embed));
    let (gate, up) = (draw(seed), draw(seed ^ 0x9e37_79b9_7f4a_7c15));
    let features: Vec<Vec<f64>> = domains
        .iter()
        .map(|d| swiglu_features(&gate, &up, d))
        .collect();
    // alpha = (H H^T + lambda I)^-1 C: [experts][hidden]
    let mut gram: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| dot(&features[i], &features[j])).collect())
        .collect();
    let mean_diagonal = (0..n).map(|i| gram[i][i]).sum::<f64>() / n as f64;
    (0..n).for_each(|i| gram[i][i] += RIDGE * mean_diagonal.max(1e-12));
    let rhs: Vec<Vec<f64>> = centroids
        .iter()
        .map(|c| c.iter().map(|&x| x as f64).collect())
        .collect();
    let alpha = solve(gram, rhs);
    // down = C^T (H H^T + lambda I)^-1 H = alpha^T H: [hidden, width]
    let mut down = vec![0f32; hidden * width];
    for (i, row) in down.chunks_mut(width).enumerate() {
        for (k, out) in row.iter_mut().enumerate() {
            *out = (0..n).map(|e| alpha[e][i] * features[e][k]).sum::<f64>() as f32;
        }
    }
    Fit {
        gate,
        up,
        down: HostTensor::new(vec![hidden, width], down),
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `a x = b` for a symmetric positive definite `a` (`[n][n]`) and right-hand
/// sides `b` (`[n][m]`), by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_a, pivot_b) = (a[col].clone(), b[col].clone());
        for row in col + 1..n {
            let f = a[row][col] / pivot_a[col];
            let a_row = a[row].iter_mut().zip(&pivot_a).skip(col);
            a_row.for_each(|(x, y)| *x -= f * y);
            b[row]
                .iter_mut()
                .zip(&pivot_b)
                .for_each(|(x, y)| *x -= f * y);
        }
    }
    for col in (0..n).rev() {
        for k in 0..b[col].len() {
            let s: f64 = (col + 1..n).map(|j| a[col][j] * b[j][k]).sum();
            b[col][k] = (b[col][k] - s) / a[col][col];
        }
    }
    b
}

/// Adds a fitted projection to `m`'s weights as the router of mixture `name` over
/// `domains`, stored as `dtype`.
pub(crate) fn add_router(
    m: &mut Module,
    pass: &str,
    (name, dtype): (&str, DType),
    domains: WeightId,
    fit: Fit,
) -> Result<ProjectedRouter, PassError> {
    let mut add = |part: &str, t: HostTensor| {
        m.weights
            .add(Weight {
                name: format!("{name}.router.projection.{part}"),
                shape: t.shape.clone(),
                dtype,
                expr: WeightExpr::Literal(Arc::new(t)),
            })
            .map_err(weight_err(pass))
    };
    let projection = FeedForward {
        gate: add("gate", fit.gate)?,
        up: add("up", fit.up)?,
        down: add("down", fit.down)?,
    };
    Ok(ProjectedRouter {
        domains,
        projection,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_projects_each_domain_onto_its_centroid() {
        let domains = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![0.6, 0.0, 0.8],
        ];
        let centroids = vec![
            vec![0.5, -0.5, 0.5, 0.5],
            vec![0.0, 1.0, 0.0, 0.0],
            vec![-0.6, 0.0, 0.0, 0.8],
        ];
        let f = fit(&domains, &centroids, 8, 3);
        let mut t = upmix_ir::WeightTable::new();
        let mut lit = |x: HostTensor| t.literal("w", x).unwrap();
        let (gate, up, down) = (lit(f.gate), lit(f.up), lit(f.down));
        let d = t
            .literal("d", HostTensor::new(vec![3, 3], domains.concat()))
            .unwrap();
        let router = ProjectedRouter {
            domains: d,
            projection: FeedForward { gate, up, down },
        };
        let rows = router.rows(&t).unwrap();
        for (e, c) in centroids.iter().enumerate() {
            for (got, want) in rows.row(e).iter().zip(c) {
                assert!((got - want).abs() < 1e-4, "domain {e}: {got} vs {want}");
            }
        }
    }
}
