//! `upmix sensitivity`: the per-component sweep (`upmix_passes::sensitivity`) fed from
//! files, and its outputs: `sensitivity.json` (what the `Plan` pass reads),
//! `sensitivity.csv`, and a heat-map per level (`heatmap-LEVEL.svg`, layers x components,
//! coloured by mean FDT).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::Exec;
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use upmix_backends::Activations;
use upmix_ir::Module;
use upmix_passes::sensitivity::{Compression, SensitivityTable, Sweep};
use upmix_passes::{calibration_norms, ActivationNorms};

use crate::dtm::{base_continuations, encode_prompts, read_prompts};
use crate::eval::tokenizer_of;

/// What to sweep.
pub struct SensitivityOptions {
    pub prompts: PathBuf,
    pub n: usize,
    pub levels: Vec<Compression>,
    /// Calibration text for Wanda levels, run in windows of `window` tokens.
    pub calibration: Option<PathBuf>,
    pub window: usize,
    pub exec: Exec,
}

/// Runs the sweep over every component of `model`.
pub fn sweep(
    m: &Module,
    model: &str,
    opts: &SensitivityOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<SensitivityTable> {
    if opts.n == 0 {
        bail!("the continuation length must be at least 1 token");
    }
    let quantizes = opts
        .levels
        .iter()
        .any(|l| matches!(l, Compression::Quantize(_)));
    if quantizes && opts.exec.activations != Activations::Float {
        bail!(
            "quantization levels are measured with float activations (each variant swaps in \
             the dequantized values): drop --activations ggml"
        );
    }
    let prompts = read_prompts(&opts.prompts)?;
    let prompt_ids = encode_prompts(m, model, &prompts)?;
    let (ys, _) = base_continuations(m, model, &prompt_ids, opts.n, &opts.exec)?;
    let mut rt = opts.exec.load(m, model)?;
    let norms: ActivationNorms = if opts.levels.iter().any(|l| l.wanda()) {
        let Some(path) = &opts.calibration else {
            bail!("wanda levels need a calibration text (--calibration FILE)");
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading calibration text {}", path.display()))?;
        let ids = tokenizer_of(m, model)?.encode(&text, false)?;
        let Some(norms) = calibration_norms(rt.as_mut(), &ids, opts.window, None)? else {
            bail!(
                "calibration text {} has fewer than two tokens",
                path.display()
            );
        };
        norms
    } else {
        HashMap::new()
    };
    let g = m
        .graph(model)
        .with_context(|| format!("no model named `{model}`"))?;
    let table = Sweep {
        graph: g,
        weights: &m.weights,
        prompts: &prompt_ids,
        continuations: &ys,
        levels: &opts.levels,
        norms: &norms,
    }
    .run(rt.as_mut(), progress)?;
    Ok(table)
}

/// Writes `sensitivity.json`, `sensitivity.csv` and the heat-maps into `dir` (created if
/// needed; each file written whole, then renamed into place). Returns the paths.
pub fn write_outputs(table: &SensitivityTable, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let json = serde_json::to_string_pretty(table)?;
    written.push(write_file(dir, "sensitivity.json", json.as_bytes())?);
    written.push(write_file(dir, "sensitivity.csv", csv(table).as_bytes())?);
    let mut levels: Vec<(&str, &str)> = Vec::new();
    for r in &table.rows {
        if !levels.contains(&(&r.method, &r.pattern)) {
            levels.push((&r.method, &r.pattern));
        }
    }
    for (method, pattern) in levels {
        let name = format!("heatmap-{method}-{}.svg", pattern.replace(':', "of"));
        let svg = heatmap(table, method, pattern)?;
        written.push(write_file(dir, &name, svg.as_bytes())?);
    }
    Ok(written)
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(name);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn csv(table: &SensitivityTable) -> String {
    let mut s = String::from(
        "component,layer,part,params,method,pattern,sparsity,bits,base_bits,mean_fdt,median_fdt,p25_fdt,mean_sdt,perplexity\n",
    );
    for r in &table.rows {
        let layer = r.layer.map_or(String::new(), |l| l.to_string());
        let bits = r.bits.map_or(String::new(), |b| b.to_string());
        let base_bits = r.base_bits.map_or(String::new(), |b| b.to_string());
        let _ = writeln!(
            s,
            "{},{layer},{},{},{},{},{},{bits},{base_bits},{},{},{},{},{}",
            r.component,
            r.part,
            r.params,
            r.method,
            r.pattern,
            r.sparsity,
            r.mean_fdt,
            r.median_fdt,
            r.p25_fdt,
            r.mean_sdt,
            r.perplexity
        );
    }
    s
}

/// A layers x components grid of one level, each cell coloured by mean FDT (0: red,
/// `n`: green) with the value written in it.
fn heatmap(table: &SensitivityTable, method: &str, pattern: &str) -> Result<String> {
    let rows: Vec<_> = table
        .rows
        .iter()
        .filter(|r| r.method == method && r.pattern == pattern)
        .collect();
    let mut parts: Vec<&str> = Vec::new();
    for r in &rows {
        if !parts.contains(&r.part.as_str()) {
            parts.push(&r.part);
        }
    }
    let layers = rows
        .iter()
        .filter_map(|r| r.layer)
        .max()
        .map_or(0, |l| l + 1);
    let cell: BTreeMap<(usize, &str), f64> = rows
        .iter()
        .filter_map(|r| Some(((r.layer?, r.part.as_str()), r.mean_fdt)))
        .collect();
    let (cw, ch, left, top) = (64i32, 18i32, 60i32, 56i32);
    let width = (left + cw * parts.len() as i32 + 20) as u32;
    let height = (top + ch * layers as i32 + 40) as u32;
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the heat-map: {e:?}");
        area.fill(&WHITE).map_err(err)?;
        let title = format!(
            "{}: mean FDT over {} prompts x {} tokens, each component {} alone ({method} {pattern})",
            table.model,
            table.prompts,
            table.n,
            if method == "quantize" { "quantized" } else { "pruned" },
        );
        let style = ("sans-serif", 12).into_font().color(&BLACK);
        area.draw(&Text::new(title, (8, 8), style.clone()))
            .map_err(err)?;
        for (j, part) in parts.iter().enumerate() {
            let x = left + cw * j as i32 + 4;
            area.draw(&Text::new(part.to_string(), (x, top - 16), style.clone()))
                .map_err(err)?;
        }
        let n = table.n.max(1) as f64;
        for l in 0..layers {
            let y = top + ch * l as i32;
            area.draw(&Text::new(format!("layer {l}"), (4, y + 3), style.clone()))
                .map_err(err)?;
            for (j, part) in parts.iter().enumerate() {
                let Some(&v) = cell.get(&(l, *part)) else {
                    continue;
                };
                let x = left + cw * j as i32;
                let t = (v / n).clamp(0.0, 1.0);
                let colour = RGBColor(
                    (230.0 * (1.0 - t) + 40.0 * t) as u8,
                    (60.0 * (1.0 - t) + 170.0 * t) as u8,
                    (50.0 * (1.0 - t) + 80.0 * t) as u8,
                );
                area.draw(&Rectangle::new(
                    [(x, y), (x + cw - 2, y + ch - 2)],
                    colour.filled(),
                ))
                .map_err(err)?;
                let label = ("sans-serif", 11).into_font().color(&WHITE);
                area.draw(&Text::new(format!("{v:.1}"), (x + 6, y + 3), label))
                    .map_err(err)?;
            }
        }
        area.present().map_err(err)?;
    }
    Ok(svg)
}
