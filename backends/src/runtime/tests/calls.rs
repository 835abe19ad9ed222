//! The runtime's calls: cached and batched decoding, batched logits, scores, weight
//! replacement, log-likelihoods, and the errors of bad inputs and invalid graphs.

use burn_flex::{Flex, FlexDevice};
use upmix_ir::{HostTensor, Module, Op, Runtime, RuntimeError, WeightExpr};

use super::{argmax, softmax_ref, weight_id, Config, HostModel, Lcg, BASE, PROMPT};
use crate::runtime::generate::Decoder;
use crate::runtime::BurnRuntime;

#[test]
fn kv_cached_decoding_matches_full_recomputation() {
    // Without and with a sliding window shorter than the run.
    for window in [None, Some(7)] {
        let model = HostModel::random(Config { window, ..BASE }, 21);
        let mut rt = model.runtime();
        // Step by step: each cached single-token pass gives the last row of a full pass.
        let mut tokens = PROMPT.to_vec();
        let (mut decoder, mut cached) = Decoder::prefill(&rt, &[&PROMPT], 300).unwrap();
        for step in 0..300 {
            let full = rt.logits(&tokens).unwrap();
            let last = full.row(tokens.len() - 1);
            let cached_last = crate::runtime::to_host(cached).unwrap();
            let diff = last
                .iter()
                .zip(&cached_last.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-5,
                "{window:?}, step {step}: cached logits differ by {diff}"
            );
            let next = argmax(last);
            tokens.push(next);
            cached = decoder.step(&rt, ids(&[next])).unwrap();
        }
        // Greedy generation equals the argmax loop over full recomputation.
        let generated = rt.generate(&PROMPT, 40, None).unwrap();
        assert_eq!(generated, tokens[PROMPT.len()..PROMPT.len() + 40].to_vec());
    }
}

fn ids(t: &[u32]) -> burn_tensor::Tensor<Flex, 1, burn_tensor::Int> {
    let ids: Vec<i64> = t.iter().map(|&v| v as i64).collect();
    burn_tensor::Tensor::from_data(burn_tensor::TensorData::new(ids, [t.len()]), &FlexDevice)
}

/// Four sequences of unequal length.
fn batch() -> Vec<Vec<u32>> {
    let mut rng = Lcg(5);
    [9, 3, 14, 1]
        .iter()
        .map(|&n| (0..n).map(|_| ((rng.next() + 1.0) * 15.9) as u32).collect())
        .collect()
}

#[test]
fn batched_logits_equal_each_sequence_alone() {
    for window in [None, Some(4)] {
        let mut rt = HostModel::random(Config { window, ..BASE }, 81).runtime();
        let seqs = batch();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let together = rt.logits_batch(&refs).unwrap();
        for (seq, got) in seqs.iter().zip(&together) {
            let alone = rt.logits(seq).unwrap();
            let diff = alone.max_abs_diff(got);
            assert!(
                diff < 1e-5,
                "{window:?}, length {}: max diff {diff}",
                seq.len()
            );
        }
        // Scores from the batch equal those of each sequence alone.
        let scores = rt.score(&refs).unwrap();
        for (seq, got) in seqs.iter().zip(&scores) {
            assert_eq!(rt.score(&[seq]).unwrap()[0].argmax, got.argmax);
        }
    }
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let mut rt = HostModel::random(
        Config {
            window: Some(6),
            ..BASE
        },
        91,
    )
    .runtime();
    let seqs = batch();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let free = rt.generate_batch(&refs, 12, None).unwrap();
    // A stop token that ends some sequences early and not others.
    let stop = free[0][4];
    for stop in [None, Some(stop)] {
        let together = rt.generate_batch(&refs, 12, stop).unwrap();
        for (seq, got) in seqs.iter().zip(&together) {
            assert_eq!(&rt.generate(seq, 12, stop).unwrap(), got, "{stop:?}");
        }
    }
}

#[test]
fn scores_are_the_argmax_and_log_probs_of_the_logits() {
    let mut rt = HostModel::random(BASE, 121).runtime();
    let logits = rt.logits(&PROMPT).unwrap();
    let scores = rt.score(&[&PROMPT]).unwrap().remove(0);
    assert_eq!(scores.argmax.len(), PROMPT.len());
    assert_eq!(scores.log_probs.len(), PROMPT.len() - 1);
    for i in 0..PROMPT.len() {
        assert_eq!(scores.argmax[i], argmax(logits.row(i)));
        if i + 1 < PROMPT.len() {
            let row: Vec<f64> = logits.row(i).iter().map(|&v| v as f64).collect();
            let want = softmax_ref(&row)[PROMPT[i + 1] as usize].ln();
            assert!((scores.log_probs[i] as f64 - want).abs() < 1e-5);
        }
    }
}

#[test]
fn replacing_a_weight_and_restoring_it_equals_fresh_builds() {
    // Untied: a projection; tied: the table that is both embedding and lm head.
    for (tied, weight) in [(false, "layers.1.k"), (true, "embed")] {
        let a = HostModel::random(Config { tied, ..BASE }, 131);
        let module_a = a.module();
        let id = weight_id(&module_a, weight);
        let original = module_a.weights.materialize(id).unwrap();
        let mut changed = original.clone();
        changed.data.iter_mut().for_each(|v| *v = -*v * 0.5);
        let mut module_b = a.module();
        module_b.weights.get_mut(id).unwrap().expr =
            WeightExpr::Literal(std::sync::Arc::new(changed.clone()));

        let fresh = |m: &Module| BurnRuntime::<Flex>::new(m, "tiny", &FlexDevice).unwrap();
        let want_a = fresh(&module_a).logits(&PROMPT).unwrap();
        let want_b = fresh(&module_b).logits(&PROMPT).unwrap();
        assert_ne!(want_a, want_b);
        let mut rt = fresh(&module_a);
        rt.replace_weights(&[(id, changed)]).unwrap();
        assert_eq!(rt.logits(&PROMPT).unwrap(), want_b, "{weight} replaced");
        rt.restore_weights();
        assert_eq!(rt.logits(&PROMPT).unwrap(), want_a, "{weight} restored");

        let wrong = HostTensor::new(vec![1], vec![0.0]);
        let err = rt.replace_weights(&[(id, wrong)]).unwrap_err();
        assert!(err.to_string().contains(weight), "{err}");
    }
}

#[test]
fn generation_stops_after_the_stop_token() {
    let mut rt = HostModel::random(BASE, 21).runtime();
    let all = rt.generate(&PROMPT, 6, None).unwrap();
    assert_eq!(all.len(), 6);
    let stop = all[2];
    let first = all.iter().position(|&t| t == stop).unwrap();
    assert_eq!(
        rt.generate(&PROMPT, 6, Some(stop)).unwrap(),
        all[..=first].to_vec()
    );
    assert_eq!(rt.generate(&PROMPT, 0, None).unwrap(), Vec::<u32>::new());
}

#[test]
fn log_likelihood_is_the_next_token_cross_entropy() {
    let mut rt = HostModel::random(BASE, 51).runtime();
    let logits = rt.logits(&PROMPT).unwrap();
    let mut nll = 0.0;
    for i in 0..PROMPT.len() - 1 {
        let row: Vec<f64> = logits.row(i).iter().map(|&v| v as f64).collect();
        let p = softmax_ref(&row);
        nll -= p[PROMPT[i + 1] as usize].ln();
    }
    let ll = rt.log_likelihood(&PROMPT).unwrap();
    assert_eq!(ll.count, PROMPT.len() - 1);
    assert!((ll.nll - nll).abs() < 1e-4, "{} vs {nll}", ll.nll);
    let single = rt.log_likelihood(&PROMPT[..1]).unwrap();
    assert_eq!((single.nll, single.count), (0.0, 0));
}

#[test]
fn bad_inputs_are_reported() {
    let mut rt = HostModel::random(BASE, 61).runtime();
    assert!(matches!(rt.logits(&[]), Err(RuntimeError::EmptyInput)));
    assert!(matches!(
        rt.generate(&[1, 32], 2, None),
        Err(RuntimeError::TokenOutOfRange {
            token: 32,
            vocab: 32
        })
    ));
    assert!(matches!(
        rt.hidden_states(&PROMPT, "layers.9.attn"),
        Err(RuntimeError::UnknownNode(n)) if n == "layers.9.attn"
    ));
    assert!(matches!(
        rt.hidden_states(&PROMPT, "input"),
        Err(RuntimeError::Backend(_))
    ));
    let embed = rt.hidden_states(&PROMPT, "embed").unwrap();
    assert_eq!(embed.shape, vec![PROMPT.len(), BASE.hidden]);
}

#[test]
fn invalid_graphs_are_rejected() {
    let model = HostModel::random(BASE, 71);
    let mut module = model.module();
    let graph = module.graph_mut("tiny").unwrap();
    let attn = graph.find("layers.0.attn").unwrap();
    if let Op::Attention(a) = &mut graph.node_mut(attn).op {
        a.n_kv_heads = 3;
    }
    let err = BurnRuntime::<Flex>::new(&module, "tiny", &FlexDevice)
        .err()
        .unwrap();
    assert!(matches!(err, crate::BackendError::Verify(_)), "{err}");
}
