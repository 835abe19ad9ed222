//! Pruning masks: which entries of a 2-D weight `[out, in]` a pruning rule zeroes.
//!
//! A [`PruneRule`] ranks the entries by a score, `|W_ij|` (magnitude pruning) or
//! `|W_ij| * s_j` with a per-input-column factor `s_j` (Wanda: `s_j = ||X_j||_2`, the norm
//! of input feature `j` over calibration tokens; Sun et al. 2023, "A Simple and Effective
//! Pruning Approach for Large Language Models"), and zeroes the lowest within a
//! [`Pattern`]:
//! - `Row(s)`: `floor(s * in)` entries of every output row;
//! - `Tensor(s)`: `floor(s * out * in)` entries of the whole tensor;
//! - `NofM { n, m }`: `n` entries of every `m` consecutive columns of a row (`2:4` is the
//!   semi-structured sparsity that sparse tensor cores accelerate).
//!
//! Ties go to the lower index (row-major), so a rule gives the same mask as a stable
//! ascending sort of the scores; scores are computed in f32 as `|w| * s_j`.

use std::sync::Arc;

/// Which entries compete for being zeroed.
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    /// The lowest `floor(sparsity * in)` scores of every row.
    Row(f64),
    /// The lowest `floor(sparsity * numel)` scores of the tensor.
    Tensor(f64),
    /// The lowest `n` scores of every `m` consecutive columns of a row.
    NofM { n: usize, m: usize },
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Row(s) => write!(f, "{s} per row"),
            Pattern::Tensor(s) => write!(f, "{s} per tensor"),
            Pattern::NofM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// Text that is no [`Pattern`]'s `Display` form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a pruning pattern (expected `S per row`, `S per tensor` or `N:M`)")]
pub struct ParsePatternError(pub String);

/// The inverse of `Display`: `0.5 per row`, `0.5 per tensor`, `2:4`.
impl std::str::FromStr for Pattern {
    type Err = ParsePatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParsePatternError(s.trim().to_string());
        if let Some((n, m)) = s.split_once(':') {
            let n = n.trim().parse().map_err(|_| bad())?;
            let m = m.trim().parse().map_err(|_| bad())?;
            return Ok(Pattern::NofM { n, m });
        }
        match s.split_whitespace().collect::<Vec<_>>()[..] {
            [v, "per", "row"] => v.parse().map(Pattern::Row).map_err(|_| bad()),
            [v, "per", "tensor"] => v.parse().map(Pattern::Tensor).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// How a pruned weight is derived from its operand.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneRule {
    pub pattern: Pattern,
    /// Per-input-column factors multiplying `|W_ij|` before ranking (Wanda's activation
    /// norms); `None` ranks by magnitude.
    pub column_scale: Option<Arc<[f32]>>,
}

impl PruneRule {
    /// Magnitude pruning with `pattern`.
    pub fn magnitude(pattern: Pattern) -> Self {
        PruneRule {
            pattern,
            column_scale: None,
        }
    }

    /// Why the rule cannot prune a weight of `shape`, if it cannot.
    pub fn check(&self, shape: &[usize]) -> Result<(), String> {
        let &[_, cols] = shape else {
            return Err(format!("pruning needs a 2-D weight, got shape {shape:?}"));
        };
        match self.pattern {
            Pattern::Row(s) | Pattern::Tensor(s) if !(0.0..1.0).contains(&s) => {
                return Err(format!("sparsity {s} is outside [0, 1)"));
            }
            Pattern::NofM { n, m } if m == 0 || n >= m => {
                return Err(format!("{n}:{m} must zero fewer than all of m > 0 entries"));
            }
            Pattern::NofM { m, .. } if cols % m != 0 => {
                return Err(format!(
                    "{} needs the input dimension ({cols}) to be a multiple of {m}",
                    self.pattern
                ));
            }
            _ => {}
        }
        match &self.column_scale {
            Some(scale) if scale.len() != cols => Err(format!(
                "{} column factors for {cols} input columns",
                scale.len()
            )),
            Some(scale) if scale.iter().any(|v| !v.is_finite() || *v < 0.0) => {
                Err("column factors must be finite and >= 0".into())
            }
            _ => Ok(()),
        }
    }

    /// The fraction of entries the rule zeroes in a weight of `shape` (checked).
    pub fn sparsity(&self, shape: &[usize]) -> f64 {
        let (rows, cols) = (shape[0], shape[1]);
        let zeroed = match self.pattern {
            Pattern::Row(s) => rows * (s * cols as f64).floor() as usize,
            Pattern::Tensor(s) => (s * (rows * cols) as f64).floor() as usize,
            Pattern::NofM { n, m } => rows * (cols / m) * n,
        };
        zeroed as f64 / (rows * cols).max(1) as f64
    }

    /// Zeroes the entries the rule selects in `values`, a row-major `[rows, cols]` matrix
    /// that [`check`](Self::check) accepted.
    pub fn apply(&self, values: &mut [f32], cols: usize) {
        let scores: Vec<f32> = match &self.column_scale {
            None => values.iter().map(|v| v.abs()).collect(),
            Some(scale) => values
                .iter()
                .enumerate()
                .map(|(i, v)| v.abs() * scale[i % cols])
                .collect(),
        };
        match self.pattern {
            Pattern::Tensor(s) => {
                let k = (s * values.len() as f64).floor() as usize;
                zero_lowest(values, &scores, k);
            }
            Pattern::Row(s) => {
                let k = (s * cols as f64).floor() as usize;
                for (row, score) in values.chunks_mut(cols).zip(scores.chunks(cols)) {
                    zero_lowest(row, score, k);
                }
            }
            Pattern::NofM { n, m } => {
                for (group, score) in values.chunks_mut(m).zip(scores.chunks(m)) {
                    zero_lowest(group, score, n);
                }
            }
        }
    }
}

/// Zeroes the `k` entries of `values` with the lowest `scores`, ties to the lower index.
fn zero_lowest(values: &mut [f32], scores: &[f32], k: usize) {
    if k == 0 {
        return;
    }
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    let key = |&i: &u32| (scores[i as usize], i);
    let less = |a: &u32, b: &u32| {
        let ((sa, ia), (sb, ib)) = (key(a), key(b));
        sa.total_cmp(&sb).then(ia.cmp(&ib))
    };
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, less);
    }
    for &i in &order[..k.min(order.len())] {
        values[i as usize] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_zero_the_lowest_with_ties_to_the_lower_index() {
        let mut v = vec![3.0, -1.0, 1.0, 2.0, /* row 2 */ 5.0, 5.0, 5.0, -5.0];
        PruneRule::magnitude(Pattern::Row(0.5)).apply(&mut v, 4);
        assert_eq!(v, [3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 5.0, -5.0]);
    }

    #[test]
    fn n_of_m_and_tensor_patterns() {
        let mut v = vec![4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0];
        PruneRule::magnitude(Pattern::NofM { n: 2, m: 4 }).apply(&mut v, 8);
        assert_eq!(v, [4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]);
        let mut v = vec![4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0];
        PruneRule::magnitude(Pattern::Tensor(0.3)).apply(&mut v, 4);
        assert_eq!(v, [4.0, 3.0, 2.0, 0.0, 0.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn column_factors_change_the_ranking() {
        let mut v = vec![1.0, 2.0];
        let rule = PruneRule {
            pattern: Pattern::Row(0.5),
            column_scale: Some(vec![10.0, 1.0].into()),
        };
        rule.apply(&mut v, 2);
        assert_eq!(v, [1.0, 0.0]);
    }

    #[test]
    fn patterns_parse_from_their_display() {
        for p in [
            Pattern::Row(0.5),
            Pattern::Tensor(0.125),
            Pattern::Row(1e-20),
            Pattern::NofM { n: 2, m: 4 },
        ] {
            assert_eq!(p.to_string().parse::<Pattern>(), Ok(p));
        }
        assert_eq!(
            " 2 : 4 ".parse::<Pattern>(),
            Ok(Pattern::NofM { n: 2, m: 4 })
        );
        assert!("0.5 per column".parse::<Pattern>().is_err());
        assert!("2:x".parse::<Pattern>().is_err());
    }

    #[test]
    fn bad_rules_say_why() {
        let rule = PruneRule::magnitude(Pattern::NofM { n: 2, m: 4 });
        assert!(rule.check(&[2, 6]).unwrap_err().contains("multiple of 4"));
        let rule = PruneRule::magnitude(Pattern::Row(1.0));
        assert!(rule.check(&[2, 4]).unwrap_err().contains("outside [0, 1)"));
        assert!(rule.check(&[8]).unwrap_err().contains("2-D"));
    }
}
