//! Shared helpers of the integration tests: fixture paths and golden files.
#![allow(dead_code)]

use std::path::PathBuf;

use upmix::backends::DeviceSpec;
use upmix::ir::Module;

/// Fixture models made by transformers (scripts/make_fixtures.py).
pub const FIXTURES: &[&str] = &["llama", "llama_tied", "qwen2", "mixtral", "mixtral_fused"];

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

pub fn model_dir(name: &str) -> PathBuf {
    golden_dir().join("models").join(name)
}

/// Loads fixture `name` as the graph `name`.
pub fn load(name: &str) -> Module {
    let mut m = Module::new();
    upmix::frontend::load(&model_dir(name), name, &mut m)
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"));
    m
}

/// A golden JSON file.
pub fn golden(path: &str) -> serde_json::Value {
    let p = golden_dir().join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The device the numeric goldens run on: `UPMIX_TEST_DEVICE` (default `cpu`).
pub fn device() -> DeviceSpec {
    std::env::var("UPMIX_TEST_DEVICE")
        .ok()
        .map(|s| s.parse().expect("UPMIX_TEST_DEVICE"))
        .unwrap_or(DeviceSpec::Cpu)
}

/// Largest absolute logit difference allowed against transformers (fp32 on both sides;
/// the bound).
pub fn logits_tolerance() -> f32 {
    1e-4
}
