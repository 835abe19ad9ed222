//! `ParallelAttention`: a Llama's sequential blocks become exactly the parallel blocks the
//! Cohere frontend builds.

mod common;

use common::{device, load};
use upmix::backends::load_runtime;
use upmix::ir::{Graph, Op};
use upmix::passes::{KeptNorm, ParallelAttention, PassContext, PassManager};

/// Layer `layer`'s nodes as `(name, kind, input names)`, norms and attention kinds
/// written alike (Cohere's are LayerNorms, Llama's RMSNorms).
fn block_shape(g: &Graph, layer: usize) -> Vec<(String, String, Vec<String>)> {
    let prefix = format!("layers.{layer}.");
    let mut rows: Vec<_> = g
        .node_ids()
        .into_iter()
        .filter(|&n| g.node(n).name.starts_with(&prefix))
        .map(|n| {
            let kind = match g.node(n).op {
                Op::RmsNorm { .. } | Op::LayerNorm { .. } => "Norm".to_string(),
                ref op => op.kind().to_string(),
            };
            let inputs = g
                .inputs(n)
                .iter()
                .map(|i| g.node(*i).name.clone())
                .collect();
            (g.node(n).name.clone(), kind, inputs)
        })
        .collect();
    rows.sort();
    rows
}

fn parallel(m: &mut upmix::ir::Module, model: &str, keep: KeptNorm) {
    let mut pm = PassManager::new();
    pm.add(Box::new(ParallelAttention {
        model: model.into(),
        keep,
    }));
    pm.run(m, &mut PassContext::default()).unwrap();
}

#[test]
fn a_llama_gets_the_cohere_block_shape() {
    let cohere = load("cohere");
    for keep in [KeptNorm::Attention, KeptNorm::Ffn] {
        let mut m = load("llama");
        let before = load_runtime(&m, "llama", &device())
            .unwrap()
            .logits(&[5, 17, 42, 99])
            .unwrap();
        parallel(&mut m, "llama", keep);
        for layer in 0..2 {
            assert_eq!(
                block_shape(&m.graphs["llama"], layer),
                block_shape(&cohere.graphs["cohere"], layer),
                "{keep:?} layer {layer}"
            );
        }
        // It runs, and (as its doc says) computes another function.
        let after = load_runtime(&m, "llama", &device())
            .unwrap()
            .logits(&[5, 17, 42, 99])
            .unwrap();
        assert!(before.max_abs_diff(&after) > 1e-3);
    }
}

#[test]
fn the_kept_norm_is_the_one_asked_for() {
    let weight = |m: &upmix::ir::Module| {
        let g = &m.graphs["llama"];
        let n = g.find("layers.0.norm").unwrap();
        match g.node(n).op {
            Op::RmsNorm { weight, .. } => m.weights.get(weight).unwrap().name.clone(),
            _ => unreachable!(),
        }
    };
    let mut m = load("llama");
    parallel(&mut m, "llama", KeptNorm::Attention);
    assert_eq!(weight(&m), "layers.0.attn_norm.weight");
    let mut m = load("llama");
    parallel(&mut m, "llama", KeptNorm::Ffn);
    assert_eq!(weight(&m), "layers.0.ffn_norm.weight");
}

#[test]
fn parallel_blocks_are_refused_a_second_time() {
    let mut m = load("cohere");
    let mut pm = PassManager::new();
    pm.add(Box::new(ParallelAttention {
        model: "cohere".into(),
        keep: KeptNorm::Attention,
    }));
    let err = pm
        .run(&mut m, &mut PassContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`layers.0.attn` is not in a sequential block"),
        "{err}"
    );
}
