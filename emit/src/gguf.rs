//! GGUF emitter: one file that llama.cpp (and ollama, LM Studio, gguf-py) loads.
//!
//! Architectures (names from the `upmix-formats` GGUF table): a dense Llama stack is
//! `llama`, with q/k/v biases `qwen2`; a Mixtral-style mixture of experts is `llama` with
//! `llama.expert_count` and `llama.expert_used_count`, its experts stacked into one
//! `[experts, out, in]` tensor per projection (`ffn_{gate,up,down}_exps`) beside the
//! router (`ffn_gate_inp`). Anything else llama.cpp has no name for here is refused.
//!
//! Layout (GGUF v3): magic, version, tensor and metadata counts; metadata (the first key
//! `upmix.version` marks the file as upmix's, so a later emit may replace it); tensor
//! infos with dimensions innermost first; then the data, every tensor at a multiple of
//! `general.alignment` (32). llama.cpp rotates the two halves of each head of a `llama`
//! model's Q and K as interleaved pairs, so their rows are permuted here, the inverse of
//! what the reader undoes.
//!
//! Types: every weight keeps its stored type (f32, f16, bf16, q8_0, q4_0, q4_1, or a
//! K-quant read from a GGUF file); 1-D weights (norms, biases) are written as f32, as
//! llama.cpp's converter does. Bytes already stored in that type are copied byte for
//! byte (rows of Q and K reordered); other values are encoded (quantized) as they are
//! written. The tokenizer's metadata comes from the caller ([`GgufEmitOptions`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use upmix_formats::gguf::{self as names, GgufValue, GGML_TYPES, T_STRING};
use upmix_formats::{Family, Role};
use upmix_ir::{DType, Module, Op, RopeScaling, Weight, WeightExpr, WeightId, WeightTable};

use super::hf::Progress;
use super::hf_family::architecture;
use super::stack::{read_stack, Stack};
use super::stream::{write_at, write_in_order, Prepared};
use super::{input_files, io, verified, write_file_atomically, EmitError};

const FORMAT: &str = "GGUF";
/// Tensor data alignment (`general.alignment`), llama.cpp's default.
const ALIGNMENT: u64 = 32;
/// The first metadata key of every GGUF file upmix writes.
const MARK: &str = "upmix.version";

/// Options of [`emit_gguf`].
#[derive(Clone, Default)]
pub struct GgufEmitOptions {
    /// `general.name` (default: the graph's name).
    pub name: Option<String>,
    /// The tokenizer's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), written
    /// after the model's.
    pub tokenizer: Vec<(String, GgufValue)>,
    /// Called after each tensor is written with `(bytes written, total bytes)`.
    pub progress: Option<Arc<Progress>>,
    /// Replace an existing file even when upmix did not write it.
    pub overwrite: bool,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct GgufEmitReport {
    /// `general.architecture`.
    pub architecture: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors by type.
    pub types: BTreeMap<DType, usize>,
}

/// One tensor of the file.
struct Tensor {
    name: String,
    /// Row-major shape.
    shape: Vec<usize>,
    dtype: DType,
    weight: WeightId,
    /// Row order (row `i` written is row `rows[i]` of the weight).
    rows: Option<Arc<[u32]>>,
}

/// Writes graph `graph` of `m` to the GGUF file `path`.
pub fn emit_gguf(
    m: &Module,
    graph: &str,
    path: &Path,
    opts: &GgufEmitOptions,
) -> Result<GgufEmitReport, EmitError> {
    let g = verified(m, graph)?;
    let unsupported = |message: String| EmitError::Unsupported {
        graph: graph.to_string(),
        format: FORMAT,
        message,
    };
    let stack = read_stack(g, FORMAT)?;
    let (_, family) = architecture(&stack, true, &unsupported)?;
    let arch = match family {
        Family::Llama | Family::Qwen2 | Family::Mixtral => names::architecture(family),
        _ => None,
    }
    .ok_or_else(|| {
        unsupported(format!(
            "llama.cpp has no architecture for {family:?} models here (GGUF output: Llama, \
             Qwen2 and Mixtral-style mixtures of experts)"
        ))
    })?;
    let mut table = m.weights.clone();
    let tensors = tensor_list(&stack, family, &mut table, &unsupported)?;
    let mut metadata = vec![(MARK.to_string(), text(env!("CARGO_PKG_VERSION")))];
    metadata.extend(model_metadata(
        g,
        &stack,
        arch,
        &tensors,
        opts,
        &unsupported,
    )?);
    metadata.extend(opts.tokenizer.iter().cloned());

    let (header, data_bytes) = header(&metadata, &tensors);
    let written = std::sync::atomic::AtomicU64::new(0);
    let report = |n: u64| {
        let so_far = written.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if let Some(progress) = &opts.progress {
            progress(so_far, data_bytes);
        }
    };
    let prepare = |i: usize| prepare(&table, &tensors[i]);
    write_file_atomically(
        path,
        &input_files(m, g),
        opts.overwrite,
        is_upmix_gguf,
        |tmp| {
            let file = File::create(tmp).map_err(io(tmp))?;
            write_at(&file, &header, 0).map_err(io(tmp))?;
            let start = header.len() as u64;
            write_in_order(
                &file,
                tmp,
                start,
                ALIGNMENT,
                tensors.len(),
                prepare,
                &report,
            )?;
            file.sync_all().map_err(io(tmp))
        },
    )?;
    let mut types = BTreeMap::new();
    for t in &tensors {
        *types.entry(t.dtype).or_insert(0) += 1;
    }
    Ok(GgufEmitReport {
        architecture: arch,
        tensors: tensors.len(),
        bytes: header.len() as u64 + data_bytes,
        types,
    })
}

fn nbytes(t: &Tensor) -> usize {
    t.dtype.nbytes(&t.shape).unwrap_or(0)
}

/// The tensor's bytes in the file: copied from input files when stored so, otherwise
/// computed (rows reordered where asked).
fn prepare(table: &WeightTable, t: &Tensor) -> Result<Prepared, EmitError> {
    if t.rows.is_none() {
        if let Some(ranges) = table.file_ranges(t.weight, t.dtype)? {
            return Ok(Prepared::InFiles(ranges));
        }
    }
    let bytes = table.materialize_bytes_as(t.weight, t.dtype)?;
    let Some(rows) = &t.rows else {
        return Ok(Prepared::Bytes(bytes));
    };
    let row = bytes.len() / rows.len().max(1);
    let mut out = Vec::with_capacity(bytes.len());
    for &r in rows.iter() {
        out.extend_from_slice(&bytes[r as usize * row..(r as usize + 1) * row]);
    }
    Ok(Prepared::Bytes(out))
}

/// Whether `path` is a GGUF file upmix wrote (its first metadata key is [`MARK`]).
fn is_upmix_gguf(path: &Path) -> bool {
    let mut head = [0u8; 24 + 8 + MARK.len()];
    let read = File::open(path).and_then(|f| {
        std::io::Read::read_exact(&mut std::io::Read::take(f, head.len() as u64), &mut head)
    });
    read.is_ok()
        && &head[..4] == b"GGUF"
        && head[24..32] == (MARK.len() as u64).to_le_bytes()
        && &head[32..] == MARK.as_bytes()
}

/// The GGUF type of a stored dtype.
fn ggml_type(dtype: DType) -> Option<u32> {
    GGML_TYPES
        .iter()
        .find(|(_, _, d)| *d == Some(dtype))
        .map(|(id, _, _)| *id)
}

/// Every tensor in file order, with its name, type and row order.
fn tensor_list(
    s: &Stack,
    family: Family,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Vec<Tensor>, EmitError> {
    let mut out = Vec::new();
    let mut push = |table: &WeightTable, role: Role, layer: usize, id, rows| {
        let tensor = tensor(table, role, layer, id, rows, unsupported)?;
        out.push(tensor);
        Ok::<(), EmitError>(())
    };
    push(table, Role::Embed, 0, s.embed, None)?;
    let permute = matches!(family, Family::Llama | Family::Mixtral);
    for (i, l) in s.layers.iter().enumerate() {
        push(table, Role::AttnNorm, i, l.attn_norm.weight, None)?;
        let a = l.attn;
        let heads = [Some(a.n_heads), Some(a.n_kv_heads), None, None];
        for (k, w) in [a.q, a.k, a.v, a.o].into_iter().enumerate() {
            let rows = heads[k]
                .filter(|_| permute)
                .map(|n| llama_rows(n * a.head_dim, n));
            push(table, Role::Attn(k), i, w, rows)?;
        }
        for (k, b) in [a.q_bias, a.k_bias, a.v_bias].into_iter().enumerate() {
            if let Some(b) = b {
                push(table, Role::AttnBias(k), i, b, None)?;
            }
        }
        let ffn_norm = l.ffn_norm.expect("Llama-family blocks are sequential");
        push(table, Role::FfnNorm, i, ffn_norm.weight, None)?;
        match l.mlp {
            Op::FeedForward(f) => {
                for (k, w) in [f.gate, f.up, f.down].into_iter().enumerate() {
                    push(table, Role::Mlp(k), i, w, None)?;
                }
            }
            Op::MixtureOfExperts(moe) => {
                let router = super::router_rows(table, i, &moe.router)?;
                push(table, Role::Router, i, router, None)?;
                for k in 0..3 {
                    let parts: Vec<WeightId> = moe
                        .experts
                        .iter()
                        .map(|f| [f.gate, f.up, f.down][k])
                        .collect();
                    let stacked = stack_experts(table, i, &parts, unsupported)?;
                    push(table, Role::Expert(k), i, stacked, None)?;
                }
            }
            _ => unreachable!("read_stack admits only FFN and MoE"),
        }
    }
    push(table, Role::FinalNorm, 0, s.final_norm.weight, None)?;
    if s.lm_head != s.embed {
        push(table, Role::LmHead, 0, s.lm_head, None)?;
    }
    Ok(out)
}

/// The file's tensor for weight `id` in `role`: its name and type (1-D weights as f32).
fn tensor(
    table: &WeightTable,
    role: Role,
    layer: usize,
    id: WeightId,
    rows: Option<Arc<[u32]>>,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Tensor, EmitError> {
    let w = table.get(id)?;
    let name = names::name(role, layer).expect("every written role has a GGUF name");
    let dtype = match w.shape.len() {
        1 => DType::F32,
        _ => w.dtype,
    };
    if ggml_type(dtype).is_none() {
        return Err(unsupported(format!(
            "`{}` is stored as {dtype}, which GGUF has no type for; quantize it to q8_0 \
             (about the same size) for GGUF output",
            w.name
        )));
    }
    Ok(Tensor {
        name,
        shape: w.shape.clone(),
        dtype,
        weight: id,
        rows,
    })
}

/// The experts' matrices of one projection as one `[experts, out, in]` weight, added to
/// `table`. They must share a type: GGUF stores the stack as one tensor.
fn stack_experts(
    table: &mut WeightTable,
    layer: usize,
    parts: &[WeightId],
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<WeightId, EmitError> {
    let first = table.get(parts[0])?.clone();
    let mut types = Vec::new();
    for id in parts {
        let dtype = table.get(*id)?.dtype;
        if !types.contains(&dtype) {
            types.push(dtype);
        }
    }
    if types.len() > 1 {
        let types: Vec<String> = types.iter().map(|d| d.to_string()).collect();
        return Err(unsupported(format!(
            "the experts of layer {layer} are stored as {}; GGUF stacks them into one tensor \
             of one type: quantize them alike",
            types.join(", ")
        )));
    }
    let mut shape = vec![parts.len()];
    shape.extend(&first.shape);
    Ok(table.add(Weight {
        name: format!("{}.stacked", first.name),
        shape,
        dtype: first.dtype,
        expr: WeightExpr::Concat(parts.to_vec()),
    })?)
}

/// llama.cpp's row order of a `llama` Q or K projection (`rows` rows, `n_heads` heads):
/// within each head, row `2b + a` is the Hugging Face row `a * head_dim / 2 + b`.
fn llama_rows(rows: usize, n_heads: usize) -> Arc<[u32]> {
    let head_dim = rows / n_heads.max(1);
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, i) = (r / head_dim, r % head_dim);
            (h * head_dim + (i % 2) * half + i / 2) as u32
        })
        .collect()
}

fn text(s: &str) -> GgufValue {
    GgufValue::String(s.to_string())
}

fn int(v: usize) -> GgufValue {
    GgufValue::U32(v as u32)
}

/// The model's metadata: llama.cpp's `general.*` and `{arch}.*` keys.
fn model_metadata(
    g: &upmix_ir::Graph,
    s: &Stack,
    arch: &str,
    tensors: &[Tensor],
    opts: &GgufEmitOptions,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Vec<(String, GgufValue)>, EmitError> {
    let a = s.layers[0].attn;
    for (i, l) in s.layers.iter().enumerate() {
        let b = l.attn;
        let same = (
            b.n_heads,
            b.n_kv_heads,
            b.head_dim,
            &b.rope,
            l.attn_norm.eps,
        ) == (
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            &a.rope,
            s.layers[0].attn_norm.eps,
        );
        if !same {
            return Err(unsupported(format!(
                "layer {i} differs from layer 0 in heads, head size, RoPE or norm epsilon; \
                 llama.cpp's {arch} has one setting for all layers"
            )));
        }
        let experts = |op: &Op| match op {
            Op::MixtureOfExperts(moe) => Some((moe.experts.len(), moe.routing.top_k)),
            _ => None,
        };
        if experts(l.mlp) != experts(s.layers[0].mlp) {
            return Err(unsupported(format!(
                "layer {i} differs from layer 0 in its experts or top-k; llama.cpp's {arch} \
                 has one setting for all layers"
            )));
        }
        if b.window.is_some() {
            return Err(unsupported(format!(
                "layer {i} has a sliding window, which llama.cpp's {arch} does not apply"
            )));
        }
    }
    let rope = a.rope.as_ref().expect("Llama-family layers have RoPE");
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = g.meta.hidden_size;
    // The FFN width: the output rows of layer 0's gate (of each expert in a mixture).
    let gates = [Role::Mlp(0), Role::Expert(0)].map(|r| names::name(r, 0));
    let ffn = tensors
        .iter()
        .find(|t| gates.contains(&Some(t.name.clone())))
        .and_then(|t| t.shape.iter().rev().nth(1).copied())
        .unwrap_or(0);
    let mut out = vec![
        ("general.architecture".to_string(), text(arch)),
        (
            "general.name".to_string(),
            text(opts.name.as_deref().unwrap_or(&g.name)),
        ),
        ("general.alignment".to_string(), int(ALIGNMENT as usize)),
        (
            "general.file_type".to_string(),
            GgufValue::U32(file_type(tensors)),
        ),
        ("general.quantization_version".to_string(), int(2)),
        (key("context_length"), int(g.meta.max_position_embeddings)),
        (key("embedding_length"), int(hidden)),
        (key("block_count"), int(s.layers.len())),
        (key("feed_forward_length"), int(ffn)),
        (key("attention.head_count"), int(a.n_heads)),
        (key("attention.head_count_kv"), int(a.n_kv_heads)),
        (key("rope.dimension_count"), int(a.head_dim)),
        (key("rope.freq_base"), GgufValue::F32(rope.theta)),
        (
            key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(s.layers[0].attn_norm.eps),
        ),
        (key("vocab_size"), int(g.meta.vocab_size)),
    ];
    if a.head_dim * a.n_heads != hidden {
        out.push((key("attention.key_length"), int(a.head_dim)));
        out.push((key("attention.value_length"), int(a.head_dim)));
    }
    match rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            out.push((key("rope.scaling.type"), text("linear")));
            out.push((key("rope.scaling.factor"), GgufValue::F32(factor)));
        }
        RopeScaling::Llama3 { .. } => {
            return Err(unsupported(
                "Llama 3.1 RoPE scaling (a rope_freqs tensor in GGUF) is not written yet".into(),
            ))
        }
    }
    if let Op::MixtureOfExperts(moe) = s.layers[0].mlp {
        out.push((key("expert_count"), int(moe.experts.len())));
        out.push((key("expert_used_count"), int(moe.routing.top_k)));
    }
    Ok(out)
}

/// `general.file_type`: llama.cpp's `llama_ftype` of the most common type among the
/// matrices (ALL_F32 0, MOSTLY_F16 1, Q4_0 2, Q4_1 3, Q8_0 7, BF16 32; K-quants as their
/// `_M` variants).
fn file_type(tensors: &[Tensor]) -> u32 {
    let mut counts: BTreeMap<DType, usize> = BTreeMap::new();
    for t in tensors.iter().filter(|t| t.shape.len() > 1) {
        *counts.entry(t.dtype).or_insert(0) += t.shape.iter().product::<usize>();
    }
    let most = counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d);
    match most {
        Some(DType::F16) => 1,
        Some(DType::Q4_0) => 2,
        Some(DType::Q4_1) => 3,
        Some(DType::Q8_0) => 7,
        Some(DType::Q4K) => 15,
        Some(DType::Q5K) => 17,
        Some(DType::Q6K) => 18,
        Some(DType::BF16) => 32,
        _ => 0,
    }
}

/// The header (everything before the data) and the data section's length.
fn header(metadata: &[(String, GgufValue)], tensors: &[Tensor]) -> (Vec<u8>, u64) {
    let mut h = Vec::new();
    h.extend(b"GGUF");
    h.extend(3u32.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut h, key);
        h.extend(value.type_id().to_le_bytes());
        encode(&mut h, value);
    }
    let mut at = 0u64;
    for t in tensors {
        string(&mut h, &t.name);
        h.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend((*d as u64).to_le_bytes());
        }
        h.extend(ggml_type(t.dtype).expect("checked").to_le_bytes());
        at = at.next_multiple_of(ALIGNMENT);
        h.extend(at.to_le_bytes());
        at += nbytes(t) as u64;
    }
    h.resize(h.len().next_multiple_of(ALIGNMENT as usize), 0);
    (h, at)
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A value's bytes (without its type id); an array as its item type, count and items
/// (an empty array is written as an array of strings).
fn encode(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => string(out, s),
        GgufValue::Array(items) => {
            let item_type = items.first().map_or(T_STRING, GgufValue::type_id);
            out.extend(item_type.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|item| encode(out, item));
        }
    }
}
