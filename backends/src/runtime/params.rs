//! The parameter store: every device tensor a lowered graph uses, in one place.
//!
//! Layers hold [`P`] handles and fetch their tensors from [`Params`] at run time, so a
//! weight can be replaced (a one-component variant of a model, an optimiser step) without
//! touching the layers: [`Params::replace`] re-uploads only the replaced weights and keeps
//! their originals for [`Params::restore`].
//!
//! A weight is uploaded once per layout it is used in ([`Form`]). The one weight used in
//! two roles, a tied embedding table that is also the lm head, is uploaded once, in the
//! lm head's transposed layout; the embedding reads its rows from that buffer.
//!
//! On a backend that keeps weights quantized (the CPU), a matrix stored as Q8_0, Q4_0,
//! Q4_1 or int8 per channel stays so, in host memory (module `quantized`), whatever
//! layout is asked for: projections multiply by it and embeddings dequantize their rows
//! from it. Elsewhere it is dequantized to f32 on upload.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::kernels::Kernels;
use super::quantized::{self, Activations, QuantMatrix};
use burn_tensor::{DType, Tensor, TensorData};
use upmix_ir::{HostTensor, RuntimeError, WeightError, WeightId, WeightTable};

use crate::BackendError;

/// A handle to one tensor in [`Params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct P(usize);

/// How a weight is laid out on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// As stored; a 1-D `[n]` weight becomes a `[1, n]` row.
    Plain,
    /// An `[out, in]` matrix stored as a contiguous `[in, out]` one: the layout gemm
    /// multiplies without repacking the weight on every call.
    Transposed,
    /// Any shape as one `[1, numel]` row (per-head norm weights, broadcast over rows).
    Flat,
}

/// What a parameter entry holds.
#[derive(Clone)]
pub(crate) enum Stored<B: Kernels> {
    /// A device tensor in the entry's layout.
    Dense(Tensor<B, 2>),
    /// A matrix kept quantized in host memory (any layout).
    Quantized(Arc<QuantMatrix>),
}

struct Entry<B: Kernels> {
    weight: WeightId,
    name: String,
    form: Form,
    /// The weight's shape in the weight table.
    shape: Vec<usize>,
    stored: Stored<B>,
}

/// One router's logits (`[rows, experts]`) and its top-k, as recorded in a forward pass.
pub(crate) type RouterRecord<B> = (Tensor<B, 2>, usize);

/// The device tensors of one lowered graph.
pub(crate) struct Params<B: Kernels> {
    entries: Vec<Entry<B>>,
    /// Original contents of replaced entries, by entry index.
    saved: HashMap<usize, Stored<B>>,
    device: B::Device,
    /// How activations meet the weights kept quantized.
    pub activations: Activations,
    /// While recording: per entry, the column sums of the squares of every input a
    /// projection multiplied by it (`[1, in]`), see [`Params::tap`].
    taps: RefCell<Option<HashMap<usize, Tensor<B, 2>>>>,
    /// While recording: every router's logits (`[rows, experts]`) and top-k, in the order
    /// the routers ran, see [`Params::record_router`].
    routers: RefCell<Option<Vec<RouterRecord<B>>>>,
}

impl<B: Kernels> Params<B> {
    pub fn new(device: &B::Device) -> Self {
        Params {
            entries: Vec::new(),
            saved: HashMap::new(),
            device: device.clone(),
            activations: Activations::default(),
            taps: RefCell::new(None),
            routers: RefCell::new(None),
        }
    }

    /// The device tensor behind `p` (a cheap handle clone).
    ///
    /// # Panics
    /// When `p` is kept quantized: read those through [`Params::stored`].
    pub fn get(&self, p: P) -> Tensor<B, 2> {
        match &self.entries[p.0].stored {
            Stored::Dense(t) => t.clone(),
            Stored::Quantized(_) => panic!("`{}` is kept quantized", self.entries[p.0].name),
        }
    }

    /// What `p` holds.
    pub fn stored(&self, p: P) -> &Stored<B> {
        &self.entries[p.0].stored
    }

    /// The handle of weight `id` in layout `form`, materialising and uploading it on first
    /// request.
    pub fn request(
        &mut self,
        weights: &WeightTable,
        id: WeightId,
        form: Form,
    ) -> Result<P, BackendError> {
        let w = weights.get(id)?;
        let keep = B::KEEPS_QUANTIZED
            && quantized::keeps(w.dtype)
            && w.shape.len() == 2
            && form != Form::Flat;
        let same = |e: &Entry<B>| {
            e.weight == id && (e.form == form || keep && matches!(e.stored, Stored::Quantized(_)))
        };
        if let Some(i) = self.entries.iter().position(same) {
            return Ok(P(i));
        }
        let name = w.name.clone();
        if keep {
            let bytes = weights.materialize_bytes(id)?;
            let matrix = QuantMatrix::new(w.dtype, w.shape[0], w.shape[1], bytes);
            self.entries.push(Entry {
                weight: id,
                name,
                form,
                shape: w.shape.clone(),
                stored: Stored::Quantized(Arc::new(matrix)),
            });
            return Ok(P(self.entries.len() - 1));
        }
        let host = weights.materialize(id)?;
        let shape = host.shape.clone();
        let tensor = prepare(host, form, &self.device).map_err(|message| {
            BackendError::from(WeightError::Invalid {
                name: name.clone(),
                message,
            })
        })?;
        self.entries.push(Entry {
            weight: id,
            name,
            form,
            shape,
            stored: Stored::Dense(tensor),
        });
        Ok(P(self.entries.len() - 1))
    }

    /// Replaces the values of `weights` in every layout they are used in (as f32 device
    /// tensors, also where the original is kept quantized). All are checked (used by the
    /// graph, same shape) before any is replaced.
    pub fn replace(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError> {
        let mut plan = Vec::new();
        for (id, host) in weights {
            let uses: Vec<usize> = (0..self.entries.len())
                .filter(|&i| self.entries[i].weight == *id)
                .collect();
            let Some(&first) = uses.first() else {
                return Err(RuntimeError::Replace {
                    name: format!("#{}", id.0),
                    reason: "the graph does not use it".into(),
                });
            };
            let entry = &self.entries[first];
            if entry.shape != host.shape {
                return Err(RuntimeError::Replace {
                    name: entry.name.clone(),
                    reason: format!(
                        "new shape {:?} differs from its shape {:?}",
                        host.shape, entry.shape
                    ),
                });
            }
            plan.extend(uses.into_iter().map(|i| (i, host)));
        }
        for (i, host) in plan {
            let entry = &mut self.entries[i];
            let tensor = prepare(host.clone(), entry.form, &self.device)
                .expect("the shape was checked against the uploaded one");
            let old = std::mem::replace(&mut entry.stored, Stored::Dense(tensor));
            self.saved.entry(i).or_insert(old);
        }
        Ok(())
    }

    /// Replaces the values of `weights` for good (an optimizer step): as
    /// [`replace`](Self::replace), but [`restore`](Self::restore) no longer brings back
    /// what they held before.
    pub fn set(&mut self, weights: &[(WeightId, HostTensor)]) -> Result<(), RuntimeError> {
        self.replace(weights)?;
        for (i, e) in self.entries.iter().enumerate() {
            if weights.iter().any(|(id, _)| *id == e.weight) {
                self.saved.remove(&i);
            }
        }
        Ok(())
    }

    /// Puts back the original of every replaced entry.
    pub fn restore(&mut self) {
        for (i, stored) in self.saved.drain() {
            self.entries[i].stored = stored;
        }
    }

    /// Starts recording projection inputs (see [`tap`](Self::tap)), dropping earlier ones.
    pub fn start_taps(&self) {
        *self.taps.borrow_mut() = Some(HashMap::new());
    }

    /// While recording, adds the column sums of `x * x` (`x`: `[rows, in]`, the input of
    /// a projection by entry `p`) to `p`'s record: summed over calls, `||X_j||^2` of every
    /// input feature `j`, as Wanda's pruning score needs.
    pub fn tap(&self, p: P, x: &Tensor<B, 2>) {
        if let Some(taps) = self.taps.borrow_mut().as_mut() {
            let sums = x.clone().square().sum_dim(0);
            let total = match taps.remove(&p.0) {
                Some(t) => t + sums,
                None => sums,
            };
            taps.insert(p.0, total);
        }
    }

    /// Stops recording; returns each record with the weight it belongs to.
    pub fn take_taps(&self) -> Vec<(WeightId, Tensor<B, 2>)> {
        let taps = self.taps.borrow_mut().take().unwrap_or_default();
        taps.into_iter()
            .map(|(i, t)| (self.entries[i].weight, t))
            .collect()
    }

    /// Starts recording router logits, dropping earlier ones.
    pub fn start_router_records(&self) {
        *self.routers.borrow_mut() = Some(Vec::new());
    }

    /// While recording, keeps a router's logits and top-k (the auxiliary losses of
    /// training are computed from them).
    pub fn record_router(&self, logits: &Tensor<B, 2>, top_k: usize) {
        if let Some(records) = self.routers.borrow_mut().as_mut() {
            records.push((logits.clone(), top_k));
        }
    }

    /// Stops recording; returns the records in the order the routers ran.
    pub fn take_router_records(&self) -> Vec<RouterRecord<B>> {
        self.routers.borrow_mut().take().unwrap_or_default()
    }

    /// How many device tensors hold weight `id`.
    #[cfg(test)]
    pub fn uses(&self, id: WeightId) -> usize {
        self.entries.iter().filter(|e| e.weight == id).count()
    }

    /// Every device parameter with its weight and layout, mutably: for marking parameters
    /// that autodiff tracks and for optimiser updates.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (WeightId, Form, &mut Tensor<B, 2>)> {
        self.entries.iter_mut().filter_map(|e| match &mut e.stored {
            Stored::Dense(t) => Some((e.weight, e.form, t)),
            Stored::Quantized(_) => None,
        })
    }
}

impl<B: Kernels> Params<B> {
    /// Every device parameter with its weight, layout and shape in the weight table.
    pub fn iter_shaped(&self) -> impl Iterator<Item = (WeightId, Form, &[usize], &Tensor<B, 2>)> {
        self.entries.iter().filter_map(|e| match &e.stored {
            Stored::Dense(t) => Some((e.weight, e.form, e.shape.as_slice(), t)),
            Stored::Quantized(_) => None,
        })
    }
}

/// A host weight in layout `form`, uploaded to `device`.
fn prepare<B: Kernels>(
    host: HostTensor,
    form: Form,
    device: &B::Device,
) -> Result<Tensor<B, 2>, String> {
    let (data, shape) = match (form, &host.shape[..]) {
        (Form::Plain, &[n]) => (host.data, [1, n]),
        (Form::Flat, _) => {
            let n = host.data.len();
            (host.data, [1, n])
        }
        (Form::Plain, &[rows, cols]) => (host.data, [rows, cols]),
        (Form::Transposed, &[rows, cols]) => (transpose(&host.data, rows, cols), [cols, rows]),
        (Form::Plain, other) => {
            return Err(format!("expected a 1-D or 2-D weight, got shape {other:?}"))
        }
        (Form::Transposed, other) => {
            return Err(format!("expected a 2-D weight, got shape {other:?}"))
        }
    };
    Ok(upload(data, shape, device))
}

/// Uploads f32 values with `shape` to `device`.
pub(crate) fn upload<B: Kernels, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F32))
}

/// The transpose of a row-major `[rows, cols]` matrix, in 32 x 32 tiles so both sides
/// stay in cache, each band of 32 output rows on its own rayon task.
pub(super) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut t = vec![0f32; rows * cols];
    if rows == 0 {
        return t;
    }
    t.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * TILE;
            let width = out.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in 0..width {
                        out[c * rows + r] = data[r * cols + c0 + c];
                    }
                }
            }
        });
    t
}
