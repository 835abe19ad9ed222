//! `upmix inspect --check`: every tensor of a loaded checkpoint scanned for NaN and Inf.
//!
//! The tensors are the checkpoint's own (the `Source` weights behind a graph), read one
//! at a time per worker thread in parallel, so memory stays at a few tensors whatever the
//! checkpoint's size. Findings name the file and the tensor as the checkpoint names it
//! (its safetensors or GGUF name), falling back to the canonical name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;
use upmix_frontend::{GgufFile, SafetensorsFile};
use upmix_ir::{DType, Module, NonFinite, WeightExpr, WeightId};

/// A checkpoint tensor holding NaN or Inf values.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFiniteTensor {
    pub file: PathBuf,
    /// The checkpoint's name for the tensor (or the canonical name if none is found).
    pub name: String,
    /// The canonical name of the part scanned, when that is only part of the checkpoint
    /// tensor (e.g. one expert of a fused stack).
    pub part: Option<String>,
    pub count: NonFinite,
}

impl std::fmt::Display for NonFiniteTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: `{}`", self.file.display(), self.name)?;
        if let Some(part) = &self.part {
            write!(f, " (part `{part}`)")?;
        }
        write!(f, ": {}", self.count)
    }
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckReport {
    /// Weights scanned: checkpoint tensors, or parts of them that are separate weights.
    pub tensors: usize,
    /// Those holding NaN or Inf, by file and position in the file.
    pub non_finite: Vec<NonFiniteTensor>,
}

impl CheckReport {
    /// Distinct checkpoint tensors holding NaN or Inf values (several findings may be
    /// parts of one fused tensor).
    pub fn bad_tensors(&self) -> usize {
        let names: HashSet<_> = self.non_finite.iter().map(|t| (&t.file, &t.name)).collect();
        names.len()
    }
}

/// Scans every checkpoint tensor behind graph `graph` of `m`.
pub fn check_non_finite(m: &Module, graph: &str) -> Result<CheckReport> {
    let g = m
        .graph(graph)
        .with_context(|| format!("no model named `{graph}`"))?;
    let mut sources = m.weights.source_weights(&g.weight_ids());
    // One scan per checkpoint tensor, however many weights read it.
    let mut seen = HashSet::new();
    sources.retain(|id| match m.weights.get(*id).map(|w| &w.expr) {
        Ok(WeightExpr::Source { file, offset, .. }) => {
            seen.insert((file.path().to_path_buf(), *offset))
        }
        _ => false,
    });
    let counts: Vec<(WeightId, NonFinite)> = sources
        .par_iter()
        .map(|id| Ok((*id, m.weights.count_non_finite(*id)?)))
        .collect::<Result<_, upmix_ir::WeightError>>()?;
    let mut bad: Vec<Finding> = Vec::new();
    for (id, count) in counts.into_iter().filter(|(_, c)| c.any()) {
        let w = m.weights.get(id)?;
        if let WeightExpr::Source {
            file,
            offset,
            dtype,
        } = &w.expr
        {
            bad.push(Finding {
                file: file.path().to_path_buf(),
                offset: *offset,
                len: dtype.nbytes(&w.shape).unwrap_or(0),
                canonical: w.name.clone(),
                count,
            });
        }
    }
    bad.sort_by(|a, b| (&a.file, a.offset).cmp(&(&b.file, b.offset)));
    let non_finite = with_checkpoint_names(bad)?;
    Ok(CheckReport {
        tensors: sources.len(),
        non_finite,
    })
}

/// A source weight holding NaN or Inf values: where its bytes lie, and what it holds.
struct Finding {
    file: PathBuf,
    offset: usize,
    len: usize,
    canonical: String,
    count: NonFinite,
}

/// Names each finding after the checkpoint tensor whose bytes it reads (a part of one
/// when it reads only some of them).
fn with_checkpoint_names(findings: Vec<Finding>) -> Result<Vec<NonFiniteTensor>> {
    let mut tensors: HashMap<PathBuf, BTreeMap<usize, (String, usize)>> = HashMap::new();
    let mut out = Vec::with_capacity(findings.len());
    for f in findings {
        if !tensors.contains_key(&f.file) {
            tensors.insert(f.file.clone(), checkpoint_tensors(&f.file)?);
        }
        let (name, part) = match tensors[&f.file].range(..=f.offset).next_back() {
            Some((start, (name, len))) if (*start, *len) == (f.offset, f.len) => {
                (name.clone(), None)
            }
            // Part of a larger tensor (e.g. one expert of a fused stack).
            Some((_, (name, _))) => (name.clone(), Some(f.canonical)),
            None => (f.canonical, None),
        };
        out.push(NonFiniteTensor {
            file: f.file,
            name,
            part,
            count: f.count,
        });
    }
    Ok(out)
}

/// The tensors of the checkpoint file `path`: name and byte length by the absolute byte
/// offset of their data.
fn checkpoint_tensors(path: &Path) -> Result<BTreeMap<usize, (String, usize)>> {
    let entry = |name: String, offset: usize, dtype: DType, shape: &[usize]| {
        let len = dtype.nbytes(shape).unwrap_or(0);
        (offset, (name, len))
    };
    Ok(if path.extension().is_some_and(|e| e == "gguf") {
        let gguf = GgufFile::open(path)?;
        gguf.tensors
            .into_iter()
            .map(|(name, t)| entry(name, t.offset, t.dtype, &t.shape))
            .collect()
    } else {
        let st = SafetensorsFile::open(path)?;
        st.tensors
            .into_iter()
            .map(|(name, t)| entry(name, t.offset, t.dtype, &t.shape))
            .collect()
    })
}
