//! Weight lines (`%w3 name dtype[shape] = expression`) read, then built into a
//! [`WeightTable`] operands first.

use std::collections::HashMap;
use std::sync::Arc;

use super::lexer::{Cursor, Pos, Tok};
use super::ParseError;
use crate::{
    DType, HostTensor, MappedFile, Pattern, PruneRule, Weight, WeightExpr, WeightId, WeightTable,
};

/// A weight label as written (`w3` for `%w3`) and where.
pub(super) type Ref = (String, Pos);

/// One weight line.
pub(super) struct Definition {
    label: String,
    pos: Pos,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    expr: Expr,
    expr_pos: Pos,
}

/// A [`WeightExpr`] with its operands still labels.
enum Expr {
    Source {
        file: String,
        file_pos: Pos,
        offset: usize,
        dtype: DType,
    },
    Literal(Vec<f32>),
    Rows(Ref, Vec<u32>),
    Columns(Ref, usize),
    Pruned(Ref, PruneRule),
    Random {
        seed: u64,
        std: f32,
    },
    Concat(Vec<Ref>),
    Scale(f32, Ref),
    Mean(Vec<Ref>),
    WeightedSum(Vec<(f32, Ref)>, bool),
}

impl Expr {
    fn operands(&self) -> Vec<&Ref> {
        match self {
            Expr::Source { .. } | Expr::Literal(_) | Expr::Random { .. } => Vec::new(),
            Expr::Rows(r, _) | Expr::Columns(r, _) | Expr::Pruned(r, _) | Expr::Scale(_, r) => {
                vec![r]
            }
            Expr::Concat(rs) | Expr::Mean(rs) => rs.iter().collect(),
            Expr::WeightedSum(terms, _) => terms.iter().map(|(_, r)| r).collect(),
        }
    }
}

const EXPRESSIONS: [&str; 10] = [
    "source",
    "literal",
    "rows",
    "columns",
    "pruned",
    "random",
    "concat",
    "scale",
    "mean",
    "weighted_sum",
];

/// `%label name dtype[d, ...] = expression`.
pub(super) fn definition(c: &mut Cursor) -> Result<Definition, ParseError> {
    let (label, pos) = c.weight_ref()?;
    let (name, _) = c.name("a weight name")?;
    let dtype = c.parsed("a dtype like f32, bf16 or q4_0")?;
    c.punct('[')?;
    let shape = c.list(']', |c| c.parsed("a dimension (a whole number)"))?;
    c.punct('=')?;
    let expr_pos = c.here();
    let expr = expr(c)?;
    c.end()?;
    Ok(Definition {
        label,
        pos,
        name,
        dtype,
        shape,
        expr,
        expr_pos,
    })
}

fn expr(c: &mut Cursor) -> Result<Expr, ParseError> {
    let (kind, pos) = c.word("a weight expression like random(seed=1, std=0.02)")?;
    if !EXPRESSIONS.contains(&kind.as_str()) {
        let message = format!(
            "unknown weight expression `{kind}` (expected one of {})",
            EXPRESSIONS.join(", ")
        );
        return Err(ParseError::at(pos, message));
    }
    c.punct('(')?;
    let comma = |c: &mut Cursor| c.punct(',');
    let e = match kind.as_str() {
        "source" => {
            let (file, file_pos) = c.name("a file name")?;
            c.punct('@')?;
            let offset = c.parsed("a byte offset")?;
            let dtype = c.parsed("a dtype like bf16 or q4_0")?;
            c.punct(')')?;
            Expr::Source {
                file,
                file_pos,
                offset,
                dtype,
            }
        }
        "literal" => Expr::Literal(c.list(')', literal_value)?),
        "rows" => {
            let of = c.weight_ref()?;
            comma(c)?;
            let rows = row_indices(c)?;
            c.punct(')')?;
            Expr::Rows(of, rows)
        }
        "columns" => {
            let of = c.weight_ref()?;
            comma(c)?;
            c.keyword("from")?;
            let start = c.parsed("a column index")?;
            c.punct(')')?;
            Expr::Columns(of, start)
        }
        "pruned" => pruned(c)?,
        "random" => {
            c.keyword("seed")?;
            c.punct('=')?;
            let seed = c.parsed("a seed (a whole number)")?;
            comma(c)?;
            c.keyword("std")?;
            c.punct('=')?;
            let std = c.parsed("a number")?;
            c.punct(')')?;
            Expr::Random { seed, std }
        }
        "concat" => Expr::Concat(c.list(')', |c| c.weight_ref())?),
        "mean" => Expr::Mean(c.list(')', |c| c.weight_ref())?),
        "scale" => {
            let factor = c.parsed("a number")?;
            comma(c)?;
            let of = c.weight_ref()?;
            c.punct(')')?;
            Expr::Scale(factor, of)
        }
        _ => weighted_sum(c)?,
    };
    Ok(e)
}

/// One value of a literal; `N values` is the abbreviation of a long one.
fn literal_value(c: &mut Cursor) -> Result<f32, ParseError> {
    let pos = c.here();
    let v = c.parsed("a number")?;
    if c.eat_word("values") {
        return Err(ParseError::at(
            pos,
            "this literal is abbreviated to its value count: print_module prints every value",
        ));
    }
    Ok(v)
}

/// `[i, ...]`; `N rows` is the abbreviation of a long list.
fn row_indices(c: &mut Cursor) -> Result<Vec<u32>, ParseError> {
    if c.eat_punct('[') {
        return c.list(']', |c| c.parsed("a row index"));
    }
    if matches!(c.peek2(), Some(Tok::Word(w)) if w == "rows") {
        return Err(ParseError::at(
            c.here(),
            "these row indices are abbreviated to their count: print_module prints every index",
        ));
    }
    Err(c.expected("a list of row indices like [2, 0, 1]"))
}

/// `pruned(%w, magnitude PATTERN)` or `pruned(%w, wanda PATTERN, scale=[...])`.
fn pruned(c: &mut Cursor) -> Result<Expr, ParseError> {
    let of = c.weight_ref()?;
    c.punct(',')?;
    let (method, method_pos) = c.word("magnitude or wanda")?;
    if method != "magnitude" && method != "wanda" {
        let message = format!("expected magnitude or wanda, found `{method}`");
        return Err(ParseError::at(method_pos, message));
    }
    let (text, at) = c.text_until(|t| matches!(t, Tok::Punct(',' | ')')));
    let pattern: Pattern = text.parse().map_err(|_| {
        let message = format!(
            "expected a pruning pattern like `0.5 per row`, `0.5 per tensor` or `2:4`, found `{text}`"
        );
        ParseError::at(at, message)
    })?;
    let scale_pos = c.here();
    let column_scale = if c.eat_punct(',') {
        c.keyword("scale")?;
        c.punct('=')?;
        c.punct('[')?;
        Some(c.list(']', |c| c.parsed::<f32>("a number"))?.into())
    } else {
        None
    };
    c.punct(')')?;
    match (method.as_str(), column_scale.is_some()) {
        ("magnitude", true) => Err(ParseError::at(
            scale_pos,
            "magnitude pruning takes no column factors (`scale=[...]` is Wanda's)",
        )),
        ("wanda", false) => Err(ParseError::at(
            method_pos,
            "wanda pruning needs its column factors, `, scale=[...]` (print_graph leaves long \
             ones out; print_module prints them)",
        )),
        _ => Ok(Expr::Pruned(
            of,
            PruneRule {
                pattern,
                column_scale,
            },
        )),
    }
}

/// `weighted_sum(X*%w, ..., normalized)`.
fn weighted_sum(c: &mut Cursor) -> Result<Expr, ParseError> {
    let mut normalize = false;
    let terms = c.list(')', |c| {
        if normalize {
            return Err(c.expected("`)` after `normalized`"));
        }
        if c.eat_word("normalized") {
            normalize = true;
            return Ok(None);
        }
        let factor = c.parsed("a factor like 0.5 (as in 0.5*%w3) or `normalized`")?;
        c.punct('*')?;
        Ok(Some((factor, c.weight_ref()?)))
    })?;
    Ok(Expr::WeightedSum(
        terms.into_iter().flatten().collect(),
        normalize,
    ))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Open,
    Done,
}

/// Adds every definition to `table`, operands first; returns the id of each label.
pub(super) fn build(
    definitions: &[Definition],
    files: &dyn Fn(&str) -> Option<Arc<MappedFile>>,
    table: &mut WeightTable,
) -> Result<HashMap<String, WeightId>, ParseError> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, d) in definitions.iter().enumerate() {
        if let Some(first) = index.insert(&d.label, i) {
            let message = format!(
                "weight %{} is defined twice (first on line {})",
                d.label, definitions[first].pos.line
            );
            return Err(ParseError::at(d.pos, message));
        }
    }
    for d in definitions {
        for (label, at) in d.expr.operands() {
            if !index.contains_key(label.as_str()) {
                return Err(ParseError::at(*at, format!("undefined weight %{label}")));
            }
        }
    }
    let mut b = Builder {
        definitions,
        index,
        files,
        opened: HashMap::new(),
        ids: HashMap::new(),
        state: vec![State::New; definitions.len()],
    };
    for root in 0..definitions.len() {
        b.visit(root, table)?;
    }
    Ok(b.ids)
}

struct Builder<'a> {
    definitions: &'a [Definition],
    index: HashMap<&'a str, usize>,
    files: &'a dyn Fn(&str) -> Option<Arc<MappedFile>>,
    opened: HashMap<String, Arc<MappedFile>>,
    ids: HashMap<String, WeightId>,
    state: Vec<State>,
}

impl Builder<'_> {
    /// Adds `root` after its operands (depth first, without recursion).
    fn visit(&mut self, root: usize, table: &mut WeightTable) -> Result<(), ParseError> {
        if self.state[root] != State::New {
            return Ok(());
        }
        self.state[root] = State::Open;
        let mut stack = vec![(root, 0)];
        while let Some(top) = stack.last_mut() {
            let (w, k) = *top;
            let operands = self.definitions[w].expr.operands();
            let Some((label, at)) = operands.get(k) else {
                self.add(w, table)?;
                self.state[w] = State::Done;
                stack.pop();
                continue;
            };
            top.1 += 1;
            let o = self.index[label.as_str()];
            match self.state[o] {
                State::Done => {}
                State::New => {
                    self.state[o] = State::Open;
                    stack.push((o, 0));
                }
                State::Open => {
                    let start = stack.iter().position(|(i, _)| *i == o).unwrap_or(0);
                    let mut path: Vec<String> = stack[start..]
                        .iter()
                        .map(|(i, _)| format!("%{}", self.definitions[*i].label))
                        .collect();
                    path.push(format!("%{label}"));
                    let message = format!("weights refer to each other: {}", path.join(" -> "));
                    return Err(ParseError::at(*at, message));
                }
            }
        }
        Ok(())
    }

    /// Adds one definition whose operands are in the table.
    fn add(&mut self, w: usize, table: &mut WeightTable) -> Result<(), ParseError> {
        let d = &self.definitions[w];
        let (ids, opened) = (&self.ids, &mut self.opened);
        let id = |r: &Ref| ids[&r.0];
        let expr = match &d.expr {
            Expr::Source {
                file,
                file_pos,
                offset,
                dtype,
            } => WeightExpr::Source {
                file: open(opened, self.files, file, *file_pos)?,
                offset: *offset,
                dtype: *dtype,
            },
            Expr::Literal(values) => WeightExpr::Literal(Arc::new(literal(d, values)?)),
            Expr::Rows(r, rows) => WeightExpr::Rows(id(r), rows.as_slice().into()),
            Expr::Columns(r, start) => WeightExpr::Columns {
                of: id(r),
                start: *start,
            },
            Expr::Pruned(r, rule) => WeightExpr::Pruned {
                of: id(r),
                rule: Arc::new(rule.clone()),
            },
            Expr::Random { seed, std } => WeightExpr::Random {
                seed: *seed,
                std: *std,
            },
            Expr::Concat(rs) => WeightExpr::Concat(rs.iter().map(id).collect()),
            Expr::Scale(f, r) => WeightExpr::Scale(*f, id(r)),
            Expr::Mean(rs) => WeightExpr::Mean(rs.iter().map(id).collect()),
            Expr::WeightedSum(terms, normalize) => WeightExpr::WeightedSum {
                terms: terms.iter().map(|(f, r)| (*f, id(r))).collect(),
                normalize: *normalize,
            },
        };
        let weight = Weight {
            name: d.name.clone(),
            shape: d.shape.clone(),
            dtype: d.dtype,
            expr,
        };
        let wid = table
            .add(weight)
            .map_err(|e| ParseError::at(d.expr_pos, e.to_string()))?;
        self.ids.insert(d.label.clone(), wid);
        Ok(())
    }
}

/// The file called `name`, opened once.
fn open(
    opened: &mut HashMap<String, Arc<MappedFile>>,
    files: &dyn Fn(&str) -> Option<Arc<MappedFile>>,
    name: &str,
    at: Pos,
) -> Result<Arc<MappedFile>, ParseError> {
    if let Some(f) = opened.get(name) {
        return Ok(f.clone());
    }
    let f = files(name).ok_or_else(|| {
        ParseError::at(
            at,
            format!("no file `{name}` to read the weight's bytes from"),
        )
    })?;
    opened.insert(name.to_string(), f.clone());
    Ok(f)
}

/// A literal's tensor: as many values as its shape holds.
fn literal(d: &Definition, values: &[f32]) -> Result<HostTensor, ParseError> {
    let holds = d.shape.iter().try_fold(1usize, |a, b| a.checked_mul(*b));
    if holds == Some(values.len()) {
        return Ok(HostTensor::new(d.shape.clone(), values.to_vec()));
    }
    let holds = holds.map_or("too many".to_string(), |n| n.to_string());
    let message = format!(
        "literal has {} values, shape {:?} holds {holds}",
        values.len(),
        d.shape
    );
    Err(ParseError::at(d.expr_pos, message))
}
