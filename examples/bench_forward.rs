//! Forward-pass benchmark of upmix's runtime (best of three runs each; prints one JSON
//! line): prefill tok/s of a prompt, prefill tok/s of a batch of such prompts, and
//! KV-cached greedy decode tok/s after prompts of several lengths, plus peak RSS.
//! `scripts/bench/forward.sh` and `scripts/bench/moe.sh` run it beside transformers.
//!
//! Usage: bench_forward MODEL [--prompt-tokens 256] [--batch 8] [--decode-tokens 64]
//!        [--decode-at 16,100,1000] [--device cpu] [--activations float|ggml]
//!        (threads: RAYON_NUM_THREADS)

use std::time::Instant;

// The same allocator as the `upmix` binary: reuses freed activation buffers instead of
// returning them to the OS and faulting fresh zeroed pages on the next call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use upmix::backends::DeviceSpec;
use upmix::ir::{Module, Runtime};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Seconds of the fastest of three runs of `f`.
fn best_of_three(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Peak resident set size of this process in MB (`VmHWM`).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Decode tok/s after a prompt of `prompt.len()` tokens: the time of `1 + n` generated
/// tokens minus that of 1 (prefill and first token), over `n` steps.
fn decode_tok_s(rt: &mut dyn Runtime, prompt: &[u32], n: usize) -> Result<f64> {
    let first = best_of_three(|| Ok(rt.generate(prompt, 1, None).map(drop)?))?;
    let all = best_of_three(|| {
        let out = rt.generate(prompt, 1 + n, None)?;
        anyhow::ensure!(out.len() == 1 + n, "stopped early");
        Ok(())
    })?;
    Ok(n as f64 / (all - first).max(1e-9))
}

fn main() -> Result<()> {
    upmix::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .context("usage: bench_forward MODEL [options]")?;
    let prompt_tokens: usize = arg(&args, "--prompt-tokens", "256").parse()?;
    let batch: usize = arg(&args, "--batch", "8").parse()?;
    let decode_tokens: usize = arg(&args, "--decode-tokens", "64").parse()?;
    let decode_at: Vec<usize> = arg(&args, "--decode-at", "16")
        .split(',')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()?;
    let device: DeviceSpec = arg(&args, "--device", "cpu").parse()?;
    let activations = upmix::parse_activations(&arg(&args, "--activations", "float"))
        .map_err(anyhow::Error::msg)?;
    let exec = upmix::Exec {
        device,
        activations,
    };

    let start = Instant::now();
    let mut m = Module::new();
    upmix::frontend::load(model.as_ref(), "model", &mut m)?;
    let mut rt = exec.load(&m, "model")?;
    let load_s = start.elapsed().as_secs_f64();

    // Deterministic prompts of ordinary token ids (no specials), one per batch row.
    let vocab = m.graphs["model"].meta.vocab_size as u32;
    let prompt = |row: u32, len: usize| -> Vec<u32> {
        (0..len as u32)
            .map(|i| 100 + (i * 7919 + row * 104_729) % (vocab - 200))
            .collect()
    };
    let first = prompt(0, prompt_tokens);
    rt.logits(&first[..8])?; // warm up

    let prefill_s = best_of_three(|| Ok(rt.logits(&first).map(drop)?))?;
    let rows: Vec<Vec<u32>> = (0..batch as u32)
        .map(|r| prompt(r, prompt_tokens))
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let batch_s = best_of_three(|| Ok(rt.logits_batch(&refs).map(drop)?))?;
    let mut decode = Vec::new();
    for &at in &decode_at {
        let tok_s = decode_tok_s(rt.as_mut(), &prompt(0, at), decode_tokens)?;
        decode.push(format!("\"{at}\": {tok_s:.2}"));
    }
    println!(
        "{{\"tool\": \"upmix\", \"threads\": \"{}\", \"load_s\": {load_s:.3}, \"prefill_tokens\": {prompt_tokens}, \"prefill_tok_s\": {:.2}, \"batch\": {batch}, \"batch_prefill_tok_s\": {:.2}, \"decode_tokens\": {decode_tokens}, \"decode_tok_s\": {{{}}}, \"peak_rss_mb\": {:.0}}}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        prompt_tokens as f64 / prefill_s,
        (batch * prompt_tokens) as f64 / batch_s,
        decode.join(", "),
        peak_rss_mb()
    );
    Ok(())
}
