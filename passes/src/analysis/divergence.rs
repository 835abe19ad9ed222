//! Divergent Token Metrics (Deiseroth, Meuer, Gritsch et al. 2023, "Divergent Token
//! Metrics: Measuring degradation to prune away LLM components — and optimize
//! quantization"): how far a compressed model follows its base model's own generations.
//!
//! For a prompt, the base model's greedy continuation `y` of `n` tokens; the candidate is
//! teacher-forced on `prompt + y` and `D` is the set of positions `i` where its argmax
//! differs from `y[i]`. First Divergent Token `FDT = min(D)` (`n` when `D` is empty);
//! Share of Divergent Tokens `SDT = |D| / n`. Over prompts: the mean, median and 25th
//! percentile of FDT (FDT@75: three prompts in four keep at least that many tokens) and
//! the mean SDT. The same teacher-forced pass gives the candidate's perplexity of `y`.
//!
//! Everything here runs over the [`Runtime`] trait, so sensitivity sweeps and planning
//! reuse it with weight swaps.

use upmix_ir::{Runtime, RuntimeError, TokenScores};

/// Sequences per runtime call.
pub const DEFAULT_BATCH: usize = 16;

/// The metrics of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptDivergence {
    /// First divergent index (`n` if none).
    pub fdt: usize,
    /// Share of divergent tokens.
    pub sdt: f64,
    /// The divergent indices into the continuation.
    pub divergent: Vec<usize>,
    /// `-sum log p(y_i | prompt, y_<i)` under the candidate.
    pub nll: f64,
    /// Length of the continuation.
    pub n: usize,
}

/// The metrics over a set of prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct DivergenceSummary {
    pub prompts: usize,
    pub n: usize,
    pub mean_fdt: f64,
    pub median_fdt: f64,
    /// The 25th percentile of FDT (linear interpolation between order statistics).
    pub p25_fdt: f64,
    pub mean_sdt: f64,
    /// The candidate's perplexity of all continuations together.
    pub perplexity: f64,
}

/// The base model's greedy continuations: exactly `n` tokens per prompt (no stop token, so
/// every prompt is measured over the same length), decoded `batch` prompts at a time.
pub fn continuations(
    base: &mut dyn Runtime,
    prompts: &[Vec<u32>],
    n: usize,
    batch: usize,
) -> Result<Vec<Vec<u32>>, RuntimeError> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(|p| p.as_slice()).collect();
        out.extend(base.generate_batch(&refs, n, None)?);
    }
    Ok(out)
}

/// The sequences to teacher-force: each prompt followed by its whole continuation (the
/// last token is needed for its log-probability).
pub fn forced_sequences(prompts: &[Vec<u32>], continuations: &[Vec<u32>]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .zip(continuations)
        .map(|(p, y)| {
            let mut s = p.clone();
            s.extend_from_slice(y);
            s
        })
        .collect()
}

/// The metrics of one prompt from the candidate's scores of its forced sequence.
pub fn compare(prompt_len: usize, continuation: &[u32], scores: &TokenScores) -> PromptDivergence {
    let n = continuation.len();
    let mut divergent = Vec::new();
    let mut nll = 0.0;
    for (i, &y) in continuation.iter().enumerate() {
        let at = prompt_len - 1 + i;
        if scores.argmax[at] != y {
            divergent.push(i);
        }
        nll -= scores.log_probs[at] as f64;
    }
    PromptDivergence {
        fdt: divergent.first().copied().unwrap_or(n),
        sdt: divergent.len() as f64 / n.max(1) as f64,
        divergent,
        nll,
        n,
    }
}

/// The candidate's metrics on every prompt, teacher-forced `batch` sequences at a time.
pub fn divergences(
    candidate: &mut dyn Runtime,
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
    batch: usize,
) -> Result<Vec<PromptDivergence>, RuntimeError> {
    let forced = forced_sequences(prompts, continuations);
    let mut out = Vec::with_capacity(prompts.len());
    for (i, chunk) in forced.chunks(batch.max(1)).enumerate() {
        let refs: Vec<&[u32]> = chunk.iter().map(|s| s.as_slice()).collect();
        for (j, scores) in candidate.score(&refs)?.iter().enumerate() {
            let k = i * batch.max(1) + j;
            out.push(compare(prompts[k].len(), &continuations[k], scores));
        }
    }
    Ok(out)
}

/// Summary statistics of per-prompt metrics.
pub fn summarize(rows: &[PromptDivergence]) -> DivergenceSummary {
    let mut fdt: Vec<f64> = rows.iter().map(|r| r.fdt as f64).collect();
    fdt.sort_by(f64::total_cmp);
    let count = rows.len().max(1) as f64;
    let tokens: usize = rows.iter().map(|r| r.n).sum();
    DivergenceSummary {
        prompts: rows.len(),
        n: rows.first().map_or(0, |r| r.n),
        mean_fdt: fdt.iter().sum::<f64>() / count,
        median_fdt: percentile(&fdt, 0.5),
        p25_fdt: percentile(&fdt, 0.25),
        mean_sdt: rows.iter().map(|r| r.sdt).sum::<f64>() / count,
        perplexity: (rows.iter().map(|r| r.nll).sum::<f64>() / tokens.max(1) as f64).exp(),
    }
}

/// The `q`-quantile of sorted values, interpolating linearly between the order statistics
/// around `q * (len - 1)` (numpy's default); 0 for no values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_at_known_positions() {
        // Prompt of 2 tokens, continuation [5, 6, 7, 8]: argmax rows 1..=4 predict it.
        let scores = TokenScores {
            argmax: vec![0, 5, 9, 7, 9, 0],
            log_probs: vec![0.0, -1.0, -2.0, -3.0, -4.0],
        };
        let d = compare(2, &[5, 6, 7, 8], &scores);
        assert_eq!((d.fdt, d.sdt, d.divergent.clone()), (1, 0.5, vec![1, 3]));
        assert_eq!(d.nll, 10.0);
        let same = compare(
            2,
            &[5, 9, 7, 9],
            &TokenScores {
                argmax: vec![0, 5, 9, 7, 9, 0],
                log_probs: vec![0.0; 5],
            },
        );
        assert_eq!((same.fdt, same.sdt), (4, 0.0));
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [0.0, 4.0, 8.0, 32.0];
        assert_eq!(percentile(&v, 0.5), 6.0);
        assert_eq!(percentile(&v, 0.25), 3.0);
        assert_eq!(percentile(&[7.0], 0.25), 7.0);
    }
}
