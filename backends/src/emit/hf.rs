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
use upmix_formats::{hf, Family, Role};
use upmix_ir::{
    FeedForward, MixtureOfExperts, Module, Op, Router, Weight, WeightExpr, WeightId, WeightTable,
};

use super::hf_config::config_json;
use super::hf_family::architecture;
use super::jetmoe;
use super::safetensors::write_safetensors;
use super::stack::{read_stack, Stack};
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

/// On-disk layout of Mixtral experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeLayout {
    /// One tensor per expert projection (`block_sparse_moe.experts.E.w1/w3/w2`): what
    /// every Mixtral loader reads (vLLM, llama.cpp's converter, transformers).
    #[default]
    Classic,
    /// Stacked expert tensors (`mlp.experts.gate_up_proj` `[E, 2F, D]`, gate rows then up
    /// rows, and `mlp.experts.down_proj` `[E, D, F]`): transformers 5's in-memory layout.
    Fused,
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
    let tensors = tensor_list(&stack, family, layout, &mut table, &unsupported)?;
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

/// Tensor names of one family, collected in file order.
pub(super) struct Names {
    family: Family,
    pub(super) list: Vec<(String, WeightId)>,
}

impl Names {
    pub(super) fn push(&mut self, role: Role, (layer, expert): (usize, usize), id: WeightId) {
        let name = hf::name(self.family, role, layer, expert)
            .unwrap_or_else(|| panic!("{:?} has no {role:?} tensor", self.family));
        self.list.push((name, id));
    }

    fn ffn(&mut self, role: fn(usize) -> Role, at: (usize, usize), f: &FeedForward) {
        for (i, id) in [f.gate, f.up, f.down].into_iter().enumerate() {
            self.push(role(i), at, id);
        }
    }
}

/// Hugging Face tensor names for every weight, in file order. `architecture` has checked
/// that `family` has a name for each.
fn tensor_list(
    s: &Stack,
    family: Family,
    layout: MoeLayout,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Vec<(String, WeightId)>, EmitError> {
    let mut t = Names {
        family,
        list: Vec::new(),
    };
    if family == Family::JetMoe {
        jetmoe::tensors(s, &mut t, table)?;
        return Ok(t.list);
    }
    t.push(Role::Embed, (0, 0), s.embed);
    for (i, l) in s.layers.iter().enumerate() {
        let norm_role = match l.ffn_norm {
            Some(_) => Role::AttnNorm,
            None => Role::BlockNorm,
        };
        t.push(norm_role, (i, 0), l.attn_norm.weight);
        let a = l.attn;
        match l.mixture {
            Some(moa) => attention_experts(&mut t, i, moa),
            None => {
                for (k, w) in [a.q, a.k, a.v, a.o].into_iter().enumerate() {
                    t.push(Role::Attn(k), (i, 0), w);
                }
            }
        }
        for (k, b) in [a.q_bias, a.k_bias, a.v_bias].into_iter().enumerate() {
            if let Some(b) = b {
                t.push(Role::AttnBias(k), (i, 0), b);
            }
        }
        if let Some(n) = &a.qk_norm {
            t.push(Role::QkNorm(0), (i, 0), n.q);
            t.push(Role::QkNorm(1), (i, 0), n.k);
        }
        if let Some(n) = l.ffn_norm {
            t.push(Role::FfnNorm, (i, 0), n.weight);
        }
        match l.mlp {
            Op::FeedForward(f) => t.ffn(Role::Mlp, (i, 0), f),
            Op::MixtureOfExperts(moe) if layout == MoeLayout::Fused => {
                fused_experts(&mut t, i, moe, table, unsupported)?
            }
            Op::MixtureOfExperts(moe) => {
                match &moe.router {
                    Router::Projected(p) if family == Family::UpmixBam => {
                        t.push(Role::RouterDomains, (i, 0), p.domains);
                        t.ffn(Role::RouterProjection, (i, 0), &p.projection);
                    }
                    router => {
                        let rows = super::router_rows(table, i, router)?;
                        t.push(Role::Router, (i, 0), rows);
                    }
                }
                for (e, f) in moe.experts.iter().enumerate() {
                    t.ffn(Role::Expert, (i, e), f);
                }
                if let Some(shared) = &moe.shared_expert {
                    t.ffn(Role::Shared, (i, 0), &shared.ffn);
                    let gate = shared.gate.ok_or_else(|| {
                        unsupported(format!("layer {i}: shared expert without gate"))
                    })?;
                    t.push(Role::SharedGate, (i, 0), gate);
                }
            }
            _ => unreachable!("read_stack admits only FFN and MoE"),
        }
    }
    t.push(Role::FinalNorm, (0, 0), s.final_norm.weight);
    if s.lm_head != s.embed {
        t.push(Role::LmHead, (0, 0), s.lm_head);
    }
    Ok(t.list)
}

/// A mixture of attention experts: the router, each expert's projections, and with shared
/// keys and values those once under the plain attention names.
fn attention_experts(t: &mut Names, i: usize, moa: &upmix_ir::MixtureOfAttention) {
    let shared = moa.shared_kv();
    t.push(Role::AttnRouter, (i, 0), moa.router);
    for (e, a) in moa.experts.iter().enumerate() {
        t.push(Role::ExpertAttn(0), (i, e), a.q);
        if !shared {
            t.push(Role::ExpertAttn(1), (i, e), a.k);
            t.push(Role::ExpertAttn(2), (i, e), a.v);
        }
        t.push(Role::ExpertAttn(3), (i, e), a.o);
    }
    if shared {
        t.push(Role::Attn(1), (i, 0), moa.experts[0].k);
        t.push(Role::Attn(2), (i, 0), moa.experts[0].v);
    }
}

/// Mixtral's fused layout: the router (named as in Qwen2-MoE), then every expert's gate and
/// up rows stacked in one tensor and their down projections in another.
fn fused_experts(
    t: &mut Names,
    i: usize,
    moe: &MixtureOfExperts,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<(), EmitError> {
    let router = hf::name(Family::Qwen2Moe, Role::Router, i, 0).expect("Qwen2-MoE has a router");
    t.list
        .push((router, super::router_rows(table, i, &moe.router)?));
    let [f, d] = table.get(moe.experts[0].gate)?.shape[..] else {
        return Err(unsupported(format!("layer {i}: experts are not 2-D")));
    };
    let n = moe.experts.len();
    let gate_up = moe.experts.iter().flat_map(|x| [x.gate, x.up]).collect();
    let down = moe.experts.iter().map(|x| x.down).collect();
    let name = |part| format!("layers.{i}.ffn.experts.{part}");
    let gate_up = concat(table, name("gate_up"), vec![n, 2 * f, d], gate_up)?;
    let down = concat(table, name("down"), vec![n, d, f], down)?;
    let fill = |p| upmix_formats::fill(p, i, 0);
    t.list.push((fill(hf::MIXTRAL_FUSED_GATE_UP), gate_up));
    t.list.push((fill(hf::MIXTRAL_FUSED_DOWN), down));
    Ok(())
}

/// A new weight holding `parts` one after another, shaped `shape`.
fn concat(
    table: &mut WeightTable,
    name: String,
    shape: Vec<usize>,
    parts: Vec<WeightId>,
) -> Result<WeightId, EmitError> {
    let dtype = table.get(parts[0])?.dtype.plain();
    Ok(table.add(Weight {
        name,
        shape,
        dtype,
        expr: WeightExpr::Concat(parts),
    })?)
}
