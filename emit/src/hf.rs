//! Hugging Face checkpoint emitter: config.json + safetensors (sharded with an index above
//! a size), tokenizer files copied through.
//!
//! The architecture follows from the graph (module `stack` reads it by its ops): a dense
//! sequential stack is `LlamaForCausalLM` (`MistralForCausalLM` with a sliding window),
//! or `Qwen2ForCausalLM` when attention has q/k/v biases; a stack whose FFNs are all
//! routed MoEs without a shared expert is `MixtralForCausalLM` (classic per-expert layout,
//! which every Mixtral loader reads), with a gated shared expert in every layer
//! `Qwen2MoeForCausalLM`; parallel blocks with LayerNorms are `CohereForCausalLM`, or
//! `Cohere2ForCausalLM` with sliding-window layers and global layers without RoPE. Tensor
//! names come from the `upmix-formats` table the frontend reads with.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use upmix_formats::{hf, Family};
use upmix_ir::{Module, WeightId, WeightTable};

use super::hf_config::config_json;
use super::hf_family::architecture;
use super::hf_names::{tensor_list, MoeLayout, Names};
use super::jetmoe;
use super::safetensors::write_safetensors;
use super::stack::read_stack;
use super::{input_files, io, verified, write_dir_atomically, EmitError};

/// Options of [`emit_hf`].
#[derive(Clone)]
pub struct HfEmitOptions {
    /// Start a new shard when the current one would pass this many bytes.
    pub max_shard_bytes: u64,
    /// How Mixtral experts are laid out on disk.
    pub moe_layout: MoeLayout,
    /// Called after each tensor is written with `(bytes written, total bytes)`, e.g. to
    /// drive a progress bar.
    pub progress: Option<Arc<Progress>>,
    /// Replace an existing destination even when it holds files upmix did not write.
    pub overwrite: bool,
    /// Write this architecture instead of the one the graph maps to by default: today
    /// `JetMoeForCausalLM`, for a BAM model with shared K/V and top-k routing (module
    /// `jetmoe`). A graph the architecture cannot express is an error saying why.
    pub architecture: Option<String>,
    /// Write quantized weights dequantized, as f32. Without it a graph with quantized
    /// weights is refused: safetensors has no quantized formats, and a silent f32 copy
    /// would be four to eight times the size the user asked for.
    pub dequantize: bool,
}

/// A progress callback: `(bytes written so far, total bytes)`.
pub type Progress = dyn Fn(u64, u64) + Send + Sync;

impl std::fmt::Debug for HfEmitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfEmitOptions")
            .field("max_shard_bytes", &self.max_shard_bytes)
            .field("moe_layout", &self.moe_layout)
            .field("progress", &self.progress.is_some())
            .field("overwrite", &self.overwrite)
            .field("architecture", &self.architecture)
            .field("dequantize", &self.dequantize)
            .finish()
    }
}

impl Default for HfEmitOptions {
    fn default() -> Self {
        HfEmitOptions {
            max_shard_bytes: 4 << 30,
            moe_layout: MoeLayout::Classic,
            progress: None,
            overwrite: false,
            architecture: None,
            dequantize: false,
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct HfEmitReport {
    pub architecture: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    pub shards: usize,
    /// Quantized weights written dequantized, as f32.
    pub dequantized: usize,
}

const FORMAT: &str = "a Hugging Face checkpoint";

/// The remote-code module written beside an `UpmixBamForCausalLM` checkpoint, so that
/// transformers loads it with `trust_remote_code=True` (`auto_map` in its config.json).
const UPMIX_BAM_CODE: &[(&str, &str)] = &[
    (
        "configuration_upmix_bam.py",
        include_str!("remote_code/configuration_upmix_bam.py"),
    ),
    (
        "modeling_upmix_bam.py",
        include_str!("remote_code/modeling_upmix_bam.py"),
    ),
];

/// Writes graph `graph` of `m` to `dir` as a Hugging Face checkpoint.
pub fn emit_hf(
    m: &Module,
    graph: &str,
    dir: &Path,
    opts: &HfEmitOptions,
) -> Result<HfEmitReport, EmitError> {
    let g = verified(m, graph)?;
    let stack = read_stack(g, FORMAT)?;
    let unsupported = |message: String| EmitError::Unsupported {
        graph: graph.to_string(),
        format: FORMAT,
        message,
    };
    let quantized = quantized_weights(&m.weights, &g.weight_ids())?;
    if !quantized.is_empty() && !opts.dequantize {
        return Err(unsupported(format!(
            "{} of its weights are quantized ({}); safetensors has no quantized formats. \
             Write a GGUF file instead (`Gguf` emit, `upmix convert`), or ask for f32 \
             copies with `dequantize: true` (`--dequantize`)",
            quantized.len(),
            summary(&quantized, 3)
        )));
    }
    let (arch, family) = match opts.architecture.as_deref() {
        Some("JetMoeForCausalLM") => {
            jetmoe::check(&stack).map_err(&unsupported)?;
            ("JetMoeForCausalLM", Family::JetMoe)
        }
        asked => {
            // Asked for another architecture, Nexus routers are written as their rows.
            let plain_routers = asked.is_some_and(|a| a != hf::architecture(Family::UpmixBam).0);
            let found = architecture(&stack, plain_routers, &unsupported)?;
            if asked.is_some_and(|a| a != found.0) {
                return Err(unsupported(format!(
                    "it is written as {} (JetMoeForCausalLM may be asked for BAM models, and \
                     the plain MoE architecture for Nexus models), not {}",
                    found.0,
                    asked.unwrap_or_default()
                )));
            }
            found
        }
    };
    // Fused experts are new (concatenated) tensors: add them to a copy of the table.
    let mut table = m.weights.clone();
    let layout = match family {
        Family::Mixtral => opts.moe_layout,
        _ => MoeLayout::Classic,
    };
    let tensors = match family {
        Family::JetMoe => {
            let mut t = Names::new(family);
            jetmoe::tensors(&stack, &mut t, &mut table)?;
            t.list
        }
        _ => tensor_list(&stack, family, layout, &mut table, &unsupported)?,
    };
    let config = config_json(m, g, &stack, family, &unsupported)?;

    // Split into shards by size, keeping the tensor order.
    let mut shards: Vec<Vec<(String, WeightId)>> = vec![Vec::new()];
    let (mut size, mut all_bytes) = (0u64, 0u64);
    for (name, id) in tensors.iter().cloned() {
        let w = table.get(id)?;
        let n = (w.numel() * w.dtype.plain().size()) as u64;
        if size > 0 && size + n > opts.max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        all_bytes += n;
        shards.last_mut().expect("one shard").push((name, id));
    }
    let written = std::sync::atomic::AtomicU64::new(0);
    let report = |n: u64| {
        let so_far = written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(progress) = &opts.progress {
            progress(so_far, all_bytes);
        }
    };
    let count = shards.len();
    let file_name = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut total = 0u64;
    let inputs = input_files(m, g);
    write_dir_atomically(dir, &inputs, opts.overwrite, all_bytes, |tmp| {
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            total += write_safetensors(&tmp.join(file_name(i)), &table, shard, &report)?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), Value::String(file_name(i)));
            }
        }
        if count > 1 {
            let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            write_json(&tmp.join("model.safetensors.index.json"), &index)?;
        }
        write_json(&tmp.join("config.json"), &config)?;
        if family == Family::UpmixBam {
            for (file, text) in UPMIX_BAM_CODE {
                let path = tmp.join(file);
                std::fs::write(&path, text).map_err(io(&path))?;
            }
        }
        for aux in &g.meta.aux_files {
            copy_aux(aux, tmp)?;
        }
        Ok(())
    })?;
    Ok(HfEmitReport {
        architecture: arch,
        tensors: tensors.len(),
        bytes: total,
        shards: count,
        dequantized: quantized.len(),
    })
}

/// The quantized weights among `ids`, as `(name, dtype)`.
pub(crate) fn quantized_weights(
    table: &WeightTable,
    ids: &[WeightId],
) -> Result<Vec<(String, upmix_ir::DType)>, EmitError> {
    let mut out = Vec::new();
    for id in ids {
        let w = table.get(*id)?;
        if w.dtype.is_quantized() {
            out.push((w.name.clone(), w.dtype));
        }
    }
    Ok(out)
}

/// The first `n` of `named` as `name: dtype`, and how many more.
pub(crate) fn summary(named: &[(String, upmix_ir::DType)], n: usize) -> String {
    let mut parts: Vec<String> = named
        .iter()
        .take(n)
        .map(|(name, dtype)| format!("{name}: {dtype}"))
        .collect();
    if named.len() > n {
        parts.push(format!("{} more", named.len() - n));
    }
    parts.join(", ")
}

/// Copies an auxiliary file, or a directory of them, into `dir` under its own name.
fn copy_aux(aux: &Path, dir: &Path) -> Result<(), EmitError> {
    let Some(name) = aux.file_name() else {
        return Ok(());
    };
    let to = dir.join(name);
    if aux.is_dir() {
        std::fs::create_dir(&to).map_err(io(&to))?;
        for entry in std::fs::read_dir(aux).map_err(io(aux))? {
            copy_aux(&entry.map_err(io(aux))?.path(), &to)?;
        }
        Ok(())
    } else {
        std::fs::copy(aux, &to).map(|_| ()).map_err(io(aux))
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), EmitError> {
    let text = serde_json::to_string_pretty(value).expect("json serialises");
    std::fs::write(path, text + "\n").map_err(io(path))
}
