//! The emit steps of a pipeline (and of `upmix convert`): what to write, and writing it
//! with a progress bar.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Deserialize;
use upmix_emit::{emit_gguf, emit_hf, GgufEmitOptions, HfEmitOptions, MoeLayout};
use upmix_ir::Module;

/// A checkpoint to write.
#[derive(Clone, Debug, Deserialize)]
pub enum Emit {
    /// A Hugging Face checkpoint directory; shards above `max_shard_mb` (default 4096);
    /// Mixtral experts in the `classic` (default) or `fused` layout. An existing `dir` is
    /// replaced only when it is empty or a previous upmix output, or with `overwrite: true`.
    Hf {
        model: String,
        dir: PathBuf,
        #[serde(default)]
        max_shard_mb: Option<u64>,
        #[serde(default, deserialize_with = "moe_layout")]
        moe_layout: Option<MoeLayout>,
        #[serde(default)]
        overwrite: Option<bool>,
        /// Another architecture than the graph's default: `"JetMoeForCausalLM"` for a BAM
        /// model with shared K/V and top-k routing.
        #[serde(default)]
        architecture: Option<String>,
        /// Write quantized weights (e.g. of a GGUF source or a `Quantize` pass) as f32;
        /// without it such a model is refused (safetensors has no quantized formats).
        #[serde(default)]
        dequantize: Option<bool>,
    },
    /// One GGUF file for llama.cpp: dense Llama and Qwen2 models and Mixtral-style
    /// mixtures of experts, every weight in its stored type (`Quantize` first for
    /// q8_0/q4_0/q4_1). The tokenizer is copied from a GGUF source or converted from
    /// `tokenizer.json`; `tokenizer_pre` names llama.cpp's pre-tokenizer when it cannot
    /// be recognised (e.g. `"gpt-2"`, `"llama-bpe"`). An existing `file` is replaced only
    /// when upmix wrote it, or with `overwrite: true`.
    Gguf {
        model: String,
        file: PathBuf,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        tokenizer_pre: Option<String>,
        #[serde(default)]
        overwrite: Option<bool>,
    },
}

/// `"classic"` or `"fused"`, checked when the pipeline is read.
fn moe_layout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<MoeLayout>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None => Ok(None),
        Some("classic") => Ok(Some(MoeLayout::Classic)),
        Some("fused") => Ok(Some(MoeLayout::Fused)),
        Some(other) => Err(serde::de::Error::custom(format!(
            "moe_layout `{other}` is not `classic` or `fused`"
        ))),
    }
}

impl Emit {
    /// The directory or file written.
    pub fn path(&self) -> &Path {
        let (Emit::Hf { dir: path, .. } | Emit::Gguf { file: path, .. }) = self;
        path
    }

    /// The model written.
    pub fn model(&self) -> &str {
        let (Emit::Hf { model, .. } | Emit::Gguf { model, .. }) = self;
        model
    }

    /// The emit with its path passed through `resolve`.
    pub fn resolved(mut self, resolve: &dyn Fn(&Path) -> PathBuf) -> Emit {
        let (Emit::Hf { dir: path, .. } | Emit::Gguf { file: path, .. }) = &mut self;
        *path = resolve(path);
        self
    }
}

/// A progress bar with bytes/s on stderr (hidden when stderr is not a terminal), and the
/// callback that drives it.
fn progress_bar(model: &str) -> (indicatif::ProgressBar, Arc<upmix_emit::Progress>) {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "emit {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(model.to_string());
    let driven = bar.clone();
    let progress = Arc::new(move |done, total| {
        driven.set_length(total);
        driven.set_position(done);
    });
    (bar, progress)
}

/// Writes `e` from `m`, adding a line to `out`; `overwrite` as `overwrite: true`.
pub fn emit(m: &Module, e: &Emit, overwrite: bool, out: &mut String) -> Result<()> {
    match e {
        Emit::Hf { .. } => emit_hf_dir(m, e, overwrite, out),
        Emit::Gguf { .. } => emit_gguf_file(m, e, overwrite, out),
    }
}

/// An `Hf` emit.
fn emit_hf_dir(m: &Module, e: &Emit, overwrite: bool, out: &mut String) -> Result<()> {
    let Emit::Hf {
        model,
        dir,
        max_shard_mb,
        moe_layout,
        overwrite: replace,
        architecture,
        dequantize,
    } = e
    else {
        unreachable!("an Hf emit")
    };
    let start = Instant::now();
    let (bar, progress) = progress_bar(model);
    let opts = HfEmitOptions {
        max_shard_bytes: max_shard_mb
            .map_or(HfEmitOptions::default().max_shard_bytes, |mb| mb << 20),
        moe_layout: moe_layout.unwrap_or_default(),
        progress: Some(progress),
        overwrite: overwrite || replace.unwrap_or(false),
        architecture: architecture.clone(),
        dequantize: dequantize.unwrap_or(false),
    };
    let r = emit_hf(m, model, dir, &opts).with_context(|| format!("writing `{model}`"))?;
    bar.finish_and_clear();
    let dequantized = match r.dequantized {
        0 => String::new(),
        n => format!(", {n} quantized weights written as f32"),
    };
    writeln!(
        out,
        "emit   {model} -> {} ({}, {} tensors, {:.2} MB in {} shard(s){dequantized}) in {:.2}s",
        dir.display(),
        r.architecture,
        r.tensors,
        r.bytes as f64 / 1e6,
        r.shards,
        start.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// A `Gguf` emit.
fn emit_gguf_file(m: &Module, e: &Emit, overwrite: bool, out: &mut String) -> Result<()> {
    let Emit::Gguf {
        model,
        file,
        name,
        tokenizer_pre,
        overwrite: replace,
    } = e
    else {
        unreachable!("a Gguf emit")
    };
    let start = Instant::now();
    let g = m
        .graph(model)
        .with_context(|| format!("emit: no model named `{model}`"))?;
    let tokenizer = upmix_frontend::gguf_tokenizer_metadata(
        &g.meta,
        g.meta.vocab_size,
        tokenizer_pre.as_deref(),
    )
    .with_context(|| format!("writing `{model}` as GGUF: its tokenizer"))?;
    let (bar, progress) = progress_bar(model);
    let opts = GgufEmitOptions {
        name: name.clone(),
        tokenizer,
        progress: Some(progress),
        overwrite: overwrite || replace.unwrap_or(false),
    };
    let r = emit_gguf(m, model, file, &opts).with_context(|| format!("writing `{model}`"))?;
    bar.finish_and_clear();
    let types: Vec<String> = r.types.iter().map(|(d, n)| format!("{n} {d}")).collect();
    writeln!(
        out,
        "emit   {model} -> {} (GGUF {}, {} tensors: {}, {:.2} MB) in {:.2}s",
        file.display(),
        r.architecture,
        r.tensors,
        types.join(", "),
        r.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    )?;
    Ok(())
}
