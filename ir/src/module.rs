//! A module: the named graphs in play and the weight table they share.

use std::collections::BTreeMap;

use crate::{Graph, WeightTable};

/// Named graphs (`seed`, `code`, `moe`, ...) over one shared [`WeightTable`], so a pass can
/// read several graphs and build a new one whose weights are expressions over theirs.
#[derive(Clone, Debug, Default)]
pub struct Module {
    pub graphs: BTreeMap<String, Graph>,
    pub weights: WeightTable,
}

impl Module {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts (or replaces) a graph under its own name.
    pub fn insert(&mut self, graph: Graph) {
        self.graphs.insert(graph.name.clone(), graph);
    }

    pub fn graph(&self, name: &str) -> Option<&Graph> {
        self.graphs.get(name)
    }

    pub fn graph_mut(&mut self, name: &str) -> Option<&mut Graph> {
        self.graphs.get_mut(name)
    }

    /// Names of all graphs, sorted.
    pub fn graph_names(&self) -> Vec<String> {
        self.graphs.keys().cloned().collect()
    }

    /// Total stored bytes of the weights one graph uses.
    pub fn graph_weight_bytes(&self, name: &str) -> usize {
        self.graph(name)
            .map(|g| {
                g.weight_ids()
                    .iter()
                    .filter_map(|id| self.weights.get(*id).ok())
                    .map(|w| w.nbytes())
                    .sum()
            })
            .unwrap_or(0)
    }
}
