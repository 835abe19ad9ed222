//! `Prune`: zero the lowest-scoring entries of selected projection matrices.
//!
//! Methods:
//! - `Magnitude`: score `|W_ij|`, per output row (default) or per tensor;
//! - `Wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
//!   Language Models"): score `|W_ij| * ||X_j||_2`, `X_j` the `j`-th input feature of that
//!   matrix over the tokens of a calibration text, compared within each output row. The
//!   norms come from one pass of the unpruned model over the text (Wanda's reference code
//!   recomputes the inputs of each layer after pruning the layers before it).
//!
//! Each target gives a sparsity (`floor(s * n)` entries of each row or of the tensor) or
//! an N:M pattern (`"2:4"`: the 2 lowest of every 4 consecutive input columns of a row,
//! the semi-structured sparsity of sparse tensor cores). Components are chosen by
//! selectors (module `components`); a later target overrides an earlier one for the same
//! component; `ignore` leaves components alone. Ties go to the lower index, so the masks
//! equal those of a stable sort. Pruned weights are lazy expressions over the originals:
//! nothing is computed until a runtime or an emitter asks. Not function-preserving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{Module, Pattern, PruneRule, Runtime, RuntimeError, Weight, WeightExpr, WeightId};

use crate::components::{components, layer_count, parts, Component, Selector};
use crate::settings::{LayerRange, ModelLayers, NofM, Scope, SettingError};
use crate::pass::{graph, insert_remapped, weight_err, Pass, PassContext, PassError, PassName};

/// Pipeline spec:
/// `Prune(model: "m", into: "m50", targets: [(select: ["attn.*", "ffn.*"], sparsity: 0.5)])`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prune {
    /// The model to prune.
    pub model: String,
    /// Name of a new, pruned copy; `model` itself is pruned when absent.
    #[serde(default)]
    pub into: Option<String>,
    /// How entries are scored (default `Magnitude`).
    #[serde(default)]
    pub method: PruneMethod,
    /// For sparsity targets with `Magnitude`: compare entries within each output `"row"`
    /// (default) or over the whole `"tensor"`. Wanda always compares within rows.
    #[serde(default)]
    pub scope: Option<Scope>,
    /// What to prune and how far, in order; a later target wins for a component.
    pub targets: Vec<PruneTarget>,
    /// Selectors of components to leave alone.
    #[serde(default)]
    pub ignore: Vec<Selector>,
}

impl PruneMethod {
    /// Makes the calibration text's path absolute with `resolve`.
    pub fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        if let PruneMethod::Wanda { calibration, .. } = self {
            *calibration = resolve(calibration);
        }
    }
}

/// How entries are scored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub enum PruneMethod {
    /// `|W_ij|`.
    #[default]
    Magnitude,
    /// `|W_ij| * ||X_j||_2` over the tokens of the text file `calibration`, run in windows
    /// of `window` tokens (default 128), at most `max_windows` of them (default: all).
    Wanda {
        calibration: PathBuf,
        #[serde(default)]
        window: Option<usize>,
        #[serde(default)]
        max_windows: Option<usize>,
    },
}

/// Components and how far to prune them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PruneTarget {
    /// Selectors (module `components`): `"attn.q"`, `"ffn.*"`, `"re:layers\\.1\\..*"`.
    pub select: Vec<Selector>,
    /// Only layers in this range, e.g. `"0..8"`.
    #[serde(default)]
    pub layers: Option<LayerRange>,
    /// Fraction of entries to zero, in [0, 1).
    #[serde(default)]
    pub sparsity: Option<f64>,
    /// An N:M pattern instead of a sparsity, e.g. `"2:4"`.
    #[serde(default)]
    pub pattern: Option<NofM>,
}

impl Prune {
    /// The pattern of every selected component, by weight.
    fn assign(&self, all: &[Component]) -> Result<BTreeMap<WeightId, Pattern>, PassError> {
        if self.targets.is_empty() {
            return Err(self.invalid("`targets` is empty: nothing to prune".into()));
        }
        let per_tensor = match self.scope.unwrap_or_default() {
            Scope::Row => false,
            Scope::Tensor if matches!(self.method, PruneMethod::Magnitude) => true,
            Scope::Tensor => {
                return Err(self.invalid("Wanda compares scores within rows only".into()))
            }
        };
        let layers = layer_count(all);
        let mut out = BTreeMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            let pattern = match (t.sparsity, t.pattern) {
                (Some(s), None) if (0.0..1.0).contains(&s) => match per_tensor {
                    true => Pattern::Tensor(s),
                    false => Pattern::Row(s),
                },
                (Some(s), None) => {
                    return Err(self.invalid(format!("target {i}: sparsity {s} is outside [0, 1)")))
                }
                (None, Some(NofM { n, m })) => Pattern::NofM { n, m },
                _ => {
                    return Err(
                        self.invalid(format!("target {i}: give either `sparsity` or `pattern`"))
                    )
                }
            };
            if let Some(r) = &t.layers {
                r.check(&self.model, layers)
                    .map_err(|e| self.invalid(format!("target {i}: {e}")))?;
            }
            let in_range = |c: &Component| match &t.layers {
                Some(r) => c.layer.is_some_and(|l| r.contains(l)),
                None => true,
            };
            for s in &t.select {
                let chosen: Vec<&Component> =
                    all.iter().filter(|c| in_range(c) && s.matches(c)).collect();
                if chosen.is_empty() {
                    let layers = t
                        .layers
                        .as_ref()
                        .map_or(String::new(), |l| format!(" in layers {l}"));
                    return Err(self.invalid(format!(
                        "target {i}: selector `{}` matches no component of `{}`{layers}; components: {}",
                        s.text(),
                        self.model,
                        parts(all).join(", ")
                    )));
                }
                for c in chosen {
                    if !self.ignore.iter().any(|x| x.matches(c)) {
                        out.insert(c.weight, pattern.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Wanda's activation norms of every linear weight of the model.
    fn input_norms(&self, m: &Module, cx: &mut PassContext) -> Result<ActivationNorms, PassError> {
        let PruneMethod::Wanda {
            calibration,
            window,
            max_windows,
        } = &self.method
        else {
            return Ok(HashMap::new());
        };
        let provider = cx.runtimes.as_deref_mut().ok_or_else(|| {
            self.invalid("Wanda runs the model on calibration text; no runtime is available".into())
        })?;
        let text = std::fs::read_to_string(calibration).map_err(|e| {
            self.invalid(format!(
                "reading calibration text {}: {e}",
                calibration.display()
            ))
        })?;
        let run_err = |e: upmix_ir::RuntimeError| self.invalid(format!("calibration: {e}"));
        let ids = provider.tokenize(m, &self.model, &text).map_err(run_err)?;
        let mut rt = provider.runtime(m, &self.model).map_err(run_err)?;
        calibration_norms(rt.as_mut(), &ids, window.unwrap_or(128), *max_windows)
            .map_err(run_err)?
            .ok_or_else(|| {
                self.invalid(format!(
                    "calibration text {} has fewer than two tokens",
                    calibration.display()
                ))
            })
    }
}

/// Wanda's `||X_j||_2` of every linear weight's input features, by weight.
pub type ActivationNorms = HashMap<WeightId, Arc<[f32]>>;

/// Wanda's activation norms of `rt`'s model over calibration tokens `ids`, run in
/// consecutive windows of `window` tokens (a last window shorter than 2 is dropped), at
/// most `max_windows` of them; `None` when there is no window.
pub fn calibration_norms(
    rt: &mut dyn Runtime,
    ids: &[u32],
    window: usize,
    max_windows: Option<usize>,
) -> Result<Option<ActivationNorms>, RuntimeError> {
    let windows: Vec<&[u32]> = ids
        .chunks(window.max(2))
        .filter(|w| w.len() >= 2)
        .take(max_windows.unwrap_or(usize::MAX))
        .collect();
    if windows.is_empty() {
        return Ok(None);
    }
    let norms = rt.linear_input_norms(&windows)?;
    Ok(Some(
        norms.into_iter().map(|(id, v)| (id, v.into())).collect(),
    ))
}

impl Pass for Prune {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        for t in &self.targets {
            models.check(&self.model, t.layers.as_ref())?;
        }
        if let Some(into) = &self.into {
            models.derive(into, &self.model);
        }
        Ok(())
    }

    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        self.method.resolve_paths(resolve);
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let g = graph(m, self.name(), &self.model)?;
        let all = components(g);
        let chosen = self.assign(&all)?;
        if let Some(into) = &self.into {
            if m.graph(into).is_some() {
                return Err(self.invalid(format!("a model named `{into}` exists already")));
            }
        }
        let norms = self.input_norms(m, cx)?;
        let mut remap = HashMap::new();
        let (mut zeroed, mut total) = (0.0, 0usize);
        for (id, pattern) in chosen {
            let w = m.weights.get(id).map_err(weight_err(self.name()))?;
            let column_scale = match &self.method {
                PruneMethod::Magnitude => None,
                PruneMethod::Wanda { .. } => Some(norms.get(&id).cloned().ok_or_else(|| {
                    self.invalid(format!("no calibration inputs reached `{}`", w.name))
                })?),
            };
            let rule = PruneRule {
                pattern,
                column_scale,
            };
            rule.check(&w.shape)
                .map_err(|e| self.invalid(format!("`{}`: {e}", w.name)))?;
            zeroed += rule.sparsity(&w.shape) * w.numel() as f64;
            total += w.numel();
            let pruned = Weight {
                name: w.name.clone(),
                shape: w.shape.clone(),
                dtype: if w.dtype.is_quantized() {
                    upmix_ir::DType::F32
                } else {
                    w.dtype
                },
                expr: WeightExpr::Pruned {
                    of: id,
                    rule: Arc::new(rule),
                },
            };
            remap.insert(id, m.weights.add(pruned).map_err(weight_err(self.name()))?);
        }
        let target = insert_remapped(m, self.name(), &self.model, self.into.as_deref(), &remap)?;
        cx.notes.push(format!(
            "Prune: {} components of `{target}`, {:.1}% of their {:.1}M parameters zeroed",
            remap.len(),
            100.0 * zeroed / total.max(1) as f64,
            total as f64 / 1e6
        ));
        Ok(vec![target])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
