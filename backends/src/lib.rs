//! upmix-backends: executing graphs.
//!
//! - [`runtime`] holds [`BurnRuntime`], which lowers one graph of a [`upmix_ir::Module`] to a
//!   flat plan of burn tensor operations and implements [`upmix_ir::Runtime`] on any burn
//!   backend (batched logits, KV-cached greedy generation, on-device scoring, weight
//!   swaps, hidden states);
//! - [`device`] holds [`DeviceSpec`] (`cpu`, `wgpu`, `cuda:N`) and [`load_runtime`], which picks
//!   the burn backend for a device;
//! - [`adamw`] holds the optimizer training steps weights with;
//! - [`error`] holds [`BackendError`].

pub mod adamw;
pub mod device;
pub mod emit;
pub mod error;
pub mod runtime;

pub use adamw::{AdamW, AdamWConfig};
pub use device::{
    load_runtime, load_runtime_with, training_runtime, CpuTraining, DeviceSpec, RuntimeOptions,
};
pub use error::BackendError;
pub use runtime::{
    Activations, BurnRuntime, LossGradients, MoeDispatch, QuantMatrix, RouterLosses,
};
