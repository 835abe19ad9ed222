//! Lowering a verified graph into a flat execution plan, and running the plan.
//!
//! Each node becomes one [`Step`] in topological order; step `i` writes activation slot
//! `i` and reads the slots of its inputs (in edge-slot order). Weights are materialised
//! once per [`WeightId`] and uploaded to the device; a weight used twice (a tied
//! embedding / lm head) shares one device buffer. A slot is released after its last
//! reader runs, so a forward pass holds only the live activations.

use std::collections::HashMap;

use burn_tensor::backend::Backend;
use burn_tensor::{DType, Int, Tensor, TensorData};
use upmix_ir::{FeedForward, Graph, Op, WeightId, WeightTable};

use super::layers::{
    embed, rms_norm, rotate_half_matrix, AttentionLayer, KvCache, MoeLayer, Positions, Projection,
    SharedExpertLayer, SwiGlu,
};
use crate::BackendError;

/// What one step computes.
pub(crate) enum Layer<B: Backend> {
    /// Emits the token ids.
    Input,
    Embedding {
        table: Tensor<B, 2>,
    },
    /// `weight`: `[1, hidden]`.
    RmsNorm {
        weight: Tensor<B, 2>,
        eps: f32,
    },
    Attention(AttentionLayer<B>),
    FeedForward(SwiGlu<B>),
    MixtureOfExperts(MoeLayer<B>),
    Add,
    Linear(Projection<B>),
    /// Passes its input through.
    Output,
}

/// One node of the graph, lowered.
pub(crate) struct Step<B: Backend> {
    pub name: String,
    pub layer: Layer<B>,
    /// Slots read, in input order.
    pub inputs: Vec<usize>,
    /// Slots no later step reads, released once this step has run.
    pub release: Vec<usize>,
}

/// An activation held in a slot.
#[derive(Clone)]
pub(crate) enum Value<B: Backend> {
    Tokens(Tensor<B, 1, Int>),
    Hidden(Tensor<B, 2>),
}

/// The next input of step `step`, which must be hidden states (the verifier guarantees
/// arity and activation kinds, so a mismatch is a lowering bug).
fn next_hidden<B: Backend>(ins: &mut impl Iterator<Item = Value<B>>, step: &str) -> Tensor<B, 2> {
    match ins.next() {
        Some(Value::Hidden(t)) => t,
        _ => panic!("step `{step}` is missing a hidden-state input"),
    }
}

/// The next input of step `step`, which must be token ids.
fn next_tokens<B: Backend>(
    ins: &mut impl Iterator<Item = Value<B>>,
    step: &str,
) -> Tensor<B, 1, Int> {
    match ins.next() {
        Some(Value::Tokens(t)) => t,
        _ => panic!("step `{step}` is missing its token-id input"),
    }
}

/// A graph lowered to steps over device tensors.
pub(crate) struct Plan<B: Backend> {
    pub steps: Vec<Step<B>>,
    /// The slot the Output node writes.
    pub output: usize,
    /// Rows of the embedding table: token ids must be below this.
    pub vocab: usize,
    /// Number of attention layers (KV cache slots).
    pub attention_layers: usize,
}

impl<B: Backend> Plan<B> {
    /// Lowers `graph` (already verified) with weights from `weights`, uploaded to `device`.
    pub fn lower(
        graph: &Graph,
        weights: &WeightTable,
        device: &B::Device,
    ) -> Result<Self, BackendError> {
        let order = graph.topo_order().expect("a verified graph is acyclic");
        let slot_of: HashMap<_, _> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut uploader = Uploader {
            weights,
            device,
            uploaded: HashMap::new(),
        };

        let mut steps = Vec::with_capacity(order.len());
        let mut last_read = vec![None; order.len()];
        let (mut output, mut vocab, mut attention_layers) = (0, usize::MAX, 0);
        let mut ropes: Vec<Vec<f32>> = Vec::new();
        for (i, id) in order.iter().enumerate() {
            let node = graph.node(*id);
            let inputs: Vec<usize> = graph.inputs(*id).iter().map(|n| slot_of[n]).collect();
            for &s in &inputs {
                last_read[s] = Some(i);
            }
            let layer = match &node.op {
                Op::Input => Layer::Input,
                Op::Output => {
                    output = i;
                    Layer::Output
                }
                Op::Add => Layer::Add,
                Op::Embedding { table } => {
                    let table = uploader.get(*table)?;
                    vocab = vocab.min(table.dims()[0]);
                    Layer::Embedding { table }
                }
                Op::RmsNorm { weight, eps } => Layer::RmsNorm {
                    weight: uploader.get(*weight)?,
                    eps: *eps,
                },
                Op::Linear { weight, bias } => Layer::Linear(uploader.projection(*weight, *bias)?),
                Op::FeedForward(f) => Layer::FeedForward(uploader.swiglu(f)?),
                Op::Attention(a) => {
                    let inv_freq = a.rope.inv_freq(a.head_dim);
                    let half = inv_freq.len();
                    let rope_slot = match ropes.iter().position(|r| *r == inv_freq) {
                        Some(slot) => slot,
                        None => {
                            ropes.push(inv_freq.clone());
                            ropes.len() - 1
                        }
                    };
                    let hd = a.head_dim;
                    let layer = AttentionLayer {
                        q: uploader.projection(a.q, a.q_bias)?,
                        k: uploader.projection(a.k, a.k_bias)?,
                        v: uploader.projection(a.v, a.v_bias)?,
                        o: uploader.projection(a.o, None)?,
                        n_heads: a.n_heads,
                        n_kv_heads: a.n_kv_heads,
                        head_dim: a.head_dim,
                        inv_freq: upload(inv_freq, [1, half], device),
                        rope_slot,
                        rotate_half: upload(rotate_half_matrix(hd), [hd, hd], device),
                        cache_slot: attention_layers,
                    };
                    attention_layers += 1;
                    Layer::Attention(layer)
                }
                Op::MixtureOfExperts(m) => {
                    let shared = match &m.shared_expert {
                        None => None,
                        Some(s) => Some(SharedExpertLayer {
                            ffn: uploader.swiglu(&s.ffn)?,
                            gate: s.gate.map(|g| uploader.projection(g, None)).transpose()?,
                        }),
                    };
                    Layer::MixtureOfExperts(MoeLayer {
                        router: uploader.projection(m.router, None)?,
                        experts: m
                            .experts
                            .iter()
                            .map(|f| uploader.swiglu(f))
                            .collect::<Result<_, _>>()?,
                        top_k: m.top_k,
                        normalize_top_k: m.normalize_top_k,
                        shared,
                    })
                }
            };
            steps.push(Step {
                name: node.name.clone(),
                layer,
                inputs,
                release: Vec::new(),
            });
        }
        for (slot, reader) in last_read.into_iter().enumerate() {
            if let Some(reader) = reader {
                steps[reader].release.push(slot);
            }
        }
        Ok(Plan {
            steps,
            output,
            vocab,
            attention_layers,
        })
    }

    /// The slot of the node called `name`.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// Runs steps `0..=until` on `tokens` at positions `start..`, returning slot `until`.
    /// With `caches`, attention layers read and extend their KV caches; without, every
    /// layer attends only within `tokens` (then `start` should be 0).
    pub fn run(
        &self,
        tokens: Tensor<B, 1, Int>,
        start: usize,
        caches: Option<&mut [Option<KvCache<B>>]>,
        until: usize,
    ) -> Value<B> {
        let mut kept = self.run_keeping(tokens, start, caches, &[until]);
        kept.pop().expect("the requested step ran")
    }

    /// Like [`run`](Self::run), up to the last of `keep`, returning the value of every slot
    /// in `keep`, in that order, from one pass.
    pub fn run_keeping(
        &self,
        tokens: Tensor<B, 1, Int>,
        start: usize,
        mut caches: Option<&mut [Option<KvCache<B>>]>,
        keep: &[usize],
    ) -> Vec<Value<B>> {
        let until = keep.iter().copied().max().unwrap_or(0);
        let mut kept: Vec<Option<Value<B>>> = vec![None; keep.len()];
        let mut slots: Vec<Option<Value<B>>> = vec![None; self.steps.len()];
        let mut positions = Positions::new(start, tokens.dims()[0]);
        let mut tokens = Some(tokens);
        for (i, step) in self.steps.iter().enumerate().take(until + 1) {
            let mut ins = step
                .inputs
                .iter()
                .map(|&s| slots[s].clone().expect("inputs run before their readers"));
            let name = step.name.as_str();
            let out = match &step.layer {
                Layer::Input => Value::Tokens(tokens.take().expect("one Input node")),
                Layer::Embedding { table } => {
                    Value::Hidden(embed(table, next_tokens(&mut ins, name)))
                }
                Layer::RmsNorm { weight, eps } => {
                    Value::Hidden(rms_norm(next_hidden(&mut ins, name), weight, *eps))
                }
                Layer::Attention(a) => {
                    let cache = caches.as_deref_mut().map(|c| &mut c[a.cache_slot]);
                    Value::Hidden(a.forward(next_hidden(&mut ins, name), &mut positions, cache))
                }
                Layer::FeedForward(f) => Value::Hidden(f.forward(next_hidden(&mut ins, name))),
                Layer::MixtureOfExperts(m) => Value::Hidden(m.forward(next_hidden(&mut ins, name))),
                Layer::Add => {
                    let a = next_hidden(&mut ins, name);
                    Value::Hidden(a + next_hidden(&mut ins, name))
                }
                Layer::Linear(p) => Value::Hidden(p.forward(next_hidden(&mut ins, name))),
                Layer::Output => Value::Hidden(next_hidden(&mut ins, name)),
            };
            for (k, _) in keep.iter().enumerate().filter(|(_, &s)| s == i) {
                kept[k] = Some(out.clone());
            }
            slots[i] = Some(out);
            for &s in &step.release {
                slots[s] = None;
            }
        }
        kept.into_iter()
            .map(|v| v.expect("every kept step ran"))
            .collect()
    }
}

/// Uploads f32 values with `shape` to `device`.
fn upload<B: Backend, const D: usize>(
    data: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), (device, DType::F32))
}

/// Materialises and uploads each weight once.
struct Uploader<'a, B: Backend> {
    weights: &'a WeightTable,
    device: &'a B::Device,
    /// Device copies by weight id; 1-D weights are stored as `[1, n]` rows.
    uploaded: HashMap<WeightId, Tensor<B, 2>>,
}

impl<B: Backend> Uploader<'_, B> {
    /// The weight as a 2-D device tensor (`[n]` becomes `[1, n]`).
    fn get(&mut self, id: WeightId) -> Result<Tensor<B, 2>, BackendError> {
        if let Some(t) = self.uploaded.get(&id) {
            return Ok(t.clone());
        }
        let host = self.weights.materialize(id)?;
        let shape = match host.shape[..] {
            [n] => [1, n],
            [rows, cols] => [rows, cols],
            ref other => {
                return Err(upmix_ir::WeightError::Invalid {
                    name: self.weights.get(id)?.name.clone(),
                    message: format!("expected a 1-D or 2-D weight, got shape {other:?}"),
                }
                .into())
            }
        };
        let t = upload(host.data, shape, self.device);
        self.uploaded.insert(id, t.clone());
        Ok(t)
    }

    /// An `[out, in]` weight as a contiguous `[in, out]` device tensor: the layout gemm
    /// multiplies without repacking the weight on every call.
    fn get_transposed(&mut self, id: WeightId) -> Result<Tensor<B, 2>, BackendError> {
        let host = self.weights.materialize(id)?;
        let [rows, cols] = host.shape[..] else {
            return Err(upmix_ir::WeightError::Invalid {
                name: self.weights.get(id)?.name.clone(),
                message: format!("expected a 2-D weight, got shape {:?}", host.shape),
            }
            .into());
        };
        // Transpose in 32 x 32 tiles so both sides stay in cache.
        const TILE: usize = 32;
        let mut t = vec![0f32; rows * cols];
        for r0 in (0..rows).step_by(TILE) {
            for c0 in (0..cols).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    for c in c0..(c0 + TILE).min(cols) {
                        t[c * rows + r] = host.data[r * cols + c];
                    }
                }
            }
        }
        Ok(upload(t, [cols, rows], self.device))
    }

    /// A projection from an `[out, in]` weight and optional `[out]` bias.
    fn projection(
        &mut self,
        weight: WeightId,
        bias: Option<WeightId>,
    ) -> Result<Projection<B>, BackendError> {
        Ok(Projection {
            weight_t: self.get_transposed(weight)?,
            bias: bias.map(|b| self.get(b)).transpose()?,
        })
    }

    fn swiglu(&mut self, f: &FeedForward) -> Result<SwiGlu<B>, BackendError> {
        Ok(SwiGlu {
            gate: self.projection(f.gate, None)?,
            up: self.projection(f.up, None)?,
            down: self.projection(f.down, None)?,
        })
    }
}
