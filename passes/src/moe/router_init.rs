//! Router initialisation for [`Upcycle`](crate::Upcycle) and
//! [`AttentionExperts`](crate::AttentionExperts): where each mixture layer's router rows
//! (one per expert, `[experts, hidden]`) start before any training.
//!
//! - `Random { seed, std }` and `Zeros` need nothing but the shape.
//! - `Hidden` is mergekit-moe's `hidden` gate mode: run one model (the base) on each
//!   expert's prompts; per layer, take each prompt's hidden state at the *input* of that
//!   layer (the residual stream before the attention norm) at its last token, average over
//!   the prompts, subtract the same average over the expert's negative prompts if any, and
//!   L2-normalise. Each prompt starts with the model's BOS token, as mergekit prepends it.
//!   mergekit batches prompts with padding, so with prompts of different lengths its "last
//!   token" can be a pad token; here each prompt's own last token is used.
//! - `DomainCentroid` is the same with a corpus per expert instead of prompts: the hidden
//!   states are mean-pooled over every token of the text (read in windows that each start
//!   with BOS, the BOS position itself left out).
//!
//! - `Nexus` projects each expert's domain embedding through a small network per layer
//!   (module `nexus`); its starting fit uses the same per-layer centroids as
//!   `DomainCentroid`.
//!
//! Router rows of different experts that point almost the same way (cosine above
//! [`COLLINEAR_COSINE`]) route almost identically; that is reported as a note.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{HostTensor, Module, WeightExpr};

use crate::hidden_states::{layer_inputs, normalized, pooled, Pool, Windows};
use crate::hyperparams::Hyperparams;
use crate::pass::{graph, PassContext, PassError, RuntimeProvider};

/// How the router rows start.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub enum RouterInit {
    /// Rows drawn from `N(0, std^2)` with a fixed seed (different per layer).
    Random { seed: u64, std: f32 },
    /// All zero: every expert equally likely until trained.
    Zeros,
    /// Normalised mean last-token hidden states of each expert's prompts (mergekit-moe's
    /// `hidden` mode). `prompts` and `negative_prompts` map expert model names to prompts;
    /// every expert needs at least one prompt. `model` is the model run (default: the
    /// `base` model, else the first expert).
    Hidden {
        prompts: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        negative_prompts: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        model: Option<String>,
    },
    /// Normalised mean hidden states over a text file per expert (`texts` maps expert
    /// model names to files; relative paths are resolved against the pipeline file).
    /// At most `max_tokens` tokens of each text are read (default 8192), in windows of
    /// `window` tokens (default: the model's max positions, capped at 512).
    DomainCentroid {
        texts: BTreeMap<String, PathBuf>,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        max_tokens: Option<usize>,
        #[serde(default)]
        window: Option<usize>,
    },
    /// Nexus (Gritsch et al. 2024): router rows projected from the experts' domain
    /// embeddings by a per-layer SwiGLU projection, so that an expert added later gets its
    /// row from its domain's text alone (`AddExpert`). `texts` maps expert model names to
    /// files, as for `DomainCentroid`. See [`crate::nexus_router`].
    Nexus(crate::nexus_router::NexusRouter),
}

impl Default for RouterInit {
    fn default() -> Self {
        RouterInit::Random { seed: 0, std: 0.02 }
    }
}

/// Router rows whose cosine similarity exceeds this are reported as nearly collinear.
const COLLINEAR_COSINE: f32 = 0.95;

/// Vectors of one hidden-state width: one per expert, or one per node.
type Rows = Vec<Vec<f32>>;

impl RouterInit {
    /// The mode's name, as written in pipelines.
    fn kind(&self) -> &'static str {
        match self {
            RouterInit::Random { .. } => "Random",
            RouterInit::Zeros => "Zeros",
            RouterInit::Hidden { .. } => "Hidden",
            RouterInit::DomainCentroid { .. } => "DomainCentroid",
            RouterInit::Nexus(_) => "Nexus",
        }
    }

    /// For activation modes, the model run: the one named, else `default_model`.
    pub fn model<'a>(&'a self, default_model: &'a str) -> Option<&'a str> {
        match self {
            RouterInit::Hidden { model, .. } | RouterInit::DomainCentroid { model, .. } => {
                Some(model.as_deref().unwrap_or(default_model))
            }
            RouterInit::Nexus(_) => Some(default_model),
            _ => None,
        }
    }

    /// The models a pass reads: `models`, then the model this mode runs (`default_model`
    /// unless the mode names one), each once, in that order.
    pub fn with_router_model(&self, mut models: Vec<String>, default_model: &str) -> Vec<String> {
        if let Some(router) = self.model(default_model) {
            models.push(router.to_string());
        }
        if let RouterInit::Nexus(n) = self {
            models.extend(n.embedder.clone());
        }
        let mut seen = std::collections::HashSet::new();
        models.retain(|name| seen.insert(name.clone()));
        models
    }

    /// Whether the rows come from running a model.
    pub fn needs_runtime(&self) -> bool {
        matches!(
            self,
            RouterInit::Hidden { .. } | RouterInit::DomainCentroid { .. } | RouterInit::Nexus(_)
        )
    }

    /// Checks the request against the expert names before anything runs: every expert
    /// has prompts (or a text), and no prompts name a model that is not an expert.
    /// Makes the text files' paths absolute with `resolve`.
    pub fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        if let RouterInit::DomainCentroid { texts, .. }
        | RouterInit::Nexus(crate::nexus_router::NexusRouter { texts, .. }) = self
        {
            texts.values_mut().for_each(|t| *t = resolve(t));
        }
    }

    pub fn check(&self, pass: &str, experts: &[String]) -> Result<(), PassError> {
        let invalid = |message: String| PassError::Invalid {
            pass: pass.to_string(),
            message,
        };
        if matches!(self, RouterInit::Nexus(_)) && pass != "Upcycle" {
            return Err(invalid(
                "a Nexus router projects FFN experts' domains: only Upcycle builds one".into(),
            ));
        }
        let (what, keys): (&str, Vec<&String>) = match self {
            RouterInit::Hidden {
                prompts,
                negative_prompts,
                ..
            } => {
                for e in experts {
                    if prompts.get(e).is_none_or(|p| p.is_empty()) {
                        return Err(invalid(format!(
                            "router Hidden: no prompts for expert `{e}` (every expert needs \
                             at least one; prompts are given for: {})",
                            names(prompts.keys())
                        )));
                    }
                }
                (
                    "prompts",
                    prompts.keys().chain(negative_prompts.keys()).collect(),
                )
            }
            RouterInit::DomainCentroid { texts, .. }
            | RouterInit::Nexus(crate::nexus_router::NexusRouter { texts, .. }) => {
                for e in experts {
                    if !texts.contains_key(e) {
                        return Err(invalid(format!(
                            "router {}: no text for expert `{e}` (texts are \
                             given for: {})",
                            self.kind(),
                            names(texts.keys())
                        )));
                    }
                }
                ("texts", texts.keys().collect())
            }
            _ => return Ok(()),
        };
        if let Some(k) = keys.iter().find(|k| !experts.contains(k)) {
            return Err(invalid(format!(
                "router {what} name `{k}`, which is not an expert (experts: {})",
                experts.join(", ")
            )));
        }
        Ok(())
    }

    /// The `[experts, hidden]` router rows of mixture layer `index`, from `computed`
    /// (`[expert][hidden]`, see [`RouterInit::activation_rows`]) for activation modes. Rows
    /// of another width than `hidden` are an error naming the model they come from
    /// (`default_model` unless the mode names one).
    pub fn rows(
        &self,
        pass: &str,
        (index, experts, hidden): (usize, usize, usize),
        computed: Option<Vec<Vec<f32>>>,
        default_model: &str,
    ) -> Result<WeightExpr, PassError> {
        let invalid = |message: String| PassError::Invalid {
            pass: pass.to_string(),
            message,
        };
        let rows = match self {
            RouterInit::Random { seed, std } => {
                return Ok(WeightExpr::Random {
                    seed: seed.wrapping_add(index as u64),
                    std: *std,
                })
            }
            RouterInit::Zeros => vec![0.0; experts * hidden],
            RouterInit::Nexus(_) => {
                return Err(invalid(
                    "Nexus routers are projected, not rows: only Upcycle builds them".into(),
                ))
            }
            RouterInit::Hidden { .. } | RouterInit::DomainCentroid { .. } => {
                let model = self.model(default_model).unwrap_or("?");
                let rows = computed.ok_or_else(|| {
                    invalid(format!(
                        "router model `{model}` gave no rows for mixture layer {index}"
                    ))
                })?;
                if let Some(bad) = rows.iter().find(|r| r.len() != hidden) {
                    return Err(invalid(format!(
                        "router model `{model}` gave rows of width {} for layer {index}, \
                         but the experts have hidden size {hidden}",
                        bad.len()
                    )));
                }
                rows.concat()
            }
        };
        let tensor = HostTensor::try_new(vec![experts, hidden], rows).ok_or_else(|| {
            invalid(format!(
                "router rows for layer {index} do not form a [{experts}, {hidden}] matrix"
            ))
        })?;
        Ok(WeightExpr::Literal(Arc::new(tensor)))
    }

    /// For activation-based modes: the router rows `[experts][hidden]` of each layer in
    /// `layers` (indices of decoder layers), computed by running the chosen model.
    /// `default_model` is used when the mode names none.
    pub fn activation_rows(
        &self,
        m: &Module,
        cx: &mut PassContext,
        pass: &str,
        experts: &[String],
        layers: &[usize],
        default_model: &str,
    ) -> Result<Vec<Vec<Vec<f32>>>, PassError> {
        let (rows, _) =
            self.activation_rows_and(m, cx, pass, (experts, layers, default_model), &[])?;
        Ok(rows)
    }

    /// [`RouterInit::activation_rows`], and in the same forward passes the pooled,
    /// normalised hidden states at the nodes `extra` of the same model, per expert
    /// (`[expert][extra node][hidden]`; Nexus embeds its domains this way when the base
    /// model is the embedder).
    pub(crate) fn activation_rows_and(
        &self,
        m: &Module,
        cx: &mut PassContext,
        pass: &str,
        (experts, layers, default_model): (&[String], &[usize], &str),
        extra: &[String],
    ) -> Result<(Vec<Rows>, Vec<Rows>), PassError> {
        let invalid = |message: String| PassError::Invalid {
            pass: pass.to_string(),
            message,
        };
        let model = self
            .model(default_model)
            .ok_or_else(|| invalid("only activation modes have router rows to compute".into()))?;
        let expert = experts
            .first()
            .ok_or_else(|| invalid("router rows need at least one expert".into()))?;
        check_width(m, pass, model, expert)?;
        let g = graph(m, pass, model)?;
        let nodes = layer_inputs(g);
        let nodes: Vec<String> = layers
            .iter()
            .map(|&l| {
                nodes
                    .get(l)
                    .cloned()
                    .ok_or_else(|| invalid(format!("model `{model}` has no decoder layer {l}")))
            })
            .collect::<Result<_, _>>()?;
        let nodes: Vec<String> = nodes.into_iter().chain(extra.iter().cloned()).collect();
        let bos = g.meta.bos_token_id;
        let Some(provider) = cx.runtimes.as_deref_mut() else {
            return Err(invalid(
                "this router initialisation runs a model, but no runtime is available here".into(),
            ));
        };
        let run_err = |e: upmix_ir::RuntimeError| invalid(format!("running `{model}`: {e}"));
        let mut rt = provider.runtime(m, model).map_err(run_err)?;
        // Token sequences, each starting with BOS when the model has one.
        let sequences = |provider: &mut dyn RuntimeProvider,
                         texts: &[String]|
         -> Result<Vec<Vec<u32>>, PassError> {
            texts
                .iter()
                .map(|t| {
                    let mut ids: Vec<u32> = bos.into_iter().collect();
                    ids.extend(provider.tokenize(m, model, t).map_err(run_err)?);
                    Ok(ids)
                })
                .collect()
        };

        // rows[expert][layer][hidden], extras[expert][extra node][hidden]
        let mut rows: Vec<Vec<Vec<f32>>> = Vec::with_capacity(experts.len());
        let mut extras = Vec::with_capacity(experts.len());
        for e in experts {
            let per_layer = match self {
                RouterInit::Hidden {
                    prompts,
                    negative_prompts,
                    ..
                } => {
                    let positive = sequences(&mut *provider, &prompts[e])?;
                    let mut v =
                        pooled(rt.as_mut(), &nodes, &positive, Pool::Last).map_err(run_err)?;
                    if let Some(neg) = negative_prompts.get(e).filter(|n| !n.is_empty()) {
                        let negative = sequences(&mut *provider, neg)?;
                        let n =
                            pooled(rt.as_mut(), &nodes, &negative, Pool::Last).map_err(run_err)?;
                        for (a, b) in v.iter_mut().zip(n) {
                            a.iter_mut().zip(b).for_each(|(x, y)| *x -= y);
                        }
                    }
                    v
                }
                RouterInit::DomainCentroid {
                    texts,
                    max_tokens,
                    window,
                    ..
                }
                | RouterInit::Nexus(crate::nexus_router::NexusRouter {
                    texts,
                    max_tokens,
                    window,
                    ..
                }) => {
                    let cut = Windows {
                        max_tokens: *max_tokens,
                        window: *window,
                    };
                    let windows = cut.read(&mut *provider, m, model, pass, &texts[e])?;
                    pooled(rt.as_mut(), &nodes, &windows, Pool::MeanAfterFirst).map_err(run_err)?
                }
                _ => return Err(invalid("only activation modes run a model".into())),
            };
            let mut per_layer: Vec<Vec<f32>> = per_layer.into_iter().map(normalized).collect();
            extras.push(per_layer.split_off(layers.len()));
            rows.push(per_layer);
        }
        // Transpose to [layer][expert][hidden] and look for near-collinear rows.
        let by_layer: Vec<Vec<Vec<f32>>> = (0..layers.len())
            .map(|l| rows.iter().map(|r| r[l].clone()).collect())
            .collect();
        for (l, layer_rows) in layers.iter().zip(&by_layer) {
            if let Some((a, b, cos)) = most_collinear(layer_rows) {
                cx.notes.push(format!(
                    "{pass}: layer {l}: the router rows of `{}` and `{}` are nearly collinear \
                     (cosine {cos:.3}); routing will hardly tell these experts apart — use \
                     more distinct prompts or texts",
                    experts[a], experts[b]
                ));
            }
        }
        Ok((by_layer, extras))
    }
}

/// Checks that the router model's hidden states are as wide as the experts' hidden
/// states, so that they can serve as router rows.
fn check_width(m: &Module, pass: &str, model: &str, expert: &str) -> Result<(), PassError> {
    let found = Hyperparams::of(graph(m, pass, model)?, &m.weights).hidden;
    let expected = Hyperparams::of(graph(m, pass, expert)?, &m.weights).hidden;
    if found == expected {
        return Ok(());
    }
    Err(PassError::Invalid {
        pass: pass.to_string(),
        message: format!(
            "router model `{model}` has hidden size {found}, but the experts (`{expert}`) \
             have {expected}: its hidden states cannot be router rows"
        ),
    })
}

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = keys.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// The pair of rows with the largest cosine similarity, if above [`COLLINEAR_COSINE`].
fn most_collinear(rows: &[Vec<f32>]) -> Option<(usize, usize, f32)> {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    let mut best: Option<(usize, usize, f32)> = None;
    for a in 0..rows.len() {
        for b in a + 1..rows.len() {
            let dot: f32 = rows[a].iter().zip(&rows[b]).map(|(x, y)| x * y).sum();
            let cos = dot / (norm(&rows[a]) * norm(&rows[b]));
            if cos > COLLINEAR_COSINE && best.is_none_or(|(_, _, c)| cos > c) {
                best = Some((a, b, cos));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collinear_rows_are_found_and_distinct_ones_are_not() {
        let rows = vec![
            vec![1.0, 0.0, 0.0],
            vec![0.0, 1.0, 0.0],
            vec![1.0, 0.1, 0.0],
        ];
        let (a, b, cos) = most_collinear(&rows).unwrap();
        assert_eq!((a, b), (0, 2));
        assert!(cos > 0.99);
        assert!(most_collinear(&rows[..2]).is_none());
    }

    #[test]
    fn rows_are_unit_length_and_zero_stays_zero() {
        let v = normalized(vec![3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        assert_eq!(normalized(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
