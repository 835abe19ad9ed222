//! The graph verifier.
//!
//! Invariants checked, each error collected with the node it concerns (nothing stops at
//! the first error, except a cycle: the checks below it need a topological order; a node
//! fed by a node in error is not checked itself):
//! - exactly one `Input` and one `Output` node; the graph is acyclic; every node lies on a
//!   path from `Input` to `Output`;
//! - arity: `Input` takes nothing, `Add` two inputs, every other op one;
//! - activation kinds: `Embedding` consumes token ids, everything else hidden states;
//! - every weight id resolves in the weight table and has the shape the op needs for the
//!   width flowing in (`[out, in]` projections, `[hidden]` norms);
//! - op invariants: norm `eps` (q/k norms' too) positive, `Scale` factor finite, heads a
//!   positive multiple of KV heads, `head_dim` even with RoPE, `router rows == experts`,
//!   `1 <= top_k <= experts`, experts of one layer share a shape (attention experts also
//!   their settings);
//! - both inputs of `Add` have the same width.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::{
    Attention, FeedForward, Graph, MixtureOfAttention, MixtureOfExperts, NodeId, Op, Router,
    WeightId, WeightTable,
};

/// One verifier finding.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyError {
    pub node: String,
    pub message: String,
}

/// All findings of one verification.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyErrors {
    pub graph: String,
    pub errors: Vec<VerifyError>,
}

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "graph `{}` failed verification ({} error{}):",
            self.graph,
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {}: {}", e.node, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for VerifyErrors {}

/// What flows along an edge.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Tokens,
    Hidden(usize),
    /// Unknown because an upstream node was already in error.
    Poison,
}

struct Checker<'a> {
    weights: &'a WeightTable,
    errors: Vec<VerifyError>,
    node: String,
}

impl Checker<'_> {
    fn err(&mut self, message: String) {
        self.errors.push(VerifyError {
            node: self.node.clone(),
            message,
        });
    }

    /// Checks a weight has `expected` shape; returns false (with an error) otherwise.
    fn shape(&mut self, label: &str, id: WeightId, expected: &[usize]) -> bool {
        match self.weights.get(id) {
            Err(e) => {
                self.err(format!("{label}: {e}"));
                false
            }
            Ok(w) if w.shape != expected => {
                self.err(format!(
                    "{label} `{}` has shape {:?}, expected {:?}",
                    w.name, w.shape, expected
                ));
                false
            }
            Ok(_) => true,
        }
    }

    /// The shape of a weight, or an error.
    fn dims(&mut self, label: &str, id: WeightId) -> Option<Vec<usize>> {
        match self.weights.get(id) {
            Ok(w) => Some(w.shape.clone()),
            Err(e) => {
                self.err(format!("{label}: {e}"));
                None
            }
        }
    }

    fn ffn(&mut self, label: &str, f: &FeedForward, hidden: usize) -> Option<usize> {
        self.swiglu(label, f, hidden, hidden)
    }

    /// A SwiGLU block from width `input` to width `output`; its own width if well-formed.
    fn swiglu(
        &mut self,
        label: &str,
        f: &FeedForward,
        input: usize,
        output: usize,
    ) -> Option<usize> {
        let gate = self.dims(&format!("{label}gate"), f.gate)?;
        if gate.len() != 2 || gate[1] != input {
            self.err(format!(
                "{label}gate has shape {gate:?}, expected [width, {input}]"
            ));
            return None;
        }
        let width = gate[0];
        let ok = self.shape(&format!("{label}up"), f.up, &[width, input])
            & self.shape(&format!("{label}down"), f.down, &[output, width]);
        ok.then_some(width)
    }

    /// A router for `n` experts over `hidden`-wide states.
    fn router(&mut self, r: &Router, n: usize, hidden: usize) -> bool {
        match r {
            Router::Rows(id) => self.shape("router", *id, &[n, hidden]),
            Router::Projected(p) => match self.dims("router.domains", p.domains) {
                Some(d) if d.len() == 2 && d[0] == n => self
                    .swiglu("router.projection.", &p.projection, d[1], hidden)
                    .is_some(),
                Some(d) => {
                    self.err(format!(
                        "router.domains has shape {d:?}, expected [{n}, embed]: one domain embedding per expert"
                    ));
                    false
                }
                None => false,
            },
        }
    }
}

/// Verifies `graph` against `weights`; collects every error.
pub fn verify(graph: &Graph, weights: &WeightTable) -> Result<(), VerifyErrors> {
    let mut c = Checker {
        weights,
        errors: Vec::new(),
        node: graph.name.clone(),
    };
    let ids = graph.node_ids();
    let inputs = nodes_of_kind(graph, &ids, "Input");
    let outputs = nodes_of_kind(graph, &ids, "Output");
    check_endpoint_counts(&mut c, inputs.len(), outputs.len());
    match graph.topo_order() {
        Ok(order) => {
            check_reachability(&mut c, graph, &ids, &inputs, &outputs);
            check_activations(&mut c, graph, &order);
        }
        Err(cycle) => c.err(format!("graph has a cycle through {}", cycle.join(", "))),
    }
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors {
            graph: graph.name.clone(),
            errors: c.errors,
        })
    }
}

/// The nodes among `ids` whose op is of kind `kind`.
fn nodes_of_kind(graph: &Graph, ids: &[NodeId], kind: &str) -> Vec<NodeId> {
    ids.iter()
        .copied()
        .filter(|i| graph.node(*i).op.kind() == kind)
        .collect()
}

/// Exactly one `Input` and one `Output` node.
fn check_endpoint_counts(c: &mut Checker, inputs: usize, outputs: usize) {
    if inputs != 1 {
        c.err(format!("expected one Input node, found {inputs}"));
    }
    if outputs != 1 {
        c.err(format!("expected one Output node, found {outputs}"));
    }
}

/// Every node reachable from `start` by repeatedly following `next`.
fn reachable(start: &[NodeId], next: impl Fn(NodeId) -> Vec<NodeId>) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeId> = start.to_vec();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(next(n));
        }
    }
    seen
}

/// Every node lies on a path from `Input` (forward reach) to `Output` (backward reach).
fn check_reachability(
    c: &mut Checker,
    graph: &Graph,
    ids: &[NodeId],
    inputs: &[NodeId],
    outputs: &[NodeId],
) {
    let fwd = reachable(inputs, |n| graph.users(n));
    let bwd = reachable(outputs, |n| graph.inputs(n));
    for id in ids {
        let name = graph.node(*id).name.clone();
        if !fwd.contains(id) {
            c.errors.push(VerifyError {
                node: name.clone(),
                message: "not reachable from the Input node".into(),
            });
        }
        if !bwd.contains(id) {
            c.errors.push(VerifyError {
                node: name,
                message: "does not lead to the Output node".into(),
            });
        }
    }
}

/// Walks the nodes in topological `order`, checking each op's arity and the activations
/// flowing into it.
fn check_activations(c: &mut Checker, graph: &Graph, order: &[NodeId]) {
    let mut acts: HashMap<NodeId, Act> = HashMap::new();
    for &id in order {
        let node = graph.node(id);
        c.node = node.name.clone();
        let ins: Vec<Act> = graph
            .inputs(id)
            .iter()
            .map(|i| *acts.get(i).unwrap_or(&Act::Poison))
            .collect();
        let arity = arity(&node.op);
        if ins.len() != arity {
            c.err(format!(
                "{} takes {arity} input(s), has {}",
                node.op.kind(),
                ins.len()
            ));
            acts.insert(id, Act::Poison);
            continue;
        }
        let out = check_op(c, &node.op, &ins);
        acts.insert(id, out);
    }
}

/// How many inputs an op takes: none for `Input`, two for `Add`, one for every other op.
fn arity(op: &Op) -> usize {
    match op {
        Op::Input => 0,
        Op::Add => 2,
        _ => 1,
    }
}

/// Checks one op given its input activations; returns its output activation.
fn check_op(c: &mut Checker, op: &Op, ins: &[Act]) -> Act {
    if ins.contains(&Act::Poison) {
        return Act::Poison;
    }
    match (op, ins.first()) {
        (Op::Input, _) => Act::Tokens,
        (Op::Embedding { table }, Some(Act::Tokens)) => check_embedding(c, *table),
        (Op::Embedding { .. }, _) => {
            c.err("Embedding must consume token ids from the Input node".into());
            Act::Poison
        }
        (Op::Linear { weight, bias }, Some(Act::Hidden(h))) => check_linear(c, *weight, *bias, *h),
        (_, Some(Act::Hidden(h))) => {
            if check_width_preserving_op(c, op, ins, *h) {
                Act::Hidden(*h)
            } else {
                Act::Poison
            }
        }
        _ => {
            c.err(format!("{} cannot consume token ids", op.kind()));
            Act::Poison
        }
    }
}

/// An embedding table `[vocab, hidden]`; its output is `hidden` wide.
fn check_embedding(c: &mut Checker, table: WeightId) -> Act {
    match c.dims("table", table) {
        Some(d) if d.len() == 2 => Act::Hidden(d[1]),
        Some(d) => {
            c.err(format!(
                "embedding table has shape {d:?}, expected [vocab, hidden]"
            ));
            Act::Poison
        }
        None => Act::Poison,
    }
}

/// A projection `[out, hidden]` with an optional `[out]` bias; its output is `out` wide.
fn check_linear(c: &mut Checker, weight: WeightId, bias: Option<WeightId>, hidden: usize) -> Act {
    match c.dims("weight", weight) {
        Some(d) if d.len() == 2 && d[1] == hidden => {
            if let Some(b) = bias {
                c.shape("bias", b, &[d[0]]);
            }
            Act::Hidden(d[0])
        }
        Some(d) => {
            c.err(format!("weight has shape {d:?}, expected [out, {hidden}]"));
            Act::Poison
        }
        None => Act::Poison,
    }
}

/// Checks an op whose output is as wide as its `hidden`-wide input; true if well-formed.
fn check_width_preserving_op(c: &mut Checker, op: &Op, ins: &[Act], hidden: usize) -> bool {
    match op {
        Op::Input | Op::Embedding { .. } | Op::Linear { .. } => {
            unreachable!("handled by check_op")
        }
        Op::Output => true,
        Op::RmsNorm { weight, eps } => {
            check_norm_eps(c, *eps);
            c.shape("weight", *weight, &[hidden])
        }
        Op::LayerNorm { weight, bias, eps } => {
            check_norm_eps(c, *eps);
            let ok = c.shape("weight", *weight, &[hidden]);
            ok & bias.is_none_or(|b| c.shape("bias", b, &[hidden]))
        }
        Op::Scale { factor } => {
            if !factor.is_finite() {
                c.err(format!("scale factor must be finite, is {factor}"));
            }
            factor.is_finite()
        }
        Op::Add => {
            if ins[1] != Act::Hidden(hidden) {
                c.err(format!("Add inputs differ: {:?} and {:?}", ins[0], ins[1]));
                false
            } else {
                true
            }
        }
        Op::Attention(a) => check_attention(c, "", a, hidden),
        Op::MixtureOfAttention(m) => check_mixture_of_attention(c, m, hidden),
        Op::FeedForward(f) => c.ffn("", f, hidden).is_some(),
        Op::MixtureOfExperts(m) => check_mixture_of_experts(c, m, hidden),
    }
}

/// A norm's `eps` is positive (errors only: the op's shapes are still checked).
fn check_norm_eps(c: &mut Checker, eps: f32) {
    if eps.is_nan() || eps <= 0.0 {
        c.err(format!("eps must be positive, is {eps}"));
    }
}

/// A router row per attention expert, valid routing, and experts of one setting and shape.
fn check_mixture_of_attention(c: &mut Checker, m: &MixtureOfAttention, hidden: usize) -> bool {
    let n = m.experts.len();
    let mut ok = c.shape("router", m.router, &[n, hidden]);
    ok &= check_routing(c, m.routing.top_k, n);
    if m.experts.iter().any(|a| !a.same_settings(&m.experts[0])) {
        c.err(
            "attention experts differ in their settings (heads, positions, window, biases, norms)"
                .into(),
        );
        ok = false;
    }
    for (e, a) in m.experts.iter().enumerate() {
        ok &= check_attention(c, &format!("experts.{e}."), a, hidden);
    }
    ok
}

/// A router for every FFN expert, valid routing, experts of one FFN size, and the shared
/// expert (with its optional `[1, hidden]` gate) if there is one.
fn check_mixture_of_experts(c: &mut Checker, m: &MixtureOfExperts, hidden: usize) -> bool {
    let n = m.experts.len();
    let mut ok = c.router(&m.router, n, hidden);
    ok &= check_routing(c, m.routing.top_k, n);
    let sizes: Vec<Option<usize>> = m
        .experts
        .iter()
        .enumerate()
        .map(|(e, f)| c.ffn(&format!("experts.{e}."), f, hidden))
        .collect();
    if sizes.windows(2).any(|w| w[0] != w[1]) {
        c.err(format!("experts differ in FFN size: {sizes:?}"));
        ok = false;
    }
    if let Some(s) = &m.shared_expert {
        ok &= c.ffn("shared.", &s.ffn, hidden).is_some();
        if let Some(g) = s.gate {
            ok &= c.shape("shared.gate_proj", g, &[1, hidden]);
        }
    }
    ok
}

/// Shapes and settings of one attention, its weights labelled with `prefix`.
fn check_attention(c: &mut Checker, prefix: &str, a: &Attention, hidden: usize) -> bool {
    let (q, kv) = (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim);
    if a.n_heads == 0 || a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
        c.err(format!(
            "n_heads {} must be a positive multiple of n_kv_heads {}",
            a.n_heads, a.n_kv_heads
        ));
    }
    if !a.head_dim.is_multiple_of(2) && a.rope.is_some() {
        c.err(format!("head_dim {} must be even for RoPE", a.head_dim));
    }
    let mut ok = c.shape(&format!("{prefix}q"), a.q, &[q, hidden])
        & c.shape(&format!("{prefix}k"), a.k, &[kv, hidden])
        & c.shape(&format!("{prefix}v"), a.v, &[kv, hidden])
        & c.shape(&format!("{prefix}o"), a.o, &[hidden, q]);
    for (label, bias, n) in [
        ("q_bias", a.q_bias, q),
        ("k_bias", a.k_bias, kv),
        ("v_bias", a.v_bias, kv),
    ] {
        if let Some(b) = bias {
            ok &= c.shape(&format!("{prefix}{label}"), b, &[n]);
        }
    }
    if let Some(n) = &a.qk_norm {
        ok &= c.shape(&format!("{prefix}q_norm"), n.q, &[a.n_heads, a.head_dim])
            & c.shape(&format!("{prefix}k_norm"), n.k, &[a.n_kv_heads, a.head_dim]);
        if n.eps.is_nan() || n.eps <= 0.0 {
            c.err(format!("q/k norm eps must be positive, is {}", n.eps));
        }
    }
    ok
}

/// `1 <= top_k <= experts`.
fn check_routing(c: &mut Checker, top_k: usize, experts: usize) -> bool {
    if top_k == 0 || top_k > experts {
        c.err(format!(
            "top_k {top_k} must be in 1..={experts} (the expert count)"
        ));
        return false;
    }
    true
}
