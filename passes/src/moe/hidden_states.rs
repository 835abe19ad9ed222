//! Hidden states of a model over text, pooled: what router initialisation reads
//! (mergekit-moe's last-token states of prompts, `DomainCentroid`'s mean states over a
//! domain's text, Nexus' domain embeddings).

use upmix_ir::{Graph, Module, Op, Runtime};

use crate::pass::{graph, PassError, RuntimeProvider};

/// How hidden states of one sequence are pooled over its positions.
#[derive(Clone, Copy)]
pub(crate) enum Pool {
    /// The last position only.
    Last,
    /// The mean over every position but the first (the BOS token).
    MeanAfterFirst,
}

/// How a domain's text is read into windows for mean pooling.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Windows {
    /// At most this many tokens of the text (default 8192).
    pub max_tokens: Option<usize>,
    /// Tokens per window, BOS included (default: the model's max positions, at most 512).
    pub window: Option<usize>,
}

impl Windows {
    /// The token windows of the text at `path` under `model`'s tokenizer, each starting
    /// with its BOS token (or its first token when it has none). An unreadable or empty
    /// text is an error naming the file.
    pub fn read(
        self,
        provider: &mut dyn RuntimeProvider,
        m: &Module,
        model: &str,
        pass: &str,
        path: &std::path::Path,
    ) -> Result<Vec<Vec<u32>>, PassError> {
        let invalid = |message: String| PassError::Invalid {
            pass: pass.to_string(),
            message,
        };
        let g = graph(m, pass, model)?;
        let (bos, max_positions) = (g.meta.bos_token_id, g.meta.max_position_embeddings);
        let window = self.window.unwrap_or(max_positions.min(512)).max(2);
        let text = std::fs::read_to_string(path)
            .map_err(|err| invalid(format!("reading {}: {err}", path.display())))?;
        let mut ids = provider
            .tokenize(m, model, &text)
            .map_err(|e| invalid(format!("tokenizing {} for `{model}`: {e}", path.display())))?;
        ids.truncate(self.max_tokens.unwrap_or(8192));
        if ids.is_empty() {
            return Err(invalid(format!(
                "{} holds no tokens: a domain needs some text",
                path.display()
            )));
        }
        Ok(ids
            .chunks(window - 1)
            .map(|c| {
                let mut w: Vec<u32> = vec![bos.unwrap_or(c[0])];
                w.extend_from_slice(c);
                w
            })
            .collect())
    }
}

/// For each decoder layer in order, the node whose output enters it: the input of the
/// norm in front of its attention (or mixture of attention experts).
pub(crate) fn layer_inputs(g: &Graph) -> Vec<String> {
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    order
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, Op::Attention(_) | Op::MixtureOfAttention(_)))
        .filter_map(|attn| {
            let norm = *g.inputs(attn).first()?;
            let input = *g.inputs(norm).first()?;
            Some(g.node(input).name.clone())
        })
        .collect()
}

/// Hidden states at each of `nodes`, pooled over positions per sequence, then averaged
/// over sequences (each sequence counts once with `Last`; each token once with
/// `MeanAfterFirst`): `[node][hidden]`. One forward pass per sequence.
pub(crate) fn pooled(
    rt: &mut dyn Runtime,
    nodes: &[String],
    sequences: &[Vec<u32>],
    pool: Pool,
) -> Result<Vec<Vec<f32>>, upmix_ir::RuntimeError> {
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let mut acc: Vec<Vec<f64>> = vec![Vec::new(); nodes.len()];
    let mut count = 0usize;
    for seq in sequences {
        if seq.is_empty() {
            return Err(upmix_ir::RuntimeError::EmptyInput);
        }
        let states = rt.hidden_states_at(seq, &names)?;
        let n = seq.len();
        let positions = match pool {
            Pool::Last => n - 1..n,
            Pool::MeanAfterFirst => 1.min(n - 1)..n,
        };
        count += positions.len();
        for ((a, h), node) in acc.iter_mut().zip(&states).zip(nodes) {
            let width = match h.shape[..] {
                [rows, width] if rows == n && (a.is_empty() || a.len() == width) => width,
                _ => {
                    return Err(upmix_ir::RuntimeError::Backend(format!(
                        "hidden states at `{node}` have shape {:?} for {n} tokens",
                        h.shape
                    )))
                }
            };
            if a.is_empty() {
                *a = vec![0.0; width];
            }
            for p in positions.clone() {
                a.iter_mut()
                    .zip(h.row(p))
                    .for_each(|(a, x)| *a += *x as f64);
            }
        }
    }
    Ok(acc
        .into_iter()
        .map(|a| a.iter().map(|v| (v / count.max(1) as f64) as f32).collect())
        .collect())
}

/// `v / max(|v|, 1e-8)`, as mergekit normalises.
pub(crate) fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-8);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}
