//! `Train`'s checkpoints: everything a training run needs to continue bit for bit — the
//! trained values, AdamW's moments and step, the data order's generator states and the
//! loss curve so far — in one file per checkpointed step, `DIR/step-N.ckpt`.
//!
//! Layout: the line `upmix-train-checkpoint 2`, a little-endian u64 header length, the
//! header (JSON: the run's fingerprint, the step, the states, the tensors' weights and
//! lengths), then each tensor's values, `m` and `v` as little-endian f32. Written to a
//! temporary file, then renamed, so a checkpoint is whole or absent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use upmix_ir::{HostTensor, WeightId};

use crate::adamw::AdamW;
use crate::pass::write_atomically;

const MAGIC: &[u8] = b"upmix-train-checkpoint 2\n";

/// A training run's state after `step` steps.
#[derive(Clone, Debug)]
pub(crate) struct TrainState<O, L> {
    pub step: usize,
    pub params: Vec<(WeightId, HostTensor)>,
    pub adamw: AdamW,
    /// Where the data order stands.
    pub order: O,
    pub losses: Vec<L>,
}

#[derive(Serialize, Deserialize)]
struct Header<O, L> {
    fingerprint: String,
    step: usize,
    adamw_step: u64,
    order: O,
    losses: Vec<L>,
    /// Weight id, name, shape of each tensor, in file order.
    tensors: Vec<(u32, String, Vec<usize>)>,
}

/// The checkpoint of step `step` in `dir`.
pub(crate) fn path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step}.ckpt"))
}

/// The highest step checkpointed in `dir`, if any.
pub(crate) fn latest(dir: &Path) -> std::io::Result<Option<usize>> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut best = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let step = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-")?.strip_suffix(".ckpt")?.parse().ok());
        best = best.max(step);
    }
    Ok(best)
}

/// Writes `state` to its step's file in `dir` (created if needed), `names` naming the
/// weights for readers.
pub(crate) fn save<O: Serialize + Clone, L: Serialize + Clone>(
    dir: &Path,
    fingerprint: &str,
    state: &TrainState<O, L>,
    names: &HashMap<WeightId, String>,
) -> std::io::Result<PathBuf> {
    let header = Header {
        fingerprint: fingerprint.to_string(),
        step: state.step,
        adamw_step: state.adamw.step,
        order: state.order.clone(),
        losses: state.losses.clone(),
        tensors: state
            .params
            .iter()
            .map(|(id, t)| (id.0, names[id].clone(), t.shape.clone()))
            .collect(),
    };
    let json = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let mut bytes = MAGIC.to_vec();
    bytes.extend((json.len() as u64).to_le_bytes());
    bytes.extend(json);
    for (id, t) in &state.params {
        let (m, v) = state
            .adamw
            .moments
            .get(id)
            .cloned()
            .unwrap_or_else(|| (vec![0.0; t.data.len()], vec![0.0; t.data.len()]));
        for values in [&t.data, &m, &v] {
            bytes.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    let target = path(dir, state.step);
    write_atomically(&target, &bytes)?;
    Ok(target)
}

/// Reads the checkpoint at `path`, which must have been written by a run with
/// `fingerprint`; `adamw` gets the stored step and moments.
pub(crate) fn load<O: for<'de> Deserialize<'de>, L: for<'de> Deserialize<'de>>(
    path: &Path,
    fingerprint: &str,
    mut adamw: AdamW,
) -> Result<TrainState<O, L>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let bad = || "not an upmix training checkpoint, or truncated".to_string();
    let rest = bytes.strip_prefix(MAGIC).ok_or_else(bad)?;
    let n = u64::from_le_bytes(rest.get(..8).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let json = rest
        .get(8..8usize.checked_add(n).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    let header: Header<O, L> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if header.fingerprint != fingerprint {
        return Err(
            "it was written by a different Train pass (model, data or settings differ)".into(),
        );
    }
    let mut data = &rest[8 + n..];
    let mut take = |len: usize| -> Result<Vec<f32>, String> {
        let bytes = data.get(..len * 4).ok_or_else(bad)?;
        data = &data[len * 4..];
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    };
    let mut params = Vec::new();
    adamw.moments.clear();
    for (id, _, shape) in &header.tensors {
        let len = shape.iter().product();
        let (values, m, v) = (take(len)?, take(len)?, take(len)?);
        params.push((WeightId(*id), HostTensor::new(shape.clone(), values)));
        adamw.moments.insert(WeightId(*id), (m, v));
    }
    if !data.is_empty() {
        return Err(bad());
    }
    adamw.step = header.adamw_step;
    Ok(TrainState {
        step: header.step,
        params,
        adamw,
        order: header.order,
        losses: header.losses,
    })
}
