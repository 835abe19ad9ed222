//! `Merge` against a torch golden (mergekit's linear method, computed in the fixture
//! script), and the invariant that merging copies of one model returns that model.

mod common;

use common::{golden, model_dir};
use upmix::frontend::SafetensorsFile;
use upmix::ir::{HostTensor, Module, Op, WeightExpr};
use upmix::passes::{Merge, PassContext, PassManager};

fn merge(m: &mut Module, models: &[&str], weights: Vec<f32>) {
    let mut pm = PassManager::new();
    pm.add(Box::new(Merge {
        into: "merged".into(),
        models: models.iter().map(|s| s.to_string()).collect(),
        weights: Some(weights.into()),
        normalize: true,
    }));
    pm.run(m, &mut PassContext::default()).unwrap();
}

/// The error of a uniform merge that must fail.
fn merge_error(m: &mut Module, models: &[&str]) -> String {
    let mut pm = PassManager::new();
    pm.add(Box::new(Merge {
        into: "merged".into(),
        models: models.iter().map(|s| s.to_string()).collect(),
        weights: None,
        normalize: true,
    }));
    pm.run(m, &mut PassContext::default())
        .expect_err("mismatch")
        .to_string()
}

#[test]
fn linear_merge_matches_torch() {
    linear_merge_matches_golden("merge");
}

#[test]
fn linear_merge_of_cohere2_models_matches_torch() {
    linear_merge_matches_golden("merge_cohere2");
}

/// The merge of the golden `golden`'s two models, with its weights, against its
/// `expected.safetensors`.
fn linear_merge_matches_golden(golden_name: &str) {
    let g = golden(&format!("{golden_name}/golden.json"));
    let names: Vec<&str> = g["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut m = Module::new();
    for name in &names {
        upmix::frontend::load(&model_dir(name), name, &mut m).unwrap();
    }
    let weights: Vec<f32> = g["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap() as f32)
        .collect();
    merge(&mut m, &names, weights);

    // The merged graph is the template's graph with weighted sums for weights; read the
    // expected tensors through a freshly loaded copy of the template so names line up.
    let mut expected = Module::new();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(model_dir(names[0]).join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        common::golden_dir().join(format!("{golden_name}/expected.safetensors")),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    upmix::frontend::load(dir.path(), "expected", &mut expected).unwrap();
    assert!(
        !SafetensorsFile::open(&dir.path().join("model.safetensors"))
            .unwrap()
            .tensors
            .is_empty()
    );

    let got_ids = m.graphs["merged"].weight_ids();
    let want_ids = expected.graphs["expected"].weight_ids();
    assert_eq!(got_ids.len(), want_ids.len());
    let mut worst = 0f32;
    for (a, b) in got_ids.iter().zip(&want_ids) {
        assert!(matches!(
            m.weights.get(*a).unwrap().expr,
            WeightExpr::WeightedSum { .. }
        ));
        let (ta, tb) = (
            m.weights.materialize(*a).unwrap(),
            expected.weights.materialize(*b).unwrap(),
        );
        worst = worst.max(ta.max_abs_diff(&tb));
    }
    println!("{golden_name}: max abs difference {worst:e}");
    assert!(worst <= 1e-6, "max abs difference {worst}");
}

#[test]
fn merging_copies_of_one_model_returns_it() {
    let mut m = Module::new();
    for name in ["a", "b", "c"] {
        upmix::frontend::load(&model_dir("llama_tied"), name, &mut m).unwrap();
    }
    merge(&mut m, &["a", "b", "c"], vec![0.2, 0.5, 0.3]);
    let tokens = [5u32, 17, 42, 99, 3];
    let mut rt_a = upmix::backends::load_runtime(&m, "a", &common::device()).unwrap();
    let mut rt_m = upmix::backends::load_runtime(&m, "merged", &common::device()).unwrap();
    let (la, lm) = (rt_a.logits(&tokens).unwrap(), rt_m.logits(&tokens).unwrap());
    let diff = la.max_abs_diff(&lm);
    assert!(diff <= 1e-5, "max abs difference {diff}");
    // Tied embeddings stay tied: one weight serves both the table and the lm head.
    let g = &m.graphs["merged"];
    assert_eq!(g.weight_ids().len(), m.graphs["a"].weight_ids().len());
}

#[test]
fn mismatched_shapes_name_the_tensor() {
    let mut m = Module::new();
    for name in ["a", "b"] {
        upmix::frontend::load(&model_dir("llama"), name, &mut m).unwrap();
    }
    // Give `b` a wider FFN gate in layer 1.
    let wide = m
        .weights
        .literal(
            "layers.1.ffn.gate",
            HostTensor::new(vec![97, 64], vec![0.0; 97 * 64]),
        )
        .unwrap();
    let g = m.graph_mut("b").unwrap();
    let ffn = g.find("layers.1.ffn").unwrap();
    if let Op::FeedForward(f) = &mut g.node_mut(ffn).op {
        f.gate = wide;
    }
    let err = merge_error(&mut m, &["a", "b"]);
    assert!(err.contains("`layers.1.ffn.gate`"), "{err}");
    assert!(
        err.contains("[96, 64]") && err.contains("[97, 64]"),
        "{err}"
    );
    assert!(m.graph("merged").is_none());
}

#[test]
fn mismatched_architectures_name_the_node() {
    // Same hyperparameters, but Qwen2 has biases on q, k and v.
    let mut m = Module::new();
    upmix::frontend::load(&model_dir("llama"), "llama", &mut m).unwrap();
    upmix::frontend::load(&model_dir("qwen2"), "qwen2", &mut m).unwrap();
    let err = merge_error(&mut m, &["llama", "qwen2"]);
    assert!(err.contains("layers.0.attn"), "{err}");
    assert!(err.contains("bias=true"), "{err}");
    assert!(m.graph("merged").is_none());
}

#[test]
fn other_architectures_name_the_first_differing_hyperparameter() {
    let mut m = Module::new();
    for (name, dir) in [
        ("llama", model_dir("llama")),
        ("mixtral", model_dir("mixtral")),
        ("seed", common::repo_root().join("examples/models/seed")),
    ] {
        upmix::frontend::load(&dir, name, &mut m).unwrap();
    }
    common::add_rewidthed_copy(&mut m, "llama", "narrow", 32);
    let cases = [
        (["llama", "seed"], "`llama` has 2 layers, `seed` has 4"),
        (["seed", "llama"], "`seed` has 4 layers, `llama` has 2"),
        (
            ["llama", "narrow"],
            "hidden size: `llama` has 64, `narrow` has 32",
        ),
        (
            ["llama", "mixtral"],
            "expert count: `llama` has 0 (dense), `mixtral` has 4",
        ),
    ];
    for (models, expected) in cases {
        let err = merge_error(&mut m, &models);
        assert!(err.contains("models do not match: "), "{err}");
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
        assert!(m.graph("merged").is_none());
    }
}

#[test]
fn merging_a_model_with_non_finite_weights_notes_a_warning() {
    let (_tmp, dir) = common::temp_fixture("llama");
    let tensor = "model.layers.1.mlp.up_proj.weight";
    common::write_f32_values(&dir, tensor, &[f32::NAN, 1.0, f32::NAN, f32::INFINITY]);
    let mut m = Module::new();
    upmix::frontend::load(&model_dir("llama"), "clean", &mut m).unwrap();
    upmix::frontend::load(&dir, "bad", &mut m).unwrap();
    let mut pm = PassManager::new();
    pm.add(Box::new(Merge {
        into: "merged".into(),
        models: vec!["clean".into(), "bad".into()],
        weights: None,
        normalize: true,
    }));
    let mut cx = PassContext::default();
    pm.run(&mut m, &mut cx).unwrap();
    let file = dir.join("model.safetensors").display().to_string();
    let warned: Vec<&String> = cx.notes.iter().filter(|n| n.contains("`bad`")).collect();
    assert_eq!(warned.len(), 1, "{:?}", cx.notes);
    for needle in ["Merge", "`layers.1.ffn.up`", &file, "2 NaN", "1 Inf"] {
        assert!(
            warned[0].contains(needle),
            "expected {needle:?} in: {}",
            warned[0]
        );
    }
    assert!(
        !cx.notes.iter().any(|n| n.contains("`clean`")),
        "{:?}",
        cx.notes
    );
}
