//! How a graph's weights are stored, per component: the table `upmix inspect` prints
//! after the IR.
//!
//! Weights are grouped by their place in a layer, the layer index and expert index left
//! out (`attn.q`, `ffn.experts.*.down`, `attn_norm.weight`; `embed.table` and
//! `lm_head.weight` outside layers), in order of first use; a weight used twice (a tied
//! embedding and lm head) counts once, under its first use. Bytes are those of each
//! weight's stored type, as an emitter writes them.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use upmix_ir::{DType, Module};

/// One row of the table.
#[derive(Default)]
struct Row {
    weights: usize,
    params: usize,
    bytes: usize,
    types: BTreeMap<DType, usize>,
}

/// `layers.3.ffn` + `experts.1.up` -> `ffn.experts.*.up`.
fn group(node: &str, label: &str) -> String {
    let name = format!("{node}.{label}");
    let name = match name.strip_prefix("layers.") {
        Some(rest) => rest.split_once('.').map_or(rest, |(_, r)| r).to_string(),
        None => name,
    };
    let parts: Vec<&str> = name.split('.').collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let numbered = i > 0 && parts[i - 1] == "experts" && p.parse::<usize>().is_ok();
        out.push(if numbered { "*" } else { p });
    }
    out.join(".")
}

/// The storage table of graph `graph` of `m`.
pub fn storage_table(m: &Module, graph: &str) -> anyhow::Result<String> {
    let g = m
        .graph(graph)
        .ok_or_else(|| anyhow::anyhow!("no model named `{graph}`"))?;
    let mut rows: Vec<(String, Row)> = Vec::new();
    let mut seen = HashSet::new();
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    for id in order {
        let node = g.node(id);
        for (label, weight) in node.op.weights() {
            if !seen.insert(weight) {
                continue;
            }
            let w = m.weights.get(weight)?;
            let key = group(&node.name, &label);
            let at = match rows.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    rows.push((key, Row::default()));
                    rows.len() - 1
                }
            };
            let row = &mut rows[at].1;
            row.weights += 1;
            row.params += w.numel();
            row.bytes += w.nbytes();
            *row.types.entry(w.dtype).or_insert(0) += 1;
        }
    }
    let mut out = String::new();
    writeln!(out, "storage:")?;
    writeln!(
        out,
        "  {:<24} {:>7} {:>12} {:>12}  types",
        "component", "weights", "parameters", "MB"
    )?;
    let (mut params, mut bytes) = (0, 0);
    for (key, row) in &rows {
        let types: Vec<String> = row
            .types
            .iter()
            .map(|(d, n)| match n {
                1 => d.to_string(),
                n => format!("{d} x{n}"),
            })
            .collect();
        writeln!(
            out,
            "  {key:<24} {:>7} {:>12} {:>12.3}  {}",
            row.weights,
            row.params,
            row.bytes as f64 / 1e6,
            types.join(", ")
        )?;
        params += row.params;
        bytes += row.bytes;
    }
    writeln!(
        out,
        "  {:<24} {:>7} {:>12} {:>12.3}  ({:.2} bits per parameter)",
        "total",
        seen.len(),
        params,
        bytes as f64 / 1e6,
        8.0 * bytes as f64 / params.max(1) as f64
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::group;

    #[test]
    fn groups_leave_out_layer_and_expert_indices() {
        assert_eq!(group("layers.3.ffn", "experts.12.up"), "ffn.experts.*.up");
        assert_eq!(group("layers.0.attn", "q"), "attn.q");
        assert_eq!(group("layers.10.attn_norm", "weight"), "attn_norm.weight");
        assert_eq!(group("embed", "table"), "embed.table");
    }
}
