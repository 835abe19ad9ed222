//! Per-component sensitivity: each component compressed alone, its Divergent Token
//! Metrics measured against the base model (Deiseroth et al. 2023, section 4).
//!
//! For every component (module `components`) and every level, the component's weight is
//! pruned, swapped into one runtime of the base model, the prompts' forced sequences
//! scored, and the weight put back. A component of layer L cannot change the activations
//! before its node, so those are computed once ([`Runtime::save_states`]) and every
//! variant runs from its node on: a sweep costs about half of full passes on average.

use serde::{Deserialize, Serialize};
use upmix_ir::{Graph, Pattern, PruneRule, Runtime, RuntimeError, WeightTable};

use crate::components::components;
use crate::divergence::{compare, forced_sequences, summarize, DivergenceSummary};

/// How one component is compressed in a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Compression {
    /// Rank by Wanda's score (needs activation norms) instead of magnitude.
    pub wanda: bool,
    pub pattern: Pattern,
}

impl Compression {
    /// Parses `magnitude:0.5,0.9`, `prune:0.9` (magnitude), `wanda:0.5`, `magnitude:2:4`:
    /// a method and a comma-separated list of levels (sparsities per row, or N:M).
    pub fn parse_list(text: &str) -> Result<Vec<Compression>, String> {
        let (method, levels) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not METHOD:LEVELS, e.g. `magnitude:0.5,0.9`"))?;
        let wanda = match method {
            "magnitude" | "prune" => false,
            "wanda" => true,
            other => {
                return Err(format!(
                    "unknown method `{other}` (magnitude, prune, wanda)"
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
            out.push(Compression { wanda, pattern });
        }
        Ok(out)
    }

    /// The fraction of a component's entries this compression zeroes.
    pub fn level(&self, shape: &[usize]) -> f64 {
        PruneRule::magnitude(self.pattern.clone()).sparsity(shape)
    }

    pub fn method(&self) -> &'static str {
        if self.wanda {
            "wanda"
        } else {
            "magnitude"
        }
    }
}

/// One measured (component, level).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SensitivityRow {
    pub component: String,
    pub layer: Option<usize>,
    pub part: String,
    pub params: usize,
    /// `magnitude` or `wanda`.
    pub method: String,
    /// The pattern as written (`0.9`, `2:4`).
    pub pattern: String,
    /// The fraction of the component's entries zeroed.
    pub sparsity: f64,
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
            let original = self
                .weights
                .materialize(c.weight)
                .map_err(|e| RuntimeError::Backend(e.to_string()))?;
            for level in self.levels {
                let rule = PruneRule {
                    pattern: level.pattern.clone(),
                    column_scale: match level.wanda {
                        true => Some(self.norms.get(&c.weight).cloned().ok_or_else(|| {
                            RuntimeError::Backend(format!("no activation norms for `{}`", c.name))
                        })?),
                        false => None,
                    },
                };
                rule.check(&original.shape)
                    .map_err(|e| RuntimeError::Backend(format!("`{}`: {e}", c.name)))?;
                let mut pruned = original.clone();
                rule.apply(&mut pruned.data, original.shape[1]);
                rt.replace_weights(&[(c.weight, pruned)])?;
                let measured = self.measure(rt, &c.node);
                rt.restore_weights();
                let s = measured?;
                rows.push(SensitivityRow {
                    component: c.name.clone(),
                    layer: c.layer,
                    part: c.part.clone(),
                    params: original.data.len(),
                    method: level.method().into(),
                    pattern: pattern_text(&level.pattern),
                    sparsity: level.level(&original.shape),
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
