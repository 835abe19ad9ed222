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
    checkpoint_names, device, f32_tensors, golden, golden_dir, ids, load, safetensors_f32,
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
    let g = m.graphs.get_mut("mixtral").unwrap();
    let mut layer = 0;
    let moes: Vec<_> = g
        .node_ids()
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, Op::MixtureOfExperts(_)))
        .collect();
    let mut routers = Vec::new();
    for _ in &moes {
        let p = format!("model.layers.{layer}.mlp.router");
        routers.push(Router::Projected(ProjectedRouter {
            domains: add(&mut m, format!("{p}.domains")),
            projection: FeedForward {
                gate: add(&mut m, format!("{p}.gate_proj.weight")),
                up: add(&mut m, format!("{p}.up_proj.weight")),
                down: add(&mut m, format!("{p}.down_proj.weight")),
            },
        }));
        layer += 1;
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
    for (term, value) in [
        ("loss", Some(got.loss)),
        ("ce", Some(got.cross_entropy)),
        ("load_balance", got.load_balance),
        ("z_loss", got.z_loss),
    ] {
        let (v, w) = (f64::from(value.unwrap()), spec[term].as_f64().unwrap());
        println!("{term}: {v} (torch {w})");
        assert!(
            (v - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{term}: {v} vs {w}"
        );
    }
    let grads: HashMap<WeightId, &Vec<f32>> =
        got.gradients.iter().map(|(id, t)| (*id, &t.data)).collect();
    let torch = f32_tensors(&golden_dir().join("nexus/grads.safetensors"));
    assert_eq!(torch.len(), names.len());
    for (tensor, w) in &torch {
        let g = grads[&names[tensor]];
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
