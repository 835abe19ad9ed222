//! upmix-backends: executing graphs.
//!
//! - [`runtime`] holds [`BurnRuntime`], which lowers one graph of a [`upmix_ir::Module`] to a
//!   flat plan of burn tensor operations and implements [`upmix_ir::Runtime`] on any burn
//!   backend (batched logits, KV-cached greedy generation, on-device scoring, weight
//!   swaps, hidden states);
//! - [`device`] holds [`DeviceSpec`] (`cpu`, `wgpu`, `cuda:N`) and [`load_runtime`], which picks
//!   the burn backend for a device;
//! - [`error`] holds [`BackendError`].

pub mod device;
pub mod error;
pub mod runtime;

pub use device::{
    load_runtime, load_runtime_with, load_training_runtime, training_runtime, CpuTraining,
    DeviceSpec, RuntimeOptions,
};
pub use error::BackendError;
pub use runtime::{Activations, BurnRuntime, MoeDispatch, QuantMatrix};
