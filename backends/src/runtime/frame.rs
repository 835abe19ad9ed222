//! Where the tokens of a batch sit, and the tensors every attention layer of one forward
//! call shares: rotary tables and attention masks.
//!
//! A batch runs as `[batch * tokens, width]` activations, sequence-major. Its tokens sit
//! in the columns of a [`Columns`] layout: the prompt columns `0..prompt`, where sequence
//! `s` fills `0..lengths[s]` and the rest is right padding, then one column per decode
//! step, which every sequence fills. A key cache stores keys by column, so a decode step
//! writes one column for the whole batch and never moves the past.
//!
//! The one mask builder, [`Frame::mask`], derives the additive attention mask from that
//! layout: a query sees a key when the key's column is not after the query's, the key is
//! not padding, and (for a windowed layer) the key is less than `window` positions back.

use super::kernels::Kernels;
use burn_tensor::{Int, Tensor, TensorData};

use super::params::upload;

/// The column layout of a batch (see the module doc).
#[derive(Clone, Debug)]
pub(crate) struct Columns {
    /// Tokens of each sequence's prompt.
    pub lengths: Vec<usize>,
    /// Prompt columns: the longest prompt.
    pub prompt: usize,
}

impl Columns {
    pub fn new(lengths: Vec<usize>) -> Self {
        let prompt = lengths.iter().copied().max().unwrap_or(0);
        Columns { lengths, prompt }
    }

    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The position of the token in column `column` of sequence `s`, or `None` for padding.
    pub fn position(&self, s: usize, column: usize) -> Option<usize> {
        let len = self.lengths[s];
        if column < self.prompt {
            (column < len).then_some(column)
        } else {
            Some(len + column - self.prompt)
        }
    }
}

/// Rotary `(cos, sin)` tables.
pub(crate) type CosSin<B> = (Tensor<B, 3>, Tensor<B, 3>);

/// One forward call: the columns `start..start + tokens` of every sequence of `columns`,
/// plus the rotary tables and masks built for it, shared by all its attention layers.
pub(crate) struct Frame<B: Kernels> {
    pub columns: Columns,
    /// First column of the call.
    pub start: usize,
    /// Columns per sequence in the call.
    pub tokens: usize,
    device: B::Device,
    /// `(cos, sin)`, each `[batch * tokens, heads, head_dim]`, by RoPE slot and head count;
    /// expanded over heads so that applying them is a contiguous element-wise op.
    rotary: Vec<((usize, usize), CosSin<B>)>,
    /// Additive masks `[batch, kv_heads, repeats * tokens, start + tokens]` by
    /// `(window, kv_heads, repeats)`; `None` where every key is visible.
    masks: Vec<(MaskKey, Option<Tensor<B, 4>>)>,
}

type MaskKey = (Option<usize>, usize, usize);

impl<B: Kernels> Frame<B> {
    pub fn new(columns: Columns, start: usize, tokens: usize, device: &B::Device) -> Self {
        Frame {
            columns,
            start,
            tokens,
            device: device.clone(),
            rotary: Vec::new(),
            masks: Vec::new(),
        }
    }

    pub fn batch(&self) -> usize {
        self.columns.batch()
    }

    /// The position of each row of the call, sequence-major; padding rows take their
    /// column (their outputs are never read).
    fn positions(&self) -> Vec<f32> {
        (0..self.batch())
            .flat_map(|s| {
                (self.start..self.start + self.tokens)
                    .map(move |c| self.columns.position(s, c).unwrap_or(c) as f32)
            })
            .collect()
    }

    /// `cos` and `sin` of `position * inv_freq`, duplicated over both halves of the head
    /// (`emb = cat(freqs, freqs)`), for `heads` heads: `[rows, heads, head_dim]`.
    pub fn rotary(&mut self, slot: usize, heads: usize, inv_freq: &Tensor<B, 2>) -> CosSin<B> {
        if let Some((_, t)) = self.rotary.iter().find(|(k, _)| *k == (slot, heads)) {
            return t.clone();
        }
        let rows = self.batch() * self.tokens;
        let positions = upload::<B, 2>(self.positions(), [rows, 1], &self.device);
        let freqs = positions * inv_freq.clone();
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 1)
            .unsqueeze_dim::<3>(1)
            .repeat_dim(1, heads);
        let t = (emb.clone().cos(), emb.sin());
        self.rotary.push(((slot, heads), t.clone()));
        t
    }

    /// The additive mask for `repeats` query heads stacked per KV head (row
    /// `r * tokens + i` is the query in column `start + i`), or `None` when every query
    /// sees every key of the call.
    pub fn mask(
        &mut self,
        window: Option<usize>,
        kv_heads: usize,
        repeats: usize,
    ) -> Option<Tensor<B, 4>> {
        let key = (window, kv_heads, repeats);
        if let Some((_, m)) = self.masks.iter().find(|(k, _)| *k == key) {
            return m.clone();
        }
        let mask = self.build_mask(window, kv_heads, repeats);
        self.masks.push((key, mask.clone()));
        mask
    }

    fn build_mask(
        &self,
        window: Option<usize>,
        kv_heads: usize,
        repeats: usize,
    ) -> Option<Tensor<B, 4>> {
        let (batch, tokens, keys) = (self.batch(), self.tokens, self.start + self.tokens);
        let mut rows = Vec::with_capacity(batch * tokens * keys);
        for s in 0..batch {
            for q in self.start..keys {
                let query = self.columns.position(s, q);
                rows.extend((0..keys).map(|k| visible(&self.columns, s, query, q, k, window)));
            }
        }
        if rows.iter().all(|&v| v) {
            return None;
        }
        let mut data = Vec::with_capacity(batch * repeats * tokens * keys);
        for block in rows.chunks(tokens * keys) {
            for _ in 0..repeats {
                data.extend(block.iter().map(|&v| if v { 0.0 } else { f32::MIN }));
            }
        }
        let mask = upload::<B, 4>(data, [batch, 1, repeats * tokens, keys], &self.device);
        Some(mask.repeat_dim(1, kv_heads))
    }
}

/// Whether the query in column `q` of sequence `s` (at position `query`, `None` for a
/// padding row) sees the key in column `k`. A padding row sees column 0 only, so that its
/// softmax stays finite.
fn visible(
    columns: &Columns,
    s: usize,
    query: Option<usize>,
    q: usize,
    k: usize,
    window: Option<usize>,
) -> bool {
    let Some(query) = query else { return k == 0 };
    match columns.position(s, k) {
        Some(key) if k <= q => window.is_none_or(|w| query - key < w),
        _ => false,
    }
}

/// Token ids of a batch as one `[batch * width]` tensor, each sequence right-padded with
/// id 0 to `width`.
pub(crate) fn upload_batch<B: Kernels>(
    sequences: &[&[u32]],
    width: usize,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    let mut ids = Vec::with_capacity(sequences.len() * width);
    for seq in sequences {
        ids.extend(seq.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0, width - seq.len()));
    }
    let n = ids.len();
    Tensor::from_data(TensorData::new(ids, [n]), device)
}

/// Row indices `[rows.len()]` as a device tensor.
pub(crate) fn upload_rows<B: Kernels>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(ids, [rows.len()]), device)
}
