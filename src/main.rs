//! The `upmix` command line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use upmix::backends::DeviceSpec;
use upmix::check::check_non_finite;
use upmix::ir::{print_graph, Module};
use upmix::passes::{DumpIr, REGISTRY};
use upmix::pipeline::{self, RunOptions};

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
    Run {
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
    },
    /// Print a checkpoint's IR (a Hugging Face directory or a .gguf file).
    Inspect {
        checkpoint: PathBuf,
        /// Then scan every tensor for NaN and Inf values; fail if any holds some.
        #[arg(long)]
        check: bool,
    },
    /// Greedy generation from a prompt.
    Generate {
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Number of new tokens.
        #[arg(short = 'n', long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Treat the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Tokenizer to use instead of the checkpoint's own (a tokenizer.json, a checkpoint
        /// directory, or a GGUF file).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// Perplexity of a checkpoint on a text file.
    Ppl {
        checkpoint: PathBuf,
        #[arg(long)]
        text: PathBuf,
        /// Window length in tokens (default: the model's max positions, capped at 1024).
        #[arg(long)]
        window: Option<usize>,
        /// Tokenizer to use instead of the checkpoint's own (a tokenizer.json, a checkpoint
        /// directory, or a GGUF file).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value = "cpu")]
        device: DeviceSpec,
    },
    /// List the available passes.
    Passes,
}

fn load(path: &Path) -> Result<Module> {
    let mut m = Module::new();
    upmix::frontend::load(path, "model", &mut m)?;
    Ok(m)
}

/// Loads a checkpoint, optionally with a tokenizer from elsewhere.
fn load_with_tokenizer(path: &Path, tokenizer: Option<PathBuf>) -> Result<Module> {
    let mut m = load(path)?;
    if let Some(t) = tokenizer {
        m.graph_mut("model").expect("just loaded").meta.tokenizer = Some(t);
    }
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
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, without a backtrace.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            pipeline: path,
            dump_ir_after,
            device,
            no_verify,
            overwrite,
        } => {
            let dump_ir = match dump_ir_after.as_slice() {
                [] => DumpIr::Never,
                names if names.iter().any(|n| n == "all") => DumpIr::All,
                names => DumpIr::After(names.to_vec()),
            };
            let opts = RunOptions {
                device,
                dump_ir,
                no_verify,
                overwrite,
            };
            let (_, report) = pipeline::run_file(&path, &opts)
                .with_context(|| format!("pipeline {} failed", path.display()))?;
            print!("{report}");
        }
        Command::Inspect { checkpoint, check } => {
            let m = load(&checkpoint)?;
            print!("{}", print_graph(&m.graphs["model"], &m.weights));
            if check {
                check_checkpoint(&m)?;
            }
        }
        Command::Generate {
            checkpoint,
            prompt,
            max_new_tokens,
            chat,
            tokenizer,
            device,
        } => {
            let m = load_with_tokenizer(&checkpoint, tokenizer)?;
            let text = pipeline::generate(&m, "model", &prompt, max_new_tokens, chat, &device)?;
            if chat {
                println!("{text}");
            } else {
                println!("{prompt}{text}");
            }
        }
        Command::Ppl {
            checkpoint,
            text,
            window,
            tokenizer,
            device,
        } => {
            let m = load_with_tokenizer(&checkpoint, tokenizer)?;
            let content = std::fs::read_to_string(&text)
                .with_context(|| format!("reading {}", text.display()))?;
            let (ppl, tokens) = pipeline::perplexity(&m, "model", &content, window, &device)?;
            println!("perplexity {ppl:.4} over {tokens} tokens");
        }
        Command::Passes => {
            for p in REGISTRY {
                println!("{:<10} {}", p.name, p.doc);
            }
        }
    }
    Ok(())
}
