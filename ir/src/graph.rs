//! The model graph: layer-level ops connected by activation edges.

use std::collections::BTreeSet;
use std::path::PathBuf;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::Op;

/// A node in a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub NodeIndex);

/// A node: a canonical name (`layers.3.attn`) and its op.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
}

/// An activation edge; `slot` orders a node's inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub slot: u8,
}

/// Model-level facts that are not ops: vocabulary, special tokens, and files a checkpoint
/// carries alongside its weights (tokenizer files) that emitters copy through.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelMeta {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Files to copy verbatim into an emitted checkpoint (e.g. `tokenizer.json`).
    pub aux_files: Vec<PathBuf>,
    /// The checkpoint's own `config.json`, if it has one: emitters keep the fields of it
    /// that upmix does not model (pad and unk token ids, model-specific extras).
    pub config_file: Option<PathBuf>,
    /// Where the model's tokenizer comes from (a `tokenizer.json`, or a GGUF file that
    /// embeds one), if it has one.
    pub tokenizer: Option<PathBuf>,
}

/// A model as a DAG from one `Input` node to one `Output` node.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub meta: ModelMeta,
    g: StableDiGraph<Node, Edge>,
}

impl Graph {
    pub fn new(name: &str, meta: ModelMeta) -> Self {
        Graph {
            name: name.to_string(),
            meta,
            g: StableDiGraph::new(),
        }
    }

    pub fn add_node(&mut self, name: &str, op: Op) -> NodeId {
        NodeId(self.g.add_node(Node {
            name: name.to_string(),
            op,
        }))
    }

    /// Feeds `from`'s output into `to`'s next input slot.
    pub fn connect(&mut self, from: NodeId, to: NodeId) {
        let slot = self.g.edges_directed(to.0, Direction::Incoming).count() as u8;
        self.g.add_edge(from.0, to.0, Edge { slot });
    }

    /// Removes every edge into `to`.
    pub fn disconnect_inputs(&mut self, to: NodeId) {
        let edges: Vec<_> = self
            .g
            .edges_directed(to.0, Direction::Incoming)
            .map(|e| e.id())
            .collect();
        for e in edges {
            self.g.remove_edge(e);
        }
    }

    pub fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        self.g.remove_node(id.0)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    /// All node ids in insertion order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().map(NodeId).collect()
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// The node called `name`, if any.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.g
            .node_indices()
            .find(|i| self.g[*i].name == name)
            .map(NodeId)
    }

    /// A node's inputs, ordered by slot.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u8, NodeId)> = self
            .g
            .edges_directed(id.0, Direction::Incoming)
            .map(|e| (e.weight().slot, NodeId(e.source())))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that consume `id`'s output.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .neighbors_directed(id.0, Direction::Outgoing)
            .map(NodeId)
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// A deterministic topological order (Kahn's algorithm, lowest node index first), or
    /// the names of the nodes left on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, Vec<String>> {
        let mut indegree: std::collections::HashMap<NodeIndex, usize> = self
            .g
            .node_indices()
            .map(|i| (i, self.g.edges_directed(i, Direction::Incoming).count()))
            .collect();
        let mut ready: BTreeSet<NodeIndex> = indegree
            .iter()
            .filter(|(_, d)| **d == 0)
            .map(|(i, _)| *i)
            .collect();
        let mut order = Vec::with_capacity(indegree.len());
        while let Some(i) = ready.pop_first() {
            order.push(NodeId(i));
            for e in self.g.edges_directed(i, Direction::Outgoing) {
                let d = indegree.get_mut(&e.target()).expect("edge target exists");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        if order.len() == self.g.node_count() {
            Ok(order)
        } else {
            let mut stuck: Vec<String> = indegree
                .iter()
                .filter(|(_, d)| **d > 0)
                .map(|(i, _)| self.g[*i].name.clone())
                .collect();
            stuck.sort();
            Err(stuck)
        }
    }

    /// Every weight id used by the graph's ops, deduplicated, in topological order of use
    /// (falls back to insertion order on a cyclic graph).
    pub fn weight_ids(&self) -> Vec<crate::WeightId> {
        let order = self.topo_order().unwrap_or_else(|_| self.node_ids());
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for id in order {
            for (_, w) in self.node(id).op.weights() {
                if seen.insert(w) {
                    out.push(w);
                }
            }
        }
        out
    }
}
