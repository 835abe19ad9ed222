//! Reading a graph as a decoder stack, by its ops and edges: what every checkpoint format
//! writes.
//!
//! The walk follows the residual stream from the embedding: each block is a norm whose
//! output feeds attention (and, in a parallel block, the FFN too), the residual `Add` of
//! attention, then either a second norm feeding the FFN (a sequential block) or nothing,
//! and the residual `Add` of the FFN. After the last block come the final norm, the lm head
//! (`Linear`), an optional `Scale` of the logits and `Output`. Any other wiring is refused
//! with the node where the walk stopped, so an emitter never writes a model whose
//! function it does not express.

use upmix_ir::{Attention, Graph, MixtureOfAttention, NodeId, Op, WeightId};

use super::EmitError;

/// A norm op's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Norm {
    pub weight: WeightId,
    pub bias: Option<WeightId>,
    pub eps: f32,
    /// LayerNorm (mean subtracted); otherwise RMSNorm.
    pub layer: bool,
}

/// One decoder block.
pub(crate) struct Block<'g> {
    /// The norm feeding attention (in a parallel block, the FFN too).
    pub attn_norm: Norm,
    /// The attention, or the first expert of a mixture of attention experts (whose
    /// experts share its settings).
    pub attn: &'g Attention,
    pub mixture: Option<&'g MixtureOfAttention>,
    /// The norm feeding the FFN of a sequential block; `None` in a parallel block.
    pub ffn_norm: Option<Norm>,
    /// `FeedForward` or `MixtureOfExperts`.
    pub mlp: &'g Op,
}

/// A graph read as a decoder stack.
pub(crate) struct Stack<'g> {
    pub embed: WeightId,
    pub layers: Vec<Block<'g>>,
    pub final_norm: Norm,
    pub lm_head: WeightId,
    /// Logits times this (Cohere's `logit_scale`).
    pub logit_scale: Option<f32>,
}

impl Stack<'_> {
    /// Whether every block is parallel; `None` when they are mixed.
    pub fn parallel(&self) -> Option<bool> {
        let n = self.layers.iter().filter(|l| l.ffn_norm.is_none()).count();
        match n {
            0 => Some(false),
            n if n == self.layers.len() => Some(true),
            _ => None,
        }
    }
}

/// Walks `g` along its residual stream; `format` names the output in errors.
pub(crate) fn read_stack<'g>(g: &'g Graph, format: &'static str) -> Result<Stack<'g>, EmitError> {
    Walk { g, format }.stack()
}

struct Walk<'g> {
    g: &'g Graph,
    format: &'static str,
}

impl<'g> Walk<'g> {
    fn bad(&self, at: NodeId, message: &str) -> EmitError {
        EmitError::Unsupported {
            graph: self.g.name.clone(),
            format: self.format,
            message: format!(
                "not a decoder stack: at node `{}`: {message}",
                self.g.node(at).name
            ),
        }
    }

    fn op(&self, id: NodeId) -> &'g Op {
        &self.g.node(id).op
    }

    /// The one user of `id`.
    fn only_user(&self, id: NodeId) -> Result<NodeId, EmitError> {
        match self.g.users(id)[..] {
            [u] => Ok(u),
            ref us => Err(self.bad(id, &format!("{} users, expected one", us.len()))),
        }
    }

    fn norm(&self, id: NodeId) -> Option<Norm> {
        match *self.op(id) {
            Op::RmsNorm { weight, eps } => Some(Norm {
                weight,
                bias: None,
                eps,
                layer: false,
            }),
            Op::LayerNorm { weight, bias, eps } => Some(Norm {
                weight,
                bias,
                eps,
                layer: true,
            }),
            _ => None,
        }
    }

    /// The norm among exactly two users of `id` (the other is the residual `Add`, checked
    /// by [`Walk::residual_add`]).
    fn norm_beside_add(&self, id: NodeId) -> Option<NodeId> {
        let users = self.g.users(id);
        let norm = users.iter().copied().find(|&u| self.norm(u).is_some());
        norm.filter(|_| users.len() == 2)
    }

    /// The `Add` user of `branch` whose other input is `residual`.
    fn residual_add(&self, branch: NodeId, residual: NodeId) -> Result<NodeId, EmitError> {
        let add = self.only_user(branch)?;
        let mut ins = self.g.inputs(add);
        ins.sort();
        let mut want = vec![branch, residual];
        want.sort();
        if !matches!(self.op(add), Op::Add) || ins != want {
            return Err(self.bad(branch, "expected a residual Add of this branch"));
        }
        Ok(add)
    }

    fn stack(&self) -> Result<Stack<'g>, EmitError> {
        let g = self.g;
        let order = g.topo_order().map_err(|c| EmitError::Unsupported {
            graph: g.name.clone(),
            format: self.format,
            message: format!("cycle through {c:?}"),
        })?;
        let input = *order.first().ok_or_else(|| EmitError::Unsupported {
            graph: g.name.clone(),
            format: self.format,
            message: "the graph is empty".into(),
        })?;
        let mut x = self.only_user(input)?;
        let Op::Embedding { table: embed } = *self.op(x) else {
            return Err(self.bad(x, "expected the Input to feed an Embedding"));
        };
        let mut layers = Vec::new();
        loop {
            // The final norm: the stream's only user, feeding the lm head.
            if let [only] = g.users(x)[..] {
                let head = g.users(only).into_iter().next();
                let to_head = head.is_some_and(|h| matches!(self.op(h), Op::Linear { .. }));
                if let (Some(norm), true) = (self.norm(only), to_head) {
                    return self.tail(embed, layers, only, norm);
                }
            }
            let (block, out) = self.block(x)?;
            layers.push(block);
            x = out;
        }
    }

    /// The block whose input is `x`, and its output (the FFN's residual `Add`).
    fn block(&self, x: NodeId) -> Result<(Block<'g>, NodeId), EmitError> {
        let g = self.g;
        let norm_id = self
            .norm_beside_add(x)
            .ok_or_else(|| self.bad(x, "expected a norm and a residual Add after it"))?;
        let attn_norm = self.norm(norm_id).expect("found as a norm");
        let branches = g.users(norm_id);
        let attn_id = branches
            .iter()
            .copied()
            .find(|&u| matches!(self.op(u), Op::Attention(_) | Op::MixtureOfAttention(_)))
            .ok_or_else(|| self.bad(norm_id, "expected attention after this norm"))?;
        let (attn, mixture) = match self.op(attn_id) {
            Op::Attention(a) => (a, None),
            Op::MixtureOfAttention(m) => match m.experts.first() {
                Some(a) => (a, Some(m)),
                None => return Err(self.bad(attn_id, "a mixture without experts")),
            },
            _ => unreachable!("found as attention"),
        };
        let h = self.residual_add(attn_id, x)?;
        let (mlp_id, ffn_norm) = match branches.len() {
            1 => {
                let ffn_norm_id = self
                    .norm_beside_add(h)
                    .ok_or_else(|| self.bad(h, "expected the FFN's norm and residual Add"))?;
                (self.only_user(ffn_norm_id)?, self.norm(ffn_norm_id))
            }
            2 => {
                if g.users(h).len() != 1 {
                    return Err(self.bad(h, "expected only the FFN's residual Add after it"));
                }
                let mlp = branches.into_iter().find(|&u| u != attn_id);
                (mlp.expect("two branches"), None)
            }
            n => return Err(self.bad(norm_id, &format!("{n} users, expected one or two"))),
        };
        let mlp = self.op(mlp_id);
        if !matches!(mlp, Op::FeedForward(_) | Op::MixtureOfExperts(_)) {
            return Err(self.bad(mlp_id, "expected a FeedForward or MixtureOfExperts"));
        }
        let out = self.residual_add(mlp_id, h)?;
        let block = Block {
            attn_norm,
            attn,
            mixture,
            ffn_norm,
            mlp,
        };
        Ok((block, out))
    }

    /// Final norm, lm head, optional scale, output.
    fn tail(
        &self,
        embed: WeightId,
        layers: Vec<Block<'g>>,
        norm_id: NodeId,
        final_norm: Norm,
    ) -> Result<Stack<'g>, EmitError> {
        let head = self.only_user(norm_id)?;
        let Op::Linear {
            weight: lm_head,
            bias,
        } = *self.op(head)
        else {
            return Err(self.bad(head, "expected the lm head (Linear) after the final norm"));
        };
        if bias.is_some() {
            return Err(self.bad(head, "the lm head has a bias"));
        }
        let mut next = self.only_user(head)?;
        let mut logit_scale = None;
        if let Op::Scale { factor } = *self.op(next) {
            logit_scale = Some(factor);
            next = self.only_user(next)?;
        }
        if !matches!(self.op(next), Op::Output) || !self.g.users(next).is_empty() {
            return Err(self.bad(next, "expected the Output node"));
        }
        Ok(Stack {
            embed,
            layers,
            final_norm,
            lm_head,
            logit_scale,
        })
    }
}
