//! `ParallelAttention`: sequential blocks `h = x + attn(N1 x); out = h + ffn(N2 h)` become
//! parallel blocks `out = x + attn(N x) + ffn(N x)` (GPT-J's and Cohere's layout, which BAM
//! builds on): one norm feeds both branches, so attention and FFN experts can run on the
//! same input at once.
//!
//! The kept norm is the attention's (`keep: Attention`, the default) or the FFN's
//! (`keep: Ffn`); it is renamed `layers.N.norm`, as the Cohere frontend names it, and the
//! other is removed. Applied in place to `model`.
//!
//! **Not function-preserving.** A model trained with sequential blocks computes something
//! else in parallel ones (its FFN no longer sees the attention's output); the result needs
//! training afterwards. On models trained in parallel this pass is never needed.

use serde::Deserialize;
use upmix_ir::{Graph, Module, NodeId, Op};

use crate::pass::{graph, Pass, PassContext, PassError, PassName};

/// Pipeline spec: `ParallelAttention(model: "bam")` or `ParallelAttention(model: "bam",
/// keep: Ffn)`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelAttention {
    /// The model rewired (in place).
    pub model: String,
    /// The norm that feeds both branches (default `Attention`).
    #[serde(default)]
    pub keep: KeptNorm,
}

/// Which of a sequential block's two norms a parallel block keeps.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum KeptNorm {
    #[default]
    Attention,
    Ffn,
}

/// The nodes of one sequential block.
struct Block {
    input: NodeId,
    attn_norm: NodeId,
    attn: NodeId,
    ffn_norm: NodeId,
    ffn: NodeId,
}

impl ParallelAttention {
    /// The sequential block around attention node `attn`, or an error naming where the
    /// wiring differs.
    fn block(&self, g: &Graph, attn: NodeId) -> Result<Block, PassError> {
        let name = &g.node(attn).name;
        let bad =
            |what: &str| self.invalid(format!("`{name}` is not in a sequential block: {what}"));
        let is_norm =
            |id: NodeId| matches!(g.node(id).op, Op::RmsNorm { .. } | Op::LayerNorm { .. });
        let attn_norm = *g.inputs(attn).first().ok_or_else(|| bad("no input"))?;
        let input = match g.inputs(attn_norm)[..] {
            [x] if is_norm(attn_norm) && g.users(attn_norm) == [attn] => x,
            _ => return Err(bad("its input is not a norm of its own")),
        };
        let residual = match g.users(attn)[..] {
            [h] if matches!(g.node(h).op, Op::Add) => h,
            _ => return Err(bad("its output does not go to one residual Add")),
        };
        let ffn_norm = g
            .users(residual)
            .into_iter()
            .find(|&u| is_norm(u))
            .ok_or_else(|| bad("no norm after its residual Add (already parallel?)"))?;
        let ffn = match g.users(ffn_norm)[..] {
            [f] if matches!(g.node(f).op, Op::FeedForward(_) | Op::MixtureOfExperts(_)) => f,
            _ => return Err(bad("the second norm does not feed one FFN")),
        };
        Ok(Block {
            input,
            attn_norm,
            attn,
            ffn_norm,
            ffn,
        })
    }
}

impl Pass for ParallelAttention {
    fn run(&self, m: &mut Module, _cx: &mut PassContext) -> Result<Vec<String>, PassError> {
        let g = graph(m, self.name(), &self.model)?;
        let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
        let attentions: Vec<NodeId> = order
            .into_iter()
            .filter(|&n| matches!(g.node(n).op, Op::Attention(_) | Op::MixtureOfAttention(_)))
            .collect();
        if attentions.is_empty() {
            return Err(self.invalid(format!("`{}` has no attention", self.model)));
        }
        let blocks = attentions
            .iter()
            .map(|&a| self.block(g, a))
            .collect::<Result<Vec<_>, _>>()?;
        let g = m.graph_mut(&self.model).expect("checked above");
        for (layer, b) in blocks.into_iter().enumerate() {
            let (kept, dropped) = match self.keep {
                KeptNorm::Attention => (b.attn_norm, b.ffn_norm),
                KeptNorm::Ffn => (b.ffn_norm, b.attn_norm),
            };
            g.disconnect_inputs(kept);
            g.connect(b.input, kept);
            for branch in [b.attn, b.ffn] {
                g.disconnect_inputs(branch);
                g.connect(kept, branch);
            }
            g.remove_node(dropped);
            g.node_mut(kept).name = format!("layers.{layer}.norm");
        }
        Ok(vec![self.model.clone()])
    }

    fn reads(&self) -> Vec<String> {
        vec![self.model.clone()]
    }
}
