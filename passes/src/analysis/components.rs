//! A graph's components — the projection matrices of its attention and feed-forward ops —
//! and the selectors that pick them.
//!
//! A component is named canonically by its node and its role in the op:
//! `layers.3.attn.q`, `layers.3.ffn.down`, `layers.3.ffn.experts.1.up`,
//! `layers.3.attn.experts.0.o`; its *part* is the name after `layers.N.` (`attn.q`).
//! Routers, norms, biases, embeddings and the lm head are not components: compressing them
//! is not what the passes over components (pruning, sensitivity, planning) are for.
//!
//! A selector is
//! - `re:REGEX`: a regular expression matching the whole canonical name, as in
//!   llm-compressor recipes (`re:layers\.(0|1)\.attn\..*`);
//! - otherwise a pattern where `*` stands for any text, matching the part or the whole
//!   name (`attn.*`, `ffn.down`, `ffn.experts.*.gate`, `layers.0.attn.o`).

use upmix_ir::{Graph, Op, WeightId};

/// Roles inside an attention or feed-forward op that are components.
const ROLES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

/// One projection matrix of a graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    /// Canonical name, e.g. `layers.3.attn.q`.
    pub name: String,
    /// The layer index, from a node named `layers.N.…`.
    pub layer: Option<usize>,
    /// The name after `layers.N.` (the whole name outside layers).
    pub part: String,
    /// The node whose op multiplies by it.
    pub node: String,
    pub weight: WeightId,
}

/// Every component of `g`, in execution order (within an op: q, k, v, o / gate, up,
/// down, expert by expert). A weight used by two components (shared keys and values)
/// is listed once, under its first user.
pub fn components(g: &Graph) -> Vec<Component> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    let mut out: Vec<Component> = Vec::new();
    for id in order {
        let node = g.node(id);
        let is_block_op = matches!(
            node.op,
            Op::Attention(_)
                | Op::MixtureOfAttention(_)
                | Op::FeedForward(_)
                | Op::MixtureOfExperts(_)
        );
        if !is_block_op {
            continue;
        }
        for (label, weight) in node.op.weights() {
            let role = label.rsplit('.').next().unwrap_or(&label);
            if !ROLES.contains(&role) || out.iter().any(|c| c.weight == weight) {
                continue;
            }
            let name = format!("{}.{label}", node.name);
            let (layer, part) = split_layer(&name);
            out.push(Component {
                name: name.clone(),
                layer,
                part,
                node: node.name.clone(),
                weight,
            });
        }
    }
    out
}

/// `layers.N.rest` -> `(Some(N), "rest")`; another name -> `(None, name)`.
fn split_layer(name: &str) -> (Option<usize>, String) {
    let parsed = name.strip_prefix("layers.").and_then(|rest| {
        let (n, part) = rest.split_once('.')?;
        Some((n.parse().ok()?, part.to_string()))
    });
    match parsed {
        Some((n, part)) => (Some(n), part),
        None => (None, name.to_string()),
    }
}

/// A compiled selector (see the module doc).
#[derive(Clone, Debug)]
pub struct Selector {
    text: String,
    regex: regex::Regex,
    /// `re:` selectors match the whole name only.
    whole_name_only: bool,
}

impl Selector {
    /// Compiles `text`; a bad regular expression is an error that says why.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let (pattern, whole_name_only) = match text.strip_prefix("re:") {
            Some(re) => (format!("^(?:{re})$"), true),
            None => {
                let parts: Vec<String> = text.split('*').map(regex::escape).collect();
                (format!("^{}$", parts.join(".*")), false)
            }
        };
        let regex = regex::Regex::new(&pattern)
            .map_err(|e| format!("selector `{text}` is not a valid regular expression: {e}"))?;
        Ok(Selector {
            text: text.to_string(),
            regex,
            whole_name_only,
        })
    }

    pub fn matches(&self, c: &Component) -> bool {
        self.matches_name(&c.name, &c.part)
    }

    /// Whether it selects the weight or component named `name`, whose part (the name
    /// after `layers.N.`) is `part`.
    pub fn matches_name(&self, name: &str, part: &str) -> bool {
        self.regex.is_match(name) || (!self.whole_name_only && self.regex.is_match(part))
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Selector {
    fn eq(&self, other: &Selector) -> bool {
        self.text == other.text
    }
}

impl std::str::FromStr for Selector {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Selector::parse(text)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::settings::from_text(d)
    }
}

/// The number of layers `components` come from (the last layer's index plus one).
pub fn layer_count(components: &[Component]) -> usize {
    components
        .iter()
        .filter_map(|c| c.layer)
        .max()
        .map_or(0, |l| l + 1)
}

/// The distinct parts of `components`, in order: for error messages.
pub fn parts(components: &[Component]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in components {
        if !out.contains(&c.part) {
            out.push(c.part.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str) -> Component {
        let (layer, part) = split_layer(name);
        Component {
            name: name.into(),
            layer,
            part,
            node: String::new(),
            weight: WeightId(0),
        }
    }

    #[test]
    fn patterns_match_parts_or_names_and_regexes_whole_names() {
        let q = component("layers.12.attn.q");
        let down = component("layers.2.ffn.experts.1.down");
        assert_eq!(q.layer, Some(12));
        assert_eq!(q.part, "attn.q");
        assert!(Selector::parse("attn.*").unwrap().matches(&q));
        assert!(!Selector::parse("attn.*").unwrap().matches(&down));
        assert!(Selector::parse("ffn.experts.*.down")
            .unwrap()
            .matches(&down));
        assert!(Selector::parse("layers.12.attn.q").unwrap().matches(&q));
        assert!(!Selector::parse("layers.1.attn.q").unwrap().matches(&q));
        assert!(Selector::parse(r"re:layers\.1\d\.attn\..*")
            .unwrap()
            .matches(&q));
        assert!(!Selector::parse(r"re:attn\.q").unwrap().matches(&q));
        assert!(Selector::parse("re:(").unwrap_err().contains("not a valid"));
    }
}
