//! Lowering a verified graph into a flat execution plan, and running the plan.
//!
//! Each node becomes one [`Step`] in topological order; step `i` writes activation slot
//! `i` and reads the slots of its inputs (in edge-slot order). The weights go into the
//! plan's [`Params`] store once per layout. A slot is released after its last reader runs,
//! so a forward pass holds only the live activations.

use std::collections::{HashMap, HashSet};

use super::kernels::Kernels;
use burn_tensor::{Int, Tensor};
use upmix_ir::{
    Attention, Graph, MixtureOfAttention, NodeId, Op, RuntimeError, WeightId, WeightTable,
};

use super::attention::{AttentionLayer, CacheSet};
use super::frame::{upload_rows, Frame};
use super::layers::{standardize, Embedding, Projection, SwiGlu};
use super::mixture_attention::MixtureOfAttentionLayer;
use super::moe::{MoeDispatch, MoeLayer};
use super::params::{Form, Params, P};
use crate::BackendError;

/// What one step computes.
pub(crate) enum Layer<B: Kernels> {
    /// Emits the token ids.
    Input,
    Embedding(Embedding),
    /// `weight`: `[1, hidden]`.
    RmsNorm {
        weight: P,
        eps: f32,
    },
    /// `weight`, `bias`: `[1, hidden]`. Named as the IR op it lowers.
    #[allow(clippy::enum_variant_names)]
    LayerNorm {
        weight: P,
        bias: Option<P>,
        eps: f32,
    },
    Scale(f32),
    Attention(AttentionLayer<B>),
    MixtureOfAttention(MixtureOfAttentionLayer<B>),
    FeedForward(SwiGlu),
    MixtureOfExperts(MoeLayer),
    Add,
    Linear(Projection),
    /// Passes its input through.
    Output,
}

/// One node of the graph, lowered.
pub(crate) struct Step<B: Kernels> {
    pub name: String,
    pub layer: Layer<B>,
    /// Slots read, in input order.
    pub inputs: Vec<usize>,
    /// Slots no later step reads, released once this step has run.
    pub release: Vec<usize>,
}

/// An activation held in a slot.
#[derive(Clone)]
pub(crate) enum Value<B: Kernels> {
    Tokens(Tensor<B, 1, Int>),
    Hidden(Tensor<B, 2>),
}

/// The next input of step `step`, which must be hidden states (the verifier guarantees
/// arity and activation kinds, so a mismatch is a lowering bug).
fn next_hidden<B: Kernels>(ins: &mut impl Iterator<Item = Value<B>>, step: &str) -> Tensor<B, 2> {
    match ins.next() {
        Some(Value::Hidden(t)) => t,
        _ => panic!("step `{step}` is missing a hidden-state input"),
    }
}

/// The next input of step `step`, which must be token ids.
fn next_tokens<B: Kernels>(
    ins: &mut impl Iterator<Item = Value<B>>,
    step: &str,
) -> Tensor<B, 1, Int> {
    match ins.next() {
        Some(Value::Tokens(t)) => t,
        _ => panic!("step `{step}` is missing its token-id input"),
    }
}

/// What one run of a plan is asked for, besides its tokens.
pub(crate) struct RunArgs<'a, B: Kernels> {
    pub frame: &'a mut Frame<B>,
    pub cache: Option<&'a mut CacheSet<B>>,
    /// Slots whose values are returned, in this order; the run stops after the last.
    pub keep: &'a [usize],
    /// Only these rows are carried past the last attention layer (everything after it is
    /// row-wise): generation needs the lm head of each sequence's last position only.
    pub rows: Option<&'a [usize]>,
    pub dispatch: MoeDispatch,
    /// Start at this snapshot's step with its activations instead of at the tokens.
    pub resume: Option<&'a Snapshot<B>>,
    /// Steps before which to take a [`Snapshot`], and where to put them.
    pub save: Option<(&'a [usize], &'a mut Vec<Snapshot<B>>)>,
}

/// The live activations before one step of a run: all that the steps from there on read,
/// so a later run can resume there (the steps before it are not run again).
#[derive(Clone)]
pub(crate) struct Snapshot<B: Kernels> {
    pub step: usize,
    slots: Vec<(usize, Value<B>)>,
}

/// A graph lowered to steps over device tensors.
pub(crate) struct Plan<B: Kernels> {
    pub steps: Vec<Step<B>>,
    pub params: Params<B>,
    /// The slot the Output node writes.
    pub output: usize,
    /// Rows of the embedding table: token ids must be below this.
    pub vocab: usize,
    /// Number of KV cache slots (one per attention layer, one per expert of a mixture of
    /// attention experts unless they share KV).
    pub attention_layers: usize,
    /// The step after which a run may keep only some rows: the last attention layer
    /// (everything after it is row-wise), or the embedding in a graph without attention.
    rows_from: Option<usize>,
}

impl<B: Kernels> Plan<B> {
    /// Lowers `graph` (already verified) with weights from `weights`, uploaded to `device`.
    pub fn lower(
        graph: &Graph,
        weights: &WeightTable,
        device: &B::Device,
    ) -> Result<Self, BackendError> {
        let order = graph.topo_order().expect("a verified graph is acyclic");
        let slot_of: HashMap<_, _> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut lowering = Lowering::new(weights, device, projected_weights(graph, &order));
        let mut steps = Vec::with_capacity(order.len());
        let mut last_read = vec![None; order.len()];
        for (i, id) in order.iter().enumerate() {
            let node = graph.node(*id);
            let inputs: Vec<usize> = graph.inputs(*id).iter().map(|n| slot_of[n]).collect();
            for &s in &inputs {
                last_read[s] = Some(i);
            }
            let layer = lowering.layer(i, &node.op)?;
            steps.push(Step {
                name: node.name.clone(),
                layer,
                inputs,
                release: Vec::new(),
            });
        }
        release_after_last_read(&mut steps, last_read);
        Ok(lowering.finish(steps))
    }

    /// The slot of the node called `name`.
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// Runs the plan on `tokens` (`[batch * tokens]`, the columns of `args.frame`; none
    /// when resuming from a snapshot) up to the last slot of `args.keep`, returning the
    /// value of every kept slot in order.
    pub fn run(
        &self,
        mut tokens: Option<Tensor<B, 1, Int>>,
        args: RunArgs<'_, B>,
    ) -> Result<Vec<Value<B>>, RuntimeError> {
        let RunArgs {
            frame,
            mut cache,
            keep,
            rows,
            dispatch,
            resume,
            mut save,
        } = args;
        let until = keep.iter().copied().max().unwrap_or(0);
        let mut kept: Vec<Option<Value<B>>> = vec![None; keep.len()];
        let mut slots: Vec<Option<Value<B>>> = vec![None; self.steps.len()];
        let first = resume.map_or(0, |r| r.step);
        for (slot, value) in resume.iter().flat_map(|r| &r.slots) {
            slots[*slot] = Some(value.clone());
        }
        for (i, step) in self.steps.iter().enumerate().take(until + 1).skip(first) {
            match save.as_mut() {
                Some((at, out)) if at.contains(&i) => out.push(Snapshot::before(i, &slots)),
                _ => {}
            }
            let ins = step
                .inputs
                .iter()
                .map(|&s| slots[s].clone().expect("inputs run before their readers"));
            let out = self.step_value(
                step,
                ins,
                &mut tokens,
                frame,
                cache.as_deref_mut(),
                dispatch,
            )?;
            for (k, _) in keep.iter().enumerate().filter(|(_, &s)| s == i) {
                kept[k] = Some(out.clone());
            }
            slots[i] = Some(out);
            for &s in &step.release {
                slots[s] = None;
            }
            if let (Some(rows), true) = (rows, self.rows_from == Some(i)) {
                select_rows(&mut slots, rows);
            }
        }
        Ok(kept
            .into_iter()
            .map(|v| v.expect("every kept step ran"))
            .collect())
    }

    /// The value `step` computes from its inputs `ins` (the Input node takes `tokens`).
    #[inline]
    fn step_value(
        &self,
        step: &Step<B>,
        mut ins: impl Iterator<Item = Value<B>>,
        tokens: &mut Option<Tensor<B, 1, Int>>,
        frame: &mut Frame<B>,
        cache: Option<&mut CacheSet<B>>,
        dispatch: MoeDispatch,
    ) -> Result<Value<B>, RuntimeError> {
        let params = &self.params;
        let name = step.name.as_str();
        Ok(match &step.layer {
            Layer::Input => Value::Tokens(tokens.take().expect("tokens for the one Input node")),
            Layer::Embedding(e) => Value::Hidden(e.forward(params, next_tokens(&mut ins, name))),
            Layer::RmsNorm { weight, eps } => Value::Hidden(B::rms_norm(
                next_hidden(&mut ins, name),
                params.get(*weight),
                *eps,
            )),
            Layer::LayerNorm { weight, bias, eps } => {
                let x = standardize(next_hidden(&mut ins, name), *eps) * params.get(*weight);
                Value::Hidden(match bias {
                    Some(b) => x + params.get(*b),
                    None => x,
                })
            }
            Layer::Scale(factor) => Value::Hidden(next_hidden(&mut ins, name).mul_scalar(*factor)),
            Layer::Attention(a) => {
                Value::Hidden(a.forward(params, next_hidden(&mut ins, name), frame, cache))
            }
            Layer::MixtureOfAttention(m) => Value::Hidden(m.forward(
                params,
                next_hidden(&mut ins, name),
                frame,
                cache,
                dispatch,
            )?),
            Layer::FeedForward(f) => Value::Hidden(f.forward(params, next_hidden(&mut ins, name))),
            Layer::MixtureOfExperts(m) => {
                Value::Hidden(m.forward(params, next_hidden(&mut ins, name), dispatch)?)
            }
            Layer::Add => {
                let a = next_hidden(&mut ins, name);
                Value::Hidden(a + next_hidden(&mut ins, name))
            }
            Layer::Linear(p) => Value::Hidden(p.forward(params, next_hidden(&mut ins, name))),
            Layer::Output => Value::Hidden(next_hidden(&mut ins, name)),
        })
    }
}

impl<B: Kernels> Snapshot<B> {
    /// The live slots of `slots` before step `step` runs.
    fn before(step: usize, slots: &[Option<Value<B>>]) -> Self {
        Snapshot {
            step,
            slots: (0..step)
                .filter_map(|s| Some((s, slots[s].clone()?)))
                .collect(),
        }
    }
}

/// Weights that some Linear op of `order` multiplies by: an embedding table among them is
/// tied to the lm head, and reads its rows from the lm head's buffer.
fn projected_weights(graph: &Graph, order: &[NodeId]) -> HashSet<WeightId> {
    order
        .iter()
        .filter_map(|id| match graph.node(*id).op {
            Op::Linear { weight, .. } => Some(weight),
            _ => None,
        })
        .collect()
}

/// Has each step release the slots it is the last reader of (`last_read[slot]`).
fn release_after_last_read<B: Kernels>(steps: &mut [Step<B>], last_read: Vec<Option<usize>>) {
    for (slot, reader) in last_read.into_iter().enumerate() {
        if let Some(reader) = reader {
            steps[reader].release.push(slot);
        }
    }
}

/// What lowering a graph gathers as it goes, node by node in topological order.
struct Lowering<'a, B: Kernels> {
    weights: &'a WeightTable,
    device: &'a B::Device,
    /// See [`projected_weights`].
    projected: HashSet<WeightId>,
    params: Params<B>,
    /// The distinct rotary inverse-frequency tables.
    ropes: Vec<Vec<f32>>,
    /// The slot the Output node writes.
    output: usize,
    /// The fewest rows of any embedding table.
    vocab: usize,
    /// KV cache slots taken so far.
    attention_layers: usize,
    /// The last attention (or mixture of attention) step so far.
    last_attention: Option<usize>,
    /// The first embedding step.
    first_embedding: Option<usize>,
}

impl<'a, B: Kernels> Lowering<'a, B> {
    /// Nothing lowered yet, parameters to go to `device`.
    fn new(weights: &'a WeightTable, device: &'a B::Device, projected: HashSet<WeightId>) -> Self {
        Lowering {
            weights,
            device,
            projected,
            params: Params::new(device),
            ropes: Vec::new(),
            output: 0,
            vocab: usize::MAX,
            attention_layers: 0,
            last_attention: None,
            first_embedding: None,
        }
    }

    /// The layer of step `i`, which computes `op`.
    fn layer(&mut self, i: usize, op: &Op) -> Result<Layer<B>, BackendError> {
        Ok(match op {
            Op::Input => Layer::Input,
            Op::Output => {
                self.output = i;
                Layer::Output
            }
            Op::Add => Layer::Add,
            Op::Embedding { table } => self.embedding_layer(i, *table)?,
            Op::RmsNorm { weight, eps } => Layer::RmsNorm {
                weight: self.plain(*weight)?,
                eps: *eps,
            },
            Op::LayerNorm { weight, bias, eps } => Layer::LayerNorm {
                weight: self.plain(*weight)?,
                bias: bias.map(|b| self.plain(b)).transpose()?,
                eps: *eps,
            },
            Op::Scale { factor } => Layer::Scale(*factor),
            Op::Linear { weight, bias } => Layer::Linear(Projection::new(
                &mut self.params,
                self.weights,
                *weight,
                *bias,
            )?),
            Op::FeedForward(f) => {
                Layer::FeedForward(SwiGlu::new(&mut self.params, self.weights, f)?)
            }
            Op::Attention(a) => self.attention_layer(i, a)?,
            Op::MixtureOfExperts(m) => {
                Layer::MixtureOfExperts(MoeLayer::new(m, &mut self.params, self.weights)?)
            }
            Op::MixtureOfAttention(m) => self.mixture_of_attention_layer(i, m)?,
        })
    }

    /// The parameter of `weight` in its stored layout ([`Form::Plain`]).
    fn plain(&mut self, weight: WeightId) -> Result<P, BackendError> {
        self.params.request(self.weights, weight, Form::Plain)
    }

    /// Step `i`, an embedding lookup in `table` (transposed when tied to the lm head).
    fn embedding_layer(&mut self, i: usize, table: WeightId) -> Result<Layer<B>, BackendError> {
        self.first_embedding.get_or_insert(i);
        let transposed = self.projected.contains(&table);
        let form = if transposed {
            Form::Transposed
        } else {
            Form::Plain
        };
        self.vocab = self.vocab.min(self.weights.get(table)?.shape[0]);
        Ok(Layer::Embedding(Embedding {
            table: self.params.request(self.weights, table, form)?,
            transposed,
        }))
    }

    /// Step `i`, attention layer `a`, which takes the next KV cache slot.
    fn attention_layer(&mut self, i: usize, a: &Attention) -> Result<Layer<B>, BackendError> {
        let layer = AttentionLayer::new(
            a,
            &mut self.params,
            self.weights,
            &mut self.ropes,
            self.attention_layers,
            self.device,
        )?;
        self.attention_layers += 1;
        self.last_attention = Some(i);
        Ok(Layer::Attention(layer))
    }

    /// Step `i`, mixture of attention experts `m`, which takes the next KV cache slots.
    fn mixture_of_attention_layer(
        &mut self,
        i: usize,
        m: &MixtureOfAttention,
    ) -> Result<Layer<B>, BackendError> {
        let layer = MixtureOfAttentionLayer::new(
            m,
            &mut self.params,
            self.weights,
            &mut self.ropes,
            &mut self.attention_layers,
            self.device,
        )?;
        self.last_attention = Some(i);
        Ok(Layer::MixtureOfAttention(layer))
    }

    /// The plan of `steps`, with what was gathered lowering them.
    fn finish(self, steps: Vec<Step<B>>) -> Plan<B> {
        Plan {
            steps,
            params: self.params,
            output: self.output,
            vocab: self.vocab,
            attention_layers: self.attention_layers,
            rows_from: self.last_attention.or(self.first_embedding),
        }
    }
}

/// Keeps only `rows` of every live hidden-state slot.
fn select_rows<B: Kernels>(slots: &mut [Option<Value<B>>], rows: &[usize]) {
    let mut index = None;
    for slot in slots.iter_mut() {
        if let Some(Value::Hidden(t)) = slot {
            let index = index.get_or_insert_with(|| upload_rows::<B>(rows, &t.device()));
            *t = t.clone().select(0, index.clone());
        }
    }
}
