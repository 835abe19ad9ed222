//! Forward-pass benchmark of upmix's runtime: prefill tok/s of a prompt and KV-cached
//! greedy decode tok/s (best of three runs each). Prints one JSON line; `scripts/bench/forward.sh` runs it beside
//! PyTorch and prints the ratios.
//!
//! Usage: bench_forward MODEL [--prompt-tokens 256] [--decode-tokens 64] [--device cpu]
//! (threads: RAYON_NUM_THREADS)

use std::time::Instant;

// The same allocator as the `upmix` binary: reuses freed activation buffers instead of
// returning them to the OS and faulting fresh zeroed pages on the next call.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use upmix::backends::{load_runtime, DeviceSpec};
use upmix::ir::Module;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .context("usage: bench_forward MODEL [options]")?;
    let prompt_tokens: usize = arg(&args, "--prompt-tokens", "256").parse()?;
    let decode_tokens: usize = arg(&args, "--decode-tokens", "64").parse()?;
    let device: DeviceSpec = arg(&args, "--device", "cpu").parse()?;

    let start = Instant::now();
    let mut m = Module::new();
    upmix::frontend::load(model.as_ref(), "model", &mut m)?;
    let mut rt = load_runtime(&m, "model", &device)?;
    let load_s = start.elapsed().as_secs_f64();

    // A deterministic prompt of ordinary token ids (no specials).
    let vocab = m.graphs["model"].meta.vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 200))
        .collect();
    rt.logits(&prompt[..8])?; // warm up

    // Best of three runs: the machine is shared, the minimum is the least disturbed.
    let mut prefill_s = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        rt.logits(&prompt)?;
        prefill_s = prefill_s.min(t.elapsed().as_secs_f64());
    }

    // generate = one prefill of a short prompt + decode steps; subtract the prefill.
    let short = &prompt[..16];
    let (mut decode_s, mut out) = (f64::MAX, Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        rt.logits(short)?;
        let short_prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        out = rt.generate(short, decode_tokens, None)?;
        decode_s = decode_s.min((t.elapsed().as_secs_f64() - short_prefill_s).max(1e-9));
    }

    println!(
        "{{\"tool\": \"upmix\", \"threads\": {}, \"load_s\": {load_s:.3}, \"prefill_tokens\": {prompt_tokens}, \"prefill_tok_s\": {:.2}, \"decode_tokens\": {}, \"decode_tok_s\": {:.2}}}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
        prompt_tokens as f64 / prefill_s,
        out.len(),
        out.len() as f64 / decode_s
    );
    Ok(())
}
