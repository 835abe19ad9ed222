//! upmix: a checkpoint compiler for dense LLM checkpoints.
//!
//! Checkpoints are lowered by [`frontend`] into the [`ir`], rewritten by [`passes`],
//! executed and written by [`backends`]. [`pipeline`] runs a RON pipeline file through all
//! of them; the `upmix` binary is a thin CLI over this crate.

pub mod check;
pub mod dtm;
pub mod emit;
pub mod pipeline;
pub mod sensitivity;

pub use upmix_backends as backends;
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
