//! Architecture hyperparameters read off a graph, for naming how two models differ.
//!
//! Passes that combine models compare these before comparing graphs node by node, so a
//! model of another architecture is reported as "`a` has 2 layers, `b` has 30" rather
//! than by the first node or tensor that happens to differ. Everything comes from the
//! graph: [`ModelMeta`](upmix_ir::ModelMeta) for vocabulary and hidden size (the embedding
//! table's shape when the meta leaves them at 0), the first attention op for heads and
//! head size, the first FFN's weight shape for the intermediate size, and the first
//! mixture-of-experts op for the expert count.

use upmix_ir::{FeedForward, Graph, Op, WeightTable};

/// The hyperparameters compared, in the order they are checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Hyperparams {
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    /// Experts of the first mixture-of-experts layer; 0 for a dense model.
    pub experts: usize,
}

impl Hyperparams {
    /// Reads the hyperparameters of `g`; what a graph lacks (e.g. attention) stays 0.
    pub(crate) fn of(g: &Graph, weights: &WeightTable) -> Hyperparams {
        let dim = |id, axis: usize| {
            weights
                .get(id)
                .ok()
                .and_then(|w| w.shape.get(axis).copied())
                .unwrap_or(0)
        };
        let mut h = Hyperparams {
            vocab: g.meta.vocab_size,
            hidden: g.meta.hidden_size,
            ..Hyperparams::default()
        };
        let first_ffn = |h: &mut Hyperparams, f: &FeedForward| {
            if h.ffn == 0 {
                h.ffn = dim(f.gate, 0);
            }
        };
        let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
        for n in order {
            match &g.node(n).op {
                Op::Embedding { table } => {
                    if h.vocab == 0 {
                        h.vocab = dim(*table, 0);
                    }
                    if h.hidden == 0 {
                        h.hidden = dim(*table, 1);
                    }
                }
                Op::MixtureOfAttention(m) if !m.experts.is_empty() => {
                    let a = &m.experts[0];
                    if h.layers == 0 {
                        (h.heads, h.kv_heads, h.head_dim) = (a.n_heads, a.n_kv_heads, a.head_dim);
                    }
                    h.layers += 1;
                }
                Op::Attention(a) => {
                    if h.layers == 0 {
                        (h.heads, h.kv_heads, h.head_dim) = (a.n_heads, a.n_kv_heads, a.head_dim);
                    }
                    h.layers += 1;
                }
                Op::FeedForward(f) => first_ffn(&mut h, f),
                Op::MixtureOfExperts(moe) => {
                    if h.experts == 0 {
                        h.experts = moe.experts.len();
                    }
                    if let Some(f) = moe.experts.first() {
                        first_ffn(&mut h, f);
                    }
                }
                _ => {}
            }
        }
        h
    }
}

/// The first hyperparameter in which model `a` and model `b` differ, as a message naming
/// both models and both values; `None` when they agree on all of them.
pub(crate) fn first_difference(
    (a_name, a): (&str, &Hyperparams),
    (b_name, b): (&str, &Hyperparams),
) -> Option<String> {
    if a.layers != b.layers {
        return Some(format!(
            "`{a_name}` has {} layers, `{b_name}` has {}",
            a.layers, b.layers
        ));
    }
    let fields = [
        ("hidden size", a.hidden, b.hidden),
        ("vocabulary size", a.vocab, b.vocab),
        ("attention heads", a.heads, b.heads),
        ("KV heads", a.kv_heads, b.kv_heads),
        ("head dim", a.head_dim, b.head_dim),
        ("FFN (intermediate) size", a.ffn, b.ffn),
        ("expert count", a.experts, b.experts),
    ];
    let (what, x, y) = fields.into_iter().find(|(_, x, y)| x != y)?;
    let value = |v: usize| {
        if what == "expert count" && v == 0 {
            "0 (dense)".to_string()
        } else {
            v.to_string()
        }
    };
    Some(format!(
        "{what}: `{a_name}` has {}, `{b_name}` has {}",
        value(x),
        value(y)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp() -> Hyperparams {
        Hyperparams {
            layers: 2,
            hidden: 64,
            vocab: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ffn: 96,
            experts: 0,
        }
    }

    #[test]
    fn layers_come_first_then_the_listed_order() {
        let a = hp();
        assert_eq!(first_difference(("a", &a), ("b", &a)), None);
        let b = Hyperparams {
            layers: 30,
            hidden: 576,
            ..hp()
        };
        assert_eq!(
            first_difference(("a", &a), ("b", &b)).unwrap(),
            "`a` has 2 layers, `b` has 30"
        );
        let c = Hyperparams {
            vocab: 512,
            ffn: 128,
            ..hp()
        };
        assert_eq!(
            first_difference(("a", &a), ("c", &c)).unwrap(),
            "vocabulary size: `a` has 256, `c` has 512"
        );
        let d = Hyperparams { experts: 8, ..hp() };
        assert_eq!(
            first_difference(("a", &a), ("d", &d)).unwrap(),
            "expert count: `a` has 0 (dense), `d` has 8"
        );
    }
}
