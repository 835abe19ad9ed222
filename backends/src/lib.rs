//! upmix-backends: executing graphs.
//!
//! - [`runtime`] holds [`BurnRuntime`], which lowers one graph of a [`upmix_ir::Module`] to a
//!   flat plan of burn tensor operations and implements [`upmix_ir::Runtime`] on any burn
//!   backend (logits, KV-cached greedy generation, log-likelihood, hidden states);
//! - [`device`] holds [`DeviceSpec`] (`cpu`, `wgpu`, `cuda:N`) and [`load_runtime`], which picks
//!   the burn backend for a device;
//! - [`error`] holds [`BackendError`].

pub mod device;
pub mod emit;
pub mod error;
pub mod runtime;

pub use device::{load_runtime, DeviceSpec};
pub use error::BackendError;
pub use runtime::BurnRuntime;
