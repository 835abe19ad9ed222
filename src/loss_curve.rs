//! Draws a `Train` loss curve (the CSV of its `log` field) as an SVG next to it: the
//! training loss and every evaluated cross-entropy against the step.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

/// Colours of the curves, the training loss first.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Reads the loss CSV at `csv` and writes its curve to the same path with `.svg`;
/// returns that path.
pub fn draw(csv: &Path) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let mut wanted = vec![("train loss".to_string(), column("loss"))];
    for (i, h) in header.iter().enumerate() {
        if let Some(name) = h.strip_prefix("eval_") {
            wanted.push((format!("eval {name}"), Some(i)));
        }
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let curves: Vec<(String, Vec<(f64, f64)>)> = wanted
        .into_iter()
        .filter_map(|(name, i)| {
            let i = i?;
            let points = rows
                .iter()
                .filter_map(|r| Some((r.first()?.parse().ok()?, r.get(i)?.parse().ok()?)))
                .filter(|(_, y): &(f64, f64)| y.is_finite())
                .collect();
            Some((name, points))
        })
        .collect();
    let svg = render(
        &curves,
        &csv.file_name().unwrap_or_default().to_string_lossy(),
    )?;
    let out = csv.with_extension("svg");
    upmix_passes::write_atomically(&out, svg.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// The SVG of `curves` (name, (step, value) points).
fn render(curves: &[(String, Vec<(f64, f64)>)], title: &str) -> Result<String> {
    let points = curves.iter().flat_map(|(_, p)| p);
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x1, y0, y1) = (x1.max(x), y0.min(y), y1.max(y));
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let (w, h, left, right, top, bottom) = (720i32, 420i32, 64i32, 16i32, 36i32, 40i32);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let at = |x: f64, y: f64| {
        let px = left + ((x - 1.0) / (x1 - 1.0).max(1.0) * pw as f64).round() as i32;
        let py = top + ((y1 - y) / (y1 - y0) * ph as f64).round() as i32;
        (px, py)
    };
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, (w as u32, h as u32)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing the loss curve: {e:?}");
        area.fill(&WHITE).map_err(err)?;
        let style = ("sans-serif", 12).into_font().color(&BLACK);
        area.draw(&Text::new(title.to_string(), (left, 10), style.clone()))
            .map_err(err)?;
        let frame = [
            (left, top),
            (left + pw, top),
            (left + pw, top + ph),
            (left, top + ph),
            (left, top),
        ];
        area.draw(&PathElement::new(frame.to_vec(), BLACK))
            .map_err(err)?;
        for k in 0..=4 {
            let y = y0 + (y1 - y0) * k as f64 / 4.0;
            let (_, py) = at(1.0, y);
            area.draw(&PathElement::new(vec![(left - 4, py), (left, py)], BLACK))
                .map_err(err)?;
            area.draw(&Text::new(format!("{y:.3}"), (4, py - 6), style.clone()))
                .map_err(err)?;
            let step = 1.0 + (x1 - 1.0) * k as f64 / 4.0;
            let (px, _) = at(step, y0);
            area.draw(&Text::new(
                format!("{step:.0}"),
                (px - 8, top + ph + 8),
                style.clone(),
            ))
            .map_err(err)?;
        }
        area.draw(&Text::new(
            "step",
            (left + pw / 2 - 12, h - 16),
            style.clone(),
        ))
        .map_err(err)?;
        for (i, (name, points)) in curves.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let path: Vec<(i32, i32)> = points.iter().map(|&(x, y)| at(x, y)).collect();
            if path.len() == 1 {
                area.draw(&Circle::new(path[0], 3, colour.filled()))
                    .map_err(err)?;
            }
            area.draw(&PathElement::new(path, colour.stroke_width(2)))
                .map_err(err)?;
            let (lx, ly) = (left + pw - 150, top + 8 + 16 * i as i32);
            area.draw(&PathElement::new(
                vec![(lx, ly + 6), (lx + 20, ly + 6)],
                colour.stroke_width(2),
            ))
            .map_err(err)?;
            area.draw(&Text::new(name.clone(), (lx + 26, ly), style.clone()))
                .map_err(err)?;
        }
        area.present().map_err(err)?;
    }
    Ok(svg)
}
