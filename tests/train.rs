//! Training's gradients against PyTorch (tests/golden/train, scripts/make_train_goldens.py):
//! one backward through the runtime on a fixed batch gives torch's loss terms and every
//! weight's gradient within 1e-4: the next-token cross-entropy of a dense Llama, and of a
//! Mixtral with its load-balancing and router z-loss terms.

mod common;

use std::collections::HashMap;

use common::{
    checkpoint_names, device, f32_tensors, golden, golden_dir, ids, load, model_dir, raw_tensors,
    repo_root, run_pipeline, values_of,
};
use upmix::backends::{load_training_runtime, training_runtime};
use upmix::ir::WeightId;
use upmix::ir::{LossGradients, RouterLosses, TrainingRuntime};

/// The golden batch: two sequences of 16 tokens.
fn batch(spec: &serde_json::Value) -> Vec<Vec<u32>> {
    spec["tokens"].as_array().unwrap().iter().map(ids).collect()
}

/// One backward on fixture `name` against torch's loss terms and gradients.
fn gradients_match_pytorch(name: &str, routers: RouterLosses) {
    let spec = golden("train/train.json");
    let batch = batch(&spec);
    let refs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
    let m = load(name);
    let got = load_training_runtime(&m, name, &device())
        .unwrap()
        .loss_gradients(&refs, routers)
        .unwrap();
    let grads = golden_dir().join(format!("train/{name}_grads.safetensors"));
    common::assert_torch_gradients(name, &got, &spec[name], &grads, &checkpoint_names(&m, name));
}

#[test]
fn dense_gradients_match_pytorch() {
    gradients_match_pytorch("llama", RouterLosses::default());
}

/// Mixtral: top-2 of 4 experts, the cross-entropy plus 0.01 x load balancing and
/// 0.001 x the router z-loss.
#[test]
fn moe_gradients_with_router_losses_match_pytorch() {
    gradients_match_pytorch(
        "mixtral",
        RouterLosses {
            load_balance: 0.01,
            z_loss: 0.001,
        },
    );
}

/// The router terms' own gradients, which the golden's small weights (0.01, 0.001) hide
/// under the cross-entropy's: each term's gradient for the largest entries of the second
/// router equals a central finite difference of that term.
#[test]
fn router_loss_gradients_equal_finite_differences() {
    use upmix::ir::Runtime;
    let spec = golden("train/train.json");
    let batch = batch(&spec);
    let refs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
    let m = load("mixtral");
    let router = checkpoint_names(&m, "mixtral")["model.layers.1.block_sparse_moe.gate.weight"];
    let original = m.weights.materialize(router).unwrap();
    let mut rt = training_runtime(&m, "mixtral").unwrap();
    let none = rt.loss_gradients(&refs, RouterLosses::default()).unwrap();
    for (weights, term) in [((1.0, 0.0), "load balance"), ((0.0, 1.0), "z-loss")] {
        let routers = RouterLosses {
            load_balance: weights.0,
            z_loss: weights.1,
        };
        let value = |g: &LossGradients| match term {
            "load balance" => g.load_balance.unwrap(),
            _ => g.z_loss.unwrap(),
        };
        let with = rt.loss_gradients(&refs, routers).unwrap();
        let of = |g: &LossGradients| {
            g.gradients
                .iter()
                .find(|(id, _)| *id == router)
                .unwrap()
                .1
                .data
                .clone()
        };
        let analytic: Vec<f32> = of(&with)
            .iter()
            .zip(of(&none))
            .map(|(a, b)| a - b)
            .collect();
        let mut order: Vec<usize> = (0..analytic.len()).collect();
        order.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
        let largest = analytic[order[0]].abs();
        assert!(
            largest > 1e-3,
            "{term}: gradient {largest} too small to check"
        );
        let h = 1e-3;
        for &i in &order[..4] {
            let mut at = |delta: f32| {
                let mut w = original.clone();
                w.data[i] += delta;
                rt.replace_weights(&[(router, w)]).unwrap();
                let v = value(&rt.loss_gradients(&refs, routers).unwrap());
                rt.restore_weights();
                f64::from(v)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
            let diff = (numeric - f64::from(analytic[i])).abs();
            println!(
                "{term} [{i}]: autodiff {} finite difference {numeric:.6}",
                analytic[i]
            );
            assert!(
                diff <= 2e-3 * f64::from(largest) + 5e-5,
                "{term} [{i}]: {diff}"
            );
        }
    }
}

/// Three AdamW steps (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01) on the
/// golden batch, the weights named by `trainable` (all if `None`) updated, against torch's
/// parameters after the same steps (within 1e-6); the others stay bit for bit.
fn adamw_matches_pytorch(
    name: &str,
    routers: RouterLosses,
    trainable: Option<&str>,
    golden_file: &str,
) {
    use upmix::passes::{AdamW, AdamWConfig};
    let spec = golden("train/train.json");
    let batch = batch(&spec);
    let refs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
    let m = load(name);
    let names = checkpoint_names(&m, name);
    let chosen = |tensor: &str| trainable.is_none_or(|t| tensor.contains(t));
    let mut params: Vec<(WeightId, upmix::ir::HostTensor)> = names
        .iter()
        .filter(|(tensor, _)| chosen(tensor))
        .map(|(_, &id)| (id, m.weights.materialize(id).unwrap()))
        .collect();
    let mut rt = load_training_runtime(&m, name, &device()).unwrap();
    let mut adamw = AdamW::new(AdamWConfig::default());
    for _ in 0..3 {
        let g = rt.loss_gradients(&refs, routers).unwrap();
        adamw.step(adamw.config.lr, &mut params, &g.gradients);
        rt.set_weights(&params).unwrap();
    }
    let updated: HashMap<WeightId, &Vec<f32>> =
        params.iter().map(|(id, t)| (*id, &t.data)).collect();
    let torch = f32_tensors(&golden_dir().join(format!("train/{golden_file}")));
    let first_grads = f32_tensors(&golden_dir().join(format!("train/{name}_grads.safetensors")));
    let (mut trained, mut loose) = (0, 0);
    for (tensor, want) in &torch {
        let id = names[tensor];
        let original = m.weights.materialize(id).unwrap().data;
        match updated.get(&id) {
            Some(got) => {
                // Adam divides by the gradient's own scale: where torch's first gradient
                // is as small as the float error of a gradient (~1e-8), the update is
                // not determined to 1e-6, and 1e-5 is asked instead.
                let g = &first_grads[tensor];
                let mut worst = 0f32;
                for ((a, b), g) in got.iter().zip(want).zip(g) {
                    let diff = (a - b).abs();
                    let tolerance = if g.abs() < 1e-6 { 1e-5 } else { 1e-6 };
                    assert!(diff <= tolerance, "{tensor}: {a} vs {b} (gradient {g})");
                    if g.abs() >= 1e-6 {
                        worst = worst.max(diff);
                    } else if diff > 1e-6 {
                        loose += 1;
                    }
                }
                let moved = original
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!("{tensor}: max |diff| {worst:.2e} (moved {moved:.2e})");
                assert!(moved > 1e-4, "{tensor}: torch did not move it");
                trained += 1;
            }
            None => assert_eq!(&original, want, "{tensor}: frozen, yet torch changed it"),
        }
    }
    assert_eq!(trained, params.len());
    println!("{name}: {loose} values with a gradient below 1e-6 differ by more than 1e-6");
}

#[test]
fn adamw_steps_match_pytorch() {
    adamw_matches_pytorch(
        "llama",
        RouterLosses::default(),
        None,
        "llama_adamw3.safetensors",
    );
    let routers = RouterLosses {
        load_balance: 0.01,
        z_loss: 0.001,
    };
    adamw_matches_pytorch("mixtral", routers, None, "mixtral_adamw3.safetensors");
    adamw_matches_pytorch(
        "mixtral",
        routers,
        Some("block_sparse_moe.gate"),
        "mixtral_adamw3_router_only.safetensors",
    );
}

/// Raw bytes of every tensor of a safetensors file, by name.
fn tensor_bytes(path: &std::path::Path) -> HashMap<String, Vec<u8>> {
    raw_tensors(path)
        .into_iter()
        .map(|(name, _, _, bytes)| (name, bytes))
        .collect()
}

#[test]
fn a_train_pass_lowers_the_loss_and_leaves_frozen_weights_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo_root().join("examples/data/law/train.txt");
    let out = dir.path().join("trained");
    let pipeline = format!(
        r#"Pipeline(
            models: {{ "llama": Hf({:?}) }},
            passes: [Train(model: "llama", into: "trained", data: {{ "law": {:?} }},
                steps: 12, batch: 4, seq_len: 32, trainable: ["attn.*"], lr: 3e-3,
                schedule: Cosine(warmup: 2))],
            emit: [Hf(model: "trained", dir: {:?})],
        )"#,
        model_dir("llama").display().to_string(),
        data.display().to_string(),
        out.display().to_string()
    );
    let (m, report) = run_pipeline(&pipeline, dir.path()).unwrap();
    println!("{report}");
    let note = report
        .lines()
        .find(|l| l.contains("Train: `trained`"))
        .unwrap();
    let losses: Vec<f64> = note
        .split("loss ")
        .nth(1)
        .unwrap()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(losses[1] < losses[0] - 0.1, "{note}");
    assert!(note.contains("8 weights"), "{note}");
    // Trained: the attention projections, as new values; everything else is the same
    // weight as in the source model and is written byte for byte.
    let before = tensor_bytes(&model_dir("llama").join("model.safetensors"));
    let after = tensor_bytes(&out.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    let mut changed = 0;
    for (name, bytes) in &before {
        let attention = name.contains("self_attn.");
        if attention {
            assert_ne!(&after[name], bytes, "{name} was to be trained");
            changed += 1;
        } else {
            assert_eq!(&after[name], bytes, "{name} is frozen");
        }
    }
    assert_eq!(changed, 8);
    assert!(m.graphs.contains_key("llama") && m.graphs.contains_key("trained"));
}

#[test]
fn bad_train_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo_root().join("examples/data/law/train.txt");
    let run = |fields: &str| {
        let pipeline = format!(
            r#"Pipeline(models: {{ "llama": Hf({:?}) }}, passes: [Train(model: "llama", {fields})])"#,
            model_dir("llama").display().to_string()
        );
        run_pipeline(&pipeline, dir.path()).unwrap_err()
    };
    let data = format!("data: {{ \"law\": {:?} }}", data.display().to_string());
    for (fields, message) in [
        (
            format!(r#"{data}, steps: 1, batch: 1, seq_len: 16, trainable: ["ffn.router"]"#),
            "trainable `ffn.router` matches no weight of `llama`",
        ),
        (
            r#"data: { "x": "missing.txt" }, steps: 1, batch: 1, seq_len: 16, trainable: ["all"]"#
                .into(),
            "data `x`:",
        ),
        (
            format!(r#"{data}, steps: 1, batch: 100000, seq_len: 64, trainable: ["all"]"#),
            "fewer than 100000",
        ),
        (
            format!(
                r#"{data}, mix: {{ "code": 1 }}, steps: 1, batch: 1, seq_len: 16, trainable: ["all"]"#
            ),
            "`mix` must give every data name (law) a share above 0",
        ),
        (
            format!(
                r#"{data}, steps: 4, batch: 1, seq_len: 16, trainable: ["all"], schedule: Cosine(warmup: 4)"#
            ),
            "leaves none of the 4 to decay over",
        ),
        (
            format!(r#"{data}, steps: 0, batch: 1, seq_len: 16, trainable: ["all"]"#),
            "must be at least 1",
        ),
    ] {
        let err = run(&fields);
        assert!(err.contains(message), "{fields}: {err}");
    }
}

/// A loss CSV without its `seconds` column (wall-clock time), as lines.
fn log_columns(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let skip = header.iter().position(|h| *h == "seconds").unwrap();
    text.lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            [&cells[..skip], &cells[skip + 1..]].concat().join(",")
        })
        .collect()
}

#[test]
fn a_resumed_run_equals_one_that_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo_root().join("examples/data");
    let pipeline = |extra: &str, log: &str| {
        format!(
            r#"Pipeline(models: {{ "llama": Hf({:?}) }}, passes: [Train(model: "llama",
                data: {{ "code": {:?}, "law": {:?} }}, mix: {{ "code": 1, "law": 2 }},
                steps: 20, batch: 3, seq_len: 24, trainable: ["attn.*", "ffn.up"],
                lr: 3e-3, schedule: Cosine(warmup: 2), checkpoint: "ckpt",
                log: {log:?}{extra})])"#,
            model_dir("llama").display().to_string(),
            data.join("code/train.txt").display().to_string(),
            data.join("law/train.txt").display().to_string(),
        )
    };
    let (straight, _) = run_pipeline(
        &pipeline(", checkpoint_every: 10", "straight.csv"),
        dir.path(),
    )
    .unwrap();
    let ckpt = dir.path().join("ckpt");
    assert!(ckpt.join("step-10.ckpt").exists() && ckpt.join("step-20.ckpt").exists());
    // Stopped after step 10: resume from there.
    std::fs::remove_file(ckpt.join("step-20.ckpt")).unwrap();
    let (resumed, report) =
        run_pipeline(&pipeline(", resume: true", "resumed.csv"), dir.path()).unwrap();
    assert!(
        report.contains("resumed from the checkpoint of step 10"),
        "{report}"
    );
    for part in ["attn.", "ffn.up"] {
        let (a, b) = (
            values_of(&straight, "llama", part),
            values_of(&resumed, "llama", part),
        );
        assert!(!a.is_empty());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{name} differs after resuming");
        }
    }
    assert_eq!(
        log_columns(&dir.path().join("straight.csv")),
        log_columns(&dir.path().join("resumed.csv"))
    );
    // A checkpoint of other settings, and a damaged one, are refused.
    let err = run_pipeline(&pipeline(", resume: true, seed: 7", "x.csv"), dir.path()).unwrap_err();
    assert!(err.contains("written by a different Train pass"), "{err}");
    let file = ckpt.join("step-20.ckpt");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
    let err = run_pipeline(&pipeline(", resume: true", "x.csv"), dir.path()).unwrap_err();
    assert!(
        err.contains("step-20.ckpt") && err.contains("truncated"),
        "{err}"
    );
}
