//! `Upcycle`: invariants (upcycling copies of one model preserves its function, with any
//! router and top_k), partial layer ranges, the Mixtral round trip, and clear errors.

mod common;

use common::{device, model_dir};
use upmix::backends::load_runtime;
use upmix::emitters::{emit_hf, HfEmitOptions, MoeLayout};
use upmix::ir::{HostTensor, Module, Op};
use upmix::passes::{PassContext, PassManager, RouterInit, Upcycle};

const TOKENS: [u32; 8] = [5, 17, 42, 99, 3, 250, 7, 64];

fn load(models: &[(&str, &str)]) -> Module {
    let mut m = Module::new();
    for (name, fixture) in models {
        upmix::frontend::load(&model_dir(fixture), name, &mut m).unwrap();
    }
    m
}

fn upcycle(experts: &[&str], top_k: usize, router: RouterInit) -> Upcycle {
    Upcycle {
        into: "moe".into(),
        experts: experts.iter().map(|s| s.to_string()).collect(),
        top_k,
        router,
        base: None,
        weights: None,
        shared_expert: None,
        layers: None,
        granularity: None,
        normalize_top_k: None,
    }
}

fn run(m: &mut Module, pass: Upcycle) -> Result<(), String> {
    let mut pm = PassManager::new();
    pm.add(Box::new(pass));
    pm.run(m, &mut PassContext::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn logits(m: &Module, graph: &str) -> HostTensor {
    load_runtime(m, graph, &device())
        .unwrap()
        .logits(&TOKENS)
        .unwrap()
}

fn moe_layers(m: &Module) -> usize {
    let g = &m.graphs["moe"];
    g.node_ids()
        .into_iter()
        .filter(|n| matches!(g.node(*n).op, Op::MixtureOfExperts(_)))
        .count()
}

#[test]
fn copies_of_one_model_keep_its_logits_for_any_router_and_top_k() {
    let routers = [
        RouterInit::Random { seed: 7, std: 1.0 },
        RouterInit::Random { seed: 1, std: 0.02 },
        RouterInit::Zeros,
    ];
    for router in routers {
        for top_k in 1..=3 {
            let mut m = load(&[("a", "llama"), ("b", "llama"), ("c", "llama")]);
            run(&mut m, upcycle(&["a", "b", "c"], top_k, router.clone())).unwrap();
            assert_eq!(moe_layers(&m), 2);
            let diff = logits(&m, "a").max_abs_diff(&logits(&m, "moe"));
            assert!(diff <= 1e-5, "{router:?} top_k {top_k}: {diff}");
        }
    }
}

/// Cohere's parallel blocks (with q/k norms and a logit scale) and Cohere2's windowed and
/// global layers upcycle like Llama's: copies keep the dense logits.
#[test]
fn copies_of_a_cohere_model_keep_its_logits() {
    for fixture in ["cohere", "cohere2"] {
        for top_k in [1, 2] {
            let mut m = load(&[("a", fixture), ("b", fixture)]);
            let router = RouterInit::Random { seed: 7, std: 1.0 };
            run(&mut m, upcycle(&["a", "b"], top_k, router)).unwrap();
            assert!(moe_layers(&m) >= 2);
            let diff = logits(&m, "a").max_abs_diff(&logits(&m, "moe"));
            assert!(diff <= 1e-5, "{fixture} top_k {top_k}: {diff}");
        }
    }
}

#[test]
fn an_upcycled_cohere_model_is_refused_for_hugging_face_output() {
    let mut m = load(&[("a", "cohere2"), ("b", "cohere2")]);
    run(&mut m, upcycle(&["a", "b"], 1, RouterInit::Zeros)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let err = emit_hf(&m, "moe", &out, &HfEmitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "mixture-of-experts FFNs (an upcycled Cohere model) have no Hugging Face architecture"
        ),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn fine_grained_copies_keep_the_dense_logits() {
    // Renormalised top-k: any router (shards of a model share a router row); softmax over
    // all experts (He et al.): the uniform router.
    let cases = [
        (2, 2, true, RouterInit::Random { seed: 5, std: 1.0 }),
        (2, 4, true, RouterInit::Zeros),
        (4, 4, true, RouterInit::Random { seed: 9, std: 0.5 }),
        (4, 8, true, RouterInit::Zeros),
        (2, 2, false, RouterInit::Zeros),
        (4, 4, false, RouterInit::Zeros),
        (4, 8, false, RouterInit::Zeros),
    ];
    for (g, top_k, normalize, router) in cases {
        let mut m = load(&[("a", "llama"), ("b", "llama")]);
        let pass = Upcycle {
            granularity: Some(g),
            normalize_top_k: Some(normalize),
            ..upcycle(&["a", "b"], top_k, router.clone())
        };
        run(&mut m, pass).unwrap();
        let g_moe = &m.graphs["moe"];
        let Op::MixtureOfExperts(moe) = &g_moe.node(g_moe.find("layers.0.ffn").unwrap()).op else {
            panic!("layer 0 is not a MoE layer");
        };
        assert_eq!(moe.experts.len(), 2 * g);
        let up = m.weights.get(moe.experts[0].up).unwrap();
        assert_eq!(up.shape[0], 96 / g);
        let diff = logits(&m, "a").max_abs_diff(&logits(&m, "moe"));
        assert!(
            diff <= 1e-5,
            "G {g} top_k {top_k} normalize {normalize} {router:?}: {diff}"
        );
    }
}

#[test]
fn layers_outside_the_range_stay_dense() {
    let mut m = load(&[("a", "llama_tied"), ("b", "llama_tied")]);
    let mut pass = upcycle(&["a", "b"], 1, RouterInit::default());
    pass.layers = Some("1..2".parse().unwrap());
    run(&mut m, pass).unwrap();
    assert_eq!(moe_layers(&m), 1);
    let g = &m.graphs["moe"];
    assert!(matches!(
        g.node(g.find("layers.0.ffn").unwrap()).op,
        Op::FeedForward(_)
    ));
    assert!(matches!(
        g.node(g.find("layers.1.ffn").unwrap()).op,
        Op::MixtureOfExperts(_)
    ));
    let diff = logits(&m, "a").max_abs_diff(&logits(&m, "moe"));
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn distinct_experts_round_trip_through_a_mixtral_checkpoint() {
    let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
    let mut pass = upcycle(&["a", "b"], 1, RouterInit::Random { seed: 3, std: 0.5 });
    pass.base = Some("a".into());
    run(&mut m, pass).unwrap();
    // With a base model, shared parameters are the base's own weights.
    let (a, moe) = (&m.graphs["a"], &m.graphs["moe"]);
    let attn = |g: &upmix::ir::Graph| g.node(g.find("layers.0.attn").unwrap()).op.weights();
    assert_eq!(attn(a), attn(moe));

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let report = emit_hf(&m, "moe", &out, &HfEmitOptions::default()).unwrap();
    assert_eq!(report.architecture, "MixtralForCausalLM");
    let mut back = Module::new();
    upmix::frontend::load(&out, "moe", &mut back).unwrap();
    let diff = logits(&m, "moe").max_abs_diff(&logits(&back, "moe"));
    assert!(diff <= 1e-5, "{diff}");
    // Real routing between distinct experts: not the dense model of either.
    assert!(logits(&m, "a").max_abs_diff(&logits(&m, "moe")) > 1e-3);
}

#[test]
fn bad_requests_are_clear_errors_and_create_nothing() {
    let cases: [(Upcycle, &str); 5] = [
        (upcycle(&["a", "b"], 3, RouterInit::Zeros), "top_k 3"),
        (
            upcycle(&["a", "nope"], 1, RouterInit::Zeros),
            "no model named `nope`",
        ),
        (upcycle(&["a", "q"], 1, RouterInit::Zeros), "layers.0.attn"),
        (
            Upcycle {
                granularity: Some(5),
                ..upcycle(&["a", "b"], 1, RouterInit::Zeros)
            },
            "granularity 5 does not divide the intermediate size 96",
        ),
        (
            upcycle(
                &["a", "b"],
                1,
                RouterInit::Hidden {
                    prompts: [("a".to_string(), vec!["x".to_string()])].into(),
                    negative_prompts: Default::default(),
                    model: None,
                },
            ),
            "no prompts for expert `b`",
        ),
    ];
    // A layer range is typed when read: a backwards one is refused there.
    let err = "5..2"
        .parse::<upmix::passes::settings::LayerRange>()
        .unwrap_err();
    assert!(err.contains("5..2"), "{err}");
    for (pass, expected) in cases {
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("q", "qwen2")]);
        let err = run(&mut m, pass).expect_err("an error");
        assert!(err.contains(expected), "{err}");
        assert!(m.graph("moe").is_none());
    }
}

/// Upcycles the fixture Llamas as scripts/check-emitted.sh does and compares with what
/// transformers computed on upmix's checkpoint (tests/golden/emitted/NAME.json): the
/// same bytes, the same logits, the same greedy ids.
fn check_against_transformers(name: &str, architecture: &str, pass: Upcycle, layout: MoeLayout) {
    let golden = common::golden(&format!("emitted/{name}.json"));
    assert_eq!(golden["architecture"], architecture);
    let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
    run(&mut m, pass).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("moe");
    let opts = HfEmitOptions {
        moe_layout: layout,
        ..Default::default()
    };
    emit_hf(&m, "moe", &out, &opts).unwrap();
    // upmix reads back what it wrote (Mixtral in either layout, Qwen2-MoE).
    let mut back = Module::new();
    upmix::frontend::load(&out, "moe", &mut back).unwrap();
    let diff = logits(&m, "moe").max_abs_diff(&logits(&back, "moe"));
    assert!(diff <= 1e-5, "{name}: reloaded logits differ by {diff}");
    common::assert_same_files(&golden["files"], &out);

    let mut rt = load_runtime(&m, "moe", &device()).unwrap();
    let got = rt.logits(&common::ids(&golden["input_ids"])).unwrap();
    let mut worst = 0f32;
    for (t, row) in golden["logits"].as_array().unwrap().iter().enumerate() {
        for (v, x) in row.as_array().unwrap().iter().enumerate() {
            worst = worst.max((got.row(t)[v] - x.as_f64().unwrap() as f32).abs());
        }
    }
    println!("{name} on {}: max abs logit difference {worst:e}", device());
    assert!(worst <= common::tolerance().tiny_logits, "{name}: {worst}");
    let greedy = rt
        .generate(&common::ids(&golden["prompt"]), 16, None)
        .unwrap();
    assert_eq!(greedy, common::ids(&golden["greedy"]), "{name}");
}

#[test]
fn upcycled_mixtral_matches_transformers() {
    let mut pass = upcycle(&["a", "b"], 1, RouterInit::Random { seed: 3, std: 0.5 });
    pass.base = Some("a".into());
    check_against_transformers(
        "upcycle_mixtral",
        "MixtralForCausalLM",
        pass.clone(),
        MoeLayout::Classic,
    );
    check_against_transformers(
        "upcycle_mixtral_fused",
        "MixtralForCausalLM",
        pass,
        MoeLayout::Fused,
    );
}

#[test]
fn upcycled_qwen2_moe_with_a_shared_expert_matches_transformers() {
    let mut pass = upcycle(&["a", "b"], 1, RouterInit::Random { seed: 3, std: 0.5 });
    pass.shared_expert = Some("b".into());
    check_against_transformers(
        "upcycle_qwen2_moe",
        "Qwen2MoeForCausalLM",
        pass,
        MoeLayout::Classic,
    );
}

#[test]
fn sparse_experts_equal_the_dense_reference() {
    let tokens: Vec<u32> = (0..64).map(|i| (i * 37 + 11) % 256).collect();
    for fixture in ["mixtral", "mixtral_fused"] {
        let m = common::load(fixture);
        let diff = common::sparse_dense_diff(&m, fixture, &tokens);
        println!("{fixture}: sparse vs dense max abs difference {diff:e}");
        assert!(diff <= 1e-5, "{fixture}: {diff}");
    }
    // A Qwen2-MoE: four fine-grained experts, top-2 without renormalisation, and a gated
    // shared expert.
    let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
    let mut pass = upcycle(&["a", "b"], 2, RouterInit::Random { seed: 9, std: 0.5 });
    pass.granularity = Some(2);
    pass.normalize_top_k = Some(false);
    pass.shared_expert = Some("b".into());
    run(&mut m, pass).unwrap();
    let diff = common::sparse_dense_diff(&m, "moe", &tokens);
    println!("qwen2-moe upcycle: sparse vs dense max abs difference {diff:e}");
    assert!(diff <= 1e-5, "qwen2-moe upcycle: {diff}");
}

#[test]
fn models_of_other_depth_or_width_name_the_differing_hyperparameter() {
    let mut m = load(&[("a", "llama")]);
    let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/seed");
    upmix::frontend::load(&seed, "seed", &mut m).unwrap();
    common::add_rewidthed_copy(&mut m, "a", "narrow", 32);
    let cases = [
        (
            ["a", "seed"],
            "models do not match: `a` has 2 layers, `seed` has 4",
        ),
        (
            ["a", "narrow"],
            "models do not match: hidden size: `a` has 64, `narrow` has 32",
        ),
    ];
    for (experts, expected) in cases {
        let err = run(&mut m, upcycle(&experts, 1, RouterInit::Zeros)).expect_err("an error");
        assert!(err.contains(expected), "{err}");
        assert!(m.graph("moe").is_none());
    }
}
