//! Greedy decoding of a batch with KV caches.
//!
//! [`Decoder`] holds one batch's caches and column layout (module `frame`): `prefill`
//! runs the prompts (right-padded) and fills the prompt columns; each `step` runs one new
//! token per sequence in the next column. Only each sequence's last position reaches the
//! lm head, and the argmax is taken on the device.

use super::kernels::Kernels;
use burn_tensor::{Int, Tensor, TensorData};
use upmix_ir::RuntimeError;

use super::attention::CacheSet;
use super::frame::{upload_batch, Columns, Frame};
use super::plan::RunArgs;
use super::{hidden, ids_to_host, BurnRuntime};

/// The decoding state of one batch.
pub(crate) struct Decoder<B: Kernels> {
    columns: Columns,
    cache: CacheSet<B>,
    /// Columns written so far.
    filled: usize,
}

impl<B: Kernels> Decoder<B> {
    /// Runs `prompts` (checked, non-empty) into fresh caches with room for `steps` more
    /// columns; returns the logits of each prompt's last position, `[batch, vocab]`.
    pub fn prefill(
        rt: &BurnRuntime<B>,
        prompts: &[&[u32]],
        steps: usize,
    ) -> Result<(Self, Tensor<B, 2>), RuntimeError> {
        let columns = Columns::new(prompts.iter().map(|p| p.len()).collect());
        let width = columns.prompt;
        let mut decoder = Decoder {
            cache: CacheSet::new(rt.plan.attention_layers, width + steps),
            columns,
            filled: 0,
        };
        let last: Vec<usize> = (decoder.columns.lengths.iter().enumerate())
            .map(|(s, &len)| s * width + len - 1)
            .collect();
        let tokens = upload_batch::<B>(prompts, width, &rt.device);
        let logits = decoder.run(rt, tokens, width, Some(&last))?;
        Ok((decoder, logits))
    }

    /// Runs one token per sequence (`[batch]`) in the next column; returns `[batch, vocab]`.
    pub fn step(
        &mut self,
        rt: &BurnRuntime<B>,
        tokens: Tensor<B, 1, Int>,
    ) -> Result<Tensor<B, 2>, RuntimeError> {
        self.run(rt, tokens, 1, None)
    }

    fn run(
        &mut self,
        rt: &BurnRuntime<B>,
        tokens: Tensor<B, 1, Int>,
        count: usize,
        rows: Option<&[usize]>,
    ) -> Result<Tensor<B, 2>, RuntimeError> {
        let mut frame = Frame::new(self.columns.clone(), self.filled, count, &rt.device);
        let mut values = rt.plan.run(
            Some(tokens),
            RunArgs {
                frame: &mut frame,
                cache: Some(&mut self.cache),
                keep: &[rt.plan.output],
                rows,
                dispatch: rt.dispatch,
                resume: None,
                save: None,
            },
        )?;
        self.filled += count;
        Ok(hidden(values.remove(0)))
    }
}

/// Greedy continuations of `prompts` (checked, non-empty), `max_new >= 1`.
pub(crate) fn greedy<B: Kernels>(
    rt: &BurnRuntime<B>,
    prompts: &[&[u32]],
    max_new: usize,
    stop: Option<u32>,
) -> Result<Vec<Vec<u32>>, RuntimeError> {
    let batch = prompts.len();
    let (mut decoder, mut logits) = Decoder::prefill(rt, prompts, max_new)?;
    let mut out = vec![Vec::with_capacity(max_new); batch];
    let mut done = vec![false; batch];
    loop {
        let next = ids_to_host(logits.argmax(1))?;
        for (s, &token) in next.iter().enumerate() {
            if !done[s] {
                out[s].push(token);
                done[s] = out[s].len() == max_new || stop == Some(token);
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(out);
        }
        // Finished sequences keep running on a placeholder id until the batch ends; the lm
        // head may be wider than the embedding table (padded vocabularies).
        let feed: Vec<i64> = next
            .iter()
            .zip(&done)
            .map(|(&t, &d)| if d { 0 } else { t as i64 })
            .collect();
        for (&token, &d) in next.iter().zip(&done) {
            if !d {
                rt.check_tokens(&[&[token]])?;
            }
        }
        let feed = Tensor::from_data(TensorData::new(feed, [batch]), &rt.device);
        logits = decoder.step(rt, feed)?;
    }
}
