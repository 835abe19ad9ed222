//! Per-component sensitivity: each component compressed alone, its Divergent Token
//! Metrics measured against the base model (Deiseroth et al. 2023, section 4).
//!
//! For every component (module `components`) and every level, the component's weight is
//! pruned or quantized (rounded to the values its type stores), swapped into one runtime of the base model, the prompts' forced sequences
//! scored, and the weight put back. A component of layer L cannot change the activations
//! before its node, so those are computed once ([`Runtime::save_states`]) and every
//! variant runs from its node on: a sweep costs about half of full passes on average.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use upmix_ir::{DType, Graph, Pattern, PruneRule, Runtime, RuntimeError, WeightTable};

use crate::components::components;
use crate::divergence::{compare, forced_sequences, summarize, DivergenceSummary};

/// How one component is compressed in a sweep.
#[derive(Clone, Debug, PartialEq)]
pub enum Compression {
    /// Zero entries by magnitude, or by Wanda's score (`wanda`: needs activation norms).
    Prune { wanda: bool, pattern: Pattern },
    /// Round the values to what a storage type holds (quantize, then dequantize).
    Quantize(DType),
}

impl Compression {
    /// Parses a method and a comma-separated list of levels: `magnitude:0.5,0.9`,
    /// `prune:0.9` (magnitude), `wanda:0.5`, `magnitude:2:4` (sparsities per row, or N:M),
    /// or `quantize:q8_0,q4_0,int8_channel` (storage types).
    pub fn parse_list(text: &str) -> Result<Vec<Compression>, String> {
        let (method, levels) = text.split_once(':').ok_or_else(|| {
            format!(
                "`{text}` is not METHOD:LEVELS, e.g. `magnitude:0.5,0.9` or `quantize:q8_0,q4_0`"
            )
        })?;
        let wanda = match method {
            "magnitude" | "prune" => false,
            "wanda" => true,
            "quantize" => {
                return levels
                    .split(',')
                    .map(|l| Self::quantize(l.trim()))
                    .collect()
            }
            other => {
                return Err(format!(
                    "unknown method `{other}` (magnitude, prune, wanda, quantize)"
                ))
            }
        };
        let mut out = Vec::new();
        for level in levels.split(',') {
            let pattern = match level.split_once(':') {
                Some((n, m)) => match (n.trim().parse(), m.trim().parse()) {
                    (Ok(n), Ok(m)) if n < m => Pattern::NofM { n, m },
                    _ => return Err(format!("`{level}` is not an N:M pattern with N < M")),
                },
                None => match level.trim().parse::<f64>() {
                    Ok(s) if (0.0..1.0).contains(&s) => Pattern::Row(s),
                    _ => return Err(format!("sparsity `{level}` is not a number in [0, 1)")),
                },
            };
            out.push(Compression::Prune { wanda, pattern });
        }
        Ok(out)
    }

    fn quantize(name: &str) -> Result<Compression, String> {
        match DType::parse(name) {
            Some(d) if d.can_encode() && d != DType::F32 => Ok(Compression::Quantize(d)),
            _ => Err(format!(
                "`{name}` is not a type to quantize to (q8_0, q4_0, q4_1, int8_channel, f16, bf16)"
            )),
        }
    }

    /// The fraction of a component's entries this compression zeroes (0 for quantization).
    pub fn level(&self, shape: &[usize]) -> f64 {
        match self {
            Compression::Prune { pattern, .. } => {
                PruneRule::magnitude(pattern.clone()).sparsity(shape)
            }
            Compression::Quantize(_) => 0.0,
        }
    }

    /// `magnitude`, `wanda` or `quantize`.
    pub fn method(&self) -> &'static str {
        match self {
            Compression::Prune { wanda: false, .. } => "magnitude",
            Compression::Prune { wanda: true, .. } => "wanda",
            Compression::Quantize(_) => "quantize",
        }
    }

    /// The level as written in a table: `0.9`, `2:4`, `q4_0`.
    pub fn text(&self) -> String {
        match self {
            Compression::Prune { pattern, .. } => pattern_text(pattern),
            Compression::Quantize(d) => d.name().into(),
        }
    }

    /// Whether it ranks by Wanda's score.
    pub fn wanda(&self) -> bool {
        matches!(self, Compression::Prune { wanda: true, .. })
    }

    /// Compresses `values` (a 2-D weight of `shape`) in place; `norms` are the weight's
    /// activation norms, for Wanda.
    fn apply(
        &self,
        values: &mut [f32],
        shape: &[usize],
        norms: Option<&Arc<[f32]>>,
    ) -> Result<(), String> {
        let cols = shape.last().copied().unwrap_or(1);
        match self {
            Compression::Prune { wanda, pattern } => {
                let rule = PruneRule {
                    pattern: pattern.clone(),
                    column_scale: match wanda {
                        true => Some(norms.ok_or("no activation norms")?.clone()),
                        false => None,
                    },
                };
                rule.check(shape)?;
                rule.apply(values, cols);
            }
            Compression::Quantize(d) => {
                d.nbytes(shape).ok_or_else(|| {
                    format!(
                        "rows of {cols} are not a whole number of {} blocks",
                        d.name()
                    )
                })?;
                d.round_in_place(values, cols);
            }
        }
        Ok(())
    }
}

/// Bits per parameter of a weight of `shape` stored as `dtype`.
pub fn bits_per_param(dtype: DType, shape: &[usize]) -> f64 {
    let n: usize = shape.iter().product();
    dtype.nbytes(shape).unwrap_or(0) as f64 * 8.0 / n.max(1) as f64
}

/// One measured (component, level).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SensitivityRow {
    pub component: String,
    pub layer: Option<usize>,
    pub part: String,
    pub params: usize,
    /// `magnitude`, `wanda` or `quantize`.
    pub method: String,
    /// The level as written (`0.9`, `2:4`, `q4_0`).
    pub pattern: String,
    /// The fraction of the component's entries zeroed (0 for quantization).
    pub sparsity: f64,
    /// Quantization rows: bits per parameter the component takes at this level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<f64>,
    /// Quantization rows: bits per parameter the component takes in the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_bits: Option<f64>,
    pub mean_fdt: f64,
    pub median_fdt: f64,
    pub p25_fdt: f64,
    pub mean_sdt: f64,
    /// The variant's perplexity of the base continuations.
    pub perplexity: f64,
}

/// A whole sweep, as written to and read from JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SensitivityTable {
    pub model: String,
    pub prompts: usize,
    /// Continuation length.
    pub n: usize,
    /// The base model scored against its own continuations (FDT = n unless the
    /// continuations were computed elsewhere or at another precision).
    pub base_mean_fdt: f64,
    pub rows: Vec<SensitivityRow>,
}

impl SensitivityTable {
    /// How many distinct components the table measures.
    pub fn components(&self) -> usize {
        let names: std::collections::BTreeSet<&str> =
            self.rows.iter().map(|r| r.component.as_str()).collect();
        names.len()
    }
}

/// What a sweep reads.
pub struct Sweep<'a> {
    pub graph: &'a Graph,
    pub weights: &'a WeightTable,
    pub prompts: &'a [Vec<u32>],
    pub continuations: &'a [Vec<u32>],
    pub levels: &'a [Compression],
    /// Wanda's activation norms by weight (for Wanda levels).
    pub norms: &'a crate::ActivationNorms,
}

impl Sweep<'_> {
    /// Runs the sweep on `rt`, a runtime of the base model; `progress(done, total, what)`
    /// is called after every variant.
    pub fn run(
        &self,
        rt: &mut dyn Runtime,
        progress: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<SensitivityTable, RuntimeError> {
        let all = components(self.graph);
        let forced = forced_sequences(self.prompts, self.continuations);
        let refs: Vec<&[u32]> = forced.iter().map(|s| s.as_slice()).collect();
        let mut nodes: Vec<&str> = Vec::new();
        for c in &all {
            if !nodes.contains(&c.node.as_str()) {
                nodes.push(&c.node);
            }
        }
        rt.save_states(&refs, &nodes)?;
        let base = self.measure(rt, nodes.first().copied().unwrap_or(""))?;
        let total = all.len() * self.levels.len();
        let mut rows = Vec::with_capacity(total);
        for c in &all {
            let backend = |e: upmix_ir::WeightError| RuntimeError::Backend(e.to_string());
            let original = self.weights.materialize(c.weight).map_err(backend)?;
            let stored = self.weights.get(c.weight).map_err(backend)?.dtype;
            for level in self.levels {
                let norms = match level.wanda() {
                    true => Some(self.norms.get(&c.weight).ok_or_else(|| {
                        RuntimeError::Backend(format!("no activation norms for `{}`", c.name))
                    })?),
                    false => None,
                };
                let mut compressed = original.clone();
                level
                    .apply(&mut compressed.data, &original.shape, norms)
                    .map_err(|e| RuntimeError::Backend(format!("`{}`: {e}", c.name)))?;
                rt.replace_weights(&[(c.weight, compressed)])?;
                let measured = self.measure(rt, &c.node);
                rt.restore_weights();
                let s = measured?;
                let (bits, base_bits) = match level {
                    Compression::Quantize(d) => (
                        Some(bits_per_param(*d, &original.shape)),
                        Some(bits_per_param(stored, &original.shape)),
                    ),
                    Compression::Prune { .. } => (None, None),
                };
                rows.push(SensitivityRow {
                    component: c.name.clone(),
                    layer: c.layer,
                    part: c.part.clone(),
                    params: original.data.len(),
                    method: level.method().into(),
                    pattern: level.text(),
                    sparsity: level.level(&original.shape),
                    bits,
                    base_bits,
                    mean_fdt: s.mean_fdt,
                    median_fdt: s.median_fdt,
                    p25_fdt: s.p25_fdt,
                    mean_sdt: s.mean_sdt,
                    perplexity: s.perplexity,
                });
                progress(rows.len(), total, &c.name);
            }
        }
        Ok(SensitivityTable {
            model: self.graph.name.clone(),
            prompts: self.prompts.len(),
            n: self.continuations.first().map_or(0, |c| c.len()),
            base_mean_fdt: base.mean_fdt,
            rows,
        })
    }

    /// The metrics of the runtime's current weights, resuming at `node`.
    fn measure(&self, rt: &mut dyn Runtime, node: &str) -> Result<DivergenceSummary, RuntimeError> {
        let scores = rt.score_saved(node)?;
        let rows: Vec<_> = scores
            .iter()
            .zip(self.prompts.iter().zip(self.continuations))
            .map(|(s, (p, y))| compare(p.len(), y, s))
            .collect();
        Ok(summarize(&rows))
    }
}

/// `0.9` or `2:4`.
pub fn pattern_text(p: &Pattern) -> String {
    match p {
        Pattern::Row(s) | Pattern::Tensor(s) => format!("{s}"),
        Pattern::NofM { n, m } => format!("{n}:{m}"),
    }
}
