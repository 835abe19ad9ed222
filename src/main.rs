//! The `upmix` command line: one argument struct per subcommand, each with the function
//! that runs it; the arguments several commands share (where models run, a tokenizer
//! from elsewhere) are declared once and flattened into them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use upmix::backends::{Activations, DeviceSpec};
use upmix::check::check_non_finite;
use upmix::dtm;
use upmix::emit::Emit;
use upmix::eval::{generate, perplexity, PerplexityOptions};
use upmix::ir::{print_graph, DType, Module};
use upmix::passes::components::Selector;
use upmix::passes::sensitivity::Compression;
use upmix::passes::{DumpIr, PassSpec, Quantize, QuantizeTarget, REGISTRY};
use upmix::pipeline::{self, ModelSource, Pipeline, RunOptions};
use upmix::sensitivity::{self, SensitivityOptions};
use upmix::Exec;

// Reuses freed activation buffers instead of returning them to the OS and faulting in
// fresh zeroed pages on the next forward pass (measurably faster prefill and decode).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "upmix",
    version,
    about = "A checkpoint compiler: dense LLM checkpoints in, MoE / merged / compressed checkpoints out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file: load models, run passes, evaluate, emit.
    Run(RunArgs),
    /// Print a checkpoint's IR (a Hugging Face directory or a .gguf file), then how its
    /// weights are stored: weights, parameters, bytes and types per component.
    Inspect(InspectArgs),
    /// Greedy generation from a prompt.
    Generate(GenerateArgs),
    /// Perplexity of a checkpoint on a text file.
    Ppl(PplArgs),
    /// Divergent Token Metrics of CANDIDATE against BASE: how many tokens of BASE's greedy
    /// continuation CANDIDATE follows (FDT: first divergent token) and how many it misses
    /// (SDT: share of divergent tokens), per prompt and summarised.
    Dtm(DtmArgs),
    /// Compress each component (q, k, v, o, gate, up, down of every layer) alone and
    /// measure its Divergent Token Metrics: a table (JSON, CSV) and heat-maps (SVG).
    Sensitivity(SensitivityArgs),
    /// Convert a checkpoint to a GGUF file (OUTPUT ending in .gguf) or a Hugging Face
    /// directory, optionally quantizing it on the way.
    Convert(ConvertArgs),
    /// List the available passes.
    Passes,
}

/// Where and how models run.
#[derive(Args)]
struct ExecArgs {
    /// How activations meet quantized weights: `float` (f32 activations times the
    /// dequantized weights) or `ggml` (quantized per block first, as llama.cpp's CPU
    /// backend does; cpu only).
    #[arg(long, value_parser = upmix::parse_activations, default_value = "float")]
    activations: Activations,
    /// `cpu`, `wgpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

impl ExecArgs {
    fn exec(&self) -> Exec {
        Exec {
            device: self.device,
            activations: self.activations,
        }
    }
}

/// A checkpoint to run, with its tokenizer or another.
#[derive(Args)]
struct ModelArgs {
    checkpoint: PathBuf,
    /// Tokenizer to use instead of the checkpoint's own (a tokenizer.json, a checkpoint
    /// directory, or a GGUF file).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the checkpoint as `model`, with the tokenizer if one is given.
    fn load(&self) -> Result<Module> {
        let mut m = load(&self.checkpoint)?;
        if let Some(t) = &self.tokenizer {
            m.graph_mut("model").expect("just loaded").meta.tokenizer = Some(t.clone());
        }
        Ok(m)
    }
}

#[derive(Args)]
struct RunArgs {
    pipeline: PathBuf,
    /// Print the IR of changed graphs after the named pass (repeatable), or `all`.
    #[arg(long, value_name = "PASS")]
    dump_ir_after: Vec<String>,
    /// Device for evaluation and model-executing passes (overrides the file).
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Skip IR verification after each pass.
    #[arg(long)]
    no_verify: bool,
    /// Let emits replace output directories that hold files upmix did not write.
    #[arg(long)]
    overwrite: bool,
    /// Overrides the file's `activations` (`float` or `ggml`).
    #[arg(long, value_parser = upmix::parse_activations)]
    activations: Option<Activations>,
    /// Continue each Train pass that has a `checkpoint` directory from its latest
    /// checkpoint (after Ctrl-C or a crash).
    #[arg(long)]
    resume: bool,
}

impl RunArgs {
    fn run(self) -> Result<()> {
        upmix::interrupt::install();
        let dump_ir = match self.dump_ir_after.as_slice() {
            [] => DumpIr::Never,
            names if names.iter().any(|n| n == "all") => DumpIr::All,
            names => DumpIr::After(names.to_vec()),
        };
        let opts = RunOptions {
            device: self.device,
            activations: self.activations,
            dump_ir,
            no_verify: self.no_verify,
            overwrite: self.overwrite,
            resume: self.resume,
            stop: Some(&upmix::interrupt::STOP),
        };
        let path = &self.pipeline;
        let (_, report) = pipeline::run_file(path, &opts)
            .with_context(|| format!("pipeline {} failed", path.display()))?;
        print!("{report}");
        Ok(())
    }
}

#[derive(Args)]
struct InspectArgs {
    checkpoint: PathBuf,
    /// Then scan every tensor for NaN and Inf values; fail if any holds some.
    #[arg(long)]
    check: bool,
}

impl InspectArgs {
    fn run(self) -> Result<()> {
        let m = load(&self.checkpoint)?;
        print!("{}", print_graph(&m.graphs["model"], &m.weights));
        print!("{}", upmix::storage::storage_table(&m, "model")?);
        if self.check {
            check_checkpoint(&m)?;
        }
        Ok(())
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Number of new tokens.
    #[arg(short = 'n', long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Treat the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

impl GenerateArgs {
    fn run(self) -> Result<()> {
        let m = self.model.load()?;
        let (prompt, n) = (&self.prompt, self.max_new_tokens);
        let text = generate(&m, "model", prompt, n, self.chat, &self.exec.exec())?;
        match self.chat {
            true => println!("{text}"),
            false => println!("{prompt}{text}"),
        }
        Ok(())
    }
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    text: PathBuf,
    /// Window length in tokens (default: the model's max positions, capped at 1024).
    #[arg(long)]
    window: Option<usize>,
    /// Start every window with the BOS token (`true`, llama.cpp's practice) or not
    /// (`false`); default: when the tokenizer adds BOS to a text.
    #[arg(long)]
    bos: Option<bool>,
    #[command(flatten)]
    exec: ExecArgs,
}

impl PplArgs {
    fn run(self) -> Result<()> {
        let m = self.model.load()?;
        let opts = PerplexityOptions {
            window: self.window,
            bos: self.bos,
        };
        let content = std::fs::read_to_string(&self.text)
            .with_context(|| format!("reading {}", self.text.display()))?;
        let (ppl, tokens) = perplexity(&m, "model", &content, opts, &self.exec.exec())?;
        println!("perplexity {ppl:.4} over {tokens} tokens");
        Ok(())
    }
}

#[derive(Args)]
struct DtmArgs {
    base: PathBuf,
    candidate: PathBuf,
    /// A text file, one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Tokens of each continuation.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Print per-prompt rows as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

impl DtmArgs {
    fn run(self) -> Result<()> {
        let m = load_pair(&self.base, &self.candidate)?;
        let report = dtm::divergence(
            &m,
            "base",
            "candidate",
            &self.prompts,
            self.max_new_tokens,
            &self.exec.exec(),
        )?;
        match self.json {
            true => print!("{}", report.json_rows()),
            false => print!("{}", report.table()),
        }
        Ok(())
    }
}

#[derive(Args)]
struct SensitivityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A text file, one prompt per line.
    #[arg(long)]
    prompts: PathBuf,
    /// Tokens of each continuation.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    /// METHOD:LEVELS, e.g. `magnitude:0.9`, `magnitude:0.5,0.75,0.9`, `wanda:0.5`,
    /// `magnitude:2:4` (`prune` means magnitude), `quantize:q8_0,q4_0,int8_channel`
    /// (each component rounded to the type's values; float activations only).
    #[arg(long, default_value = "magnitude:0.9")]
    method: String,
    /// Calibration text for `wanda` levels.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Calibration window in tokens.
    #[arg(long, default_value_t = 128)]
    window: usize,
    /// Directory for sensitivity.json, sensitivity.csv and the heat-maps.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    exec: ExecArgs,
}

impl SensitivityArgs {
    fn run(self) -> Result<()> {
        let levels =
            Compression::parse_list(&self.method).map_err(|e| anyhow::anyhow!("--method: {e}"))?;
        let m = self.model.load()?;
        let opts = SensitivityOptions {
            prompts: self.prompts,
            n: self.max_new_tokens,
            levels,
            calibration: self.calibration,
            window: self.window,
            exec: self.exec.exec(),
        };
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "sensitivity [{bar:30}] {pos}/{len} {msg} elapsed {elapsed} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let start = std::time::Instant::now();
        let mut table = sensitivity::sweep(&m, "model", &opts, &mut |done, total, what| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(what.to_string());
        })?;
        bar.finish_and_clear();
        let path = &self.model.checkpoint;
        table.model = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        for path in sensitivity::write_outputs(&table, &self.out)? {
            println!("wrote {}", path.display());
        }
        println!(
            "{} variants of {} components in {:.1}s",
            table.rows.len(),
            table.components(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

#[derive(Args)]
struct ConvertArgs {
    input: PathBuf,
    output: PathBuf,
    /// Store every projection matrix as this type: q8_0, q4_0, q4_1 (ggml blocks),
    /// int8_channel, f16, bf16.
    #[arg(long, value_name = "TYPE", value_parser = encodable)]
    quantize: Option<DType>,
    /// With --quantize: the embedding table and the lm head too.
    #[arg(long, requires = "quantize")]
    all: bool,
    /// Hugging Face output of a quantized model: write its quantized weights as f32.
    #[arg(long)]
    dequantize: bool,
    /// GGUF output: llama.cpp's pre-tokenizer name, when it cannot be recognised from
    /// tokenizer.json (e.g. gpt-2, llama-bpe, qwen2, smollm).
    #[arg(long)]
    tokenizer_pre: Option<String>,
    /// Replace OUTPUT even when upmix did not write it.
    #[arg(long)]
    overwrite: bool,
}

/// A type `--quantize` can store weights in.
fn encodable(text: &str) -> Result<DType, String> {
    DType::parse(text)
        .filter(|t| t.can_encode())
        .ok_or_else(|| {
            format!("unknown type `{text}` (valid: q8_0, q4_0, q4_1, int8_channel, f16, bf16, f32)")
        })
}

impl ConvertArgs {
    fn run(self) -> Result<()> {
        let opts = RunOptions {
            overwrite: self.overwrite,
            ..RunOptions::default()
        };
        let (_, report) = pipeline::run(&self.pipeline(), Path::new(""), &opts)?;
        print!("{report}");
        Ok(())
    }

    /// The pipeline it runs: load, quantize if asked, emit.
    fn pipeline(self) -> Pipeline {
        let model = "model".to_string();
        let source = match self.input.extension().is_some_and(|e| e == "gguf") {
            true => ModelSource::Gguf(self.input),
            false => ModelSource::Hf(self.input),
        };
        let all = self.all;
        let passes = self.quantize.map(|dtype| {
            let selector = |s: &str| Selector::parse(s).expect("a plain name is a selector");
            let targets = match all {
                true => vec![QuantizeTarget {
                    select: vec![selector("embed"), selector("lm_head")],
                    layers: None,
                    dtype,
                }],
                false => Vec::new(),
            };
            PassSpec::Quantize(Quantize {
                model: model.clone(),
                into: None,
                dtype: Some(dtype),
                targets,
                ignore: Vec::new(),
            })
        });
        let emit = match self.output.extension().is_some_and(|e| e == "gguf") {
            true => Emit::Gguf {
                model: model.clone(),
                file: self.output,
                name: None,
                tokenizer_pre: self.tokenizer_pre,
                overwrite: None,
            },
            false => Emit::Hf {
                model: model.clone(),
                dir: self.output,
                max_shard_mb: None,
                moe_layout: None,
                overwrite: None,
                architecture: None,
                dequantize: Some(self.dequantize),
            },
        };
        Pipeline {
            device: None,
            activations: None,
            models: [(model, source)].into_iter().collect(),
            passes: passes.into_iter().map(Into::into).collect(),
            eval: Vec::new(),
            emit: vec![emit.into()],
        }
    }
}

/// Loads two checkpoints into one module, as `base` and `candidate`.
fn load_pair(base: &Path, candidate: &Path) -> Result<Module> {
    let mut m = Module::new();
    upmix::frontend::load(base, "base", &mut m)
        .with_context(|| format!("loading {}", base.display()))?;
    upmix::frontend::load(candidate, "candidate", &mut m)
        .with_context(|| format!("loading {}", candidate.display()))?;
    Ok(m)
}

fn load(path: &Path) -> Result<Module> {
    let mut m = Module::new();
    upmix::frontend::load(path, "model", &mut m)?;
    Ok(m)
}

/// Prints each tensor of the loaded checkpoint that holds NaN or Inf values and a summary;
/// an error when there are any.
fn check_checkpoint(m: &Module) -> Result<()> {
    let report = check_non_finite(m, "model")?;
    for t in &report.non_finite {
        println!("{t}");
    }
    match report.bad_tensors() {
        0 => {
            println!("check: all {} tensors are finite", report.tensors);
            Ok(())
        }
        1 => bail!("1 tensor holds non-finite values"),
        n => bail!("{n} tensors hold non-finite values"),
    }
}

fn main() -> std::process::ExitCode {
    upmix::keep_freed_memory();
    let ran = match Cli::parse().command {
        Command::Run(a) => a.run(),
        Command::Inspect(a) => a.run(),
        Command::Generate(a) => a.run(),
        Command::Ppl(a) => a.run(),
        Command::Dtm(a) => a.run(),
        Command::Sensitivity(a) => a.run(),
        Command::Convert(a) => a.run(),
        Command::Passes => {
            for p in REGISTRY {
                println!("{:<18} {}", p.name, p.doc);
            }
            Ok(())
        }
    };
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, without a backtrace.
            eprintln!("Error: {}", upmix::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
