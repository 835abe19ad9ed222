//! The IR text form read back into a [`Module`]: the inverse of [`crate::print_module`]
//! (the format is described in the printer's module, `print.rs`).
//!
//! The text is read line by line: a `graph NAME (...)` header starts a graph, the node
//! lines under it (`name = Kind(inputs) key=value ...`) and an optional `files:` line
//! belong to it, and weight lines (`%label name dtype[shape] = expression`) may stand
//! anywhere, conventionally after a `weights:` line. Blank lines and `;` comments are
//! skipped. Weights are built first, operands before the expressions that read them
//! (so labels and order are free; undefined labels and cycles are errors), each through
//! [`WeightTable::add`](crate::WeightTable::add) and its checks; then every graph, its
//! nodes connected in the order their inputs are written.

mod exprs;
mod lexer;
mod ops;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::{Graph, MappedFile, ModelMeta, Module, WeightId};
pub(crate) use lexer::is_word_char;
use lexer::{Cursor, Line, Pos, Tok};

/// Why IR text could not be read: where (1-based line and column) and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl ParseError {
    fn at(pos: Pos, message: impl Into<String>) -> Self {
        ParseError {
            line: pos.line,
            column: pos.col,
            message: message.into(),
        }
    }
}

/// Reads a module from its text form ([`crate::print_module`]'s, or one graph's
/// [`crate::print_graph`] text when that abbreviates nothing). `files` opens the file a
/// `source(NAME @offset dtype)` weight reads, given the name as printed; a name it cannot
/// open is an error.
pub fn parse_module(
    text: &str,
    files: &dyn Fn(&str) -> Option<Arc<MappedFile>>,
) -> Result<Module, ParseError> {
    let lines = lexer::lex(text)?;
    let mut graphs: Vec<GraphText> = Vec::new();
    let mut definitions = Vec::new();
    // Whether node lines now belong to the last graph (not after `weights:`).
    let mut in_graph = false;
    for line in &lines {
        let mut c = Cursor::new(line);
        match (c.peek(), c.peek2()) {
            (Some(Tok::Ref(_)), _) => definitions.push(exprs::definition(&mut c)?),
            (Some(Tok::Word(w)), Some(Tok::Punct(':'))) if w == "weights" => {
                c.skip();
                c.skip();
                c.end()?;
                in_graph = false;
            }
            (Some(Tok::Word(w)), Some(Tok::Punct(':'))) if w == "files" => {
                match graphs.last_mut().filter(|_| in_graph) {
                    Some(g) => files_line(&mut c, g)?,
                    None => return Err(outside_graph(line)),
                }
            }
            (Some(Tok::Word(w)), Some(t)) if w == "graph" && *t != Tok::Punct('=') => {
                graphs.push(header(&mut c)?);
                in_graph = true;
            }
            _ => match graphs.last_mut().filter(|_| in_graph) {
                Some(g) => g.nodes.push(node_line(&mut c)?),
                None => return Err(outside_graph(line)),
            },
        }
    }
    let mut module = Module::new();
    let ids = exprs::build(&definitions, files, &mut module.weights)?;
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for g in graphs {
        if let Some(first) = seen.insert(g.name.clone(), g.pos) {
            let message = format!(
                "graph `{}` is defined twice (first on line {})",
                g.name, first.line
            );
            return Err(ParseError::at(g.pos, message));
        }
        module.insert(build_graph(g, &ids)?);
    }
    Ok(module)
}

fn outside_graph(line: &Line) -> ParseError {
    let pos = Cursor::new(line).here();
    ParseError::at(
        pos,
        "expected a `graph NAME (...)` header before this line, or a weight like \
         `%w3 name f32[4] = random(seed=1, std=0.02)`",
    )
}

/// A graph as written: its header, files and node lines.
struct GraphText {
    name: String,
    pos: Pos,
    meta: ModelMeta,
    nodes: Vec<NodeText>,
}

/// `name = Kind(inputs) attrs`.
struct NodeText {
    name: String,
    pos: Pos,
    kind: String,
    kind_pos: Pos,
    inputs: Vec<(String, Pos)>,
    attrs: Vec<Attr>,
}

/// `key=value`.
struct Attr {
    key: String,
    pos: Pos,
    value: Value,
    value_pos: Pos,
}

enum Value {
    Word(String),
    Str(String),
    Ref(String),
    /// `name(key=value, ...)`.
    Call(String, Vec<Attr>),
    List(Vec<(Value, Pos)>),
}

impl Value {
    /// The value as written (roughly), for messages.
    fn describe(&self) -> String {
        match self {
            Value::Word(w) => format!("`{w}`"),
            Value::Str(s) => format!("`{}`", crate::print::quote(s)),
            Value::Ref(r) => format!("`%{r}`"),
            Value::Call(name, _) => format!("`{name}(...)`"),
            Value::List(_) => "a list `[...]`".to_string(),
        }
    }
}

/// `graph NAME (vocab V, hidden H, max_positions P, bos B, eos E)`; `bos` and `eos` may
/// be `none`, and settings left out are zero or none.
fn header(c: &mut Cursor) -> Result<GraphText, ParseError> {
    let pos = c.here();
    c.keyword("graph")?;
    let (name, _) = c.name("a graph name")?;
    c.punct('(')?;
    let mut meta = ModelMeta::default();
    let mut seen = HashSet::new();
    c.list(')', |c| {
        let (key, at) = c.word("a model setting (vocab, hidden, max_positions, bos or eos)")?;
        if !seen.insert(key.clone()) {
            return Err(ParseError::at(at, format!("`{key}` is given twice")));
        }
        let token = |c: &mut Cursor| match c.eat_word("none") {
            true => Ok(None),
            false => c.parsed("a token id or none").map(Some),
        };
        match key.as_str() {
            "vocab" => meta.vocab_size = c.parsed("a whole number")?,
            "hidden" => meta.hidden_size = c.parsed("a whole number")?,
            "max_positions" => meta.max_position_embeddings = c.parsed("a whole number")?,
            "bos" => meta.bos_token_id = token(c)?,
            "eos" => meta.eos_token_id = token(c)?,
            _ => {
                let message = format!(
                    "unknown model setting `{key}` (expected vocab, hidden, max_positions, bos or eos)"
                );
                return Err(ParseError::at(at, message));
            }
        }
        Ok(())
    })?;
    c.end()?;
    Ok(GraphText {
        name,
        pos,
        meta,
        nodes: Vec::new(),
    })
}

/// `files: tokenizer="..." config="..." aux=["...", ...]`.
fn files_line(c: &mut Cursor, g: &mut GraphText) -> Result<(), ParseError> {
    c.skip();
    c.skip();
    let path = |v: &Value, at: Pos| match v {
        Value::Str(s) | Value::Word(s) => Ok(PathBuf::from(s)),
        other => Err(ParseError::at(
            at,
            format!("expected a quoted path, found {}", other.describe()),
        )),
    };
    for attr in attrs(c)? {
        match (attr.key.as_str(), &attr.value) {
            ("tokenizer", v) => g.meta.tokenizer = Some(path(v, attr.value_pos)?),
            ("config", v) => g.meta.config_file = Some(path(v, attr.value_pos)?),
            ("aux", Value::List(items)) => {
                g.meta.aux_files = items
                    .iter()
                    .map(|(v, at)| path(v, *at))
                    .collect::<Result<_, _>>()?;
            }
            ("aux", v) => {
                let message = format!("expected a list of paths `[...]`, found {}", v.describe());
                return Err(ParseError::at(attr.value_pos, message));
            }
            (key, _) => {
                let message = format!("unknown file `{key}` (expected tokenizer, config or aux)");
                return Err(ParseError::at(attr.pos, message));
            }
        }
    }
    Ok(())
}

/// `name = Kind(input, ...) key=value ...`.
fn node_line(c: &mut Cursor) -> Result<NodeText, ParseError> {
    let (name, pos) = c.name("a node name")?;
    c.punct('=')?;
    let (kind, kind_pos) = c.word("an op kind like RmsNorm")?;
    c.punct('(')?;
    let inputs = c.list(')', |c| c.name("an input node's name"))?;
    let attrs = attrs(c)?;
    Ok(NodeText {
        name,
        pos,
        kind,
        kind_pos,
        inputs,
        attrs,
    })
}

/// `key=value` pairs to the end of the line, each key once.
fn attrs(c: &mut Cursor) -> Result<Vec<Attr>, ParseError> {
    let mut out: Vec<Attr> = Vec::new();
    while !c.at_end() {
        let a = attr(c)?;
        if out.iter().any(|b| b.key == a.key) {
            let message = format!("attribute `{}` is given twice", a.key);
            return Err(ParseError::at(a.pos, message));
        }
        out.push(a);
    }
    Ok(out)
}

fn attr(c: &mut Cursor) -> Result<Attr, ParseError> {
    let (key, pos) = c.word("an attribute like eps=1e-5")?;
    c.punct('=')?;
    let value_pos = c.here();
    let value = value(c)?;
    Ok(Attr {
        key,
        pos,
        value,
        value_pos,
    })
}

fn value(c: &mut Cursor) -> Result<Value, ParseError> {
    match c.peek() {
        Some(Tok::Ref(_)) => Ok(Value::Ref(c.weight_ref()?.0)),
        Some(Tok::Str(s)) => {
            c.skip();
            Ok(Value::Str(s.clone()))
        }
        Some(Tok::Punct('[')) => {
            c.skip();
            let items = c.list(']', |c| {
                let at = c.here();
                Ok((value(c)?, at))
            })?;
            Ok(Value::List(items))
        }
        Some(Tok::Word(_)) => {
            let (w, _) = c.word("a value")?;
            if c.eat_punct('(') {
                let args = c.list(')', attr)?;
                Ok(Value::Call(w, args))
            } else {
                Ok(Value::Word(w))
            }
        }
        _ => Err(c.expected("a value")),
    }
}

/// A graph from its text: nodes in the order written, then their inputs connected.
fn build_graph(g: GraphText, weights: &HashMap<String, WeightId>) -> Result<Graph, ParseError> {
    let mut graph = Graph::new(&g.name, g.meta);
    let mut ids = HashMap::new();
    for node in &g.nodes {
        if let Some((_, first)) = ids.get(&node.name) {
            let message = format!(
                "node `{}` is defined twice in graph `{}` (first on line {})",
                node.name, g.name, first
            );
            return Err(ParseError::at(node.pos, message));
        }
        let op = ops::build(node, weights)?;
        ids.insert(
            node.name.clone(),
            (graph.add_node(&node.name, op), node.pos.line),
        );
    }
    for node in &g.nodes {
        let to = ids[&node.name].0;
        for (input, at) in &node.inputs {
            let Some((from, _)) = ids.get(input) else {
                let message = format!(
                    "unknown input node `{input}`: graph `{}` has no node of that name",
                    g.name
                );
                return Err(ParseError::at(*at, message));
            };
            graph.connect(*from, to);
        }
    }
    Ok(graph)
}
