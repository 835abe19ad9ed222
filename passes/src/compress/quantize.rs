//! `Quantize`: store selected weights in a quantized (or narrower float) type.
//!
//! Types: ggml's block formats `q8_0`, `q4_0`, `q4_1` (blocks of 32 along each row, one
//! f16 scale per block, plus an f16 minimum for Q4_1), weight-only `int8_channel` (one
//! f32 scale per output row), and the floats `f16`, `bf16`, `f32`; the formulas are in
//! `upmix_ir::quant`. Quantized weights are lazy: a runtime or emitter quantizes each one
//! when it asks for it, and a weight already stored in the asked type (a GGUF source) is
//! kept byte for byte. Not function-preserving: values round to what the type stores.
//!
//! Which weights: every component (the projection matrices, module `components`) gets
//! `dtype` unless a target says otherwise; targets choose components by selectors, and
//! may also name `embed` (the embedding table) and `lm_head`, which are otherwise kept, as
//! are routers, norms and biases. A later target wins for a weight; `ignore` keeps
//! components as they are. A tied embedding and lm head are one weight: naming either
//! quantizes both. Every row of a quantized weight must be a whole number of blocks.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use upmix_ir::{DType, Graph, Module, Op, WeightId};

use crate::components::{components, layer_count, parts, Component, Selector};
use crate::settings::{self, LayerRange, ModelLayers, SettingError};
use crate::pass::{graph, insert_remapped, weight_err, Pass, PassContext, PassError, PassName};

/// Pipeline spec: `Quantize(model: "m", into: "m_q8", dtype: "q8_0")`, or with targets:
/// `Quantize(model: "m", dtype: "q4_1", targets: [(select: ["ffn.down"], dtype: "q8_0")])`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Quantize {
    /// The model to quantize.
    pub model: String,
    /// Name of a new, quantized copy; `model` itself is quantized when absent.
    #[serde(default)]
    pub into: Option<String>,
    /// The type of every component no target names: `"q8_0"`, `"q4_0"`, `"q4_1"`,
    /// `"int8_channel"`, `"f16"`, `"bf16"`, `"f32"`. Absent: only targets are quantized.
    #[serde(default, deserialize_with = "settings::encodable_opt")]
    pub dtype: Option<DType>,
    /// Weights and their types, in order; a later target wins for a weight.
    #[serde(default)]
    pub targets: Vec<QuantizeTarget>,
    /// Selectors of components to leave as they are.
    #[serde(default)]
    pub ignore: Vec<Selector>,
}

/// Weights and the type to store them in.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeTarget {
    /// Selectors (module `components`), plus `"embed"` and `"lm_head"`.
    pub select: Vec<Selector>,
    /// Only layers in this range, e.g. `"0..8"`.
    #[serde(default)]
    pub layers: Option<LayerRange>,
    #[serde(deserialize_with = "settings::encodable")]
    pub dtype: DType,
}

impl Quantize {
    /// The type of every chosen weight.
    fn assign(&self, g: &Graph) -> Result<BTreeMap<WeightId, DType>, PassError> {
        if self.dtype.is_none() && self.targets.is_empty() {
            return Err(self.invalid("give `dtype`, `targets` or both: nothing to quantize".into()));
        }
        let types = self.dtype.iter().chain(self.targets.iter().map(|t| &t.dtype));
        if let Some(t) = types.into_iter().find(|t| !t.can_encode()) {
            return Err(self.invalid(format!(
                "unknown type `{t}` (valid: q8_0, q4_0, q4_1, int8_channel, f16, bf16, f32)"
            )));
        }
        let all = components(g);
        let kept = |c: &Component| self.ignore.iter().any(|s| s.matches(c));
        let mut out = BTreeMap::new();
        if let Some(dtype) = self.dtype {
            for c in all.iter().filter(|c| !kept(c)) {
                out.insert(c.weight, dtype);
            }
        }
        let named = embedding_and_head(g);
        let choosable: Vec<&Component> = all.iter().chain(&named).collect();
        let layers = layer_count(&all);
        for (i, t) in self.targets.iter().enumerate() {
            let dtype = t.dtype;
            if let Some(r) = &t.layers {
                r.check(&self.model, layers)
                    .map_err(|e| self.invalid(format!("target {i}: {e}")))?;
            }
            let in_range = |c: &Component| match &t.layers {
                Some(r) => c.layer.is_some_and(|l| r.contains(l)),
                None => true,
            };
            for s in &t.select {
                let chosen: Vec<&&Component> = choosable
                    .iter()
                    .filter(|c| in_range(c) && s.matches(c))
                    .collect();
                if chosen.is_empty() {
                    return Err(self.invalid(format!(
                        "target {i}: selector `{}` matches no weight of `{}`; components: {}, and embed, lm_head",
                        s.text(),
                        self.model,
                        parts(&all).join(", ")
                    )));
                }
                for c in chosen.into_iter().filter(|c| !kept(c)) {
                    out.insert(c.weight, dtype);
                }
            }
        }
        Ok(out)
    }
}

/// The embedding table and the lm head as selectable weights named `embed` and
/// `lm_head` (they are not components: only a target that names them quantizes them).
fn embedding_and_head(g: &Graph) -> Vec<Component> {
    let mut out = Vec::new();
    for id in g.node_ids() {
        let node = g.node(id);
        let (name, weight) = match &node.op {
            Op::Embedding { table } => ("embed", *table),
            Op::Linear { weight, .. } if node.name == "lm_head" => ("lm_head", *weight),
            _ => continue,
        };
        out.push(Component {
            name: name.into(),
            layer: None,
            part: name.into(),
            node: node.name.clone(),
            weight,
        });
    }
    out
}

impl Pass for Quantize {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        for t in &self.targets {
            models.check(&self.model, t.layers.as_ref())?;
        }
        if let Some(into) = &self.into {
            models.derive(into, &self.model);
        }
        Ok(())
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let g = graph(m, self.name(), &self.model)?;
        let chosen = self.assign(g)?;
        if let Some(into) = &self.into {
            if m.graph(into).is_some() {
                return Err(self.invalid(format!("a model named `{into}` exists already")));
            }
        }
        let mut remap = HashMap::new();
        let mut counts: BTreeMap<DType, (usize, usize)> = BTreeMap::new();
        for (id, dtype) in chosen {
            let mut w = m.weights.get(id).map_err(weight_err(self.name()))?.clone();
            if dtype.nbytes(&w.shape).is_none() {
                let (elems, _) = dtype.block();
                return Err(self.invalid(format!(
                    "`{}` {:?}: rows of {} elements are not a whole number of {dtype} blocks of {elems}; leave it out with `ignore` or choose another type for it",
                    w.name,
                    w.shape,
                    w.cols()
                )));
            }
            let entry = counts.entry(dtype).or_default();
            entry.0 += 1;
            entry.1 += w.numel();
            if w.dtype != dtype {
                w.dtype = dtype;
                remap.insert(id, m.weights.add(w).map_err(weight_err(self.name()))?);
            }
        }
        let target = insert_remapped(m, self.name(), &self.model, self.into.as_deref(), &remap)?;
        let summary: Vec<String> = counts
            .iter()
            .map(|(d, (n, p))| format!("{n} weights ({:.1}M parameters) to {d}", *p as f64 / 1e6))
            .collect();
        cx.notes
            .push(format!("Quantize: `{target}`: {}", summary.join(", ")));
        Ok(vec![target])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
