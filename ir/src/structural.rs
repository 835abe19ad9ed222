//! Structural equality of modules: the same graphs computing the same thing from the same
//! weight expressions, whatever the weight ids and node ids (which differ between a module
//! and its text form read back).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::{Graph, ModelMeta, Module, NodeId, Op, Weight, WeightExpr, WeightId, WeightTable};

/// `None` when `a` and `b` are structurally equal, else the first difference found, named
/// by graph, node and weight.
///
/// Equal means: the same graph names; per graph the same model numbers (vocab, hidden,
/// max positions, bos, eos) and model file names; the same nodes by name with equal ops,
/// their weights compared through the weights they denote; the same inputs of every
/// node, by name in slot order; and weights equal recursively (name, shape, dtype,
/// expression kind and parameters, operands). A source compares its file's name (not its
/// directory), offset and dtype; literals compare values bit for bit.
pub fn structural_diff(a: &Module, b: &Module) -> Option<String> {
    let names = |m: &Module| m.graphs.keys().cloned().collect::<HashSet<_>>();
    let (na, nb) = (names(a), names(b));
    let mut only: Vec<(&String, &str)> = na
        .difference(&nb)
        .map(|n| (n, "first"))
        .chain(nb.difference(&na).map(|n| (n, "second")))
        .collect();
    only.sort();
    if let Some((name, side)) = only.first() {
        return Some(format!("graph `{name}` is only in the {side} module"));
    }
    let mut weights = WeightCmp {
        a: &a.weights,
        b: &b.weights,
        equal: HashSet::new(),
    };
    a.graphs.iter().find_map(|(name, ga)| {
        graph_diff(ga, &b.graphs[name], &mut weights).map(|d| format!("graph `{name}`: {d}"))
    })
}

fn meta_diff(a: &ModelMeta, b: &ModelMeta) -> Option<String> {
    let numbers = |m: &ModelMeta| {
        (
            m.vocab_size,
            m.hidden_size,
            m.max_position_embeddings,
            m.bos_token_id,
            m.eos_token_id,
        )
    };
    if numbers(a) != numbers(b) {
        return Some(format!(
            "model numbers (vocab, hidden, max_positions, bos, eos) {:?} vs {:?}",
            numbers(a),
            numbers(b)
        ));
    }
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let files = |m: &ModelMeta| {
        (
            m.tokenizer.as_deref().map(name),
            m.config_file.as_deref().map(name),
            m.aux_files.iter().map(|p| name(p)).collect::<Vec<_>>(),
        )
    };
    (files(a) != files(b)).then(|| {
        format!(
            "model files (tokenizer, config, aux) {:?} vs {:?}",
            files(a),
            files(b)
        )
    })
}

/// Node ids by name (several per name, in id order, if names repeat).
fn by_name(g: &Graph) -> BTreeMap<&str, Vec<NodeId>> {
    let mut out: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for id in g.node_ids() {
        out.entry(g.node(id).name.as_str()).or_default().push(id);
    }
    out
}

fn graph_diff(ga: &Graph, gb: &Graph, weights: &mut WeightCmp) -> Option<String> {
    if let Some(d) = meta_diff(&ga.meta, &gb.meta) {
        return Some(d);
    }
    let (na, nb) = (by_name(ga), by_name(gb));
    let names: std::collections::BTreeSet<&str> = na.keys().chain(nb.keys()).copied().collect();
    for name in &names {
        let (ia, ib) = (na.get(name), nb.get(name));
        let (ca, cb) = (ia.map_or(0, Vec::len), ib.map_or(0, Vec::len));
        if ca != cb {
            return Some(format!(
                "node `{name}` occurs {ca} time(s) in the first graph, {cb} in the second"
            ));
        }
    }
    for name in names {
        for (&ia, &ib) in na[name].iter().zip(&nb[name]) {
            let inputs = |g: &Graph, id| -> Vec<String> {
                g.inputs(id)
                    .iter()
                    .map(|i| g.node(*i).name.clone())
                    .collect()
            };
            let d = op_diff(&ga.node(ia).op, &gb.node(ib).op, weights).or_else(|| {
                let (xa, xb) = (inputs(ga, ia), inputs(gb, ib));
                (xa != xb).then(|| format!("inputs ({}) vs ({})", xa.join(", "), xb.join(", ")))
            });
            if let Some(d) = d {
                return Some(format!("node `{name}`: {d}"));
            }
        }
    }
    None
}

fn op_diff(a: &Op, b: &Op, weights: &mut WeightCmp) -> Option<String> {
    if a.kind() != b.kind() {
        return Some(format!("op {} vs {}", a.kind(), b.kind()));
    }
    // Settings: the ops with every weight id made the same.
    let settings = |op: &Op| {
        let mut op = op.clone();
        op.map_weights(|_| WeightId(0));
        op
    };
    let (sa, sb) = (settings(a), settings(b));
    if sa != sb {
        return Some(format!("settings differ: {sa:?} vs {sb:?}"));
    }
    let (wa, wb) = (a.weights(), b.weights());
    if wa.len() != wb.len() {
        return Some(format!("{} weights vs {}", wa.len(), wb.len()));
    }
    wa.iter().zip(&wb).find_map(|((la, ia), (lb, ib))| {
        if la != lb {
            return Some(format!("weight labels `{la}` vs `{lb}`"));
        }
        weights
            .diff(*ia, *ib)
            .map(|d| format!("weight `{la}`: {d}"))
    })
}

/// Compares weights of two tables, remembering pairs found equal.
struct WeightCmp<'a> {
    a: &'a WeightTable,
    b: &'a WeightTable,
    equal: HashSet<(WeightId, WeightId)>,
}

impl WeightCmp<'_> {
    fn diff(&mut self, ia: WeightId, ib: WeightId) -> Option<String> {
        if self.equal.contains(&(ia, ib)) {
            return None;
        }
        let (wa, wb) = match (self.a.get(ia), self.b.get(ib)) {
            (Ok(wa), Ok(wb)) => (wa, wb),
            (Err(e), _) => return Some(format!("first module: {e}")),
            (_, Err(e)) => return Some(format!("second module: {e}")),
        };
        let d = weight_diff(wa, wb).or_else(|| {
            let (oa, ob) = (wa.expr.operands(), wb.expr.operands());
            oa.iter().zip(&ob).enumerate().find_map(|(k, (x, y))| {
                self.diff(*x, *y)
                    .map(|d| format!("operand {k} of `{}`: {d}", wa.name))
            })
        });
        if d.is_none() {
            self.equal.insert((ia, ib));
        }
        d
    }
}

/// The expression's kind, as printed.
fn kind(e: &WeightExpr) -> &'static str {
    match e {
        WeightExpr::Source { .. } => "source",
        WeightExpr::Literal(_) => "literal",
        WeightExpr::Rows(..) => "rows",
        WeightExpr::Columns { .. } => "columns",
        WeightExpr::Pruned { .. } => "pruned",
        WeightExpr::Random { .. } => "random",
        WeightExpr::Concat(_) => "concat",
        WeightExpr::Scale(..) => "scale",
        WeightExpr::Mean(_) => "mean",
        WeightExpr::WeightedSum { .. } => "weighted_sum",
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The first difference of two weights' own fields (not their operands').
fn weight_diff(a: &Weight, b: &Weight) -> Option<String> {
    let name = &a.name;
    if a.name != b.name {
        return Some(format!("names `{}` vs `{}`", a.name, b.name));
    }
    if a.shape != b.shape || a.dtype != b.dtype {
        return Some(format!(
            "`{name}` is {}{:?} vs {}{:?}",
            a.dtype, a.shape, b.dtype, b.shape
        ));
    }
    expr_diff(name, &a.expr, &b.expr)
}

/// The first difference of two expressions' kinds and parameters (not their operands).
fn expr_diff(name: &str, a: &WeightExpr, b: &WeightExpr) -> Option<String> {
    let differ = |what: &str| format!("`{name}`: {what} differ");
    use WeightExpr as E;
    match (a, b) {
        (
            E::Source {
                file: fa,
                offset: oa,
                dtype: da,
            },
            E::Source {
                file: fb,
                offset: ob,
                dtype: db,
            },
        ) => {
            let (na, nb) = (fa.path().file_name(), fb.path().file_name());
            if na != nb || oa != ob || da != db {
                return Some(format!(
                    "`{name}`: source {na:?} @{oa} {da} vs {nb:?} @{ob} {db}"
                ));
            }
            None
        }
        (E::Literal(ta), E::Literal(tb)) => {
            let (va, vb) = (bits(&ta.data), bits(&tb.data));
            if ta.shape != tb.shape || va.len() != vb.len() {
                return Some(differ("literal shapes"));
            }
            let i = va.iter().zip(&vb).position(|(x, y)| x != y)?;
            Some(format!(
                "`{name}`: literal value {i} is {:?} vs {:?}",
                ta.data[i], tb.data[i]
            ))
        }
        (E::Rows(_, ra), E::Rows(_, rb)) => (ra != rb).then(|| differ("row indices")),
        (E::Columns { start: sa, .. }, E::Columns { start: sb, .. }) => {
            (sa != sb).then(|| differ("first columns"))
        }
        (E::Pruned { rule: ra, .. }, E::Pruned { rule: rb, .. }) => {
            let scale = |r: &crate::PruneRule| r.column_scale.as_deref().map(bits);
            (ra.pattern != rb.pattern || scale(ra) != scale(rb)).then(|| differ("pruning rules"))
        }
        (E::Random { seed: sa, std: da }, E::Random { seed: sb, std: db }) => {
            (sa != sb || da.to_bits() != db.to_bits()).then(|| differ("seeds or stds"))
        }
        (E::Concat(xa), E::Concat(xb)) | (E::Mean(xa), E::Mean(xb)) => {
            (xa.len() != xb.len()).then(|| differ("operand counts"))
        }
        (E::Scale(fa, _), E::Scale(fb, _)) => {
            (fa.to_bits() != fb.to_bits()).then(|| differ("factors"))
        }
        (
            E::WeightedSum {
                terms: ta,
                normalize: na,
            },
            E::WeightedSum {
                terms: tb,
                normalize: nb,
            },
        ) => {
            let factors = |t: &[(f32, WeightId)]| t.iter().map(|(f, _)| f.to_bits()).collect();
            let (fa, fb): (Vec<u32>, Vec<u32>) = (factors(ta), factors(tb));
            (na != nb || fa != fb).then(|| differ("weighted sum factors or normalisation"))
        }
        (ea, eb) => Some(format!("`{name}`: {} vs {}", kind(ea), kind(eb))),
    }
}
