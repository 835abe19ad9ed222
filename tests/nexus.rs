//! Nexus routers and adding experts.
//!
//! The projected router against an independent torch implementation
//! (scripts/make_nexus_goldens.py, tests/golden/nexus): the fixture Mixtral with every
//! router replaced by `x . down(silu(gate d_e) * up d_e)` gives torch's logits within
//! 1e-5, and one backward of the cross-entropy plus the router terms gives torch's
//! gradients within 1e-4, the projections' and domain embeddings' included.

mod common;

use std::collections::HashMap;

use common::{
    checkpoint_names, device, f32_tensors, golden, golden_dir, ids, load, run_pipeline,
    safetensors_f32,
};
use upmix::backends::{load_runtime, load_training_runtime};
use upmix::ir::{FeedForward, Module, Op, ProjectedRouter, Router, RouterLosses, WeightId};

/// The fixture Mixtral with the golden projected routers; their checkpoint names.
fn projected_mixtral() -> (Module, HashMap<String, WeightId>) {
    let mut m = load("mixtral");
    let mut names = checkpoint_names(&m, "mixtral");
    names.retain(|name, _| !name.ends_with("block_sparse_moe.gate.weight"));
    let file = golden_dir().join("nexus/router.safetensors");
    let mut add = |m: &mut Module, name: String| {
        let id = m
            .weights
            .literal(&name, safetensors_f32(&file, &name))
            .unwrap();
        names.insert(name, id);
        id
    };
    let g = &m.graphs["mixtral"];
    let moes: Vec<_> = g
        .node_ids()
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, Op::MixtureOfExperts(_)))
        .collect();
    let mut routers = Vec::new();
    for layer in 0..moes.len() {
        let p = format!("model.layers.{layer}.mlp.router");
        routers.push(Router::Projected(ProjectedRouter {
            domains: add(&mut m, format!("{p}.domains")),
            projection: FeedForward {
                gate: add(&mut m, format!("{p}.gate_proj.weight")),
                up: add(&mut m, format!("{p}.up_proj.weight")),
                down: add(&mut m, format!("{p}.down_proj.weight")),
            },
        }));
    }
    let g = m.graphs.get_mut("mixtral").unwrap();
    for (n, router) in moes.into_iter().zip(routers) {
        let Op::MixtureOfExperts(moe) = &mut g.node_mut(n).op else {
            unreachable!()
        };
        moe.router = router;
    }
    upmix::ir::verify(&m.graphs["mixtral"], &m.weights).unwrap();
    (m, names)
}

#[test]
fn projected_router_logits_match_pytorch() {
    let spec = golden("nexus/nexus.json");
    let (m, _) = projected_mixtral();
    let want = f32_tensors(&golden_dir().join("nexus/logits.safetensors"));
    let want = &want["logits"];
    let mut rt = load_runtime(&m, "mixtral", &device()).unwrap();
    let mut worst = 0f32;
    for (b, row) in spec["tokens"].as_array().unwrap().iter().enumerate() {
        let got = rt.logits(&ids(row)).unwrap();
        let n = got.data.len();
        let diff = got
            .data
            .iter()
            .zip(&want[b * n..(b + 1) * n])
            .map(|(a, w)| (a - w).abs())
            .fold(0f32, f32::max);
        worst = worst.max(diff);
    }
    println!("max |logit diff| {worst:.2e}");
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn projected_router_gradients_match_pytorch() {
    let spec = golden("nexus/nexus.json");
    let batch: Vec<Vec<u32>> = spec["tokens"].as_array().unwrap().iter().map(ids).collect();
    let refs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
    let (m, names) = projected_mixtral();
    let got = load_training_runtime(&m, "mixtral", &device())
        .unwrap()
        .loss_gradients(
            &refs,
            RouterLosses {
                load_balance: 0.01,
                z_loss: 0.001,
            },
        )
        .unwrap();
    let grads = golden_dir().join("nexus/grads.safetensors");
    common::assert_torch_gradients("nexus", &got, &spec, &grads, &names);
}

const TOKENS: [u32; 8] = [5, 17, 42, 99, 3, 250, 7, 64];

fn logits(m: &Module, graph: &str) -> upmix::ir::HostTensor {
    load_runtime(m, graph, &device())
        .unwrap()
        .logits(&TOKENS)
        .unwrap()
}

/// A pipeline over the fixtures `llama`, `llama_b`, `mixtral` and `branch` (the Mixtral's
/// dense branch) with `passes`, and the domain texts of [`write_texts`] in `dir`.
fn pipeline(dir: &std::path::Path, passes: &str) -> Result<(Module, String), String> {
    write_texts(dir);
    let model = |name: &str| format!("{:?}", common::model_dir(name).display().to_string());
    let text = format!(
        "Pipeline(models: {{ \"llama\": Hf({}), \"llama_b\": Hf({}), \"mixtral\": Hf({}), \
         \"branch\": Hf({}) }}, passes: [{passes}])",
        model("llama"),
        model("llama_b"),
        model("mixtral"),
        model("mixtral_branch"),
    );
    run_pipeline(&text, dir)
}

/// Three domain texts in `dir`: `a.txt`, `b.txt`, `c.txt`.
fn write_texts(dir: &std::path::Path) {
    for (name, text) in [
        ("a.txt", "fn main() { let x = 1; println!(\"{x}\"); }\n"),
        (
            "b.txt",
            "The licensee shall indemnify the licensor against all claims.\n",
        ),
        (
            "c.txt",
            "The integral of x squared from zero to one is one third.\n",
        ),
    ] {
        std::fs::write(dir.join(name), text.repeat(20)).unwrap();
    }
}

fn moe_experts(m: &Module, graph: &str) -> Vec<usize> {
    let g = &m.graphs[graph];
    g.node_ids()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::MixtureOfExperts(x) => Some(x.experts.len()),
            _ => None,
        })
        .collect()
}

/// Adding a copy of the experts to an MoE of copies (uniform routing: zero rows) keeps
/// the dense model's logits, whatever the new row: the renormalised top-k weights sum to
/// one over equal experts.
#[test]
fn adding_a_copy_to_an_moe_of_copies_preserves_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = pipeline(
        dir.path(),
        r#"Upcycle(into: "moe", experts: ["llama", "llama", "llama"], top_k: 2, router: Zeros),
           AddExpert(into: "centroid", model: "moe", expert: "llama", text: "a.txt"),
           AddExpert(into: "random", model: "moe", expert: "llama", text: "a.txt",
                     router: Random(seed: 3, std: 1.0)),"#,
    )
    .unwrap();
    let dense = logits(&m, "llama");
    for graph in ["moe", "centroid", "random"] {
        let diff = dense.max_abs_diff(&logits(&m, graph));
        println!("{graph}: max |logit diff| {diff:.2e}");
        assert!(diff <= 1e-5, "{graph}: {diff}");
    }
    assert_eq!(moe_experts(&m, "centroid"), [4, 4]);
    assert_eq!(moe_experts(&m, "random"), [4, 4]);
}

/// The same through a Nexus router: an MoE of copies with a projected router and a
/// shared expert is unchanged by one more copy whose row is projected.
#[test]
fn adding_a_copy_through_a_nexus_projection_preserves_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = pipeline(
        dir.path(),
        r#"Upcycle(into: "moe", experts: ["llama", "llama"], top_k: 1, shared_expert: "llama",
                   router: Nexus(texts: { "llama": "a.txt" }, width: 8)),
           AddExpert(into: "more", model: "moe", expert: "llama", text: "c.txt",
                     router: Projection(embedder: "llama")),"#,
    )
    .unwrap();
    let diff = logits(&m, "moe").max_abs_diff(&logits(&m, "more"));
    println!("max |logit diff| {diff:.2e}");
    assert!(diff <= 1e-5, "{diff}");
    assert_eq!(moe_experts(&m, "more"), [3, 3]);
}

/// A Mixtral read from disk gains a fifth expert from its dense branch (router row: the
/// Mixtral's centroid on the new domain's text) and is written as a Mixtral again:
/// the bytes transformers loaded (scripts/check-emitted.sh), and transformers' logits on
/// them, which route tokens to the new expert.
#[test]
fn a_mixtral_from_disk_with_an_added_expert_matches_transformers() {
    let golden = golden("emitted/add_expert_mixtral.json");
    assert_eq!(golden["architecture"], "MixtralForCausalLM");
    let dir = tempfile::tempdir().unwrap();
    let text = golden_dir().join("nexus/domain.txt");
    let out = dir.path().join("out");
    let passes = format!(
        "AddExpert(into: \"moe\", model: \"mixtral\", expert: \"branch\", text: {:?})],
         emit: [Hf(model: \"moe\", dir: {:?})",
        text.display().to_string(),
        out.display().to_string()
    );
    let (m, report) = pipeline(dir.path(), &passes).unwrap();
    assert_eq!(moe_experts(&m, "moe"), [5, 5]);
    assert!(
        report.contains("`branch`'s FFNs (f32) are stored as bf16 in `moe`"),
        "{report}"
    );
    matches_transformers("add_expert_mixtral", &golden, &m, &out);
}

/// Asserts that the checkpoint `out` written from graph `moe` of `m` holds the bytes
/// transformers loaded (`golden`, scripts/check-emitted.sh) and that `m` and `out` read
/// back give its logits; returns what was read back.
fn matches_transformers(
    name: &str,
    golden: &serde_json::Value,
    m: &Module,
    out: &std::path::Path,
) -> Module {
    common::assert_same_files(&golden["files"], out);
    let input = ids(&golden["input_ids"]);
    let mut back = Module::new();
    upmix::frontend::load(out, "moe", &mut back).unwrap();
    for (what, module) in [("in memory", m), ("read back", &back)] {
        let got = load_runtime(module, "moe", &device())
            .unwrap()
            .logits(&input)
            .unwrap();
        let diff = common::golden_logit_diff(&golden["logits"], &got);
        println!("{name} {what}: max |logit diff| against transformers {diff:.2e}");
        assert!(
            diff <= common::tolerance().tiny_logits,
            "{name} {what}: {diff}"
        );
    }
    back
}

/// Runs pass `name` with pipeline arguments `args` over `m`; its error as text.
fn run_spec(m: &mut Module, name: &str, args: &str) -> Result<(), String> {
    let mut pm = upmix::passes::PassManager::new();
    pm.add(upmix::passes::create(name, args).map_err(|e| e.to_string())?);
    pm.run(m, &mut upmix::passes::PassContext::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// An embedder without a tokenizer whose vocabulary is not the experts' cannot read the
/// texts: refused before anything runs, by Upcycle and AddExpert alike.
#[test]
fn an_embedder_of_another_vocabulary_without_a_tokenizer_is_refused() {
    let mut m = common::load_all(&[("llama", "llama"), ("llama_b", "llama_b")]);
    let upcycle = r#"(into: "moe", experts: ["llama", "llama_b"], top_k: 1)"#;
    run_spec(&mut m, "Upcycle", upcycle).unwrap();
    let mut other = m.graphs["llama_b"].clone();
    other.name = "other".into();
    other.meta.tokenizer = None;
    other.meta.vocab_size = 512;
    m.insert(other);
    let nexus = r#"(into: "nexus", experts: ["llama", "llama_b"], top_k: 1,
        router: Nexus(texts: { "llama": "a.txt", "llama_b": "b.txt" }, embedder: "other"))"#;
    let add = r#"(into: "more", model: "moe", expert: "llama", text: "a.txt", keep_moe: true,
        router: Projection(embedder: "other"))"#;
    for err in [
        run_spec(&mut m, "Upcycle", nexus).unwrap_err(),
        run_spec(&mut m, "AddExpert", add).unwrap_err(),
    ] {
        println!("{err}");
        assert!(err.contains("embedder `other` has no tokenizer"), "{err}");
        assert!(err.contains("512 tokens where `"), "{err}");
        assert!(err.contains("` has 256"), "{err}");
    }
    // The same embedder with the experts' vocabulary reads the texts with their tokenizer.
    m.graphs.get_mut("other").unwrap().meta.vocab_size = 256;
    let err = run_spec(&mut m, "Upcycle", nexus).unwrap_err();
    assert!(!err.contains("tokenizer"), "{err}");
}

/// Bad requests name what is wrong: a model of another architecture, an empty text, an
/// MoE as the new expert, a dense model to extend, a branch trained beyond its FFNs, a
/// projection asked of plain rows.
#[test]
fn bad_add_expert_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    let moe = r#"Upcycle(into: "moe", experts: ["llama", "llama_b"], top_k: 1),"#;
    let cases = [
        (
            r#"AddExpert(into: "x", model: "mixtral", expert: "llama", text: "a.txt")"#.to_string(),
            vec![
                "`llama` is another architecture",
                "rope_theta=10000,",
                "rope_theta=1000000",
            ],
        ),
        (
            r#"AddExpert(into: "x", model: "mixtral", expert: "branch", text: "empty.txt")"#.into(),
            vec!["empty.txt holds no tokens"],
        ),
        (
            r#"Upcycle(into: "x", experts: ["llama", "llama_b"], top_k: 1,
                router: Nexus(texts: { "llama": "a.txt", "llama_b": "empty.txt" }))"#
                .into(),
            vec!["empty.txt holds no tokens"],
        ),
        (
            r#"AddExpert(into: "x", model: "mixtral", expert: "mixtral", text: "a.txt")"#.into(),
            vec!["`mixtral` is itself a mixture of experts"],
        ),
        (
            r#"AddExpert(into: "x", model: "llama", expert: "llama_b", text: "a.txt")"#.into(),
            vec!["`llama` has no mixture of experts"],
        ),
        (
            format!(r#"{moe} AddExpert(into: "x", model: "moe", expert: "llama", text: "a.txt")"#),
            vec!["of `llama` differs from the MoE `moe`'s", "keep_moe: true"],
        ),
        (
            r#"Upcycle(into: "fine", experts: ["llama", "llama"], top_k: 2, granularity: 2),
               AddExpert(into: "x", model: "fine", expert: "llama", text: "a.txt")"#
                .into(),
            vec!["the experts of `fine` have an FFN size of 48, `llama`'s FFN has 96"],
        ),
        (
            r#"AddExpert(into: "x", model: "mixtral", expert: "branch", text: "a.txt",
                router: Projection(embedder: "branch"))"#
                .into(),
            vec!["`mixtral` routes by plain rows"],
        ),
    ];
    for (passes, wanted) in cases {
        let err = pipeline(dir.path(), &passes).unwrap_err();
        println!("{err}\n");
        for w in wanted {
            assert!(err.contains(w), "`{w}` not in: {err}");
        }
    }
}

/// `keep_moe` adds a branch whose other parameters differ, keeping the MoE's.
#[test]
fn keep_moe_adds_a_branch_trained_beyond_its_ffns() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = pipeline(
        dir.path(),
        r#"Upcycle(into: "moe", experts: ["llama", "llama_b"], top_k: 1),
           AddExpert(into: "x", model: "moe", expert: "llama", text: "a.txt", keep_moe: true)"#,
    )
    .unwrap();
    assert_eq!(moe_experts(&m, "x"), [3, 3]);
    let (moe, x) = (&m.graphs["moe"], &m.graphs["x"]);
    let attention = |g: &upmix::ir::Graph| {
        g.node_ids()
            .into_iter()
            .find_map(|n| match &g.node(n).op {
                Op::Attention(a) => Some(a.q),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(attention(moe), attention(x), "the MoE's attention is kept");
}

/// A Nexus MoE as scripts/check-emitted.sh makes it: upmix's layout keeps the projected
/// router (run by upmix's remote code in transformers), and a Qwen2-MoE export writes its
/// rows. Both give transformers' logits on the bytes transformers loaded, and both read
/// back into upmix with the same logits.
#[test]
fn a_nexus_moe_is_written_in_upmix_layout_and_as_qwen2_moe() {
    let dir = tempfile::tempdir().unwrap();
    let text = |name: &str| format!("{:?}", golden_dir().join(name).display().to_string());
    let out = |name: &str| dir.path().join(name);
    let passes = format!(
        "Upcycle(into: \"moe\", experts: [\"llama\", \"llama_b\"], top_k: 1, shared_expert: \
         \"llama\", router: Nexus(texts: {{ \"llama\": {}, \"llama_b\": {} }}, width: 16))],
         emit: [Hf(model: \"moe\", dir: {:?}),
                Hf(model: \"moe\", dir: {:?}, architecture: \"Qwen2MoeForCausalLM\")",
        text("nexus/code.txt"),
        text("nexus/domain.txt"),
        out("upmix").display().to_string(),
        out("qwen2_moe").display().to_string(),
    );
    let (m, _) = pipeline(dir.path(), &passes).unwrap();
    let mixture = m.graphs["moe"]
        .node_ids()
        .into_iter()
        .find_map(|n| match &m.graphs["moe"].node(n).op {
            Op::MixtureOfExperts(x) => Some(x.clone()),
            _ => None,
        })
        .unwrap();
    assert!(matches!(mixture.router, Router::Projected(_)));
    assert!(mixture.shared_expert.is_some());
    for (name, dir) in [("nexus_upmix", "upmix"), ("nexus_qwen2_moe", "qwen2_moe")] {
        let golden = golden(&format!("emitted/{name}.json"));
        let back = matches_transformers(name, &golden, &m, &out(dir));
        let projected = back.graphs["moe"].node_ids().into_iter().any(|n| {
            matches!(&back.graphs["moe"].node(n).op,
                Op::MixtureOfExperts(x) if matches!(x.router, Router::Projected(_)))
        });
        assert_eq!(projected, dir == "upmix", "{name}: the router read back");
    }
}

/// A Nexus MoE without a shared expert is written as a Mixtral and as GGUF (its router
/// rows written out), and both read back with the same logits; a Qwen2-MoE read from disk
/// takes an expert and is written again as Qwen2-MoE.
#[test]
fn nexus_rows_are_written_for_mixtral_and_gguf_and_a_qwen2_moe_takes_an_expert() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| format!("{:?}", dir.path().join(name).display().to_string());
    let passes = format!(
        "Upcycle(into: \"moe\", experts: [\"llama\", \"llama_b\"], top_k: 2, base: \"llama\",
                 router: Nexus(texts: {{ \"llama\": \"a.txt\", \"llama_b\": \"b.txt\" }})),
         Upcycle(into: \"shared\", experts: [\"llama\", \"llama_b\"], top_k: 1,
                 shared_expert: \"llama\", router: Random(seed: 1, std: 0.5))],
         emit: [Hf(model: \"moe\", dir: {}, architecture: \"MixtralForCausalLM\"),
                Gguf(model: \"moe\", file: {}),
                Hf(model: \"shared\", dir: {})",
        out("mixtral"),
        out("moe.gguf"),
        out("qwen2_moe"),
    );
    let (m, _) = pipeline(dir.path(), &passes).unwrap();
    let want = logits(&m, "moe");
    for path in ["mixtral", "moe.gguf"] {
        let mut back = Module::new();
        upmix::frontend::load(&dir.path().join(path), "moe", &mut back).unwrap();
        let diff = want.max_abs_diff(&logits(&back, "moe"));
        println!("{path}: max |logit diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{path}: {diff}");
    }
    let second = format!(
        "Pipeline(models: {{ \"qwen\": Hf({}), \"llama\": Hf({:?}) }},
           passes: [AddExpert(into: \"more\", model: \"qwen\", expert: \"llama\", text: \"a.txt\",
                              keep_moe: true)],
           emit: [Hf(model: \"more\", dir: {})])",
        out("qwen2_moe"),
        common::model_dir("llama").display().to_string(),
        out("more"),
    );
    let (m, _) = run_pipeline(&second, dir.path()).unwrap();
    assert_eq!(moe_experts(&m, "more"), [3, 3]);
    let mut back = Module::new();
    upmix::frontend::load(&dir.path().join("more"), "more", &mut back).unwrap();
    let config = std::fs::read_to_string(dir.path().join("more/config.json")).unwrap();
    assert!(config.contains("Qwen2MoeForCausalLM"), "{config}");
    let diff = logits(&m, "more").max_abs_diff(&logits(&back, "more"));
    assert!(diff <= 1e-5, "{diff}");
}

/// An FFN of a layer the MoE keeps dense would be dropped like the other parameters, so
/// it must agree too.
#[test]
fn a_dense_layer_ffn_that_differs_is_refused() {
    let mut m = common::load_all(&[("llama", "llama"), ("llama_b", "llama_b")]);
    let part = r#"(into: "part", experts: ["llama", "llama_b"], top_k: 1, base: "llama",
        layers: "1..2")"#;
    run_spec(&mut m, "Upcycle", part).unwrap();
    // `llama` with the first FFN of `llama_b`.
    let ffn_of = |g: &upmix::ir::Graph| {
        let n = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).name == "layers.0.ffn")
            .unwrap();
        (n, g.node(n).op.clone())
    };
    let (_, other_ffn) = ffn_of(&m.graphs["llama_b"]);
    let mut branch = m.graphs["llama"].clone();
    branch.name = "branch".into();
    let (n, _) = ffn_of(&branch);
    branch.node_mut(n).op = other_ffn;
    m.insert(branch);
    let add = r#"(into: "x", model: "part", expert: "branch", text: "a.txt")"#;
    let err = run_spec(&mut m, "AddExpert", add).unwrap_err();
    assert!(
        err.contains("`layers.0.ffn.gate` of `branch` differs from the MoE `part`'s"),
        "{err}"
    );
}

/// Any model upmix loads can embed the domains, with its own tokenizer and width: the
/// real SmolLM2 (GGUF, 576 wide, another vocabulary) for the tiny Llamas (64 wide).
#[test]
fn a_gguf_model_of_another_width_and_vocabulary_embeds_the_domains() {
    let dir = tempfile::tempdir().unwrap();
    let model = |name: &str| format!("{:?}", common::model_dir(name).display().to_string());
    let text = format!(
        "Pipeline(models: {{ \"llama\": Hf({}), \"llama_b\": Hf({}), \"smol\": Gguf({:?}) }},
           passes: [Upcycle(into: \"moe\", experts: [\"llama\", \"llama_b\"], top_k: 1,
               router: Nexus(texts: {{ \"llama\": \"a.txt\", \"llama_b\": \"b.txt\" }},
                             embedder: \"smol\", width: 8))])",
        model("llama"),
        model("llama_b"),
        common::gguf_path().display().to_string(),
    );
    write_texts(dir.path());
    let (m, _) = run_pipeline(&text, dir.path()).unwrap();
    let g = &m.graphs["moe"];
    let mut checked = 0;
    for n in g.node_ids() {
        if let Op::MixtureOfExperts(x) = &g.node(n).op {
            let Router::Projected(p) = &x.router else {
                panic!("not projected")
            };
            assert_eq!(m.weights.get(p.domains).unwrap().shape, [2, 576]);
            assert_eq!(m.weights.get(p.projection.gate).unwrap().shape, [8, 576]);
            assert_eq!(m.weights.get(p.projection.down).unwrap().shape, [64, 8]);
            checked += 1;
        }
    }
    assert_eq!(checked, 2);
    assert!(logits(&m, "moe").data.iter().all(|v| v.is_finite()));
}
