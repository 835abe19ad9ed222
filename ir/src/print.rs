//! The deterministic text form of a graph: what `upmix inspect` and `--dump-ir-after`
//! print and what snapshot tests compare.
//!
//! Nodes are printed in topological order, one per line, as `name = Kind(inputs) attrs`;
//! weights are numbered `%wN` in order of first use and listed after the nodes with their
//! canonical name, dtype, shape and expression. Source files print by file name only, so
//! the text does not depend on where a checkpoint lives.

use std::collections::HashMap;
use std::fmt::Write;

use crate::{Attention, Graph, Op, RopePairs, RopeScaling, WeightExpr, WeightId, WeightTable};

/// Prints `graph` with the weights it uses.
pub fn print_graph(graph: &Graph, weights: &WeightTable) -> String {
    let mut p = Printer {
        weights,
        numbers: HashMap::new(),
        order: Vec::new(),
    };
    let m = &graph.meta;
    let mut out = String::new();
    let opt = |v: Option<u32>| v.map_or("none".to_string(), |v| v.to_string());
    let _ = writeln!(
        out,
        "graph {} (vocab {}, hidden {}, max_positions {}, bos {}, eos {})",
        graph.name,
        m.vocab_size,
        m.hidden_size,
        m.max_position_embeddings,
        opt(m.bos_token_id),
        opt(m.eos_token_id)
    );
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    for id in order {
        let node = graph.node(id);
        let inputs: Vec<&str> = graph
            .inputs(id)
            .iter()
            .map(|i| graph.node(*i).name.as_str())
            .collect();
        let attrs = p.attrs(&node.op);
        let _ = writeln!(
            out,
            "  {} = {}({}){}",
            node.name,
            node.op.kind(),
            inputs.join(", "),
            attrs
        );
    }
    let _ = writeln!(out, "weights:");
    let mut i = 0;
    while i < p.order.len() {
        let id = p.order[i];
        let line = p.weight_line(id);
        let _ = writeln!(out, "  %w{i} {line}");
        i += 1;
    }
    out
}

struct Printer<'a> {
    weights: &'a WeightTable,
    numbers: HashMap<WeightId, usize>,
    order: Vec<WeightId>,
}

impl Printer<'_> {
    fn num(&mut self, id: WeightId) -> String {
        let next = self.order.len();
        let n = *self.numbers.entry(id).or_insert_with(|| {
            self.order.push(id);
            next
        });
        format!("%w{n}")
    }

    fn attrs(&mut self, op: &Op) -> String {
        let mut s = String::new();
        match op {
            Op::RmsNorm { eps, .. } | Op::LayerNorm { eps, .. } => {
                let _ = write!(s, " eps={eps:?}");
            }
            Op::Scale { factor } => {
                let _ = write!(s, " factor={factor:?}");
            }
            Op::Attention(a) => attention_attrs(&mut s, a),
            Op::MixtureOfAttention(m) => {
                let _ = write!(
                    s,
                    " experts={} top_k={} normalize_top_k={} kv={}",
                    m.experts.len(),
                    m.routing.top_k,
                    m.routing.normalize,
                    if m.shared_kv() {
                        "shared"
                    } else {
                        "per_expert"
                    }
                );
                if let Some(a) = m.experts.first() {
                    attention_attrs(&mut s, a);
                }
            }
            Op::MixtureOfExperts(m) => {
                let _ = write!(
                    s,
                    " experts={} top_k={} normalize_top_k={}",
                    m.experts.len(),
                    m.routing.top_k,
                    m.routing.normalize
                );
            }
            _ => {}
        }
        for (label, id) in op.weights() {
            let n = self.num(id);
            let _ = write!(s, " {label}={n}");
        }
        s
    }

    fn weight_line(&mut self, id: WeightId) -> String {
        let w = match self.weights.get(id) {
            Ok(w) => w,
            Err(e) => return format!("<{e}>"),
        };
        let shape: Vec<String> = w.shape.iter().map(|d| d.to_string()).collect();
        let expr = match &w.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype,
            } => {
                let name = file
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("source({name} @{offset} {dtype})")
            }
            WeightExpr::Literal(_) => "literal".to_string(),
            WeightExpr::Rows(x, rows) => format!("rows({}, {} rows)", self.num(*x), rows.len()),
            WeightExpr::Columns { of, start } => {
                format!("columns({}, from {start})", self.num(*of))
            }
            WeightExpr::Pruned { of, rule } => {
                let by = if rule.column_scale.is_some() {
                    "wanda"
                } else {
                    "magnitude"
                };
                format!("pruned({}, {by} {})", self.num(*of), rule.pattern)
            }
            WeightExpr::Random { seed, std } => format!("random(seed={seed}, std={std:?})"),
            WeightExpr::Concat(xs) => {
                let args: Vec<String> = xs.iter().map(|x| self.num(*x)).collect();
                format!("concat({})", args.join(", "))
            }
            WeightExpr::Scale(f, x) => format!("scale({f:?}, {})", self.num(*x)),
            WeightExpr::Mean(xs) => {
                let args: Vec<String> = xs.iter().map(|x| self.num(*x)).collect();
                format!("mean({})", args.join(", "))
            }
            WeightExpr::WeightedSum { terms, normalize } => {
                let args: Vec<String> = terms
                    .iter()
                    .map(|(f, x)| format!("{f:?}*{}", self.num(*x)))
                    .collect();
                let norm = if *normalize { ", normalized" } else { "" };
                format!("weighted_sum({}{norm})", args.join(", "))
            }
        };
        format!("{} {}[{}] = {expr}", w.name, w.dtype, shape.join(", "))
    }
}

/// An attention's settings (not its weights).
fn attention_attrs(s: &mut String, a: &Attention) {
    let _ = write!(
        s,
        " heads={} kv_heads={} head_dim={}",
        a.n_heads, a.n_kv_heads, a.head_dim
    );
    match &a.rope {
        Some(rope) => {
            let _ = write!(s, " rope_theta={:?}", rope.theta);
            if rope.pairs == RopePairs::Interleaved {
                s.push_str(" rope_pairs=interleaved");
            }
        }
        None => s.push_str(" rope=none"),
    }
    if let Some(window) = a.window {
        let _ = write!(s, " window={window}");
    }
    if let Some(n) = &a.qk_norm {
        let _ = write!(s, " qk_norm_eps={:?}", n.eps);
    }
    match a.rope.as_ref().map(|r| &r.scaling) {
        None | Some(RopeScaling::None) => {}
        Some(RopeScaling::Linear { factor }) => {
            let _ = write!(s, " rope_scaling=linear(factor={factor:?})");
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => {
            let _ = write!(
                    s,
                    " rope_scaling=llama3(factor={factor:?}, low={low_freq_factor:?}, high={high_freq_factor:?}, original_max_positions={original_max_position})"
                );
        }
    }
}
