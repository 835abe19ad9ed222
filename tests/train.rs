//! Training's gradients against PyTorch (tests/golden/train, scripts/make_train_goldens.py):
//! one backward of the next-token cross-entropy through the runtime, on a fixed batch,
//! gives every weight's gradient within 1e-4 of torch's.

mod common;

use std::collections::HashMap;

use common::{golden, golden_dir, ids, load, model_dir};
use upmix::backends::training_runtime;
use upmix::ir::{Module, WeightExpr, WeightId};

/// Checkpoint tensor name -> the weight read from it, matched by file offset.
fn checkpoint_names(m: &Module, fixture: &str) -> HashMap<String, WeightId> {
    let bytes = std::fs::read(model_dir(fixture).join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut by_offset = HashMap::new();
    for id in m.graphs[fixture].weight_ids() {
        if let WeightExpr::Source { offset, .. } = m.weights.get(id).unwrap().expr {
            by_offset.insert(offset, id);
        }
    }
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let start = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
            let id = *by_offset
                .get(&start)
                .unwrap_or_else(|| panic!("no weight reads {name}"));
            (name.clone(), id)
        })
        .collect()
}

fn f32_tensors(path: &std::path::Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            assert_eq!(info["dtype"], "F32");
            let [a, b] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
            let values = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name.clone(), values)
        })
        .collect()
}

#[test]
fn dense_gradients_match_pytorch() {
    let spec = golden("train/train.json");
    let batch: Vec<Vec<u32>> = spec["tokens"].as_array().unwrap().iter().map(ids).collect();
    let refs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
    let m = load("llama");
    let mut rt = training_runtime(&m, "llama").unwrap();
    let got = rt.cross_entropy_gradients(&refs).unwrap();
    let want_loss = spec["llama"]["ce"].as_f64().unwrap();
    assert!(
        (f64::from(got.loss) - want_loss).abs() <= 1e-5,
        "loss {} vs torch {want_loss}",
        got.loss
    );
    let grads: HashMap<WeightId, &Vec<f32>> =
        got.gradients.iter().map(|(id, t)| (*id, &t.data)).collect();
    let want = f32_tensors(&golden_dir().join("train/llama_grads.safetensors"));
    let names = checkpoint_names(&m, "llama");
    assert_eq!(want.len(), names.len());
    for (name, w) in &want {
        let g = grads[&names[name]];
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!("{name}: max |diff| {worst:.2e} (max |grad| {scale:.2e})");
        assert!(
            scale > 0.0,
            "{name}: an all-zero golden gradient checks nothing"
        );
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
}
