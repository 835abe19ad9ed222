//! A builder for graphs written in Rust code: the programmatic graph API.
//!
//! ```
//! use upmix_ir::*;
//! let mut m = Module::new();
//! let t = |m: &mut Module, name: &str, shape: Vec<usize>| {
//!     let n = shape.iter().product();
//!     m.weights.literal(name, HostTensor::new(shape, vec![0.1; n])).unwrap()
//! };
//! let (embed, norm) = (t(&mut m, "embed.weight", vec![16, 8]), t(&mut m, "final_norm.weight", vec![8]));
//! let mut b = GraphBuilder::new("tiny", ModelMeta { vocab_size: 16, hidden_size: 8, ..Default::default() });
//! let x = b.input();
//! let h = b.embedding(x, embed);
//! let h = b.rms_norm("final_norm", h, norm, 1e-5);
//! let logits = b.linear("lm_head", h, embed);
//! let g = b.output(logits);
//! verify(&g, &m.weights).unwrap();
//! ```

use crate::{Attention, FeedForward, Graph, MixtureOfExperts, ModelMeta, NodeId, Op, WeightId};

/// Builds a [`Graph`] node by node; every method adds one node fed by the given inputs and
/// returns it. Node names follow the canonical scheme (`embed`, `layers.N.attn`, ...).
pub struct GraphBuilder {
    graph: Graph,
}

impl GraphBuilder {
    pub fn new(name: &str, meta: ModelMeta) -> Self {
        GraphBuilder {
            graph: Graph::new(name, meta),
        }
    }

    /// Adds a node called `name` computing `op` on `inputs`.
    pub fn node(&mut self, name: &str, op: Op, inputs: &[NodeId]) -> NodeId {
        let id = self.graph.add_node(name, op);
        for i in inputs {
            self.graph.connect(*i, id);
        }
        id
    }

    pub fn input(&mut self) -> NodeId {
        self.node("input", Op::Input, &[])
    }

    pub fn embedding(&mut self, tokens: NodeId, table: WeightId) -> NodeId {
        self.node("embed", Op::Embedding { table }, &[tokens])
    }

    pub fn rms_norm(&mut self, name: &str, x: NodeId, weight: WeightId, eps: f32) -> NodeId {
        self.node(name, Op::RmsNorm { weight, eps }, &[x])
    }

    pub fn layer_norm(
        &mut self,
        name: &str,
        x: NodeId,
        (weight, bias): (WeightId, Option<WeightId>),
        eps: f32,
    ) -> NodeId {
        self.node(name, Op::LayerNorm { weight, bias, eps }, &[x])
    }

    /// `x * factor`.
    pub fn scale(&mut self, name: &str, x: NodeId, factor: f32) -> NodeId {
        self.node(name, Op::Scale { factor }, &[x])
    }

    pub fn attention(&mut self, name: &str, x: NodeId, attn: Attention) -> NodeId {
        self.node(name, Op::Attention(attn), &[x])
    }

    pub fn feed_forward(&mut self, name: &str, x: NodeId, ffn: FeedForward) -> NodeId {
        self.node(name, Op::FeedForward(ffn), &[x])
    }

    pub fn mixture_of_attention(
        &mut self,
        name: &str,
        x: NodeId,
        moa: crate::MixtureOfAttention,
    ) -> NodeId {
        self.node(name, Op::MixtureOfAttention(moa), &[x])
    }

    pub fn mixture_of_experts(&mut self, name: &str, x: NodeId, moe: MixtureOfExperts) -> NodeId {
        self.node(name, Op::MixtureOfExperts(moe), &[x])
    }

    pub fn add(&mut self, name: &str, a: NodeId, b: NodeId) -> NodeId {
        self.node(name, Op::Add, &[a, b])
    }

    pub fn linear(&mut self, name: &str, x: NodeId, weight: WeightId) -> NodeId {
        self.node(name, Op::Linear { weight, bias: None }, &[x])
    }

    /// A pre-norm transformer block `layers.{layer}`:
    /// `h = x + attn(norm(x)); out = h + mlp(norm(h))`, where `mlp` is a `FeedForward` or
    /// `MixtureOfExperts` op.
    pub fn decoder_block(&mut self, layer: usize, x: NodeId, block: DecoderBlock) -> NodeId {
        let p = format!("layers.{layer}");
        let n1 = self.rms_norm(&format!("{p}.attn_norm"), x, block.attn_norm, block.eps);
        let a = self.node(&format!("{p}.attn"), block.attn, &[n1]);
        let h = self.add(&format!("{p}.attn_residual"), x, a);
        let n2 = self.rms_norm(&format!("{p}.ffn_norm"), h, block.ffn_norm, block.eps);
        let f = self.node(&format!("{p}.ffn"), block.mlp, &[n2]);
        self.add(&format!("{p}.ffn_residual"), h, f)
    }

    /// A parallel block `layers.{layer}` (Cohere): one norm feeds both branches,
    /// `out = (x + attn(norm(x))) + mlp(norm(x))`.
    pub fn parallel_block(&mut self, layer: usize, x: NodeId, block: ParallelBlock) -> NodeId {
        let p = format!("layers.{layer}");
        let n = self.node(&format!("{p}.norm"), block.norm, &[x]);
        let a = self.node(&format!("{p}.attn"), block.attn, &[n]);
        let f = self.node(&format!("{p}.ffn"), block.mlp, &[n]);
        let h = self.add(&format!("{p}.attn_residual"), x, a);
        self.add(&format!("{p}.ffn_residual"), h, f)
    }

    /// Adds the `output` node and returns the finished graph.
    pub fn output(mut self, x: NodeId) -> Graph {
        self.node("output", Op::Output, &[x]);
        self.graph
    }
}

/// The weights and settings of one pre-norm decoder block.
pub struct DecoderBlock {
    pub attn_norm: WeightId,
    /// `Op::Attention` or `Op::MixtureOfAttention`.
    pub attn: Op,
    pub ffn_norm: WeightId,
    /// `Op::FeedForward` or `Op::MixtureOfExperts`.
    pub mlp: Op,
    pub eps: f32,
}

/// The weights and settings of one parallel block.
pub struct ParallelBlock {
    /// `Op::LayerNorm` or `Op::RmsNorm`.
    pub norm: Op,
    /// `Op::Attention` or `Op::MixtureOfAttention`.
    pub attn: Op,
    /// `Op::FeedForward` or `Op::MixtureOfExperts`.
    pub mlp: Op,
}
