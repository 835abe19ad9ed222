//! upmix-emit: checkpoint emitters, which write a graph as files other tools load.
//!
//! Every emitter writes through [`output`]: into a temporary sibling of the destination
//! that replaces it once complete, never over the model's own inputs, never over files
//! upmix did not write (unless told to overwrite); and it streams weights tensor by
//! tensor from the lazy table.

mod gguf;
mod hf;
mod hf_config;
mod hf_config_family;
mod hf_family;
mod hf_names;
mod jetmoe;
mod output;
mod safetensors;
mod stack;
mod stream;

pub use gguf::{emit_gguf, GgufEmitOptions, GgufEmitReport};
pub use hf::{emit_hf, HfEmitOptions, Progress};
pub use hf_names::MoeLayout;
pub use output::{write_dir_atomically, write_file_atomically, MANIFEST};

use std::path::{Path, PathBuf};

use thiserror::Error;
use upmix_ir::{Graph, Module, Router, Weight, WeightExpr, WeightId, WeightTable};

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
    #[error("refusing to replace {}: {} ({why}); write to a new or empty directory, or say `overwrite: true` in the pipeline (`--overwrite` on the command line) to replace it", dest.display(), file.display())]
    Foreign {
        dest: PathBuf,
        file: PathBuf,
        why: &'static str,
    },
    #[error("no space left on the device to write {} ({}: {detail}); nothing was changed there", dest.display(), path.display())]
    DiskFull {
        path: PathBuf,
        dest: PathBuf,
        detail: String,
    },
    #[error("graph `{graph}` cannot be written as {format}: {message}")]
    Unsupported {
        graph: String,
        format: &'static str,
        message: String,
    },
    #[error("nothing was written: {errors}")]
    Invalid {
        graph: String,
        errors: upmix_ir::VerifyErrors,
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

/// Graph `graph` of `m`, verified: a loaded checkpoint goes straight to an emitter when no
/// pass ran, so it is checked like a pass's output and a malformed graph is an error
/// rather than an index out of bounds.
pub(crate) fn verified<'m>(m: &'m Module, graph: &str) -> Result<&'m Graph, EmitError> {
    let g = m
        .graph(graph)
        .ok_or_else(|| EmitError::UnknownGraph(graph.to_string()))?;
    upmix_ir::verify(g, &m.weights).map_err(|errors| EmitError::Invalid {
        graph: graph.to_string(),
        errors,
    })?;
    Ok(g)
}

/// Every file the graph reads: its checkpoints' weight files, its config and auxiliary
/// files.
pub(crate) fn input_files(m: &Module, g: &Graph) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = g.meta.aux_files.clone();
    files.extend(g.meta.config_file.clone());
    for id in m.weights.source_weights(&g.weight_ids()) {
        if let Ok(WeightExpr::Source { file, .. }) = m.weights.get(id).map(|w| &w.expr) {
            files.push(file.path().to_path_buf());
        }
    }
    files.sort();
    files.dedup();
    files
}

/// The router matrix (`[experts, hidden]`) of a mixture in `layer`, for a format whose
/// routers are plain matrices: a projected (Nexus) router's rows are computed once, stored
/// in the projection's dtype and added to `table`.
pub(crate) fn router_rows(
    table: &mut WeightTable,
    layer: usize,
    router: &Router,
) -> Result<WeightId, EmitError> {
    let p = match router {
        Router::Rows(id) => return Ok(*id),
        Router::Projected(p) => p,
    };
    let rows = p.rows(table)?;
    let dtype = table.get(p.projection.down)?.dtype;
    Ok(table.add(Weight {
        name: upmix_formats::canonical(upmix_formats::Role::Router, layer, 0),
        shape: rows.shape.clone(),
        dtype,
        expr: WeightExpr::Literal(std::sync::Arc::new(rows)),
    })?)
}
