//! `Plan`: per-component compression levels from a sensitivity table (module
//! `sensitivity`), by the threshold sweep of Deiseroth et al. 2023 (Divergent Token
//! Metrics, sections 4 and 5: pruning, and which components to quantize).
//!
//! Each level of a component has a *gain*: the fraction of its entries zeroed (pruning
//! tables) or the bits per parameter it saves against the base model (quantization
//! tables). A threshold on the chosen FDT statistic starts at its largest value and is
//! lowered step by step through the values in the table; at each threshold every
//! component gets the level of largest gain whose statistic still reaches it (none: left
//! alone). The sweep stops at the first threshold whose parameter-weighted average gain
//! reaches the target (`Sparsity(t)`; `Bits(b)`: an average of at most `b` bits per
//! parameter), or is that threshold (`Fdt(f)`: a budget). Within the last step the
//! components it raises are raised one at a time, those with the best statistic at their
//! new level first, until the target is reached, so the plan lands on the target rather
//! than a whole step beyond it. The result is written as a `Prune` or `Quantize` pipeline
//! fragment a user can read and edit, and applied to `model` if given. Not
//! function-preserving (it prunes or rounds weights).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use upmix_ir::{DType, Module};

use crate::settings::{ModelLayers, SettingError};
use crate::components::Selector;
use crate::pass::{write_atomically, Pass, PassContext, PassError, PassName};
use crate::prune::{Prune, PruneMethod, PruneTarget};
use crate::quantize::{Quantize, QuantizeTarget};
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
    pub statistic: Statistic,
    /// Where to write the plan as a `Prune` or `Quantize` pass (RON).
    #[serde(default)]
    pub fragment: Option<PathBuf>,
    /// The model to prune by the plan (none: only write the fragment).
    #[serde(default)]
    pub model: Option<String>,
    /// Name of the compressed copy of `model` (default: compress `model` itself).
    #[serde(default)]
    pub into: Option<String>,
    /// The table's levels to choose from, as written in it (`["int8_channel"]`,
    /// `["0.5", "0.9"]`; default: all).
    #[serde(default)]
    pub levels: Option<Vec<String>>,
    /// The pruning method the table was measured with (`Magnitude` default; `Wanda(...)`
    /// gives the calibration text for applying it). Not used by quantization tables.
    #[serde(default)]
    pub method: PruneMethod,
}

/// The FDT statistic of a table row a plan compares with its threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Statistic {
    /// `"p25"`: FDT@75, three prompts in four keep at least that many tokens.
    #[default]
    P25,
    /// `"median"`.
    Median,
    /// `"mean"`.
    Mean,
}

impl Statistic {
    fn of(self) -> fn(&SensitivityRow) -> f64 {
        match self {
            Statistic::P25 => |r| r.p25_fdt,
            Statistic::Median => |r| r.median_fdt,
            Statistic::Mean => |r| r.mean_fdt,
        }
    }
}

impl std::fmt::Display for Statistic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Statistic::P25 => "p25",
            Statistic::Median => "median",
            Statistic::Mean => "mean",
        })
    }
}

impl std::str::FromStr for Statistic {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "p25" => Ok(Statistic::P25),
            "median" => Ok(Statistic::Median),
            "mean" => Ok(Statistic::Mean),
            other => Err(format!(
                "statistic `{other}` is not `p25`, `median` or `mean`"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Statistic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::settings::from_text(d)
    }
}

/// What the plan aims for.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub enum PlanTarget {
    /// A parameter-weighted average sparsity over the table's components (pruning tables).
    Sparsity(f64),
    /// At most this many bits per parameter, averaged over the table's components with
    /// their parameters as weights; a component left alone counts at its base bits
    /// (quantization tables).
    Bits(f64),
    /// An FDT budget: every component as far as its statistic stays at or above it.
    Fdt(f64),
}

/// A plan: each component's level (row of the table), and what it achieves.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment<'t> {
    pub threshold: f64,
    /// Chosen rows, one per compressed component.
    pub rows: Vec<&'t SensitivityRow>,
    /// The parameter-weighted average gain over all the table's components: sparsity, or
    /// bits per parameter saved.
    pub average_gain: f64,
    /// Parameters of all the table's components.
    pub total_params: f64,
    /// Their parameter-weighted average bits in the base model (0 for pruning tables).
    pub base_bits: f64,
}

impl Assignment<'_> {
    /// Average bits per parameter of the table's components under the plan (quantization).
    pub fn average_bits(&self) -> f64 {
        self.base_bits - self.average_gain
    }
}

/// What one level saves: the sparsity of a pruning row, the bits per parameter saved by a
/// quantization row.
pub fn gain(r: &SensitivityRow) -> f64 {
    match (r.bits, r.base_bits) {
        (Some(bits), Some(base)) => base - bits,
        _ => r.sparsity,
    }
}

impl Plan {
    /// The levels at threshold `tau`.
    fn at<'t>(
        by_component: &BTreeMap<&str, Vec<&'t SensitivityRow>>,
        stat: fn(&SensitivityRow) -> f64,
        tau: f64,
    ) -> Assignment<'t> {
        let (mut saved, mut total, mut base) = (0.0, 0.0, 0.0);
        let mut rows = Vec::new();
        for levels in by_component.values() {
            let params = levels[0].params as f64;
            total += params;
            base += levels[0].base_bits.unwrap_or(0.0) * params;
            let best = levels
                .iter()
                .filter(|r| stat(r) >= tau)
                .max_by(|a, b| gain(a).total_cmp(&gain(b)));
            if let Some(r) = best {
                saved += gain(r) * params;
                rows.push(*r);
            }
        }
        Assignment {
            threshold: tau,
            rows,
            average_gain: saved / total.max(1.0),
            total_params: total.max(1.0),
            base_bits: base / total.max(1.0),
        }
    }

    /// The threshold sweep over `table`.
    pub fn assign<'t>(&self, table: &'t SensitivityTable) -> Result<Assignment<'t>, PassError> {
        let stat = self.statistic.of();
        let mut by_component: BTreeMap<&str, Vec<&SensitivityRow>> = BTreeMap::new();
        for r in &table.rows {
            by_component.entry(&r.component).or_default().push(r);
        }
        if by_component.is_empty() {
            return Err(self.invalid(format!("table {} has no rows", self.table.display())));
        }
        let quantizes = is_quantization(table);
        let base = Self::at(&by_component, stat, f64::INFINITY);
        let (target, what) = match self.target {
            PlanTarget::Fdt(f) => return Ok(Self::at(&by_component, stat, f)),
            PlanTarget::Sparsity(_) if quantizes => {
                return Err(self.invalid(
                    "the table measures quantization: give the target as `Bits(b)`".into(),
                ))
            }
            PlanTarget::Bits(_) if !quantizes => {
                return Err(self.invalid(
                    "the table measures pruning: give the target as `Sparsity(s)`".into(),
                ))
            }
            PlanTarget::Sparsity(t) if !(0.0..1.0).contains(&t) => {
                return Err(self.invalid(format!("target sparsity {t} is outside [0, 1)")))
            }
            PlanTarget::Sparsity(t) => (t, "average sparsity"),
            PlanTarget::Bits(b) if !(b > 0.0 && b <= base.base_bits) => {
                return Err(self.invalid(format!(
                    "target {b} bits per parameter is outside (0, {:.3}], the base model's",
                    base.base_bits
                )))
            }
            PlanTarget::Bits(b) => (base.base_bits - b, "bits per parameter saved"),
        };
        let mut thresholds: Vec<f64> = table.rows.iter().map(stat).collect();
        thresholds.sort_by(|a, b| b.total_cmp(a));
        thresholds.dedup();
        let mut last = base;
        for tau in thresholds {
            let a = Self::at(&by_component, stat, tau);
            if a.average_gain >= target {
                return Ok(Self::part_way(last, a, stat, target));
            }
            last = a;
        }
        Err(self.invalid(match self.target {
            PlanTarget::Bits(b) => format!(
                "the table's levels reach at least {:.3} bits per parameter, above the target {b}",
                last.average_bits()
            ),
            _ => format!(
                "the table's levels reach at most {:.3} {what}, below the target {target}",
                last.average_gain
            ),
        }))
    }

    /// The step from `before` to `after` crosses the target `t`: raise the components it
    /// raises one at a time, those with the best statistic at their new level first, and
    /// stop as soon as the average gain reaches `t`, so that the plan lands on the target
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
        let mut average = before.average_gain;
        for r in raises {
            if average >= t {
                break;
            }
            let old = chosen.get(r.component.as_str()).map_or(0.0, |o| gain(o));
            average += (gain(r) - old) * r.params as f64 / after.total_params;
            chosen.insert(&r.component, r);
        }
        Assignment {
            rows: chosen.into_values().collect(),
            average_gain: average,
            ..after
        }
    }

    /// The chosen components by level (`0.9`, `2:4`, `q4_0`), in level order.
    fn by_level<'t>(a: &Assignment<'t>) -> BTreeMap<&'t str, Vec<String>> {
        let mut out: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for r in &a.rows {
            out.entry(&r.pattern).or_default().push(r.component.clone());
        }
        out
    }

    /// The plan as a `Prune` pass: one target per level, listing its components.
    fn prune(&self, model: &str, a: &Assignment) -> Result<Prune, PassError> {
        let mut targets = Vec::new();
        for (level, names) in Self::by_level(a) {
            let (sparsity, pattern) = match level.parse::<f64>() {
                Ok(s) => (Some(s), None),
                Err(_) => (None, Some(level.parse().map_err(|e| self.invalid(e))?)),
            };
            targets.push(PruneTarget {
                select: self.selectors(&names)?,
                layers: None,
                sparsity,
                pattern,
            });
        }
        Ok(Prune {
            model: model.into(),
            into: self.into.clone(),
            method: self.method.clone(),
            scope: None,
            targets,
            ignore: Vec::new(),
        })
    }

    /// The plan as a `Quantize` pass: one target per type; other components are kept.
    fn quantize(&self, model: &str, a: &Assignment) -> Result<Quantize, PassError> {
        let mut targets = Vec::new();
        for (level, names) in Self::by_level(a) {
            let dtype = DType::parse(level)
                .ok_or_else(|| self.invalid(format!("level `{level}` is not a type")))?;
            targets.push(QuantizeTarget {
                select: self.selectors(&names)?,
                layers: None,
                dtype,
            });
        }
        Ok(Quantize {
            model: model.into(),
            into: self.into.clone(),
            dtype: None,
            targets,
            ignore: Vec::new(),
        })
    }

    /// Selectors of exactly the components `names`.
    fn selectors(&self, names: &[String]) -> Result<Vec<Selector>, PassError> {
        names
            .iter()
            .map(|n| Selector::parse(n).map_err(|e| self.invalid(e)))
            .collect()
    }

    /// The plan as a RON pass for a pipeline's `passes` list, after a comment saying where
    /// it comes from.
    fn fragment(&self, a: &Assignment, table: &SensitivityTable) -> String {
        let mut s = String::new();
        let achieved = match is_quantization(table) {
            true => format!("{:.4} bits per parameter", a.average_bits()),
            false => format!("average sparsity {:.4}", a.average_gain),
        };
        let _ = writeln!(
            s,
            "// Plan from {} ({} prompts x {} tokens): threshold {} on FDT {}, {achieved} over the table's components.",
            self.table.display(),
            table.prompts,
            table.n,
            a.threshold,
            self.statistic,
        );
        let model = self.model.as_deref().unwrap_or(&table.model);
        let name = if is_quantization(table) {
            "Quantize"
        } else {
            "Prune"
        };
        let _ = writeln!(s, "{name}(\n    model: {model:?},");
        if let Some(into) = &self.into {
            let _ = writeln!(s, "    into: {into:?},");
        }
        if let (false, PruneMethod::Wanda { calibration, .. }) =
            (is_quantization(table), &self.method)
        {
            let _ = writeln!(
                s,
                "    method: Wanda(calibration: {:?}),",
                calibration.display().to_string()
            );
        }
        let _ = writeln!(s, "    targets: [");
        for (level, select) in Self::by_level(a) {
            let level = match (is_quantization(table), level.parse::<f64>()) {
                (true, _) => format!("dtype: {level:?}"),
                (false, Ok(v)) => format!("sparsity: {v}"),
                (false, Err(_)) => format!("pattern: {level:?}"),
            };
            let _ = writeln!(s, "        ({level}, select: [");
            for c in select {
                let _ = writeln!(s, "            {c:?},");
            }
            let _ = writeln!(s, "        ]),");
        }
        let _ = writeln!(s, "    ],\n)");
        s
    }

    fn read_table(&self) -> Result<SensitivityTable, PassError> {
        let text = std::fs::read_to_string(&self.table)
            .map_err(|e| self.invalid(format!("reading {}: {e}", self.table.display())))?;
        let mut table: SensitivityTable = serde_json::from_str(&text).map_err(|e| {
            self.invalid(format!(
                "{} is not a sensitivity table: {e}",
                self.table.display()
            ))
        })?;
        if let Some(levels) = &self.levels {
            if let Some(missing) = levels
                .iter()
                .find(|l| !table.rows.iter().any(|r| &r.pattern == *l))
            {
                return Err(
                    self.invalid(format!("{} has no level `{missing}`", self.table.display()))
                );
            }
            table.rows.retain(|r| levels.contains(&r.pattern));
        }
        let quantizes = is_quantization(&table);
        let wanda = matches!(self.method, PruneMethod::Wanda { .. });
        for r in &table.rows {
            let consistent = match quantizes {
                true => r.method == "quantize" && r.bits.is_some() && r.base_bits.is_some(),
                false => r.method == if wanda { "wanda" } else { "magnitude" },
            };
            if !consistent {
                return Err(self.invalid(format!(
                    "{}: row `{}` ({} {}) does not fit a plan of {}: a table measures one method",
                    self.table.display(),
                    r.component,
                    r.method,
                    r.pattern,
                    match (quantizes, wanda) {
                        (true, _) => "quantization",
                        (false, true) => "wanda pruning",
                        (false, false) => "magnitude pruning",
                    }
                )));
            }
        }
        Ok(table)
    }
}

/// Whether a table measures quantization (its first row does; [`Plan`] checks the rest).
fn is_quantization(table: &SensitivityTable) -> bool {
    table.rows.first().is_some_and(|r| r.method == "quantize")
}

impl Pass for Plan {
    fn check(&self, models: &mut ModelLayers) -> Result<(), SettingError> {
        if let (Some(model), Some(into)) = (&self.model, &self.into) {
            models.derive(into, model);
        }
        Ok(())
    }

    fn resolve_paths(&mut self, resolve: &dyn Fn(&Path) -> PathBuf) {
        self.table = resolve(&self.table);
        self.fragment = self.fragment.as_deref().map(resolve);
        self.method.resolve_paths(resolve);
    }

    fn run(&self, m: &mut Module, cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let table = self.read_table()?;
        let a = self.assign(&table)?;
        if let Some(path) = &self.fragment {
            write_atomically(path, self.fragment(&a, &table).as_bytes())
                .map_err(|e| self.invalid(format!("writing {}: {e}", path.display())))?;
        }
        let quantizes = is_quantization(&table);
        cx.notes.push(format!(
            "Plan: threshold {} -> {} of {} components {}, {}",
            a.threshold,
            a.rows.len(),
            table.components(),
            if quantizes { "quantized" } else { "pruned" },
            match quantizes {
                true => format!("{:.4} bits per parameter", a.average_bits()),
                false => format!("average sparsity {:.4}", a.average_gain),
            }
        ));
        let Some(model) = &self.model else {
            return Ok(Vec::new());
        };
        if a.rows.is_empty() {
            return Err(self.invalid(format!(
                "at threshold {} no component may be {}",
                a.threshold,
                if quantizes { "quantized" } else { "pruned" }
            )));
        }
        match quantizes {
            true => self.quantize(model, &a)?.run(m, cx),
            false => self.prune(model, &a)?.run(m, cx),
        }
    }

    fn reads(&self) -> Vec<String> {
        self.model.iter().cloned().collect()
    }
}
