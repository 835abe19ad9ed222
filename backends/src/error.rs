//! Errors of building a runtime: verification, weight materialisation and device choice.
//!
//! Errors while *running* a model are [`upmix_ir::RuntimeError`]s; a [`BackendError`]
//! converts into `RuntimeError::Backend` where an IR-level caller needs one.

use thiserror::Error;
use upmix_ir::{RuntimeError, VerifyErrors, WeightError};

/// Why a runtime could not be built.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The graph failed [`upmix_ir::verify`].
    #[error(transparent)]
    Verify(#[from] VerifyErrors),
    /// A weight the graph uses could not be materialised.
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// The device is valid but its backend is not part of this build.
    #[error(
        "device `{device}` is not compiled into this build; rebuild with `--features {feature}`"
    )]
    DeviceNotCompiled { device: String, feature: String },
    /// The backend is compiled in but the device cannot be used here (no driver, no
    /// adapter, no such device index).
    #[error("device `{device}` is not available: {reason} ({hint})")]
    DeviceUnavailable {
        device: String,
        reason: String,
        hint: &'static str,
    },
    /// A device string that does not parse.
    #[error("{0}")]
    BadDevice(String),
    /// The module has no graph of that name.
    #[error("no graph named `{0}` in the module")]
    UnknownGraph(String),
}

impl From<BackendError> for RuntimeError {
    fn from(e: BackendError) -> Self {
        RuntimeError::Backend(e.to_string())
    }
}
