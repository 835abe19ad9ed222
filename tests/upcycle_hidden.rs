//! `Upcycle` routers computed from activations, on the example models (a seed and three
//! domain branches): `Hidden` rows against mergekit-moe's (tests/golden/upcycle_hidden,
//! made by scripts/make_router_golden.py), and `DomainCentroid` rows and notes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::device;
use upmix::ir::{HostTensor, Module, Op};
use upmix::passes::{PassContext, PassManager, RouterInit, Upcycle};
use upmix::pipeline::DeviceRuntimes;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn load() -> Module {
    let mut m = Module::new();
    for name in ["seed", "code", "law", "math"] {
        upmix::frontend::load(&example(&format!("models/{name}")), name, &mut m).unwrap();
    }
    m
}

fn upcycle(experts: &[&str], router: RouterInit) -> Upcycle {
    Upcycle {
        into: "moe".into(),
        experts: experts.iter().map(|s| s.to_string()).collect(),
        top_k: 2,
        router,
        base: Some("seed".into()),
        weights: None,
        shared_expert: None,
        layers: None,
        granularity: None,
        normalize_top_k: None,
    }
}

/// Runs `pass` with runtimes on the test device; returns the notes.
fn run(m: &mut Module, pass: Upcycle) -> Result<Vec<String>, String> {
    let mut provider = DeviceRuntimes::new(device());
    let mut cx = PassContext {
        runtimes: Some(&mut provider),
        notes: Vec::new(),
        ..PassContext::default()
    };
    let mut pm = PassManager::new();
    pm.add(Box::new(pass));
    pm.run(m, &mut cx).map_err(|e| e.to_string())?;
    Ok(cx.notes)
}

/// The router matrix `[experts, hidden]` of every MoE layer.
fn routers(m: &Module) -> Vec<HostTensor> {
    let g = &m.graphs["moe"];
    let order = g.topo_order().unwrap();
    order
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::MixtureOfExperts(moe) => Some(moe.router.rows(&m.weights).unwrap()),
            _ => None,
        })
        .collect()
}

fn strings(v: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn hidden_router_rows_match_mergekit_moe() {
    let golden = common::golden("upcycle_hidden/router.json");
    let mut m = load();
    let router = RouterInit::Hidden {
        prompts: strings(&golden["prompts"]),
        negative_prompts: strings(&golden["negative_prompts"]),
        model: None,
    };
    run(&mut m, upcycle(&["code", "law", "math"], router)).unwrap();
    let ours = routers(&m);
    let theirs = golden["routers"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (layer, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let rows = b.as_array().unwrap();
        let b = HostTensor::new(
            vec![rows.len(), rows[0].as_array().unwrap().len()],
            rows.iter()
                .flat_map(|row| row.as_array().unwrap())
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        );
        assert_eq!(a.shape, b.shape);
        let diff = a.max_abs_diff(&b);
        eprintln!("layer {layer}: router rows within {diff:.2e} of mergekit-moe's");
        assert!(diff <= 1e-4, "layer {layer}: max difference {diff}");
    }
}

#[test]
fn domain_centroid_rows_are_unit_length_and_tell_domains_apart() {
    let mut m = load();
    let texts = ["code", "law", "math"]
        .into_iter()
        .map(|d| (d.to_string(), example(&format!("data/{d}/train.txt"))))
        .collect();
    let router = RouterInit::DomainCentroid {
        texts,
        model: None,
        max_tokens: Some(1024),
        window: None,
    };
    run(&mut m, upcycle(&["code", "law", "math"], router)).unwrap();
    for (layer, r) in routers(&m).iter().enumerate() {
        let rows: Vec<&[f32]> = (0..r.shape[0]).map(|e| r.row(e)).collect();
        for row in &rows {
            let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "layer {layer}: norm {norm}");
        }
        assert!(rows[0] != rows[1] && rows[1] != rows[2], "layer {layer}");
    }
}

#[test]
fn identical_corpora_give_collinear_rows_and_a_note() {
    let mut m = load();
    let text = example("data/law/eval.txt");
    let texts = [
        ("code".to_string(), text.clone()),
        ("law".to_string(), text),
    ]
    .into();
    let router = RouterInit::DomainCentroid {
        texts,
        model: None,
        max_tokens: Some(256),
        window: None,
    };
    let notes = run(&mut m, upcycle(&["code", "law"], router)).unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("`code` and `law` are nearly collinear")),
        "{notes:?}"
    );
}

#[test]
fn missing_prompts_or_texts_are_clear_errors_and_create_nothing() {
    let prompts = |names: &[&str]| -> BTreeMap<String, Vec<String>> {
        names
            .iter()
            .map(|n| (n.to_string(), vec!["fn main".to_string()]))
            .collect()
    };
    let cases = [
        (
            RouterInit::Hidden {
                prompts: prompts(&["code", "law"]),
                negative_prompts: BTreeMap::new(),
                model: None,
            },
            "no prompts for expert `math`",
        ),
        (
            RouterInit::Hidden {
                prompts: prompts(&["code", "law", "math", "poetry"]),
                negative_prompts: BTreeMap::new(),
                model: None,
            },
            "`poetry`, which is not an expert",
        ),
        (
            RouterInit::DomainCentroid {
                texts: [
                    ("code".to_string(), example("data/code/train.txt")),
                    ("law".to_string(), example("data/law/train.txt")),
                    ("math".to_string(), example("data/nope.txt")),
                ]
                .into(),
                model: None,
                max_tokens: None,
                window: None,
            },
            "nope.txt",
        ),
    ];
    for (router, expected) in cases {
        let mut m = load();
        let err = run(&mut m, upcycle(&["code", "law", "math"], router)).expect_err("an error");
        assert!(err.contains(expected), "{err}");
        assert!(m.graph("moe").is_none());
    }
}

#[test]
fn a_router_model_of_another_width_is_an_error_naming_it() {
    let prompts = ["code", "law", "math"]
        .into_iter()
        .map(|e| (e.to_string(), vec![format!("{e} text")]))
        .collect();
    let texts = ["code", "law", "math"]
        .into_iter()
        .map(|d| (d.to_string(), example(&format!("data/{d}/train.txt"))))
        .collect();
    let routers = [
        RouterInit::Hidden {
            prompts,
            negative_prompts: BTreeMap::new(),
            model: Some("narrow".into()),
        },
        RouterInit::DomainCentroid {
            texts,
            model: Some("narrow".into()),
            max_tokens: Some(64),
            window: None,
        },
    ];
    for router in routers {
        let mut m = load();
        common::add_rewidthed_copy(&mut m, "seed", "narrow", 32);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&mut m, upcycle(&["code", "law", "math"], router.clone()))
        }));
        let err = result
            .unwrap_or_else(|_| panic!("{router:?} panicked"))
            .expect_err("an error");
        for needle in ["router model `narrow`", "hidden size 32", "64"] {
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
        assert!(m.graph("moe").is_none());
    }
}
