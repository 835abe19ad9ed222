//! Node lines' op kinds and `key=value` attributes read into [`Op`]s.

use std::collections::HashMap;
use std::str::FromStr;

use super::lexer::Pos;
use super::{Attr, NodeText, ParseError, Value};
use crate::{
    Attention, FeedForward, MixtureOfAttention, MixtureOfExperts, Op, ProjectedRouter, QkNorm,
    Rope, RopePairs, RopeScaling, Router, Routing, SharedExpert, WeightId,
};

const KINDS: [&str; 12] = [
    "Input",
    "Embedding",
    "RmsNorm",
    "LayerNorm",
    "Attention",
    "FeedForward",
    "MixtureOfExperts",
    "MixtureOfAttention",
    "Add",
    "Linear",
    "Scale",
    "Output",
];

/// The op of a node line; every attribute must be used.
pub(super) fn build(
    node: &NodeText,
    weights: &HashMap<String, WeightId>,
) -> Result<Op, ParseError> {
    if !KINDS.contains(&node.kind.as_str()) {
        let message = format!(
            "unknown op kind `{}` (expected one of {})",
            node.kind,
            KINDS.join(", ")
        );
        return Err(ParseError::at(node.kind_pos, message));
    }
    let mut a = Attrs::new(&node.kind, node.kind_pos, &node.attrs, weights);
    let op = match node.kind.as_str() {
        "Input" => Op::Input,
        "Add" => Op::Add,
        "Output" => Op::Output,
        "Embedding" => Op::Embedding {
            table: a.require_weight("table")?,
        },
        "RmsNorm" => Op::RmsNorm {
            weight: a.require_weight("weight")?,
            eps: a.require("eps", "a number")?,
        },
        "LayerNorm" => Op::LayerNorm {
            weight: a.require_weight("weight")?,
            bias: a.weight("bias")?,
            eps: a.require("eps", "a number")?,
        },
        "Linear" => Op::Linear {
            weight: a.require_weight("weight")?,
            bias: a.weight("bias")?,
        },
        "Scale" => Op::Scale {
            factor: a.require("factor", "a number")?,
        },
        "Attention" => Op::Attention(attention(&mut a, "", "")?),
        "FeedForward" => Op::FeedForward(ffn(&mut a, "")?),
        "MixtureOfExperts" => Op::MixtureOfExperts(mixture_of_experts(&mut a)?),
        _ => Op::MixtureOfAttention(mixture_of_attention(&mut a)?),
    };
    a.finish()?;
    Ok(op)
}

/// The attributes of one node (or of one `name(...)` value), each marked when used.
struct Attrs<'a> {
    /// What they belong to, for messages: `RmsNorm`, `rope_scaling=llama3(...)`.
    what: String,
    pos: Pos,
    items: Vec<(&'a Attr, bool)>,
    weights: &'a HashMap<String, WeightId>,
}

impl<'a> Attrs<'a> {
    fn new(
        what: &str,
        pos: Pos,
        attrs: &'a [Attr],
        weights: &'a HashMap<String, WeightId>,
    ) -> Self {
        Attrs {
            what: what.to_string(),
            pos,
            items: attrs.iter().map(|a| (a, false)).collect(),
            weights,
        }
    }

    fn has(&self, key: &str) -> bool {
        self.items.iter().any(|(a, _)| a.key == key)
    }

    /// The attribute `key`, marked used.
    fn take(&mut self, key: &str) -> Option<&'a Attr> {
        let (attr, used) = self.items.iter_mut().find(|(a, _)| a.key == key)?;
        *used = true;
        Some(*attr)
    }

    fn missing(&self, key: &str, what: &str) -> ParseError {
        let message = format!("{} needs `{key}=...` ({what})", self.what);
        ParseError::at(self.pos, message)
    }

    /// The word value of `key` parsed as `T`, if given.
    fn value<T: FromStr>(&mut self, key: &str, what: &str) -> Result<Option<T>, ParseError> {
        let Some(attr) = self.take(key) else {
            return Ok(None);
        };
        match &attr.value {
            Value::Word(w) => w.parse().map(Some).map_err(|_| {
                let message = format!("expected {what} for `{key}`, found `{w}`");
                ParseError::at(attr.value_pos, message)
            }),
            other => {
                let message = format!("expected {what} for `{key}`, found {}", other.describe());
                Err(ParseError::at(attr.value_pos, message))
            }
        }
    }

    fn require<T: FromStr>(&mut self, key: &str, what: &str) -> Result<T, ParseError> {
        self.value(key, what)?
            .ok_or_else(|| self.missing(key, what))
    }

    /// One of `choices`, if given.
    fn choice(&mut self, key: &str, choices: &[&str]) -> Result<Option<String>, ParseError> {
        let what = choices.join(" or ");
        let v: Option<String> = self.value(key, &what)?;
        match v {
            Some(v) if !choices.contains(&v.as_str()) => {
                let at = self.take(key).map_or(self.pos, |a| a.value_pos);
                let message = format!("expected {what} for `{key}`, found `{v}`");
                Err(ParseError::at(at, message))
            }
            v => Ok(v),
        }
    }

    /// `key=N` or `key=none`; `None` when not given.
    fn number_or_none<T: FromStr>(&mut self, key: &str) -> Result<Option<Option<T>>, ParseError> {
        let none = matches!(self.items.iter().find(|(a, _)| a.key == key), Some((a, _)) if matches!(&a.value, Value::Word(w) if w == "none"));
        if none {
            self.take(key);
            return Ok(Some(None));
        }
        Ok(self.value(key, "a whole number or none")?.map(Some))
    }

    /// The weight `key=%label` names, if given.
    fn weight(&mut self, key: &str) -> Result<Option<WeightId>, ParseError> {
        let Some(attr) = self.take(key) else {
            return Ok(None);
        };
        match &attr.value {
            Value::Ref(label) => match self.weights.get(label) {
                Some(id) => Ok(Some(*id)),
                None => {
                    let message = format!("undefined weight %{label}");
                    Err(ParseError::at(attr.value_pos, message))
                }
            },
            other => {
                let message = format!(
                    "expected a weight reference like %w3 for `{key}`, found {}",
                    other.describe()
                );
                Err(ParseError::at(attr.value_pos, message))
            }
        }
    }

    fn require_weight(&mut self, key: &str) -> Result<WeightId, ParseError> {
        self.weight(key)?
            .ok_or_else(|| self.missing(key, "a weight reference like %w3"))
    }

    /// Fails on the first attribute nothing used.
    fn finish(self) -> Result<(), ParseError> {
        match self.items.iter().find(|(_, used)| !used) {
            Some((a, _)) => {
                let message = format!("unexpected attribute `{}` for {}", a.key, self.what);
                Err(ParseError::at(a.pos, message))
            }
            None => Ok(()),
        }
    }
}

/// An attention whose settings keys start with `settings` and weight keys with `weights`.
fn attention(a: &mut Attrs, settings: &str, weights: &str) -> Result<Attention, ParseError> {
    let s = |k: &str| format!("{settings}{k}");
    let w = |k: &str| format!("{weights}{k}");
    let number = "a whole number";
    let n_heads = a.require(&s("heads"), number)?;
    let n_kv_heads = a.require(&s("kv_heads"), number)?;
    let head_dim = a.require(&s("head_dim"), number)?;
    let rope = rope(a, settings)?;
    let window = a.number_or_none(&s("window"))?.flatten();
    let eps_pos = a.take(&s("qk_norm_eps")).map(|attr| attr.pos);
    let eps: Option<f32> = a.value(&s("qk_norm_eps"), "a number")?;
    let [q, k, v, o] = ["q", "k", "v", "o"].map(|x| a.require_weight(&w(x)));
    let [q_bias, k_bias, v_bias] = ["q_bias", "k_bias", "v_bias"].map(|x| a.weight(&w(x)));
    let (q_norm, k_norm) = (a.weight(&w("q_norm"))?, a.weight(&w("k_norm"))?);
    let qk_norm = match (q_norm, k_norm, eps) {
        (Some(q), Some(k), Some(eps)) => Some(QkNorm { q, k, eps }),
        (Some(_), Some(_), None) => return Err(a.missing(&s("qk_norm_eps"), "a number")),
        (None, None, None) => None,
        (None, None, Some(_)) => {
            let message = format!(
                "`{}` is given, but no `{}` and `{}` weights",
                s("qk_norm_eps"),
                w("q_norm"),
                w("k_norm")
            );
            return Err(ParseError::at(eps_pos.unwrap_or(a.pos), message));
        }
        (None, Some(_), _) => return Err(a.missing(&w("q_norm"), "a weight reference")),
        (Some(_), None, _) => return Err(a.missing(&w("k_norm"), "a weight reference")),
    };
    Ok(Attention {
        q: q?,
        k: k?,
        v: v?,
        o: o?,
        q_bias: q_bias?,
        k_bias: k_bias?,
        v_bias: v_bias?,
        n_heads,
        n_kv_heads,
        head_dim,
        rope,
        qk_norm,
        window,
    })
}

/// `rope_theta=X [rope_pairs=...] [rope_scaling=...]`, or `rope=none`.
fn rope(a: &mut Attrs, settings: &str) -> Result<Option<Rope>, ParseError> {
    let s = |k: &str| format!("{settings}{k}");
    if let Some(attr) = a.take(&s("rope")) {
        if !matches!(&attr.value, Value::Word(w) if w == "none") {
            let message = format!(
                "expected none for `{}` (a rotary embedding is given as `rope_theta=...`), found {}",
                attr.key,
                attr.value.describe()
            );
            return Err(ParseError::at(attr.value_pos, message));
        }
        for key in ["rope_theta", "rope_pairs", "rope_scaling"].map(s) {
            if let Some(other) = a.take(&key) {
                let message = format!("`{key}` is given with `{}=none`", attr.key);
                return Err(ParseError::at(other.pos, message));
            }
        }
        return Ok(None);
    }
    let theta = a
        .value(&s("rope_theta"), "a number")?
        .ok_or_else(|| a.missing(&s("rope_theta"), "a number (or `rope=none`)"))?;
    let pairs = match a.choice(&s("rope_pairs"), &["halves", "interleaved"])? {
        Some(p) if p == "interleaved" => RopePairs::Interleaved,
        _ => RopePairs::Halves,
    };
    let scaling = match a.take(&s("rope_scaling")) {
        None => RopeScaling::None,
        Some(attr) => rope_scaling(attr, a.weights)?,
    };
    Ok(Some(Rope {
        theta,
        scaling,
        pairs,
    }))
}

/// `none`, `linear(factor=X)` or `llama3(factor=X, low=X, high=X, original_max_positions=N)`.
fn rope_scaling(
    attr: &Attr,
    weights: &HashMap<String, WeightId>,
) -> Result<RopeScaling, ParseError> {
    let bad = || {
        let message = format!(
            "expected none, linear(factor=...) or llama3(factor=..., low=..., high=..., \
             original_max_positions=...) for `{}`, found {}",
            attr.key,
            attr.value.describe()
        );
        ParseError::at(attr.value_pos, message)
    };
    let (name, args) = match &attr.value {
        Value::Word(w) if w == "none" => return Ok(RopeScaling::None),
        Value::Call(name, args) => (name, args),
        _ => return Err(bad()),
    };
    let mut c = Attrs::new(&format!("{name}(...)"), attr.value_pos, args, weights);
    let scaling = match name.as_str() {
        "linear" => RopeScaling::Linear {
            factor: c.require("factor", "a number")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: c.require("factor", "a number")?,
            low_freq_factor: c.require("low", "a number")?,
            high_freq_factor: c.require("high", "a number")?,
            original_max_position: c.require("original_max_positions", "a whole number")?,
        },
        _ => return Err(bad()),
    };
    c.finish()?;
    Ok(scaling)
}

/// `{prefix}gate`, `{prefix}up`, `{prefix}down`.
fn ffn(a: &mut Attrs, prefix: &str) -> Result<FeedForward, ParseError> {
    Ok(FeedForward {
        gate: a.require_weight(&format!("{prefix}gate"))?,
        up: a.require_weight(&format!("{prefix}up"))?,
        down: a.require_weight(&format!("{prefix}down"))?,
    })
}

/// `experts=N top_k=K normalize_top_k=B`: the expert count and routing.
fn routing(a: &mut Attrs) -> Result<(usize, Routing), ParseError> {
    let n = a.require("experts", "the expert count")?;
    let top_k = a.require("top_k", "a whole number")?;
    let normalize = a.require("normalize_top_k", "true or false")?;
    Ok((n, Routing { top_k, normalize }))
}

fn mixture_of_experts(a: &mut Attrs) -> Result<MixtureOfExperts, ParseError> {
    let (n, routing) = routing(a)?;
    let router = if a.has("router") || !a.has("router.domains") {
        Router::Rows(a.weight("router")?.ok_or_else(|| {
            a.missing(
                "router",
                "a weight reference (or `router.domains=` and `router.projection.gate/up/down=`)",
            )
        })?)
    } else {
        Router::Projected(ProjectedRouter {
            domains: a.require_weight("router.domains")?,
            projection: ffn(a, "router.projection.")?,
        })
    };
    let experts = (0..n)
        .map(|e| ffn(a, &format!("experts.{e}.")))
        .collect::<Result<_, _>>()?;
    let shared_expert = match a.has("shared.gate") {
        true => Some(SharedExpert {
            ffn: ffn(a, "shared.")?,
            gate: a.weight("shared.gate_proj")?,
        }),
        false => None,
    };
    Ok(MixtureOfExperts {
        router,
        experts,
        routing,
        shared_expert,
    })
}

/// Experts share the unprefixed attention settings unless `experts.E.heads` is given,
/// when all of expert E's settings are its own (`experts.E.rope_theta`, ...).
fn mixture_of_attention(a: &mut Attrs) -> Result<MixtureOfAttention, ParseError> {
    let (n, routing) = routing(a)?;
    let kv_pos = a.take("kv").map(|attr| attr.value_pos);
    let kv = a.choice("kv", &["shared", "per_expert"])?;
    let router = a.require_weight("router")?;
    let mut experts = Vec::with_capacity(n);
    for e in 0..n {
        let prefix = format!("experts.{e}.");
        let settings = match a.has(&format!("{prefix}heads")) {
            true => prefix.as_str(),
            false => "",
        };
        experts.push(attention(a, settings, &prefix)?);
    }
    let moa = MixtureOfAttention {
        router,
        experts,
        routing,
    };
    if let (Some(kv), Some(at)) = (kv, kv_pos) {
        if (kv == "shared") != moa.shared_kv() {
            let message = match moa.shared_kv() {
                true => "kv=per_expert, but every expert reads the same k and v weights",
                false => "kv=shared, but the experts' k and v weights differ",
            };
            return Err(ParseError::at(at, message));
        }
    }
    Ok(moa)
}
