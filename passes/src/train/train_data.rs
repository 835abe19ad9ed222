//! `Train`'s data: text files tokenized and packed into windows of `seq_len` tokens, and
//! the seeded order in which steps draw them.
//!
//! Each data name's files are tokenized with the model's tokenizer and joined; without
//! `mix` all of them form one stream. A stream is cut into non-overlapping windows (each
//! opening with BOS with `bos: true`), the tail that does not fill one is dropped. Each
//! batch row first draws a pool by its `mix` share, then takes that pool's next window
//! in a shuffled order (SplitMix64 and Fisher-Yates, reshuffled after every pass over
//! the pool).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use upmix_ir::{splitmix64, Module};

use crate::pass::{graph, PassContext, PassError, PassName};
use crate::train::Train;

/// A held-out set: its name and windows.
pub(crate) type EvalSet = (String, Vec<Vec<u32>>);

impl Train {
    /// The training windows: one pool per data name with `mix`, else one.
    pub(crate) fn windows(
        &self,
        m: &Module,
        cx: &mut PassContext,
    ) -> Result<Vec<Vec<Vec<u32>>>, PassError> {
        let streams = self.streams(m, cx, &self.data, self.mix.is_some(), "data")?;
        let mut pools = Vec::new();
        for (name, stream) in streams {
            let pool = self.cut(m, &stream, false)?;
            let need = if self.mix.is_some() { 1 } else { self.batch };
            if pool.len() < need {
                let which = match self.mix {
                    Some(_) => format!(" `{name}`"),
                    None => String::new(),
                };
                return Err(self.invalid(format!(
                    "data{which}: {} tokens make {} windows of {}, fewer than {need}",
                    stream.len(),
                    pool.len(),
                    self.seq_len,
                )));
            }
            pools.push(pool);
        }
        Ok(pools)
    }

    /// The held-out windows of every `eval` name (at least one each; the last may be
    /// shorter, so that every token is scored).
    pub(crate) fn eval_windows(
        &self,
        m: &Module,
        cx: &mut PassContext,
    ) -> Result<Vec<EvalSet>, PassError> {
        let Some(eval) = &self.eval else {
            return Ok(Vec::new());
        };
        let mut sets = Vec::new();
        for (name, stream) in self.streams(m, cx, eval, true, "eval")? {
            let windows = self.cut(m, &stream, true)?;
            if windows.is_empty() {
                return Err(self.invalid(format!(
                    "eval `{name}`: {} tokens make no window of {}",
                    stream.len(),
                    self.seq_len
                )));
            }
            sets.push((name, windows));
        }
        Ok(sets)
    }

    /// The token streams of `files`: one per name when `apart`, else one of them all;
    /// `field` names them in errors.
    fn streams(
        &self,
        m: &Module,
        cx: &mut PassContext,
        files: &BTreeMap<String, PathBuf>,
        apart: bool,
        field: &str,
    ) -> Result<Vec<(String, Vec<u32>)>, PassError> {
        let provider = cx
            .runtimes
            .as_deref_mut()
            .ok_or_else(|| self.invalid("training needs a runtime; run it in a pipeline".into()))?;
        let mut streams: Vec<(String, Vec<u32>)> = Vec::new();
        for (name, path) in files {
            let text = std::fs::read_to_string(path)
                .map_err(|e| self.invalid(format!("{field} `{name}`: {}: {e}", path.display())))?;
            let ids = provider
                .tokenize(m, &self.model, &text)
                .map_err(|e| self.invalid(format!("{field} `{name}`: {e}")))?;
            match (apart, streams.last_mut()) {
                (false, Some((_, all))) => all.extend(ids),
                _ => streams.push((name.clone(), ids)),
            }
        }
        Ok(streams)
    }

    /// `stream` cut into windows of `seq_len`, each opening with BOS with `bos`; with
    /// `tail`, the rest that fills no window is one more (if it makes 2 tokens).
    fn cut(&self, m: &Module, stream: &[u32], tail: bool) -> Result<Vec<Vec<u32>>, PassError> {
        let bos = match self.bos {
            true => Some(
                graph(m, "Train", &self.model)?
                    .meta
                    .bos_token_id
                    .ok_or_else(|| self.invalid(format!("`{}` has no BOS token", self.model)))?,
            ),
            false => None,
        };
        let body = self.seq_len - usize::from(bos.is_some());
        let windows = stream.chunks(body).map(|w| {
            bos.into_iter()
                .chain(w.iter().copied())
                .collect::<Vec<u32>>()
        });
        Ok(windows
            .filter(|w| w.len() == self.seq_len || tail && w.len() >= 2)
            .collect())
    }
}

/// Where the data order stands: every pool's shuffled order and the generator that
/// draws pools by their shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct DataOrder {
    orders: Vec<Order>,
    draw: u64,
}

impl DataOrder {
    /// The order at the start of a run over `pools` with `seed`.
    pub fn new(pools: &[Vec<Vec<u32>>], seed: u64) -> Self {
        DataOrder {
            orders: pools
                .iter()
                .enumerate()
                .map(|(i, p)| Order::new(p.len(), seed.wrapping_add(i as u64)))
                .collect(),
            draw: seed ^ 0x5EED,
        }
    }

    /// The next `rows` windows: for each, a pool drawn by `shares`, then its next window.
    pub fn next_batch<'p>(
        &mut self,
        pools: &'p [Vec<Vec<u32>>],
        shares: &[f64],
        rows: usize,
    ) -> Vec<&'p [u32]> {
        let total: f64 = shares.iter().sum();
        (0..rows)
            .map(|_| {
                let mut u = (splitmix64(&mut self.draw) >> 11) as f64 / (1u64 << 53) as f64 * total;
                let pool = shares
                    .iter()
                    .position(|w| {
                        u -= w;
                        u < 0.0
                    })
                    .unwrap_or(shares.len() - 1);
                pools[pool][self.orders[pool].next()].as_slice()
            })
            .collect()
    }
}

/// Window indices in a seeded shuffled order, reshuffled after each pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    state: u64,
    indices: Vec<usize>,
    at: usize,
}

impl Order {
    fn new(n: usize, seed: u64) -> Order {
        Order {
            state: seed,
            indices: (0..n).collect(),
            at: n,
        }
    }

    fn next(&mut self) -> usize {
        if self.at == self.indices.len() {
            for i in (1..self.indices.len()).rev() {
                let j = (splitmix64(&mut self.state) % (i as u64 + 1)) as usize;
                self.indices.swap(i, j);
            }
            self.at = 0;
        }
        self.at += 1;
        self.indices[self.at - 1]
    }
}
