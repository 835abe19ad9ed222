//! Device selection from the command line: a GPU device that is not compiled in, or has
//! no driver, is a clear error (never a panic); where a GPU backend runs, generation on
//! it prints the same continuation as on the CPU.

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
fn cuda_generates_like_the_cpu_or_fails_clearly() {
    let out = generate("cuda:0");
    if out.status.success() {
        // A build with `cuda` on a machine with an NVIDIA GPU: the same continuation.
        let cpu = generate("cpu");
        assert!(cpu.status.success());
        assert_eq!(out.stdout, cpu.stdout);
        return;
    }
    // No GPU (as in CI), or a build without the `cuda` feature.
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
