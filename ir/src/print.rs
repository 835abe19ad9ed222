//! The deterministic text form of the IR, both ways: what `upmix inspect` and
//! `--dump-ir-after` print, what snapshot tests compare, and what [`crate::parse_module`]
//! reads back.
//!
//! A graph prints as a header, then its nodes in topological order, one per line, as
//! `name = Kind(inputs) attrs`; the weights the nodes use follow in one `weights:`
//! section, numbered `%wN` in order of first use (operands of expressions are numbered
//! too, so the text is self-contained), each with its canonical name, dtype, shape and
//! expression:
//!
//! ```text
//! graph tiny (vocab 16, hidden 8, max_positions 64, bos 1, eos none)
//!   input = Input()
//!   embed = Embedding(input) table=%w0
//!   final_norm = RmsNorm(embed) eps=1e-5 weight=%w1
//!   lm_head = Linear(final_norm) weight=%w0
//!   output = Output(lm_head)
//! weights:
//!   %w0 embed.table f32[16, 8] = random(seed=1, std=0.02)
//!   %w1 final_norm.weight bf16[8] = source(model.safetensors @1024 bf16)
//! ```
//!
//! Expressions: `source(FILE @OFFSET DTYPE)` (the file by name only, so the text does not
//! depend on where a checkpoint lives), `literal(v, ...)`, `rows(%w, [i, ...])`,
//! `columns(%w, from S)`, `pruned(%w, magnitude PATTERN)` or
//! `pruned(%w, wanda PATTERN, scale=[s, ...])`, `random(seed=N, std=X)`,
//! `concat(%w, ...)`, `scale(X, %w)`, `mean(%w, ...)` and
//! `weighted_sum(X*%w, ..., normalized)`. Floats print as Rust's `{:?}` does, which reads
//! back to the same value. Names that are not plain words print as quoted strings.
//!
//! [`print_graph`] prints one graph for reading: it abbreviates lists longer than
//! 16 entries (`literal(4096 values)`, `rows(%w3, 576 rows)`, a Wanda rule without its
//! column factors) and leaves out the model's files. [`print_module`] prints every graph
//! of a module (sorted by name), then one `weights:` section shared by all of them, in
//! full: every value, and a `files:` line under a graph header that names its tokenizer,
//! config and aux files. [`crate::parse_module`] reads that form back (and a
//! [`print_graph`] text that abbreviates nothing); the parser also takes blank lines,
//! `;` comments, weights labelled and ordered at will, and nodes in any order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use crate::parse::is_word_char;
use crate::{
    Attention, Graph, Module, Op, PruneRule, RopePairs, RopeScaling, WeightExpr, WeightId,
    WeightTable,
};

/// The longest list (literal values, row indices, column factors) [`print_graph`] prints
/// in full.
const SHORT_LIST: usize = 16;

/// Prints `graph` with the weights it uses, for reading (long lists abbreviated).
pub fn print_graph(graph: &Graph, weights: &WeightTable) -> String {
    let mut p = Printer::new(weights, Detail::Summary);
    p.graph(graph);
    p.finish()
}

/// Prints every graph of `m` and the weights they use in full: the text
/// [`crate::parse_module`] rebuilds the module from. Weights no graph uses are left out.
pub fn print_module(m: &Module) -> String {
    let mut p = Printer::new(&m.weights, Detail::Full);
    for graph in m.graphs.values() {
        p.graph(graph);
    }
    p.finish()
}

/// How much a printout says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Long lists abbreviated, no model files.
    Summary,
    /// Everything needed to rebuild the module.
    Full,
}

struct Printer<'a> {
    weights: &'a WeightTable,
    detail: Detail,
    numbers: HashMap<WeightId, usize>,
    order: Vec<WeightId>,
    out: String,
}

impl<'a> Printer<'a> {
    fn new(weights: &'a WeightTable, detail: Detail) -> Self {
        Printer {
            weights,
            detail,
            numbers: HashMap::new(),
            order: Vec::new(),
            out: String::new(),
        }
    }

    /// The header and node lines of one graph (weights are numbered as they appear).
    fn graph(&mut self, graph: &Graph) {
        let m = &graph.meta;
        let opt = |v: Option<u32>| v.map_or("none".to_string(), |v| v.to_string());
        let _ = writeln!(
            self.out,
            "graph {} (vocab {}, hidden {}, max_positions {}, bos {}, eos {})",
            word(&graph.name),
            m.vocab_size,
            m.hidden_size,
            m.max_position_embeddings,
            opt(m.bos_token_id),
            opt(m.eos_token_id)
        );
        if self.detail == Detail::Full {
            self.files(graph);
        }
        let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
        for id in order {
            let node = graph.node(id);
            let inputs: Vec<Cow<str>> = graph
                .inputs(id)
                .iter()
                .map(|i| word(&graph.node(*i).name))
                .collect();
            let attrs = self.attrs(&node.op);
            let _ = writeln!(
                self.out,
                "  {} = {}({}){}",
                word(&node.name),
                node.op.kind(),
                inputs.join(", "),
                attrs
            );
        }
    }

    /// The `files:` line: the model's tokenizer, config and aux files, if it has any.
    fn files(&mut self, graph: &Graph) {
        let m = &graph.meta;
        let path = |p: &Path| quote(&p.to_string_lossy());
        let mut s = String::new();
        if let Some(t) = &m.tokenizer {
            let _ = write!(s, " tokenizer={}", path(t));
        }
        if let Some(c) = &m.config_file {
            let _ = write!(s, " config={}", path(c));
        }
        if !m.aux_files.is_empty() {
            let aux: Vec<String> = m.aux_files.iter().map(|p| path(p)).collect();
            let _ = write!(s, " aux=[{}]", aux.join(", "));
        }
        if !s.is_empty() {
            let _ = writeln!(self.out, "  files:{s}");
        }
    }

    /// The `weights:` section: every weight numbered so far, operands numbered (and
    /// printed) as they appear.
    fn finish(mut self) -> String {
        let _ = writeln!(self.out, "weights:");
        let mut i = 0;
        while i < self.order.len() {
            let line = self.weight_line(self.order[i]);
            let _ = writeln!(self.out, "  %w{i} {line}");
            i += 1;
        }
        self.out
    }

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
            Op::Attention(a) => attention_attrs(&mut s, "", a),
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
                if let Some(first) = m.experts.first() {
                    attention_attrs(&mut s, "", first);
                    // Experts whose settings differ from the first's spell out their own.
                    for (e, a) in m.experts.iter().enumerate().skip(1) {
                        if !a.same_settings(first) {
                            attention_attrs(&mut s, &format!("experts.{e}."), a);
                        }
                    }
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

    /// Whether a list of `len` entries prints in full.
    fn in_full(&self, len: usize) -> bool {
        self.detail == Detail::Full || len <= SHORT_LIST
    }

    fn weight_line(&mut self, id: WeightId) -> String {
        let w = match self.weights.get(id) {
            Ok(w) => w,
            Err(e) => return format!("<{e}>"),
        };
        let shape: Vec<String> = w.shape.iter().map(|d| d.to_string()).collect();
        let expr = self.expr(&w.expr);
        format!(
            "{} {}[{}] = {expr}",
            word(&w.name),
            w.dtype,
            shape.join(", ")
        )
    }

    fn expr(&mut self, expr: &WeightExpr) -> String {
        match expr {
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
                format!("source({} @{offset} {dtype})", word(&name))
            }
            WeightExpr::Literal(t) if self.in_full(t.data.len()) => {
                format!("literal({})", floats(&t.data))
            }
            WeightExpr::Literal(t) => format!("literal({} values)", t.data.len()),
            WeightExpr::Rows(x, rows) if self.in_full(rows.len()) => {
                let rows: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
                format!("rows({}, [{}])", self.num(*x), rows.join(", "))
            }
            WeightExpr::Rows(x, rows) => format!("rows({}, {} rows)", self.num(*x), rows.len()),
            WeightExpr::Columns { of, start } => {
                format!("columns({}, from {start})", self.num(*of))
            }
            WeightExpr::Pruned { of, rule } => {
                let of = self.num(*of);
                format!("pruned({of}, {})", self.prune_rule(rule))
            }
            WeightExpr::Random { seed, std } => format!("random(seed={seed}, std={std:?})"),
            WeightExpr::Concat(xs) => format!("concat({})", self.nums(xs)),
            WeightExpr::Scale(f, x) => format!("scale({f:?}, {})", self.num(*x)),
            WeightExpr::Mean(xs) => format!("mean({})", self.nums(xs)),
            WeightExpr::WeightedSum { terms, normalize } => {
                let args: Vec<String> = terms
                    .iter()
                    .map(|(f, x)| format!("{f:?}*{}", self.num(*x)))
                    .collect();
                let norm = if *normalize { ", normalized" } else { "" };
                format!("weighted_sum({}{norm})", args.join(", "))
            }
        }
    }

    fn nums(&mut self, ids: &[WeightId]) -> String {
        let args: Vec<String> = ids.iter().map(|x| self.num(*x)).collect();
        args.join(", ")
    }

    /// `magnitude PATTERN` or `wanda PATTERN, scale=[...]` (the factors left out when
    /// abbreviated).
    fn prune_rule(&self, rule: &PruneRule) -> String {
        match &rule.column_scale {
            None => format!("magnitude {}", rule.pattern),
            Some(scale) if self.in_full(scale.len()) => {
                format!("wanda {}, scale=[{}]", rule.pattern, floats(scale))
            }
            Some(_) => format!("wanda {}", rule.pattern),
        }
    }
}

/// `v, v, ...` with every value as `{:?}` prints it (which parses back to the same f32).
fn floats(values: &[f32]) -> String {
    let mut s = String::with_capacity(values.len() * 8);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{v:?}");
    }
    s
}

/// A name as printed: itself when it is a plain word, else a quoted string.
fn word(name: &str) -> Cow<'_, str> {
    if !name.is_empty() && name.chars().all(is_word_char) {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(quote(name))
    }
}

/// `"text"`, with `\`, `"` and line breaks escaped.
pub(crate) fn quote(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// An attention's settings (not its weights), each key prefixed with `prefix`.
fn attention_attrs(s: &mut String, prefix: &str, a: &Attention) {
    let _ = write!(
        s,
        " {prefix}heads={} {prefix}kv_heads={} {prefix}head_dim={}",
        a.n_heads, a.n_kv_heads, a.head_dim
    );
    match &a.rope {
        Some(rope) => {
            let _ = write!(s, " {prefix}rope_theta={:?}", rope.theta);
            if rope.pairs == RopePairs::Interleaved {
                let _ = write!(s, " {prefix}rope_pairs=interleaved");
            }
        }
        None => {
            let _ = write!(s, " {prefix}rope=none");
        }
    }
    if let Some(window) = a.window {
        let _ = write!(s, " {prefix}window={window}");
    }
    if let Some(n) = &a.qk_norm {
        let _ = write!(s, " {prefix}qk_norm_eps={:?}", n.eps);
    }
    match a.rope.as_ref().map(|r| &r.scaling) {
        None | Some(RopeScaling::None) => {}
        Some(RopeScaling::Linear { factor }) => {
            let _ = write!(s, " {prefix}rope_scaling=linear(factor={factor:?})");
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => {
            let _ = write!(
                s,
                " {prefix}rope_scaling=llama3(factor={factor:?}, low={low_freq_factor:?}, high={high_freq_factor:?}, original_max_positions={original_max_position})"
            );
        }
    }
}
