//! Runs that measure a model rather than use it: scoring from saved activations (a
//! component of layer L cannot change anything before layer L, so a sweep over variants
//! of one model runs each from there), and the input norms of every projection.

use std::collections::BTreeMap;

use upmix_ir::{RuntimeError, TokenScores, WeightId};

use super::frame::{upload_batch, Columns, Frame};
use super::kernels::Kernels;
use super::plan::{RunArgs, Snapshot};
use super::{hidden, to_host, BurnRuntime};

/// Activations saved by [`BurnRuntime::save_states`].
pub(crate) struct SavedStates<B: Kernels> {
    sequences: Vec<Vec<u32>>,
    /// The batch's columns, rotary tables and masks, built once for every resumed run.
    frame: Frame<B>,
    /// Node names, in the order of `snapshots`.
    nodes: Vec<String>,
    snapshots: Vec<Snapshot<B>>,
}

impl<B: Kernels> BurnRuntime<B> {
    pub(crate) fn save_states_of(
        &mut self,
        sequences: &[&[u32]],
        nodes: &[&str],
    ) -> Result<(), RuntimeError> {
        self.check_tokens(sequences)?;
        if sequences.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let mut steps = Vec::with_capacity(nodes.len());
        for node in nodes {
            let step = self
                .plan
                .slot(node)
                .ok_or_else(|| RuntimeError::UnknownNode(node.to_string()))?;
            steps.push(step);
        }
        self.saved = None;
        let columns = Columns::new(sequences.iter().map(|s| s.len()).collect());
        let width = columns.prompt;
        let tokens = upload_batch::<B>(sequences, width, &self.device);
        let mut frame = Frame::new(columns, 0, width, &self.device);
        let mut snapshots = Vec::new();
        // Run up to the last requested node only.
        let last = steps.iter().copied().max().unwrap_or(0);
        self.plan.run(
            Some(tokens),
            RunArgs {
                frame: &mut frame,
                cache: None,
                keep: &[last],
                rows: None,
                dispatch: self.dispatch,
                resume: None,
                save: Some((&steps, &mut snapshots)),
            },
        )?;
        // One snapshot per distinct step, in step order: one per node, in the nodes' order.
        let snapshots = steps
            .iter()
            .map(|&step| {
                let s = snapshots.iter().find(|s| s.step == step);
                s.cloned().expect("every requested step ran")
            })
            .collect();
        self.saved = Some(SavedStates {
            sequences: sequences.iter().map(|s| s.to_vec()).collect(),
            frame,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            snapshots,
        });
        Ok(())
    }

    pub(crate) fn score_saved_at(&mut self, node: &str) -> Result<Vec<TokenScores>, RuntimeError> {
        let saved = self.saved.as_mut().ok_or_else(|| {
            RuntimeError::Backend("score_saved needs states saved by save_states first".into())
        })?;
        let at = saved
            .nodes
            .iter()
            .position(|n| n == node)
            .ok_or_else(|| RuntimeError::UnknownNode(format!("{node} (no saved state)")))?;
        let mut values = self.plan.run(
            None,
            RunArgs {
                frame: &mut saved.frame,
                cache: None,
                keep: &[self.plan.output],
                rows: None,
                dispatch: self.dispatch,
                resume: Some(&saved.snapshots[at]),
                save: None,
            },
        )?;
        let logits = hidden(values.remove(0));
        let sequences: Vec<&[u32]> = saved.sequences.iter().map(|s| s.as_slice()).collect();
        Self::token_scores(&self.device, logits, &saved.frame.columns, &sequences)
    }

    pub(crate) fn input_norms(
        &mut self,
        sequences: &[&[u32]],
    ) -> Result<Vec<(WeightId, Vec<f32>)>, RuntimeError> {
        self.check_tokens(sequences)?;
        let mut sums: BTreeMap<WeightId, Vec<f64>> = BTreeMap::new();
        // One sequence per run, so that no padding row enters the sums.
        for seq in sequences {
            self.plan.params.start_taps();
            let run = self.forward(&[seq], &[self.plan.output]);
            let taps = self.plan.params.take_taps();
            run?;
            for (id, t) in taps {
                let values = to_host(t)?.data;
                let acc = sums.entry(id).or_insert_with(|| vec![0.0; values.len()]);
                acc.iter_mut().zip(values).for_each(|(a, v)| *a += v as f64);
            }
        }
        Ok(sums
            .into_iter()
            .map(|(id, s)| (id, s.into_iter().map(|v| v.sqrt() as f32).collect()))
            .collect())
    }
}
