//! Structure-aware mutations of JSON documents (safetensors headers, config.json,
//! tokenizer.json): a node, picked by its pre-order index, gets a value of the wrong type
//! or an extreme number, is removed, copied over from another node, nested deeply, or its
//! object gains a duplicate key. Documents are held as a tree that keeps key order and
//! duplicates, and raw number text, so the mutated text is exactly what a parser sees.

use proptest::prelude::*;

use super::mutate::{self, num, ByteOp, Num};

/// A JSON document.
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    /// A number, or any raw text written as is.
    Raw(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn parse(text: &str) -> J {
        J::from(serde_json::from_str::<serde_json::Value>(text).expect("a valid seed"))
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        let quote = |s: &str| serde_json::to_string(s).expect("a string serialises");
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Raw(r) => out.push_str(r),
            J::Str(s) => out.push_str(&quote(s)),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            J::Obj(entries) => {
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&quote(k));
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    /// Number of nodes (pre-order indices run `0..count()`).
    pub fn count(&self) -> usize {
        1 + match self {
            J::Arr(items) => items.iter().map(J::count).sum(),
            J::Obj(entries) => entries.iter().map(|(_, v)| v.count()).sum(),
            _ => 0,
        }
    }

    /// The node with pre-order index `i`.
    pub fn node(&self, i: usize) -> Option<&J> {
        if i == 0 {
            return Some(self);
        }
        let mut i = i - 1;
        for child in self.children() {
            let n = child.count();
            if i < n {
                return child.node(i);
            }
            i -= n;
        }
        None
    }

    fn children(&self) -> Box<dyn Iterator<Item = &J> + '_> {
        match self {
            J::Arr(items) => Box::new(items.iter()),
            J::Obj(entries) => Box::new(entries.iter().map(|(_, v)| v)),
            _ => Box::new(std::iter::empty()),
        }
    }

    /// Applies `f` to the node with pre-order index `i`; `f` gets the node and may remove
    /// it from its parent by returning `false` (the root is never removed).
    fn visit(&mut self, i: usize, f: &mut dyn FnMut(&mut J) -> bool) -> bool {
        let mut rest = i;
        if rest == 0 {
            f(self);
            return true;
        }
        rest -= 1;
        let mut remove = None;
        let mut done = false;
        let mut each = |idx: usize, child: &mut J, rest: &mut usize| {
            let n = child.count();
            if *rest == 0 {
                if !f(child) {
                    remove = Some(idx);
                }
                return true;
            }
            if *rest < n {
                return child.visit(*rest, f);
            }
            *rest -= n;
            false
        };
        match self {
            J::Arr(items) => {
                for (idx, child) in items.iter_mut().enumerate() {
                    if each(idx, child, &mut rest) {
                        done = true;
                        break;
                    }
                }
                if let Some(idx) = remove {
                    items.remove(idx);
                }
            }
            J::Obj(entries) => {
                for (idx, (_, child)) in entries.iter_mut().enumerate() {
                    if each(idx, child, &mut rest) {
                        done = true;
                        break;
                    }
                }
                if let Some(idx) = remove {
                    entries.remove(idx);
                }
            }
            _ => {}
        }
        done
    }
}

impl From<serde_json::Value> for J {
    fn from(v: serde_json::Value) -> J {
        use serde_json::Value;
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(b),
            Value::Number(n) => J::Raw(n.to_string()),
            Value::String(s) => J::Str(s),
            Value::Array(a) => J::Arr(a.into_iter().map(J::from).collect()),
            Value::Object(o) => J::Obj(o.into_iter().map(|(k, v)| (k, J::from(v))).collect()),
        }
    }
}

/// Number literals a careful parser must reject or bound.
const RAW: &[&str] = &[
    "18446744073709551616",
    "-9223372036854775809",
    "-1",
    "-9223372036854775808",
    "1e400",
    "-1e400",
    "1e308",
    "0.5",
    "-0",
    "1e2",
    "4294967296",
    "2147483648",
];

/// Strings that parsers compare against (dtype names, architectures) and odd text.
const STRINGS: &[&str] = &[
    "",
    "F32",
    "F16",
    "BF16",
    "I64",
    "F64",
    "Q4_0",
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen2ForCausalLM",
    "BPE",
    "ByteLevel",
    "llama3",
    "linear",
    "\u{0}",
    "\u{feff}x",
    "\u{10ffff}",
];

/// A replacement value.
#[derive(Clone, Debug)]
pub enum Value {
    Num(Num),
    Raw(usize),
    Str(usize),
    Null,
    Bool(bool),
    EmptyArr,
    EmptyObj,
    /// A long string of one character.
    Long(u16),
}

impl Value {
    fn build(&self, len: usize) -> J {
        match self {
            Value::Num(n) => J::Raw(n.resolve(len).to_string()),
            Value::Raw(i) => J::Raw(RAW[i % RAW.len()].to_string()),
            Value::Str(i) => J::Str(STRINGS[i % STRINGS.len()].to_string()),
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::EmptyArr => J::Arr(vec![]),
            Value::EmptyObj => J::Obj(vec![]),
            Value::Long(n) => J::Str("a".repeat(*n as usize)),
        }
    }
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => num().prop_map(Value::Num),
        2 => any::<usize>().prop_map(Value::Raw),
        2 => any::<usize>().prop_map(Value::Str),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::EmptyArr),
        1 => Just(Value::EmptyObj),
        1 => any::<u16>().prop_map(Value::Long),
    ]
}

/// What happens to the picked node.
#[derive(Clone, Debug)]
pub enum Action {
    Replace(Value),
    Remove,
    /// Replaced by a copy of another node (e.g. one tensor's offsets into another's).
    CopyFrom(usize),
    /// Wrapped in this many arrays (odd) or objects (even).
    Nest(u16),
    /// An object gets a second entry with the key of its entry `key` and value `Value`.
    DuplicateKey(usize, Value),
    /// An array's items are repeated this many times over.
    Repeat(u8),
}

/// One edit: `action` on the node with pre-order index `node % count`.
#[derive(Clone, Debug)]
pub struct Edit {
    pub node: usize,
    pub action: Action,
}

pub fn edit() -> impl Strategy<Value = Edit> {
    let action = prop_oneof![
        6 => value().prop_map(Action::Replace),
        2 => Just(Action::Remove),
        2 => any::<usize>().prop_map(Action::CopyFrom),
        1 => (1u16..400).prop_map(Action::Nest),
        2 => (any::<usize>(), value()).prop_map(|(k, v)| Action::DuplicateKey(k, v)),
        1 => (1u8..6).prop_map(Action::Repeat),
    ];
    (any::<usize>(), action).prop_map(|(node, action)| Edit { node, action })
}

impl Edit {
    /// Applies the edit; `len` resolves [`Num::PastEnd`] (e.g. the data section's length).
    pub fn apply(&self, doc: &mut J, len: usize) {
        let count = doc.count();
        let target = self.node % count;
        let copied = match self.action {
            Action::CopyFrom(from) => doc.node(from % count).cloned(),
            _ => None,
        };
        doc.visit(target, &mut |node| {
            match &self.action {
                Action::Replace(v) => *node = v.build(len),
                Action::Remove => return false,
                Action::CopyFrom(_) => *node = copied.clone().unwrap_or(J::Null),
                Action::Nest(depth) => {
                    for d in 0..*depth {
                        let inner = std::mem::replace(node, J::Null);
                        *node = if d % 2 == 0 {
                            J::Arr(vec![inner])
                        } else {
                            J::Obj(vec![("k".into(), inner)])
                        };
                    }
                }
                Action::DuplicateKey(k, v) => {
                    if let J::Obj(entries) = node {
                        if !entries.is_empty() {
                            let key = entries[k % entries.len()].0.clone();
                            entries.push((key, v.build(len)));
                        }
                    }
                }
                Action::Repeat(times) => {
                    if let J::Arr(items) = node {
                        let original = items.clone();
                        for _ in 0..*times {
                            items.extend(original.iter().cloned());
                        }
                    }
                }
            }
            true
        });
    }
}

/// Up to `max` structural edits.
pub fn edits(max: usize) -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(edit(), 0..=max)
}

/// `seed` with `edits` applied in order.
pub fn apply_all(seed: &J, edits: &[Edit], len: usize) -> J {
    let mut doc = seed.clone();
    for e in edits {
        e.apply(&mut doc, len);
    }
    doc
}

/// A mutated JSON document: one of several seed documents, structural edits, then
/// byte-level edits of its text.
#[derive(Clone, Debug)]
pub struct Case {
    /// Index of the seed document.
    pub seed: usize,
    pub edits: Vec<Edit>,
    pub bytes: Vec<ByteOp>,
}

/// Cases over `seeds` seed documents, with up to `max_edits` structural edits.
pub fn case(seeds: usize, max_edits: usize) -> impl Strategy<Value = Case> {
    (0..seeds, edits(max_edits), mutate::byte_ops(2)).prop_map(|(seed, edits, bytes)| Case {
        seed,
        edits,
        bytes,
    })
}

impl Case {
    /// The bytes a parser sees: the seed with every edit applied.
    pub fn render(&self, seeds: &[J]) -> Vec<u8> {
        let text = apply_all(&seeds[self.seed], &self.edits, 0).text();
        mutate::apply_all(text.as_bytes(), &self.bytes)
    }
}
