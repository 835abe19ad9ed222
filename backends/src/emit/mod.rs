//! Checkpoint emitters: write a graph as files other tools load.
//!
//! Every emitter writes into a temporary directory beside the destination and renames it
//! into place once complete, so a failed or interrupted emit leaves no partial output; it
//! refuses a destination that holds any of the model's own input files; and it streams
//! weights tensor by tensor from the lazy table.

mod hf;
mod safetensors;

pub use hf::{emit_hf, HfEmitOptions, MoeLayout, Progress};

use std::path::{Path, PathBuf};

use thiserror::Error;
use upmix_ir::{Graph, Module, WeightExpr};

/// Errors while emitting a checkpoint.
#[derive(Debug, Error)]
pub enum EmitError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to write {}: it holds an input of the model ({})", dir.display(), input.display())]
    WouldOverwriteInput { dir: PathBuf, input: PathBuf },
    #[error("graph `{graph}` cannot be written as {format}: {message}")]
    Unsupported {
        graph: String,
        format: &'static str,
        message: String,
    },
    #[error("no model named `{0}`")]
    UnknownGraph(String),
    #[error(transparent)]
    Weight(#[from] upmix_ir::WeightError),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EmitError + '_ {
    move |source| EmitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every file the graph reads: mapped weight sources and auxiliary files.
fn input_files(m: &Module, g: &Graph) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = g.meta.aux_files.clone();
    let mut stack = g.weight_ids();
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Ok(w) = m.weights.get(id) else { continue };
        match &w.expr {
            WeightExpr::Source { file, .. } => files.push(file.path().to_path_buf()),
            WeightExpr::Mean(ids) | WeightExpr::Concat(ids) => stack.extend(ids),
            WeightExpr::WeightedSum { terms, .. } => stack.extend(terms.iter().map(|(_, i)| *i)),
            WeightExpr::Scale(_, i)
            | WeightExpr::Rows(i, _)
            | WeightExpr::Columns { of: i, .. } => stack.push(*i),
            WeightExpr::Literal(_) | WeightExpr::Random { .. } => {}
        }
    }
    files.sort();
    files.dedup();
    files
}

/// Writes a directory atomically: `fill` populates a fresh temporary directory beside
/// `dir`, which then replaces `dir`. Refuses when `dir` holds one of the graph's inputs.
pub(crate) fn write_dir_atomically(
    m: &Module,
    g: &Graph,
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<(), EmitError>,
) -> Result<(), EmitError> {
    if dir.exists() {
        let canon = dir.canonicalize().map_err(io(dir))?;
        for input in input_files(m, g) {
            if input.canonicalize().is_ok_and(|p| p.starts_with(&canon)) {
                return Err(EmitError::WouldOverwriteInput {
                    dir: dir.to_path_buf(),
                    input,
                });
            }
        }
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{base}.upmix-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{base}.upmix-old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    Ok(())
}
