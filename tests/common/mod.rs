//! Shared helpers of the integration tests: fixture paths and golden files.
#![allow(dead_code)]

use std::path::PathBuf;

use upmix::backends::DeviceSpec;
use upmix::ir::Module;

/// Fixture models made by transformers (scripts/make_fixtures.py).
pub const FIXTURES: &[&str] = &[
    "llama",
    "llama_tied",
    "qwen2",
    "mixtral",
    "mixtral_fused",
    "mistral",
    "cohere",
    "cohere2",
];

/// The repository: `UPMIX_REPO_ROOT` when set (test binaries packed by
/// scripts/gpu-pack.sh run in another checkout), else where the tests were built.
pub fn repo_root() -> PathBuf {
    std::env::var_os("UPMIX_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn golden_dir() -> PathBuf {
    repo_root().join("tests/golden")
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

/// Largest absolute logit differences allowed against transformers' fp32 CPU logits, by
/// device, in one place.
///
/// Every backend computes in f32 but sums in its own order (gemm blocking on the CPU,
/// tiled matmuls and parallel reductions on GPUs), so each sum rounds differently and the
/// error grows with the reduction length (hidden 576 and 30 layers for SmolLM2). Measured:
/// CPU and wgpu (Mesa lavapipe) stay below 3e-6 on the tiny fixtures and 8e-5 on SmolLM2,
/// so both get 1e-4 / 1e-3. CUDA may run f32 matmuls on TF32 tensor cores (10-bit
/// mantissa inputs), so it gets ten times more.
pub struct Tolerance {
    /// Tiny transformers fixtures (hidden 64, 2 layers).
    pub tiny_logits: f32,
    /// SmolLM2-135M: top-10 and last-position logits.
    pub smollm2_logits: f32,
}

pub fn tolerance() -> Tolerance {
    match device() {
        DeviceSpec::Cpu | DeviceSpec::Wgpu => Tolerance {
            tiny_logits: 1e-4,
            smollm2_logits: 1e-3,
        },
        DeviceSpec::Cuda(_) => Tolerance {
            tiny_logits: 1e-3,
            smollm2_logits: 1e-2,
        },
    }
}

/// Largest difference between the logits of graph `graph` of `m` on `tokens` with sparse
/// expert dispatch and with the dense reference, on the test device.
pub fn sparse_dense_diff(m: &Module, graph: &str, tokens: &[u32]) -> f32 {
    use upmix::backends::{load_runtime_with, MoeDispatch, RuntimeOptions};
    let logits = |moe_dispatch| {
        let options = RuntimeOptions {
            moe_dispatch,
            ..RuntimeOptions::default()
        };
        load_runtime_with(m, graph, &device(), options)
            .unwrap()
            .logits(tokens)
            .unwrap()
    };
    logits(MoeDispatch::Sparse).max_abs_diff(&logits(MoeDispatch::Dense))
}

/// The checkpoint files a copied fixture gets.
const CHECKPOINT_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// A temporary directory holding a copy of fixture `name`'s checkpoint in `<tmp>/<name>`.
pub fn temp_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for file in CHECKPOINT_FILES {
        std::fs::copy(model_dir(name).join(file), dir.join(file))
            .unwrap_or_else(|e| panic!("copying {file} of {name}: {e}"));
    }
    (tmp, dir)
}

/// Overwrites the first values of the f32 tensor `tensor` in `<dir>/model.safetensors`
/// (found through the file's header) with `values`.
pub fn write_f32_values(dir: &std::path::Path, tensor: &str, values: &[f32]) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[tensor];
    assert_eq!(info["dtype"], "F32", "{tensor} is not an f32 tensor");
    let begin = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    for (i, v) in values.iter().enumerate() {
        bytes[begin + 4 * i..begin + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

/// Adds to `m` a copy of graph `src` called `dst` whose hidden width is `hidden` instead of
/// `src`'s: every weight is replaced by seeded normal samples of the new shape (head count,
/// head size, FFN size and vocabulary stay). Tokenizer and special tokens stay `src`'s.
pub fn add_rewidthed_copy(m: &mut Module, src: &str, dst: &str, hidden: usize) {
    use upmix::ir::{Op, Weight, WeightExpr};
    let mut g = m.graphs[src].clone();
    g.name = dst.to_string();
    g.meta.hidden_size = hidden;
    let mut seed = 0u64;
    for n in g.node_ids() {
        let labels = g.node(n).op.weights();
        let is_norm = matches!(g.node(n).op, Op::RmsNorm { .. });
        let mut next = 0;
        g.node_mut(n).op.map_weights(|id| {
            let label = &labels[next].0;
            next += 1;
            let old = m.weights.get(id).unwrap().clone();
            let mut shape = old.shape.clone();
            match shape.len() {
                1 if is_norm => shape[0] = hidden,
                2 if label == "o" || label.ends_with("down") => shape[0] = hidden,
                2 => shape[1] = hidden,
                _ => {}
            }
            seed += 1;
            // Norm weights of ones, so activations keep their scale.
            let expr = if is_norm {
                let ones = upmix::ir::HostTensor::new(shape.clone(), vec![1.0; hidden]);
                WeightExpr::Literal(std::sync::Arc::new(ones))
            } else {
                WeightExpr::Random { seed, std: 0.02 }
            };
            let w = Weight {
                name: old.name.clone(),
                shape,
                dtype: upmix::ir::DType::F32,
                expr,
            };
            m.weights.add(w).unwrap()
        });
    }
    upmix::ir::verify(&g, &m.weights).unwrap();
    m.insert(g);
}

/// Loads each fixture `fixture` as the graph `name` of one module.
pub fn load_all(models: &[(&str, &str)]) -> Module {
    let mut m = Module::new();
    for (name, fixture) in models {
        upmix::frontend::load(&model_dir(fixture), name, &mut m)
            .unwrap_or_else(|e| panic!("loading fixture {fixture}: {e}"));
    }
    m
}

/// Runs one pass over `m`; its error as text.
pub fn run_pass(m: &mut Module, pass: impl upmix::passes::Pass + 'static) -> Result<(), String> {
    let mut pm = upmix::passes::PassManager::new();
    pm.add(Box::new(pass));
    pm.run(m, &mut upmix::passes::PassContext::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The largest absolute difference between `got` and golden logit rows `rows`.
pub fn golden_logit_diff(rows: &serde_json::Value, got: &upmix::ir::HostTensor) -> f32 {
    let mut worst = 0f32;
    for (t, row) in rows.as_array().unwrap().iter().enumerate() {
        for (v, x) in row.as_array().unwrap().iter().enumerate() {
            worst = worst.max((got.row(t)[v] - x.as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

/// Asserts that every file of `files` (`{name: sha256}`, as `make_fixtures.py` records
/// what transformers loaded) has that hash in `dir`.
pub fn assert_same_files(files: &serde_json::Value, dir: &std::path::Path) {
    use sha2::Digest;
    for (file, hash) in files.as_object().unwrap() {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let got: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            &got,
            hash.as_str().unwrap(),
            "{file} differs from what transformers loaded; rerun scripts/check-emitted.sh"
        );
    }
}

/// Tensor `name` of a float32 safetensors file.
pub fn safetensors_f32(path: &std::path::Path, name: &str) -> upmix::ir::HostTensor {
    let file = upmix::frontend::SafetensorsFile::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let info = file
        .tensors
        .get(name)
        .unwrap_or_else(|| panic!("{} has no tensor {name}", path.display()));
    let len = info.shape.iter().product::<usize>() * 4;
    let values = file.file.bytes()[info.offset..info.offset + len]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    upmix::ir::HostTensor::new(info.shape.clone(), values)
}

/// The canonical name (`layers.0.attn.q`) of a Llama projection's Hugging Face tensor name
/// (`model.layers.0.self_attn.q_proj.weight`), looked up in upmix's name tables.
pub fn canonical_of_hf(hf: &str) -> String {
    use upmix::formats::{canonical, hf, Family, Role};
    let roles = || (0..4).map(Role::Attn).chain((0..3).map(Role::Mlp));
    (0..256)
        .flat_map(|layer| roles().map(move |role| (role, layer)))
        .find(|&(role, layer)| hf::name(Family::Llama, role, layer, 0).as_deref() == Some(hf))
        .map(|(role, layer)| canonical(role, layer, 0))
        .unwrap_or_else(|| panic!("{hf} is not a Llama projection"))
}

/// A `Plan` of the table at `table` with every optional field at its default.
pub fn plan(table: &std::path::Path, target: upmix::passes::PlanTarget) -> upmix::passes::Plan {
    upmix::passes::Plan {
        table: table.into(),
        target,
        statistic: Default::default(),
        fragment: None,
        model: None,
        into: None,
        levels: None,
        method: upmix::passes::PruneMethod::Magnitude,
    }
}

/// Runs a plan's fragment (a pass written by `Plan`, its `into` dropped) as the only pass
/// of a pipeline over the tiny Llama, in `dir`; returns the module, the pass applied to
/// graph `llama` itself.
pub fn run_fragment(fragment: &str, dir: &std::path::Path) -> Module {
    let body: Vec<&str> = fragment.lines().filter(|l| !l.starts_with("//")).collect();
    let pipeline = format!(
        "Pipeline(models: {{ \"llama\": Hf({:?}) }}, passes: [{}])",
        model_dir("llama").display().to_string(),
        body.join("\n").replace("into: \"planned\",", "")
    );
    let parsed =
        upmix::pipeline::Pipeline::parse(&pipeline, std::path::Path::new("plan.ron")).unwrap();
    upmix::pipeline::run(&parsed, dir, &Default::default())
        .unwrap()
        .0
}

/// Every tensor of a safetensors file: name, absolute file offset, dtype and bytes.
pub fn raw_tensors(path: &std::path::Path) -> Vec<(String, usize, String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let [a, b] = [0, 1].map(|i| 8 + n + info["data_offsets"][i].as_u64().unwrap() as usize);
            let dtype = info["dtype"].as_str().unwrap().to_string();
            (name.clone(), a, dtype, bytes[a..b].to_vec())
        })
        .collect()
}

/// Checkpoint tensor name -> the weight read from it, matched by file offset.
pub fn checkpoint_names(
    m: &Module,
    fixture: &str,
) -> std::collections::HashMap<String, upmix::ir::WeightId> {
    let mut by_offset = std::collections::HashMap::new();
    for id in m.graphs[fixture].weight_ids() {
        if let upmix::ir::WeightExpr::Source { offset, .. } = m.weights.get(id).unwrap().expr {
            by_offset.insert(offset, id);
        }
    }
    raw_tensors(&model_dir(fixture).join("model.safetensors"))
        .into_iter()
        .map(|(name, start, _, _)| {
            let id = *by_offset
                .get(&start)
                .unwrap_or_else(|| panic!("no weight reads {name}"));
            (name, id)
        })
        .collect()
}

pub fn f32_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    raw_tensors(path)
        .into_iter()
        .map(|(name, _, dtype, bytes)| {
            assert_eq!(dtype, "F32");
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

/// Runs pipeline `text` (relative paths against `dir`); the module and report, or the
/// error with its causes.
pub fn run_pipeline(text: &str, dir: &std::path::Path) -> Result<(Module, String), String> {
    let p = upmix::pipeline::Pipeline::parse(text, std::path::Path::new("train.ron"))
        .map_err(|e| format!("{e:#}"))?;
    upmix::pipeline::run(&p, dir, &Default::default()).map_err(|e| format!("{e:#}"))
}

/// Asserts that one backward `got` gives torch's loss terms (`want`'s `loss`, `ce`,
/// `load_balance`, `z_loss`; within 1e-5, relative above 1) and, for every tensor of the
/// golden gradient file `grads` (by checkpoint name), the gradient of weight
/// `names[tensor]` within 1e-4.
pub fn assert_torch_gradients(
    label: &str,
    got: &upmix::ir::LossGradients,
    want: &serde_json::Value,
    grads: &std::path::Path,
    names: &std::collections::HashMap<String, upmix::ir::WeightId>,
) {
    for (term, value) in [
        ("loss", Some(got.loss)),
        ("ce", Some(got.cross_entropy)),
        ("load_balance", got.load_balance),
        ("z_loss", got.z_loss),
    ] {
        let w = want[term].as_f64();
        assert_eq!(value.is_some(), w.is_some(), "{label}: {term}");
        if let (Some(v), Some(w)) = (value, w) {
            println!("{label} {term}: {v} (torch {w})");
            assert!(
                (f64::from(v) - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{label} {term}: {v} vs {w}"
            );
        }
    }
    let ours: std::collections::HashMap<upmix::ir::WeightId, &Vec<f32>> =
        got.gradients.iter().map(|(id, t)| (*id, &t.data)).collect();
    let torch = f32_tensors(grads);
    assert_eq!(torch.len(), names.len(), "{label}: gradient count");
    for (tensor, w) in &torch {
        let g = ours[&names[tensor]];
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!("{tensor}: max |diff| {worst:.2e} (max |grad| {scale:.2e})");
        assert!(
            scale > 0.0,
            "{tensor}: an all-zero golden gradient checks nothing"
        );
        assert!(worst <= 1e-4, "{tensor}: {worst}");
    }
}

/// Where scripts/fetch-models.sh keeps the real models.
pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("UPMIX_MODEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"));
    base.join("upmix")
}

/// SmolLM2-135M-Instruct as GGUF (Q4_1), fetched by scripts/fetch-models.sh.
pub fn gguf_path() -> PathBuf {
    let path = std::env::var("UPMIX_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set UPMIX_SMOLLM2_GGUF)",
        path.display()
    );
    path
}

/// The values of graph `graph`'s weights named like `part`, by name.
pub fn values_of(m: &Module, graph: &str, part: &str) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = m.graphs[graph]
        .weight_ids()
        .into_iter()
        .filter_map(|id| {
            let w = m.weights.get(id).unwrap();
            w.name
                .contains(part)
                .then(|| (w.name.clone(), m.weights.materialize(id).unwrap().data))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
