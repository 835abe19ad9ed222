//! `Plan`: per-component compression levels from a sensitivity table (module
//! `sensitivity`), by the threshold sweep of Deiseroth et al. 2023 (Divergent Token
//! Metrics, section 4).
//!
//! A threshold on the chosen FDT statistic starts at its largest value and is lowered step
//! by step through the values in the table; at each threshold every component gets the
//! largest level whose statistic still reaches it (none: left alone). The sweep stops at
//! the first threshold whose parameter-weighted average sparsity reaches the target
//! (`Sparsity(t)`), or is that threshold (`Fdt(f)`: a budget). Within the last step the
//! components it raises are raised one at a time, those with the best statistic at their
//! new level first, until the target is reached, so the plan lands on the target rather
//! than a whole step beyond it. The result is written as a
//! `Prune` pipeline fragment a user can read and edit, and applied to `model` if given.
//! Not function-preserving (it prunes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Deserialize;
use upmix_ir::Module;

use crate::pass::{Pass, PassContext, PassError};
use crate::prune::{Prune, PruneMethod, PruneTarget};
use crate::sensitivity::{SensitivityRow, SensitivityTable};

/// Pipeline spec: `Plan(table: "sensitivity.json", target: Sparsity(0.5), model: "m",
/// into: "m50", fragment: "plan50.ron")`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A sensitivity table as `upmix sensitivity` writes it (JSON).
    pub table: PathBuf,
    pub target: PlanTarget,
    /// The FDT statistic compared with the threshold: `"p25"` (default: FDT@75, three
    /// prompts in four keep at least that many tokens), `"median"` or `"mean"`.
    #[serde(default)]
    pub statistic: Option<String>,
    /// Where to write the plan as a `Prune` pass (RON).
    #[serde(default)]
    pub fragment: Option<PathBuf>,
    /// The model to prune by the plan (none: only write the fragment).
    #[serde(default)]
    pub model: Option<String>,
    /// Name of the pruned copy of `model` (default: prune `model` itself).
    #[serde(default)]
    pub into: Option<String>,
    /// The method the table was measured with (`Magnitude` default; `Wanda(...)` gives the
    /// calibration text for applying it).
    #[serde(default)]
    pub method: PruneMethod,
}

/// What the plan aims for.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub enum PlanTarget {
    /// A parameter-weighted average sparsity over the table's components.
    Sparsity(f64),
    /// An FDT budget: every component as far as its statistic stays at or above it.
    Fdt(f64),
}

/// A plan: each component's level (row of the table), and what it achieves.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment<'t> {
    pub threshold: f64,
    /// Chosen rows, one per pruned component.
    pub rows: Vec<&'t SensitivityRow>,
    pub average_sparsity: f64,
    /// Parameters of all the table's components.
    pub total_params: f64,
}

impl Plan {
    fn invalid(&self, message: String) -> PassError {
        PassError::Invalid {
            pass: "Plan".into(),
            message,
        }
    }

    fn statistic(&self) -> Result<fn(&SensitivityRow) -> f64, PassError> {
        Ok(match self.statistic.as_deref() {
            None | Some("p25") => |r| r.p25_fdt,
            Some("median") => |r| r.median_fdt,
            Some("mean") => |r| r.mean_fdt,
            Some(other) => {
                return Err(self.invalid(format!(
                    "statistic `{other}` is not `p25`, `median` or `mean`"
                )))
            }
        })
    }

    /// The levels at threshold `tau`.
    fn at<'t>(
        by_component: &BTreeMap<&str, Vec<&'t SensitivityRow>>,
        stat: fn(&SensitivityRow) -> f64,
        tau: f64,
    ) -> Assignment<'t> {
        let (mut zeroed, mut total) = (0.0, 0.0);
        let mut rows = Vec::new();
        for levels in by_component.values() {
            total += levels[0].params as f64;
            let best = levels
                .iter()
                .filter(|r| stat(r) >= tau)
                .max_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
            if let Some(r) = best {
                zeroed += r.sparsity * r.params as f64;
                rows.push(*r);
            }
        }
        Assignment {
            threshold: tau,
            rows,
            average_sparsity: zeroed / total.max(1.0),
            total_params: total.max(1.0),
        }
    }

    /// The threshold sweep over `table`.
    pub fn assign<'t>(&self, table: &'t SensitivityTable) -> Result<Assignment<'t>, PassError> {
        let stat = self.statistic()?;
        let mut by_component: BTreeMap<&str, Vec<&SensitivityRow>> = BTreeMap::new();
        for r in &table.rows {
            by_component.entry(&r.component).or_default().push(r);
        }
        if by_component.is_empty() {
            return Err(self.invalid(format!("table {} has no rows", self.table.display())));
        }
        match self.target {
            PlanTarget::Fdt(f) => Ok(Self::at(&by_component, stat, f)),
            PlanTarget::Sparsity(t) if !(0.0..1.0).contains(&t) => {
                Err(self.invalid(format!("target sparsity {t} is outside [0, 1)")))
            }
            PlanTarget::Sparsity(t) => {
                let mut thresholds: Vec<f64> = table.rows.iter().map(stat).collect();
                thresholds.sort_by(|a, b| b.total_cmp(a));
                thresholds.dedup();
                let mut last = Self::at(&by_component, stat, f64::INFINITY);
                for tau in thresholds {
                    let a = Self::at(&by_component, stat, tau);
                    if a.average_sparsity >= t {
                        return Ok(Self::part_way(last, a, stat, t));
                    }
                    last = a;
                }
                Err(self.invalid(format!(
                    "the table's levels reach at most {:.3} average sparsity, below the target {t}",
                    last.average_sparsity
                )))
            }
        }
    }

    /// The step from `before` to `after` crosses the target `t`: raise the components it
    /// raises one at a time, those with the best statistic at their new level first, and
    /// stop as soon as the average reaches `t`, so that the plan lands on the target
    /// rather than a whole step beyond it.
    fn part_way<'t>(
        before: Assignment<'t>,
        after: Assignment<'t>,
        stat: fn(&SensitivityRow) -> f64,
        t: f64,
    ) -> Assignment<'t> {
        let mut chosen: BTreeMap<&str, &SensitivityRow> = before
            .rows
            .iter()
            .map(|r| (r.component.as_str(), *r))
            .collect();
        let mut raises: Vec<&SensitivityRow> = after
            .rows
            .iter()
            .filter(|r| chosen.get(r.component.as_str()) != Some(r))
            .copied()
            .collect();
        raises.sort_by(|a, b| {
            stat(b)
                .total_cmp(&stat(a))
                .then(a.component.cmp(&b.component))
        });
        let mut average = before.average_sparsity;
        for r in raises {
            let old = chosen.get(r.component.as_str()).map_or(0.0, |o| o.sparsity);
            average += (r.sparsity - old) * r.params as f64 / after.total_params;
            chosen.insert(&r.component, r);
            if average >= t {
                break;
            }
        }
        Assignment {
            threshold: after.threshold,
            rows: chosen.into_values().collect(),
            average_sparsity: average,
            total_params: after.total_params,
        }
    }

    /// The plan as `Prune` targets: one per level, listing its components.
    fn targets(a: &Assignment) -> Vec<PruneTarget> {
        let mut by_pattern: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in &a.rows {
            by_pattern
                .entry(&r.pattern)
                .or_default()
                .push(r.component.clone());
        }
        by_pattern
            .into_iter()
            .map(|(pattern, select)| {
                let (sparsity, pattern) = match pattern.parse::<f64>() {
                    Ok(s) => (Some(s), None),
                    Err(_) => (None, Some(pattern.to_string())),
                };
                PruneTarget {
                    select,
                    layers: None,
                    sparsity,
                    pattern,
                }
            })
            .collect()
    }

    /// The plan as a RON `Prune(...)` pass for a pipeline's `passes` list.
    fn fragment(
        &self,
        a: &Assignment,
        targets: &[PruneTarget],
        table: &SensitivityTable,
    ) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// Plan from {} ({} prompts x {} tokens): threshold {} on FDT {}, average sparsity {:.4} over the table's components.",
            self.table.display(),
            table.prompts,
            table.n,
            a.threshold,
            self.statistic.as_deref().unwrap_or("p25"),
            a.average_sparsity
        );
        let model = self.model.as_deref().unwrap_or(&table.model);
        let _ = writeln!(s, "Prune(\n    model: {model:?},");
        if let Some(into) = &self.into {
            let _ = writeln!(s, "    into: {into:?},");
        }
        if let PruneMethod::Wanda { calibration, .. } = &self.method {
            let _ = writeln!(
                s,
                "    method: Wanda(calibration: {:?}),",
                calibration.display().to_string()
            );
        }
        let _ = writeln!(s, "    targets: [");
        for t in targets {
            let level = match (&t.sparsity, &t.pattern) {
                (Some(v), _) => format!("sparsity: {v}"),
                (_, Some(p)) => format!("pattern: {p:?}"),
                _ => unreachable!("every target has a level"),
            };
            let _ = writeln!(s, "        ({level}, select: [");
            for c in &t.select {
                let _ = writeln!(s, "            {c:?},");
            }
            let _ = writeln!(s, "        ]),");
        }
        let _ = writeln!(s, "    ],\n)");
        s
    }
}

impl Pass for Plan {
    fn name(&self) -> &'static str {
        "Plan"
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let text = std::fs::read_to_string(&self.table)
            .map_err(|e| self.invalid(format!("reading {}: {e}", self.table.display())))?;
        let table: SensitivityTable = serde_json::from_str(&text).map_err(|e| {
            self.invalid(format!(
                "{} is not a sensitivity table: {e}",
                self.table.display()
            ))
        })?;
        let wanda = matches!(self.method, PruneMethod::Wanda { .. });
        if let Some(r) = table.rows.iter().find(|r| (r.method == "wanda") != wanda) {
            return Err(self.invalid(format!(
                "the table was measured with {}, the plan's method is {}",
                r.method,
                if wanda { "wanda" } else { "magnitude" }
            )));
        }
        let a = self.assign(&table)?;
        let targets = Self::targets(&a);
        if let Some(path) = &self.fragment {
            write_atomically(path, &self.fragment(&a, &targets, &table))
                .map_err(|e| self.invalid(format!("writing {}: {e}", path.display())))?;
        }
        cx.notes.push(format!(
            "Plan: threshold {} -> {} of {} components pruned, average sparsity {:.4}",
            a.threshold,
            a.rows.len(),
            table.components(),
            a.average_sparsity
        ));
        let Some(model) = &self.model else {
            return Ok(Vec::new());
        };
        if targets.is_empty() {
            return Err(self.invalid(format!(
                "at threshold {} no component may be pruned",
                a.threshold
            )));
        }
        Prune {
            model: model.clone(),
            into: self.into.clone(),
            method: self.method.clone(),
            scope: None,
            targets,
            ignore: Vec::new(),
        }
        .run(m, cx)
    }

    fn reads(&self) -> Vec<String> {
        self.model.iter().cloned().collect()
    }
}

/// Writes `text` to a temporary file beside `path` (creating its directory), then renames
/// it over `path`.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("ron.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
