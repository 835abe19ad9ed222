//! Choosing where a graph runs: [`DeviceSpec`] and [`load_runtime`].
//!
//! `cpu` runs on burn's portable CPU backend (`burn_flex::Flex`) and is always built.
//! `wgpu` and `cuda[:N]` name GPU backends that are compiled in only with the matching
//! cargo feature; without it they fail with [`BackendError::DeviceNotCompiled`], and
//! without a usable driver or device with [`BackendError::DeviceUnavailable`].

use std::fmt;
use std::str::FromStr;

use upmix_ir::{Module, Runtime, TrainingRuntime};

use crate::{Activations, BackendError, BurnRuntime, MoeDispatch};

/// A device to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    Wgpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

const VALID_FORMS: &str = "`cpu`, `wgpu`, `cuda` (= `cuda:0`) or `cuda:N`";

impl FromStr for DeviceSpec {
    type Err = BackendError;

    /// Parses `cpu`, `wgpu`, `cuda` (device 0) or `cuda:N` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let bad =
            || BackendError::BadDevice(format!("unknown device `{s}`; expected {VALID_FORMS}"));
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "wgpu" => Ok(DeviceSpec::Wgpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Wgpu => f.write_str("wgpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Builds a runtime for graph `graph` of `module` on `device`.
pub fn load_runtime(
    module: &Module,
    graph: &str,
    device: &DeviceSpec,
) -> Result<Box<dyn Runtime>, BackendError> {
    load_runtime_with(module, graph, device, RuntimeOptions::default())
}

/// The CPU backend with gradients (burn's autodiff over burn-flex), for training.
pub type CpuTraining = burn_autodiff::Autodiff<burn_flex::Flex>;

/// A CPU runtime of graph `graph` of `module` that records gradients
/// ([`upmix_ir::TrainingRuntime`]). Quantized weights are dequantized; experts run on
/// their routed rows only (sparse dispatch: row selections and adds autodiff follows),
/// and the fused CPU kernels carry their own backward passes.
pub fn training_runtime(
    module: &Module,
    graph: &str,
) -> Result<BurnRuntime<CpuTraining>, BackendError> {
    let mut runtime = BurnRuntime::new(module, graph, &burn_flex::FlexDevice)?;
    runtime.set_moe_dispatch(MoeDispatch::Sparse);
    Ok(runtime)
}

/// [`training_runtime`] on `device`: burn's autodiff over the device's backend.
pub fn load_training_runtime(
    module: &Module,
    graph: &str,
    device: &DeviceSpec,
) -> Result<Box<dyn TrainingRuntime>, BackendError> {
    match device {
        DeviceSpec::Cpu => Ok(Box::new(training_runtime(module, graph)?)),
        DeviceSpec::Wgpu => wgpu_training(module, graph),
        DeviceSpec::Cuda(n) => cuda_training(module, graph, *n),
    }
}

/// Settings of a built runtime that do not change what it computes beyond rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// How mixture-of-experts layers give rows to their experts.
    pub moe_dispatch: MoeDispatch,
    /// How activations meet quantized weights: `Ggml` (on the CPU only) quantizes them
    /// per block as llama.cpp's CPU backend does, so logits are llama.cpp's.
    pub activations: Activations,
}

/// [`load_runtime`] with `options`.
pub fn load_runtime_with(
    module: &Module,
    graph: &str,
    device: &DeviceSpec,
    options: RuntimeOptions,
) -> Result<Box<dyn Runtime>, BackendError> {
    if options.activations == Activations::Ggml && *device != DeviceSpec::Cpu {
        return Err(BackendError::BadDevice(format!(
            "ggml activations (quantized per block, as llama.cpp's CPU backend does) run on \
             the cpu only, not on `{device}`"
        )));
    }
    match device {
        DeviceSpec::Cpu => {
            let mut runtime =
                BurnRuntime::<burn_flex::Flex>::new(module, graph, &burn_flex::FlexDevice)?;
            runtime.set_moe_dispatch(options.moe_dispatch);
            runtime.set_activations(options.activations);
            Ok(Box::new(runtime))
        }
        DeviceSpec::Wgpu => wgpu_runtime(module, graph, options),
        DeviceSpec::Cuda(n) => cuda_runtime(module, graph, *n, options),
    }
}

// The GPU backends: one function per backend, compiled for real when its cargo feature
// is on and otherwise an error saying which feature to build with.
mod gpu {
    use super::*;

    #[cfg(feature = "wgpu")]
    pub(super) fn wgpu_runtime(
        module: &Module,
        graph: &str,
        options: RuntimeOptions,
    ) -> Result<Box<dyn Runtime>, BackendError> {
        let device = burn_wgpu::WgpuDevice::default();
        let runtime = start::<burn_wgpu::Wgpu>(
            DeviceSpec::Wgpu,
            &device,
            module,
            graph,
            options.moe_dispatch,
        )?;
        Ok(Box::new(runtime))
    }

    #[cfg(feature = "wgpu")]
    pub(super) fn wgpu_training(
        module: &Module,
        graph: &str,
    ) -> Result<Box<dyn TrainingRuntime>, BackendError> {
        let device = burn_wgpu::WgpuDevice::default();
        type Training = burn_autodiff::Autodiff<burn_wgpu::Wgpu>;
        let runtime = start::<Training>(
            DeviceSpec::Wgpu,
            &device,
            module,
            graph,
            MoeDispatch::Sparse,
        )?;
        Ok(Box::new(runtime))
    }

    #[cfg(not(feature = "wgpu"))]
    pub(super) fn wgpu_training(
        _module: &Module,
        _graph: &str,
    ) -> Result<Box<dyn TrainingRuntime>, BackendError> {
        Err(not_compiled(DeviceSpec::Wgpu, "wgpu"))
    }

    #[cfg(not(feature = "wgpu"))]
    pub(super) fn wgpu_runtime(
        _module: &Module,
        _graph: &str,
        _options: RuntimeOptions,
    ) -> Result<Box<dyn Runtime>, BackendError> {
        Err(not_compiled(DeviceSpec::Wgpu, "wgpu"))
    }

    #[cfg(feature = "cuda")]
    pub(super) fn cuda_runtime(
        module: &Module,
        graph: &str,
        index: usize,
        options: RuntimeOptions,
    ) -> Result<Box<dyn Runtime>, BackendError> {
        let device = burn_cuda::CudaDevice::new(index);
        let runtime = start::<burn_cuda::Cuda>(
            DeviceSpec::Cuda(index),
            &device,
            module,
            graph,
            options.moe_dispatch,
        )?;
        Ok(Box::new(runtime))
    }

    #[cfg(feature = "cuda")]
    pub(super) fn cuda_training(
        module: &Module,
        graph: &str,
        index: usize,
    ) -> Result<Box<dyn TrainingRuntime>, BackendError> {
        let device = burn_cuda::CudaDevice::new(index);
        type Training = burn_autodiff::Autodiff<burn_cuda::Cuda>;
        let runtime = start::<Training>(
            DeviceSpec::Cuda(index),
            &device,
            module,
            graph,
            MoeDispatch::Sparse,
        )?;
        Ok(Box::new(runtime))
    }

    #[cfg(not(feature = "cuda"))]
    pub(super) fn cuda_training(
        _module: &Module,
        _graph: &str,
        index: usize,
    ) -> Result<Box<dyn TrainingRuntime>, BackendError> {
        Err(not_compiled(DeviceSpec::Cuda(index), "cuda"))
    }

    #[cfg(not(feature = "cuda"))]
    pub(super) fn cuda_runtime(
        _module: &Module,
        _graph: &str,
        index: usize,
        _options: RuntimeOptions,
    ) -> Result<Box<dyn Runtime>, BackendError> {
        Err(not_compiled(DeviceSpec::Cuda(index), "cuda"))
    }

    /// Builds a runtime of backend `B` on `device` (named `spec` in errors) that gives
    /// experts their rows by `dispatch`.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn start<B: crate::runtime::Kernels>(
        spec: DeviceSpec,
        device: &B::Device,
        module: &Module,
        graph: &str,
        dispatch: MoeDispatch,
    ) -> Result<BurnRuntime<B>, BackendError> {
        let mut runtime =
            catch_backend_panic(spec, || BurnRuntime::<B>::new(module, graph, device))?;
        runtime.set_moe_dispatch(dispatch);
        Ok(runtime)
    }

    /// Runs a backend's first use, turning the panic GPU runtimes raise when no driver or
    /// adapter is present into a [`BackendError::DeviceUnavailable`] (and keeping the
    /// default panic message off the terminal).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn catch_backend_panic<T>(
        device: DeviceSpec,
        init: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        use std::sync::{Arc, Mutex};
        // GPU runtimes often fail on a worker thread and the caller only sees a closed
        // channel; the first panic message, from whichever thread, says why.
        let first: Arc<Mutex<Option<String>>> = Arc::default();
        let seen = first.clone();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = upmix_ir::panic_message(info.payload())
                .unwrap_or_else(|| "the backend panicked while starting".into());
            if let Ok(mut s) = seen.lock() {
                s.get_or_insert(text);
            }
        }));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(init));
        std::panic::set_hook(hook);
        result.unwrap_or_else(|_| {
            let reason = first.lock().ok().and_then(|s| s.clone()).unwrap_or_default();
            // Loader errors list every library name they tried; the first sentence says it.
            let reason = match reason.split_once(" - ") {
                Some((head, _)) if reason.len() > 200 => head.to_string(),
                _ => reason,
            };
            Err(BackendError::DeviceUnavailable {
                device: device.to_string(),
                hint: match device {
                    DeviceSpec::Wgpu => "needs a Vulkan, Metal or DX12 driver; on Linux without a GPU, install Mesa's software Vulkan (Debian: mesa-vulkan-drivers libvulkan1)",
                    _ => "needs an NVIDIA GPU with its driver (libcuda.so) and a valid device index",
                },
                reason: reason.lines().next().unwrap_or_default().to_string(),
            })
        })
    }
}
use gpu::{cuda_runtime, cuda_training, wgpu_runtime, wgpu_training};

// Unused in a build with every GPU feature, except by the tests of its message.
#[cfg_attr(all(feature = "wgpu", feature = "cuda"), allow(dead_code))]
fn not_compiled(device: DeviceSpec, feature: &str) -> BackendError {
    BackendError::DeviceNotCompiled {
        device: device.to_string(),
        feature: feature.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for (text, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("CPU", DeviceSpec::Cpu, "cpu"),
            ("wgpu", DeviceSpec::Wgpu, "wgpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let parsed: DeviceSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(shown.parse::<DeviceSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn rejects_bad_devices_listing_valid_forms() {
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(matches!(err, BackendError::BadDevice(_)), "{bad}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("`cpu`") && msg.contains("cuda:N"), "{msg}");
        }
    }

    #[test]
    fn gpu_devices_say_how_to_rebuild_unless_compiled_in() {
        let module = Module::new();
        for (spec, feature, compiled) in [
            (DeviceSpec::Wgpu, "wgpu", cfg!(feature = "wgpu")),
            (DeviceSpec::Cuda(1), "cuda", cfg!(feature = "cuda")),
        ] {
            let err = load_runtime(&module, "seed", &spec).err().unwrap();
            if compiled {
                // The backend is there: the request gets as far as the missing graph.
                assert!(
                    matches!(err, BackendError::UnknownGraph(ref g) if g == "seed"),
                    "{err}"
                );
            } else {
                assert!(
                    matches!(err, BackendError::DeviceNotCompiled { .. }),
                    "{err}"
                );
            }
            // The message a build without the feature gives, in every build.
            let message = not_compiled(spec, feature).to_string();
            assert!(
                message.contains(&format!("--features {feature}")),
                "{message}"
            );
            assert!(message.contains(&spec.to_string()), "{message}");
        }
    }

    #[test]
    fn unknown_graph_is_reported() {
        let err = load_runtime(&Module::new(), "nope", &DeviceSpec::Cpu)
            .err()
            .unwrap();
        assert!(matches!(err, BackendError::UnknownGraph(ref g) if g == "nope"));
    }
}
