//! `AttentionExperts` (BAM attention experts): invariants and KV-cached decoding.

mod common;

use common::{device, golden, golden_dir, ids, tolerance};
use upmix::backends::load_runtime;
use upmix::emitters::{emit_hf, HfEmitOptions};
use upmix::frontend::SafetensorsFile;
use upmix::ir::{HostTensor, Module, Op};
use upmix::passes::{
    AttentionExperts, AttentionRouting, Bam, KeptNorm, KvSource, Pass, RouterInit, ShareKv,
};

const TOKENS: [u32; 12] = [5, 17, 42, 99, 3, 250, 7, 64, 1, 200, 31, 8];

fn load(models: &[(&str, &str)]) -> Module {
    common::load_all(models)
}

fn pass(experts: &[&str], routing: AttentionRouting, router: RouterInit) -> AttentionExperts {
    AttentionExperts {
        into: "bam".into(),
        experts: experts.iter().map(|s| s.to_string()).collect(),
        routing,
        router,
        base: None,
        weights: None,
        layers: None,
        split_heads: None,
    }
}

fn run(m: &mut Module, pass: impl Pass + 'static) -> Result<(), String> {
    common::run_pass(m, pass)
}

fn logits(m: &Module, graph: &str) -> HostTensor {
    load_runtime(m, graph, &device())
        .unwrap()
        .logits(&TOKENS)
        .unwrap()
}

fn mixtures(m: &Module) -> usize {
    let g = &m.graphs["bam"];
    g.node_ids()
        .into_iter()
        .filter(|n| matches!(g.node(*n).op, Op::MixtureOfAttention(_)))
        .count()
}

#[test]
fn copies_of_one_model_under_soft_routing_equal_it() {
    // Llama; Cohere2 (parallel blocks, a window of 4 on three layers, a layer without RoPE).
    for (fixture, layers) in [("llama", 2), ("cohere2", 4)] {
        let mut m = load(&[("a", fixture), ("b", fixture), ("c", fixture)]);
        let router = RouterInit::Random { seed: 5, std: 1.0 };
        run(
            &mut m,
            pass(&["a", "b", "c"], AttentionRouting::Soft, router),
        )
        .unwrap();
        assert_eq!(mixtures(&m), layers);
        let diff = logits(&m, "a").max_abs_diff(&logits(&m, "bam"));
        assert!(diff <= 1e-5, "{fixture}: {diff}");
    }
}

#[test]
fn split_heads_under_uniform_routing_equal_the_dense_attention() {
    let mut m = load(&[("a", "llama")]);
    let mut p = pass(&["a"], AttentionRouting::Soft, RouterInit::Zeros);
    p.split_heads = Some(2);
    run(&mut m, p).unwrap();
    let g = &m.graphs["bam"];
    let moa = g
        .node_ids()
        .into_iter()
        .find_map(|n| match &g.node(n).op {
            Op::MixtureOfAttention(x) => Some(x.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(moa.experts.len(), 2);
    assert_eq!((moa.experts[0].n_heads, moa.experts[0].n_kv_heads), (2, 1));
    let diff = logits(&m, "a").max_abs_diff(&logits(&m, "bam"));
    assert!(diff <= 1e-5, "{diff}");
    // A router that is not uniform changes the function: the test can fail.
    let mut m = load(&[("a", "llama")]);
    let mut p = pass(
        &["a"],
        AttentionRouting::Soft,
        RouterInit::Random { seed: 1, std: 1.0 },
    );
    p.split_heads = Some(2);
    run(&mut m, p).unwrap();
    let diff = logits(&m, "a").max_abs_diff(&logits(&m, "bam"));
    assert!(diff > 1e-3, "{diff}");
}

/// Greedy generation of `bam` (KV-cached) picks at every step the argmax of a full
/// recomputation over the sequence so far.
fn assert_cached_decoding_equals_recomputation(m: &Module, label: &str) {
    let mut rt = load_runtime(m, "bam", &device()).unwrap();
    let prompt = &TOKENS[..5];
    let out = rt.generate(prompt, 12, None).unwrap();
    let mut seq = prompt.to_vec();
    seq.extend(&out);
    let full = rt.logits(&seq[..seq.len() - 1]).unwrap();
    for (i, &token) in out.iter().enumerate() {
        let row = full.row(prompt.len() - 1 + i);
        let best = (0..row.len())
            .max_by(|&x, &y| row[x].total_cmp(&row[y]))
            .unwrap();
        assert_eq!(best as u32, token, "{label} step {i}");
    }
}

fn share_kv() -> ShareKv {
    ShareKv {
        model: "bam".into(),
        from: None,
    }
}

/// A BAM model written independently in plain torch from the formulas
/// (`make_fixtures.py bam`): attention experts of llama, llama_b and llama_c with expert or
/// shared (averaged) K/V, soft or top-2 routing, every other parameter averaged, the
/// routers read from the golden.
#[test]
fn bam_layers_match_a_torch_golden() {
    let g = golden("bam/golden.json");
    let routers = golden_dir().join("bam/routers.safetensors");
    let file = SafetensorsFile::open(&routers).unwrap();
    for (variant, routing, shared) in [
        ("expert_kv_soft", AttentionRouting::Soft, false),
        ("expert_kv_top2", AttentionRouting::TopK(2), false),
        ("shared_kv_soft", AttentionRouting::Soft, true),
        ("shared_kv_top2", AttentionRouting::TopK(2), true),
    ] {
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
        run(&mut m, pass(&["a", "b", "c"], routing, RouterInit::Zeros)).unwrap();
        if shared {
            run(&mut m, share_kv()).unwrap();
        }
        let graph = &m.graphs["bam"];
        let mut swaps = Vec::new();
        for id in graph.node_ids() {
            if let Op::MixtureOfAttention(moa) = &graph.node(id).op {
                assert_eq!(moa.shared_kv(), shared);
                let name = format!("{}.router", graph.node(id).name);
                let info = &file.tensors[&name];
                let bytes = &file.file.bytes()
                    [info.offset..info.offset + info.shape.iter().product::<usize>() * 4];
                let values = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                swaps.push((moa.router, HostTensor::new(info.shape.clone(), values)));
            }
        }
        assert_eq!(swaps.len(), 2);
        let mut rt = load_runtime(&m, "bam", &device()).unwrap();
        rt.replace_weights(&swaps).unwrap();
        let logits = rt.logits(&ids(&g["input_ids"])).unwrap();
        let worst = common::golden_logit_diff(&g["logits"][variant], &logits);
        println!(
            "bam {variant} on {}: max abs logit difference {worst:e}",
            device()
        );
        assert!(worst <= tolerance().tiny_logits, "{variant}: {worst}");
    }
}

#[test]
fn sharing_kv_of_copies_changes_nothing() {
    let mut m = load(&[("a", "cohere2"), ("b", "cohere2")]);
    let router = RouterInit::Random { seed: 2, std: 1.0 };
    run(&mut m, pass(&["a", "b"], AttentionRouting::TopK(1), router)).unwrap();
    let before = logits(&m, "bam");
    run(&mut m, share_kv()).unwrap();
    let diff = before.max_abs_diff(&logits(&m, "bam"));
    assert!(diff <= 1e-5, "{diff}");
}

/// Greedy generation (KV-cached: one cache per expert, or one shared) picks at every step
/// the argmax of a full recomputation over the sequence so far.
#[test]
fn cached_decoding_equals_full_recomputation() {
    let variants = [
        (AttentionRouting::Soft, false),
        (AttentionRouting::TopK(1), false),
        (AttentionRouting::Soft, true),
    ];
    for (routing, shared) in variants {
        let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
        let router = RouterInit::Random { seed: 9, std: 1.0 };
        run(&mut m, pass(&["a", "b"], routing, router)).unwrap();
        if shared {
            run(&mut m, share_kv()).unwrap();
        }
        assert_cached_decoding_equals_recomputation(&m, &format!("{routing:?} shared {shared}"));
    }
}

#[test]
fn bad_requests_are_clear_errors_and_create_nothing() {
    let cases: [(AttentionExperts, &str); 3] = [
        (
            pass(&["a", "b"], AttentionRouting::TopK(3), RouterInit::Zeros),
            "TopK(3) must be between 1 and the number of experts (2)",
        ),
        (
            AttentionExperts {
                split_heads: Some(2),
                ..pass(&["a", "b"], AttentionRouting::Soft, RouterInit::Zeros)
            },
            "split_heads cuts one model's heads; 2 models are given",
        ),
        (
            AttentionExperts {
                split_heads: Some(3),
                ..pass(&["a"], AttentionRouting::Soft, RouterInit::Zeros)
            },
            "split_heads 3 must divide both the 4 heads and the 2 KV heads",
        ),
    ];
    for (p, message) in cases {
        let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
        let err = run(&mut m, p).unwrap_err();
        assert!(err.contains(message), "{err}");
        assert!(m.graph("bam").is_none());
    }
}

fn bam(experts: &[&str], top_k: usize, kv: KvSource) -> Bam {
    Bam {
        into: "bam".into(),
        experts: experts.iter().map(|s| s.to_string()).collect(),
        top_k,
        router: RouterInit::Random { seed: 4, std: 1.0 },
        attention: AttentionRouting::Soft,
        kv,
        parallel: None,
        base: None,
        weights: None,
        layers: None,
    }
}

fn count(m: &Module, kind: &str) -> usize {
    let g = &m.graphs["bam"];
    g.node_ids()
        .into_iter()
        .filter(|n| g.node(*n).op.kind() == kind)
        .count()
}

#[test]
fn bam_of_copies_keeps_the_dense_logits() {
    for fixture in ["llama", "cohere2"] {
        for kv in [
            KvSource::Expert,
            KvSource::Shared,
            KvSource::From("a".into()),
        ] {
            for top_k in [1, 2] {
                let mut m = load(&[("a", fixture), ("b", fixture)]);
                run(&mut m, bam(&["a", "b"], top_k, kv.clone())).unwrap();
                assert!(count(&m, "MixtureOfAttention") >= 2);
                assert_eq!(
                    count(&m, "MixtureOfAttention"),
                    count(&m, "MixtureOfExperts")
                );
                assert_eq!(m.graphs.len(), 3, "no helper model is left behind");
                let diff = logits(&m, "a").max_abs_diff(&logits(&m, "bam"));
                assert!(diff <= 1e-5, "{fixture} {kv:?} top_k {top_k}: {diff}");
            }
        }
    }
}

/// Attention experts and sparse FFN experts in one block, decoded with the KV cache,
/// equal a full recomputation at every step; in parallel blocks too.
#[test]
fn bam_decoding_equals_full_recomputation() {
    for (kv, parallel) in [
        (KvSource::Expert, None),
        (KvSource::Shared, None),
        (KvSource::Shared, Some(KeptNorm::Attention)),
    ] {
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
        let mut p = bam(&["a", "b", "c"], 2, kv.clone());
        p.parallel = parallel;
        run(&mut m, p).unwrap();
        assert_cached_decoding_equals_recomputation(&m, &format!("{kv:?} {parallel:?}"));
    }
}

/// Writes graph `name` of `m` as a Hugging Face checkpoint and loads it back.
fn emit_and_load(m: &Module, name: &str, dir: &std::path::Path) -> Module {
    let report = emit_hf(m, name, dir, &HfEmitOptions::default()).unwrap();
    assert_eq!(report.architecture, "UpmixBamForCausalLM");
    for file in ["configuration_upmix_bam.py", "modeling_upmix_bam.py"] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    let mut back = Module::new();
    upmix::frontend::load(dir, "back", &mut back).unwrap();
    back
}

/// upmix's BAM checkpoints (attention experts with expert or shared KV, FFN experts,
/// parallel blocks) load back bit-identical: same ops, same weights, same logits.
#[test]
fn bam_checkpoints_round_trip_bit_identically() {
    let cases = [
        (KvSource::Expert, None, 2),
        (KvSource::Shared, Some(KeptNorm::Attention), 1),
    ];
    for (kv, parallel, top_k) in cases {
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
        let mut p = bam(&["a", "b", "c"], top_k, kv.clone());
        p.parallel = parallel;
        run(&mut m, p).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let back = emit_and_load(&m, "bam", &tmp.path().join("bam"));
        let (a, b) = (
            m.graphs["bam"].weight_ids(),
            back.graphs["back"].weight_ids(),
        );
        assert_eq!(a.len(), b.len(), "{kv:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                m.weights.materialize_bytes(*x).unwrap(),
                back.weights.materialize_bytes(*y).unwrap(),
                "{kv:?}: {}",
                m.weights.get(*x).unwrap().name
            );
        }
        // The same nodes with the same inputs (a parallel block's nodes may print in
        // another topological order).
        let ops = |m: &Module, g: &str| -> Vec<String> {
            let mut lines: Vec<String> = upmix::ir::print_graph(&m.graphs[g], &m.weights)
                .lines()
                .skip(1)
                .take_while(|l| *l != "weights:")
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        assert_eq!(ops(&m, "bam"), ops(&back, "back"), "{kv:?}");
        assert_eq!(logits(&m, "bam"), logits(&back, "back"), "{kv:?}");
    }
}

/// Attention experts alone (dense FFNs), and a Llama made parallel, are written in the
/// same format.
#[test]
fn attention_experts_and_parallel_blocks_alone_are_written_too() {
    let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
    let router = RouterInit::Random { seed: 9, std: 1.0 };
    run(&mut m, pass(&["a", "b"], AttentionRouting::TopK(1), router)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let back = emit_and_load(&m, "bam", &tmp.path().join("experts"));
    assert_eq!(logits(&m, "bam"), logits(&back, "back"));

    let mut m = load(&[("bam", "llama")]);
    let parallel = upmix::passes::ParallelAttention {
        model: "bam".into(),
        keep: KeptNorm::Attention,
    };
    run(&mut m, parallel).unwrap();
    let back = emit_and_load(&m, "bam", &tmp.path().join("parallel"));
    assert_eq!(logits(&m, "bam"), logits(&back, "back"));
}

/// Top-k attention experts skip the experts no row picked (sparse dispatch); that gives
/// the logits of running every expert.
#[test]
fn sparse_and_dense_dispatch_agree() {
    for kv in [KvSource::Expert, KvSource::Shared] {
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
        let mut p = bam(&["a", "b", "c"], 1, kv.clone());
        p.attention = AttentionRouting::TopK(1);
        run(&mut m, p).unwrap();
        for tokens in [&TOKENS[..], &TOKENS[..1]] {
            // Products of fewer rows may round differently in gemm: not bit-exact.
            let diff = common::sparse_dense_diff(&m, "bam", tokens);
            assert!(diff <= 1e-5, "{kv:?}, {} tokens: {diff}", tokens.len());
        }
    }
}

/// The BAM checkpoints `scripts/check-emitted.sh` had transformers load through upmix's
/// remote-code module: upmix writes the same bytes, its logits equal those transformers
/// computed, and transformers' one training step had a finite loss and gave every expert
/// and router a gradient.
#[test]
fn transformers_loads_and_trains_the_emitted_bam_checkpoints() {
    let variants = [
        (
            "bam_expert_kv",
            KvSource::Expert,
            AttentionRouting::Soft,
            None,
        ),
        (
            "bam_shared_kv_parallel",
            KvSource::Shared,
            AttentionRouting::TopK(2),
            Some(KeptNorm::Attention),
        ),
    ];
    for (name, kv, attention, parallel) in variants {
        let g = golden(&format!("emitted/{name}.json"));
        let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
        let mut p = bam(&["a", "b", "c"], 2, kv);
        (p.attention, p.parallel) = (attention, parallel);
        run(&mut m, p).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        emit_hf(&m, "bam", &out, &HfEmitOptions::default()).unwrap();
        common::assert_same_files(&g["files"], &out);
        let got = load_runtime(&m, "bam", &device())
            .unwrap()
            .logits(&ids(&g["input_ids"]))
            .unwrap();
        let worst = common::golden_logit_diff(&g["logits"], &got);
        println!(
            "{name} on {}: max abs logit difference to transformers {worst:e}",
            device()
        );
        assert!(worst <= tolerance().tiny_logits, "{name}: {worst}");
        assert!(g["loss"].as_f64().unwrap().is_finite(), "{name}");
        let norms = g["grad_norms"].as_object().unwrap();
        // Every attention expert's q and o, every FFN expert, both routers, in both layers.
        let expected = 2 * (3 * 2 + 3 * 3 + 2)
            + if name == "bam_expert_kv" {
                2 * 3 * 2
            } else {
                0
            };
        assert_eq!(norms.len(), expected, "{name}: {:?}", norms.keys());
        for (param, norm) in norms {
            assert!(
                norm.as_f64().unwrap() > 0.0,
                "{name}: {param} got no gradient"
            );
        }
    }
}

/// A BAM model with shared K/V and top-2 routing of both mixtures is exactly a JetMoE:
/// written as `JetMoeForCausalLM` (grouped-query K/V repeated per query head, the residual
/// stream scaled for JetMoE's fixed norm epsilon), transformers' own JetMoE computes the
/// logits and greedy continuation of upmix's runtime (`scripts/check-emitted.sh` records
/// them). A soft-routed model is refused, with the reason.
#[test]
fn a_shared_kv_top_k_bam_model_is_written_as_jetmoe() {
    let g = golden("emitted/bam_jetmoe.json");
    assert_eq!(g["architecture"], "JetMoeForCausalLM");
    let mut m = load(&[("a", "llama"), ("b", "llama_b"), ("c", "llama_c")]);
    let mut p = bam(&["a", "b", "c"], 2, KvSource::Shared);
    p.attention = AttentionRouting::TopK(2);
    run(&mut m, p).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("jetmoe");
    let opts = HfEmitOptions {
        architecture: Some("JetMoeForCausalLM".into()),
        ..Default::default()
    };
    emit_hf(&m, "bam", &out, &opts).unwrap();
    common::assert_same_files(&g["files"], &out);
    let mut rt = load_runtime(&m, "bam", &device()).unwrap();
    let got = rt.logits(&ids(&g["input_ids"])).unwrap();
    let worst = common::golden_logit_diff(&g["logits"], &got);
    println!(
        "bam as JetMoE on {}: max abs logit difference to transformers {worst:e}",
        device()
    );
    assert!(worst <= tolerance().tiny_logits, "{worst}");
    let greedy = rt.generate(&ids(&g["prompt"]), 16, None).unwrap();
    assert_eq!(greedy, ids(&g["greedy"]));

    let mut m = load(&[("a", "llama"), ("b", "llama_b")]);
    run(&mut m, bam(&["a", "b"], 2, KvSource::Shared)).unwrap();
    let err = emit_hf(&m, "bam", &tmp.path().join("soft"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("JetMoE renormalises the top-k routing weights"),
        "{err}"
    );
}
