//! upmix: a checkpoint compiler for dense LLM checkpoints.
//!
//! Checkpoints are lowered by [`frontend`] into the [`ir`], rewritten by [`passes`],
//! executed and written by [`backends`]. [`pipeline`] runs a RON pipeline file through all
//! of them; the `upmix` binary is a thin CLI over this crate.

pub mod check;
pub mod pipeline;

pub use upmix_backends as backends;
pub use upmix_frontend as frontend;
pub use upmix_ir as ir;
pub use upmix_passes as passes;
