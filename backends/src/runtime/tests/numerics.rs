//! What a forward pass computes: layers against the naive reference, and models against
//! equivalent ones (sparse vs dense experts, identical experts vs one FFN, GQA vs repeated
//! heads, a tied lm head).

use burn_flex::{Flex, FlexDevice};
use upmix_ir::Runtime;

use super::{max_diff, random_ffn, reference, weight_id, Config, HostMlp, HostModel, BASE, PROMPT};
use crate::runtime::BurnRuntime;

#[test]
fn norm_and_attention_match_naive_reference() {
    let model = HostModel::random(
        Config {
            biases: true,
            ..BASE
        },
        7,
    );
    let mut rt = model.runtime();
    let want = reference(&model, &PROMPT);
    let nodes = ["layers.1.attn", "layers.0.attn_norm", "layers.0.attn"];
    for node in nodes {
        let got = rt.hidden_states(&PROMPT, node).unwrap();
        let diff = max_diff(&got, &want[node]);
        assert!(diff < 1e-5, "{node}: max diff {diff}");
    }
    // Several nodes from one pass, in the order asked.
    let all = rt.hidden_states_at(&PROMPT, &nodes).unwrap();
    for (got, node) in all.iter().zip(nodes) {
        let diff = max_diff(got, &want[node]);
        assert!(diff < 1e-5, "{node} (one pass): max diff {diff}");
    }
    let logits = rt.logits(&PROMPT).unwrap();
    let diff = max_diff(&logits, &want["lm_head"]);
    assert!(diff < 1e-5, "logits: max diff {diff}");
}

/// Four random experts, top-2, and a gated shared expert in every layer.
fn moe_model(seed: u64, normalize: bool) -> HostModel {
    HostModel::random(BASE, seed).with_moe(seed + 1, |rng, _| HostMlp::Moe {
        router: rng.vec(4 * BASE.hidden, 1.0),
        experts: (0..4).map(|_| random_ffn(rng, &BASE)).collect(),
        top_k: 2,
        normalize,
        shared: Some((random_ffn(rng, &BASE), Some(rng.vec(BASE.hidden, 1.0)))),
    })
}

#[test]
fn moe_with_shared_expert_matches_naive_reference() {
    let model = moe_model(11, false);
    let mut rt = model.runtime();
    let want = reference(&model, &PROMPT);
    let got = rt.hidden_states(&PROMPT, "layers.0.ffn").unwrap();
    let diff = max_diff(&got, &want["layers.0.ffn"]);
    assert!(diff < 1e-5, "moe: max diff {diff}");
    let logits = rt.logits(&PROMPT).unwrap();
    let diff = max_diff(&logits, &want["lm_head"]);
    assert!(diff < 1e-5, "logits: max diff {diff}");
}

#[test]
fn sliding_window_matches_naive_reference() {
    let model = HostModel::random(
        Config {
            window: Some(3),
            ..BASE
        },
        101,
    );
    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 % 32) as u32).collect();
    let want = reference(&model, &tokens);
    let got = model.runtime().logits(&tokens).unwrap();
    let diff = max_diff(&got, &want["lm_head"]);
    assert!(diff < 1e-5, "max diff {diff}");
}

#[test]
fn sparse_moe_equals_the_dense_reference() {
    let model = moe_model(111, true);
    let mut rt = model.runtime();
    let tokens: Vec<u32> = (0..64).map(|i| (i * 11 % 32) as u32).collect();
    let sparse = rt.logits(&tokens).unwrap();
    rt.set_moe_dispatch(crate::runtime::MoeDispatch::Dense);
    let dense = rt.logits(&tokens).unwrap();
    let diff = sparse.max_abs_diff(&dense);
    assert!(diff < 1e-5, "max diff {diff}");
}

#[test]
fn a_tied_embedding_and_lm_head_share_one_buffer() {
    let model = HostModel::random(Config { tied: true, ..BASE }, 141);
    let module = model.module();
    let rt = BurnRuntime::<Flex>::new(&module, "tiny", &FlexDevice).unwrap();
    let id = weight_id(&module, "embed");
    assert_eq!(rt.plan.params.uses(id), 1);
    let want = reference(&model, &PROMPT);
    let diff = max_diff(&model.runtime().logits(&PROMPT).unwrap(), &want["lm_head"]);
    assert!(diff < 1e-5, "max diff {diff}");
}

#[test]
fn identical_experts_equal_the_dense_model() {
    let dense = HostModel::random(BASE, 31);
    let moe = dense.clone().with_moe(32, |rng, ffn| HostMlp::Moe {
        router: rng.vec(4 * BASE.hidden, 1.0),
        experts: vec![ffn.clone(); 4],
        top_k: 2,
        normalize: true,
        shared: None,
    });
    let a = dense.runtime().logits(&PROMPT).unwrap();
    let b = moe.runtime().logits(&PROMPT).unwrap();
    let diff = a.max_abs_diff(&b);
    assert!(diff < 1e-5, "max diff {diff}");
}

#[test]
fn grouped_query_attention_equals_repeated_heads() {
    let gqa = HostModel::random(Config { tied: true, ..BASE }, 41);
    assert_eq!(gqa.cfg.kv_heads, gqa.cfg.heads / 2);
    // The same model with each KV head's rows copied for every query head that reads it.
    let mut mha = gqa.clone();
    mha.cfg.kv_heads = mha.cfg.heads;
    let rows = gqa.cfg.head_dim * gqa.cfg.hidden;
    let group = gqa.cfg.heads / gqa.cfg.kv_heads;
    for layer in &mut mha.layers {
        let repeat = |w: &[f32]| -> Vec<f32> {
            (0..gqa.cfg.heads)
                .flat_map(|h| w[(h / group) * rows..(h / group + 1) * rows].to_vec())
                .collect()
        };
        layer.k = repeat(&layer.k);
        layer.v = repeat(&layer.v);
    }
    let a = gqa.runtime().logits(&PROMPT).unwrap();
    assert_eq!(a.shape, vec![PROMPT.len(), BASE.vocab]);
    let b = mha.runtime().logits(&PROMPT).unwrap();
    let diff = a.max_abs_diff(&b);
    assert!(diff < 1e-5, "max diff {diff}");
}
