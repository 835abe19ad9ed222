//! upmix: a checkpoint compiler for dense LLM checkpoints.
//!
//! Checkpoints are lowered by [`frontend`] into the [`ir`], rewritten by [`passes`],
//! executed by [`backends`] and written by [`emitters`]. [`pipeline`] runs a RON pipeline file through all
//! of them; the `upmix` binary is a thin CLI over this crate.

pub mod check;
pub mod dtm;
pub mod emit;
pub mod eval;
pub mod interrupt;
pub mod loss_curve;
pub mod pipeline;
pub mod sensitivity;
pub mod storage;

pub use upmix_backends as backends;
pub use upmix_emit as emitters;

use upmix_backends::{load_runtime_with, Activations, BackendError, DeviceSpec, RuntimeOptions};

/// Where and how models run: a device, and how activations meet quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub device: DeviceSpec,
    /// `Ggml`: quantized per block before products with quantized weights, as llama.cpp's
    /// CPU backend does (the CPU only).
    pub activations: Activations,
}

impl From<DeviceSpec> for Exec {
    fn from(device: DeviceSpec) -> Exec {
        Exec {
            device,
            activations: Activations::Float,
        }
    }
}

/// An error and its causes on one line, each cause once: a cause whose text the message
/// before it already shows (an error type that prints its source in its own message) is
/// not repeated.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Parses `float` or `ggml`.
pub fn parse_activations(text: &str) -> Result<Activations, String> {
    match text {
        "float" => Ok(Activations::Float),
        "ggml" => Ok(Activations::Ggml),
        other => Err(format!("activations `{other}` are not `float` or `ggml`")),
    }
}

impl Exec {
    /// A runtime for graph `graph` of `m`.
    pub fn load(
        &self,
        m: &upmix_ir::Module,
        graph: &str,
    ) -> Result<Box<dyn upmix_ir::Runtime>, BackendError> {
        let options = RuntimeOptions {
            activations: self.activations,
            ..RuntimeOptions::default()
        };
        load_runtime_with(m, graph, &self.device, options)
    }
}
pub use upmix_formats as formats;
pub use upmix_frontend as frontend;
pub use upmix_ir as ir;
pub use upmix_passes as passes;

/// Tunes the mimalloc allocator the `upmix` binary and the benchmarks use: memory freed
/// by one forward pass is kept for the next instead of being returned to the OS, so that
/// large activation buffers (an lm head's logits are hundreds of MB) are not faulted in
/// and zeroed by the kernel again on every call. Peak memory is unchanged; without
/// mimalloc as the global allocator this does nothing.
pub fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc.h (v2); -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an allocator option is thread-safe and takes plain values.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
