//! Fuzz test of `config.json` handling: `HfConfig::read` and `upmix_frontend::load` on a
//! copy of tests/golden/models/llama whose config.json is mutated case by case (hidden
//! sizes, head and layer counts, expert counts set to extreme values; wrong JSON types;
//! the architecture switched to a MoE family; deep nesting; duplicate keys; byte edits).
//! Every case must return `Ok` or an error naming the checkpoint, without a panic or an
//! allocation beyond the bound.

mod fuzz_support;

use std::path::Path;

use upmix_frontend::HfConfig;
use upmix_ir::Module;

use fuzz_support::json::{self, J};
use fuzz_support::{check_call, fuzz, rewrite, scratch, show_bytes, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Keys a MoE family needs, added to the seed so that edits reach their code paths.
const MOE_KEYS: &str = r#"{"num_local_experts": 2, "num_experts": 2, "num_experts_per_tok": 1,
    "moe_intermediate_size": 96, "shared_expert_intermediate_size": 96,
    "decoder_sparse_step": 1, "mlp_only_layers": [1],
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}"#;

/// The llama checkpoint's files copied to `dir` (config.json is rewritten per case), and
/// the seed configs: the plain one, then Mixtral and Qwen2-MoE with the MoE keys and llama3
/// RoPE scaling (their expert tensors are missing: loading stops there).
fn checkpoint(dir: &Path) -> [J; 3] {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/models/llama");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(golden.join(f), dir.join(f)).expect("golden llama checkpoint");
    }
    let text = std::fs::read_to_string(golden.join("config.json")).expect("config.json");
    let plain = J::parse(&text);
    let moe = |arch: &str| {
        let mut doc = plain.clone();
        if let (J::Obj(entries), J::Obj(extra)) = (&mut doc, J::parse(MOE_KEYS)) {
            entries.retain(|(k, _)| !k.starts_with("rope") && k != "architectures");
            entries.push(("architectures".into(), J::Arr(vec![J::Str(arch.into())])));
            entries.extend(extra);
        }
        doc
    };
    [
        plain.clone(),
        moe("MixtralForCausalLM"),
        moe("Qwen2MoeForCausalLM"),
    ]
}

#[test]
fn fuzz_config_json() {
    let dir = scratch();
    let seeds = checkpoint(dir.path());
    let config = dir.path().join("config.json");
    let dir_name = dir.path().display().to_string();
    let config_name = config.display().to_string();
    for (i, seed) in seeds.iter().enumerate() {
        rewrite(&config, seed.text().as_bytes());
        HfConfig::read(&config).expect("seed configs parse");
        let loaded = upmix_frontend::load(dir.path(), "m", &mut Module::new());
        // The MoE seeds stop at their missing expert tensors.
        assert_eq!(loaded.is_ok(), i == 0, "seed {i}: {loaded:?}");
    }
    fuzz("config.json", 8000, json::case(3, 4), |case| {
        let bytes = case.render(&seeds);
        rewrite(&config, &bytes);
        let shown = || show_bytes(&bytes, 4096);
        check_call(&config_name, &case, &shown, || HfConfig::read(&config))?;
        check_call(&dir_name, &case, &shown, || {
            upmix_frontend::load(dir.path(), "m", &mut Module::new())
        })?;
        Ok(())
    });
}
