//! Device selection from the command line: a GPU device that is not compiled in, or has
//! no driver, is a clear error (never a panic); with the `wgpu` feature, generation on
//! wgpu prints the same continuation as on the CPU.

mod common;

use std::process::{Command, Output};

fn upmix(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn generate(device: &str) -> Output {
    let model = common::model_dir("llama");
    upmix(&[
        "generate",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
        "-n",
        "12",
        "--device",
        device,
    ])
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    // No machine that runs this suite in CI has an NVIDIA GPU; where one does, the
    // command succeeds and there is nothing to check.
    let out = generate("cuda:0");
    if out.status.success() {
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cuda:0"), "{err}");
    assert!(
        err.contains("--features cuda") || err.contains("not available"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_bad_device_name_lists_the_valid_ones() {
    let out = generate("tpu");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpu") && err.contains("cuda:N"), "{err}");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_generation_matches_cpu() {
    let (cpu, gpu) = (generate("cpu"), generate("wgpu"));
    assert!(
        cpu.status.success(),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    assert!(
        gpu.status.success(),
        "{}",
        String::from_utf8_lossy(&gpu.stderr)
    );
    assert_eq!(cpu.stdout, gpu.stdout);
}
