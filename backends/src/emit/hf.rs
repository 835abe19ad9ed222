//! Hugging Face checkpoint emitter: config.json + safetensors (sharded with an index above
//! a size), tokenizer files copied through.
//!
//! The architecture follows from the graph: a dense stack is `LlamaForCausalLM`, or
//! `Qwen2ForCausalLM` when attention has q/k/v biases; a stack whose FFNs are all routed
//! MoEs without a shared expert is `MixtralForCausalLM` (classic per-expert layout, which
//! every Mixtral loader reads), with a gated shared expert in every layer
//! `Qwen2MoeForCausalLM`. Tensor names of the format live here and in the frontend's
//! name tables only.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use upmix_ir::{
    Attention, FeedForward, Graph, MixtureOfExperts, Module, Op, Weight, WeightExpr, WeightId,
    WeightTable,
};

use super::hf_config::config_json;
use super::safetensors::write_safetensors;
use super::{input_files, io, write_dir_atomically, EmitError};

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
}

/// One decoder layer, as found in the graph.
pub(super) struct Layer<'g> {
    pub(super) attn_norm: WeightId,
    pub(super) attn: &'g Attention,
    pub(super) ffn_norm: WeightId,
    pub(super) mlp: &'g Op,
}

/// The graph read as a pre-norm decoder stack.
pub(super) struct Stack<'g> {
    pub(super) embed: WeightId,
    pub(super) layers: Vec<Layer<'g>>,
    pub(super) final_norm: WeightId,
    pub(super) eps: f32,
    pub(super) lm_head: WeightId,
}

/// Writes graph `graph` of `m` to `dir` as a Hugging Face checkpoint.
pub fn emit_hf(
    m: &Module,
    graph: &str,
    dir: &Path,
    opts: &HfEmitOptions,
) -> Result<HfEmitReport, EmitError> {
    let g = m
        .graph(graph)
        .ok_or_else(|| EmitError::UnknownGraph(graph.to_string()))?;
    let stack = read_stack(g)?;
    let unsupported = |message: String| EmitError::Unsupported {
        graph: graph.to_string(),
        format: "a Hugging Face checkpoint",
        message,
    };
    let arch = architecture(&stack, &unsupported)?;
    // Fused experts are new (concatenated) tensors: add them to a copy of the table.
    let mut table = m.weights.clone();
    let tensors = tensor_list(&stack, arch, opts.moe_layout, &mut table, &unsupported)?;
    let config = config_json(m, g, &stack, arch, &unsupported)?;

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
    })
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

/// The Hugging Face architecture that expresses the stack: dense layers are Llama (or
/// Qwen2 with q/k/v biases); routed MoE layers are Mixtral, or Qwen2-MoE when every layer
/// has a gated shared expert.
fn architecture(
    s: &Stack,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<&'static str, EmitError> {
    let n = s.layers.len();
    let moes: Vec<&MixtureOfExperts> = s
        .layers
        .iter()
        .filter_map(|l| match l.mlp {
            Op::MixtureOfExperts(m) => Some(m),
            _ => None,
        })
        .collect();
    let biased = s.layers.iter().filter(|l| l.attn.q_bias.is_some()).count();
    if biased != 0 && biased != n {
        return Err(unsupported("only some layers have attention biases".into()));
    }
    let windowed = s.layers.iter().any(|l| l.attn.window.is_some());
    let shared_experts = moes.iter().any(|m| m.shared_expert.is_some());
    if windowed && (biased != 0 || shared_experts) {
        return Err(unsupported(
            "sliding windows in a Qwen2 or Qwen2-MoE checkpoint (layer-wise windows) are not written"
                .into(),
        ));
    }
    if moes.is_empty() {
        return Ok(match (biased, windowed) {
            (0, false) => "LlamaForCausalLM",
            (0, true) => "MistralForCausalLM",
            _ => "Qwen2ForCausalLM",
        });
    }
    if moes.len() < n {
        return Err(unsupported(
            "mixes dense and MoE layers, which no Hugging Face architecture here expresses".into(),
        ));
    }
    let shared = moes.iter().filter(|m| m.shared_expert.is_some()).count();
    let gated = moes
        .iter()
        .filter(|m| m.shared_expert.as_ref().is_some_and(|s| s.gate.is_some()))
        .count();
    let renormalised = moes.iter().all(|m| m.normalize_top_k);
    match (shared, gated, biased) {
        (0, _, 0) if renormalised => Ok("MixtralForCausalLM"),
        (0, _, 0) => Err(unsupported(
            "Mixtral renormalises the top-k routing weights; these layers do not".into(),
        )),
        (0, _, _) => Err(unsupported("Mixtral has no attention biases".into())),
        (s, g, _) if s == n && g == n => Ok("Qwen2MoeForCausalLM"),
        _ => Err(unsupported(
            "Qwen2-MoE needs a gated shared expert in every layer".into(),
        )),
    }
}

/// Reads `g` as `Input, Embedding, (RmsNorm, Attention, Add, RmsNorm, FFN|MoE, Add)*,
/// RmsNorm, Linear, Output` in topological order.
fn read_stack(g: &Graph) -> Result<Stack<'_>, EmitError> {
    let bad = |message: String| EmitError::Unsupported {
        graph: g.name.clone(),
        format: "a Hugging Face checkpoint",
        message: format!("not a pre-norm decoder stack: {message}"),
    };
    let order = g
        .topo_order()
        .map_err(|c| bad(format!("cycle through {c:?}")))?;
    let ops: Vec<&Op> = order.iter().map(|id| &g.node(*id).op).collect();
    let n = ops.len();
    if n < 5 || !(n - 5).is_multiple_of(6) {
        return Err(bad(format!("{n} nodes")));
    }
    let expect = |i: usize, kind: &str| -> Result<&Op, EmitError> {
        if ops[i].kind() == kind {
            Ok(ops[i])
        } else {
            Err(bad(format!(
                "node `{}` is {}, expected {kind}",
                g.node(order[i]).name,
                ops[i].kind()
            )))
        }
    };
    expect(0, "Input")?;
    let Op::Embedding { table: embed } = expect(1, "Embedding")? else {
        unreachable!()
    };
    let mut layers = Vec::new();
    let mut eps = None;
    for l in 0..(n - 5) / 6 {
        let b = 2 + 6 * l;
        let (
            Op::RmsNorm {
                weight: attn_norm,
                eps: e,
            },
            Op::Attention(attn),
        ) = (expect(b, "RmsNorm")?, expect(b + 1, "Attention")?)
        else {
            unreachable!()
        };
        expect(b + 2, "Add")?;
        let Op::RmsNorm {
            weight: ffn_norm, ..
        } = expect(b + 3, "RmsNorm")?
        else {
            unreachable!()
        };
        let mlp = ops[b + 4];
        if !matches!(mlp, Op::FeedForward(_) | Op::MixtureOfExperts(_)) {
            return Err(bad(format!(
                "node `{}` is {}",
                g.node(order[b + 4]).name,
                mlp.kind()
            )));
        }
        expect(b + 5, "Add")?;
        eps.get_or_insert(*e);
        layers.push(Layer {
            attn_norm: *attn_norm,
            attn,
            ffn_norm: *ffn_norm,
            mlp,
        });
    }
    let Op::RmsNorm {
        weight: final_norm,
        eps: e,
    } = expect(n - 3, "RmsNorm")?
    else {
        unreachable!()
    };
    let Op::Linear {
        weight: lm_head,
        bias: None,
    } = expect(n - 2, "Linear")?
    else {
        return Err(bad("the lm head has a bias".into()));
    };
    expect(n - 1, "Output")?;
    Ok(Stack {
        embed: *embed,
        layers,
        final_norm: *final_norm,
        eps: eps.unwrap_or(*e),
        lm_head: *lm_head,
    })
}

/// Hugging Face tensor names for every weight, in file order.
fn tensor_list(
    s: &Stack,
    arch: &str,
    layout: MoeLayout,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Vec<(String, WeightId)>, EmitError> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), s.embed)];
    for (i, l) in s.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        t.push((format!("{p}input_layernorm.weight"), l.attn_norm));
        let a = l.attn;
        for (proj, w) in [("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)] {
            t.push((format!("{p}self_attn.{proj}_proj.weight"), w));
        }
        for (proj, b) in [("q", a.q_bias), ("k", a.k_bias), ("v", a.v_bias)] {
            if let Some(b) = b {
                t.push((format!("{p}self_attn.{proj}_proj.bias"), b));
            }
        }
        t.push((format!("{p}post_attention_layernorm.weight"), l.ffn_norm));
        match l.mlp {
            Op::FeedForward(f) => push_ffn(
                &mut t,
                &format!("{p}mlp."),
                f,
                ["gate_proj", "up_proj", "down_proj"],
            ),
            Op::MixtureOfExperts(moe) if arch == "Qwen2MoeForCausalLM" => {
                t.push((format!("{p}mlp.gate.weight"), moe.router));
                for (e, f) in moe.experts.iter().enumerate() {
                    push_ffn(
                        &mut t,
                        &format!("{p}mlp.experts.{e}."),
                        f,
                        ["gate_proj", "up_proj", "down_proj"],
                    );
                }
                let shared = moe
                    .shared_expert
                    .as_ref()
                    .ok_or_else(|| unsupported(format!("layer {i} has no shared expert")))?;
                push_ffn(
                    &mut t,
                    &format!("{p}mlp.shared_expert."),
                    &shared.ffn,
                    ["gate_proj", "up_proj", "down_proj"],
                );
                let gate = shared
                    .gate
                    .ok_or_else(|| unsupported(format!("layer {i}: shared expert without gate")))?;
                t.push((format!("{p}mlp.shared_expert_gate.weight"), gate));
            }
            Op::MixtureOfExperts(moe) if layout == MoeLayout::Fused => {
                t.push((format!("{p}mlp.gate.weight"), moe.router));
                let [f, d] = table.get(moe.experts[0].gate)?.shape[..] else {
                    return Err(unsupported(format!("layer {i}: experts are not 2-D")));
                };
                let n = moe.experts.len();
                let gate_up = moe.experts.iter().flat_map(|x| [x.gate, x.up]).collect();
                let down = moe.experts.iter().map(|x| x.down).collect();
                let canonical = format!("layers.{i}.ffn.experts");
                t.push((
                    format!("{p}mlp.experts.gate_up_proj"),
                    concat(
                        table,
                        format!("{canonical}.gate_up"),
                        vec![n, 2 * f, d],
                        gate_up,
                    )?,
                ));
                t.push((
                    format!("{p}mlp.experts.down_proj"),
                    concat(table, format!("{canonical}.down"), vec![n, d, f], down)?,
                ));
            }
            Op::MixtureOfExperts(moe) => {
                t.push((format!("{p}block_sparse_moe.gate.weight"), moe.router));
                for (e, f) in moe.experts.iter().enumerate() {
                    push_ffn(
                        &mut t,
                        &format!("{p}block_sparse_moe.experts.{e}."),
                        f,
                        ["w1", "w3", "w2"],
                    );
                }
            }
            _ => unreachable!("read_stack admits only FFN and MoE"),
        }
    }
    t.push(("model.norm.weight".to_string(), s.final_norm));
    if s.lm_head != s.embed {
        t.push(("lm_head.weight".to_string(), s.lm_head));
    }
    Ok(t)
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

fn push_ffn(t: &mut Vec<(String, WeightId)>, prefix: &str, f: &FeedForward, names: [&str; 3]) {
    for (name, w) in names.iter().zip([f.gate, f.up, f.down]) {
        t.push((format!("{prefix}{name}.weight"), w));
    }
}
