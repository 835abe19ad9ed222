//! Hugging Face tensor names for every weight of a graph, in file order, from the
//! `upmix-formats` name tables (JetMoE's differ: module `jetmoe`).

use upmix_formats::{hf, Family, Role};
use upmix_ir::{
    FeedForward, MixtureOfExperts, Op, Router, Weight, WeightExpr, WeightId, WeightTable,
};

use super::stack::Stack;
use super::EmitError;

/// On-disk layout of Mixtral experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MoeLayout {
    /// One tensor per expert projection (`block_sparse_moe.experts.E.w1/w3/w2`): what
    /// every Mixtral loader reads (vLLM, llama.cpp's converter, transformers).
    #[default]
    Classic,
    /// Stacked expert tensors (`mlp.experts.gate_up_proj` `[E, 2F, D]`, gate rows then up
    /// rows, and `mlp.experts.down_proj` `[E, D, F]`): transformers 5's in-memory layout.
    Fused,
}

/// Tensor names of one family, collected in file order.
pub(super) struct Names {
    family: Family,
    pub(super) list: Vec<(String, WeightId)>,
}

impl Names {
    pub(super) fn new(family: Family) -> Self {
        Names {
            family,
            list: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, role: Role, (layer, expert): (usize, usize), id: WeightId) {
        let name = hf::name(self.family, role, layer, expert)
            .unwrap_or_else(|| panic!("{:?} has no {role:?} tensor", self.family));
        self.list.push((name, id));
    }

    fn ffn(&mut self, role: fn(usize) -> Role, at: (usize, usize), f: &FeedForward) {
        for (i, id) in [f.gate, f.up, f.down].into_iter().enumerate() {
            self.push(role(i), at, id);
        }
    }
}

/// Hugging Face tensor names for every weight, in file order. `architecture` has checked
/// that `family` has a name for each.
pub(super) fn tensor_list(
    s: &Stack,
    family: Family,
    layout: MoeLayout,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Vec<(String, WeightId)>, EmitError> {
    let mut t = Names::new(family);
    t.push(Role::Embed, (0, 0), s.embed);
    for (i, l) in s.layers.iter().enumerate() {
        let norm_role = match l.ffn_norm {
            Some(_) => Role::AttnNorm,
            None => Role::BlockNorm,
        };
        t.push(norm_role, (i, 0), l.attn_norm.weight);
        let a = l.attn;
        match l.mixture {
            Some(moa) => attention_experts(&mut t, i, moa),
            None => {
                for (k, w) in [a.q, a.k, a.v, a.o].into_iter().enumerate() {
                    t.push(Role::Attn(k), (i, 0), w);
                }
            }
        }
        for (k, b) in [a.q_bias, a.k_bias, a.v_bias].into_iter().enumerate() {
            if let Some(b) = b {
                t.push(Role::AttnBias(k), (i, 0), b);
            }
        }
        if let Some(n) = &a.qk_norm {
            t.push(Role::QkNorm(0), (i, 0), n.q);
            t.push(Role::QkNorm(1), (i, 0), n.k);
        }
        if let Some(n) = l.ffn_norm {
            t.push(Role::FfnNorm, (i, 0), n.weight);
        }
        match l.mlp {
            Op::FeedForward(f) => t.ffn(Role::Mlp, (i, 0), f),
            Op::MixtureOfExperts(moe) if layout == MoeLayout::Fused => {
                fused_experts(&mut t, i, moe, table, unsupported)?
            }
            Op::MixtureOfExperts(moe) => {
                match &moe.router {
                    Router::Projected(p) if family == Family::UpmixBam => {
                        t.push(Role::RouterDomains, (i, 0), p.domains);
                        t.ffn(Role::RouterProjection, (i, 0), &p.projection);
                    }
                    router => {
                        let rows = super::router_rows(table, i, router)?;
                        t.push(Role::Router, (i, 0), rows);
                    }
                }
                for (e, f) in moe.experts.iter().enumerate() {
                    t.ffn(Role::Expert, (i, e), f);
                }
                if let Some(shared) = &moe.shared_expert {
                    t.ffn(Role::Shared, (i, 0), &shared.ffn);
                    let gate = shared.gate.ok_or_else(|| {
                        unsupported(format!("layer {i}: shared expert without gate"))
                    })?;
                    t.push(Role::SharedGate, (i, 0), gate);
                }
            }
            _ => unreachable!("read_stack admits only FFN and MoE"),
        }
    }
    t.push(Role::FinalNorm, (0, 0), s.final_norm.weight);
    if s.lm_head != s.embed {
        t.push(Role::LmHead, (0, 0), s.lm_head);
    }
    Ok(t.list)
}

/// A mixture of attention experts: the router, each expert's projections, and with shared
/// keys and values those once under the plain attention names.
fn attention_experts(t: &mut Names, i: usize, moa: &upmix_ir::MixtureOfAttention) {
    let shared = moa.shared_kv();
    t.push(Role::AttnRouter, (i, 0), moa.router);
    for (e, a) in moa.experts.iter().enumerate() {
        t.push(Role::ExpertAttn(0), (i, e), a.q);
        if !shared {
            t.push(Role::ExpertAttn(1), (i, e), a.k);
            t.push(Role::ExpertAttn(2), (i, e), a.v);
        }
        t.push(Role::ExpertAttn(3), (i, e), a.o);
    }
    if shared {
        t.push(Role::Attn(1), (i, 0), moa.experts[0].k);
        t.push(Role::Attn(2), (i, 0), moa.experts[0].v);
    }
}

/// Mixtral's fused layout: the router (named as in Qwen2-MoE), then every expert's gate and
/// up rows stacked in one tensor and their down projections in another.
fn fused_experts(
    t: &mut Names,
    i: usize,
    moe: &MixtureOfExperts,
    table: &mut WeightTable,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<(), EmitError> {
    let router = hf::name(Family::Qwen2Moe, Role::Router, i, 0).expect("Qwen2-MoE has a router");
    t.list
        .push((router, super::router_rows(table, i, &moe.router)?));
    let [f, d] = table.get(moe.experts[0].gate)?.shape[..] else {
        return Err(unsupported(format!("layer {i}: experts are not 2-D")));
    };
    let n = moe.experts.len();
    let gate_up = moe.experts.iter().flat_map(|x| [x.gate, x.up]).collect();
    let down = moe.experts.iter().map(|x| x.down).collect();
    let name = |part| format!("layers.{i}.ffn.experts.{part}");
    let gate_up = concat(table, name("gate_up"), vec![n, 2 * f, d], gate_up)?;
    let down = concat(table, name("down"), vec![n, d, f], down)?;
    let fill = |p| upmix_formats::fill(p, i, 0);
    t.list.push((fill(hf::MIXTRAL_FUSED_GATE_UP), gate_up));
    t.list.push((fill(hf::MIXTRAL_FUSED_DOWN), down));
    Ok(())
}

/// A new weight holding `parts` one after another, shaped `shape`.
fn concat(
    table: &mut WeightTable,
    name: String,
    shape: Vec<usize>,
    parts: Vec<WeightId>,
) -> Result<WeightId, EmitError> {
    let dtype = table.get(parts[0])?.dtype.plain();
    Ok(table.add(Weight {
        name,
        shape,
        dtype,
        expr: WeightExpr::Concat(parts),
    })?)
}
