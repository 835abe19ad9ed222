//! Non-finite values (NaN, +-Inf) in weights.
//!
//! Two uses: counting them in a weight ([`WeightTable::count_non_finite`], for checking
//! checkpoints), and refusing computed values that are non-finite although their inputs
//! are finite. The latter runs whenever [`WeightTable::materialize`] computes something
//! that can overflow: a mean, weighted sum or scale, or a rounding to a narrower dtype
//! (f32 values above 65504 become Inf in f16). It costs one pass over the output; only
//! when that pass finds a non-finite value are the inputs read again, to tell values
//! that were already NaN or Inf (passed through, reported where they are read) from
//! values the computation produced (an error naming the weight and the expression).
//! Plain reads of a checkpoint's own values are never checked here.

use crate::{DType, Weight, WeightError, WeightExpr, WeightId, WeightTable};

/// Counts of NaN and infinite values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NonFinite {
    pub nan: usize,
    pub inf: usize,
}

impl NonFinite {
    /// Counts the NaN and infinite values of `values` in one pass.
    pub fn of(values: &[f32]) -> NonFinite {
        // A branch-free count first (vectorised): almost every tensor has none.
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad == 0 {
            return NonFinite::default();
        }
        let nan = values.iter().filter(|v| v.is_nan()).count();
        NonFinite {
            nan,
            inf: bad - nan,
        }
    }

    /// Whether any value is NaN or infinite.
    pub fn any(&self) -> bool {
        self.nan + self.inf > 0
    }
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} NaN, {} Inf", self.nan, self.inf)
    }
}

impl WeightTable {
    /// NaN and infinite values of a weight: of a source, the values its file holds (before
    /// any rounding to another dtype); of any other weight, its materialised values (a
    /// computation that overflows is an error, as in [`materialize`](Self::materialize)).
    pub fn count_non_finite(&self, id: WeightId) -> Result<NonFinite, WeightError> {
        let weight = self.get(id)?;
        let values = match &weight.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype: dtype @ (DType::F32 | DType::F16 | DType::BF16),
            } => {
                let len = dtype.nbytes(&weight.shape).unwrap_or(0);
                return scan_floats(file, *offset, len, *dtype)
                    .map_err(|e| Self::invalid(weight, format!("reading: {e}")));
            }
            WeightExpr::Source { .. } => self.eval(weight)?,
            _ => self.materialize(id)?.data,
        };
        Ok(NonFinite::of(&values))
    }

    /// The `Source` weights that `ids` are or are computed from, each once, in the order
    /// first reached (a checkpoint's own tensors behind a graph's weights).
    pub fn source_weights(&self, ids: &[WeightId]) -> Vec<WeightId> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut stack: Vec<WeightId> = ids.iter().rev().copied().collect();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Ok(w) = self.get(id) else { continue };
            match &w.expr {
                WeightExpr::Source { .. } => out.push(id),
                expr => stack.extend(expr.operands().into_iter().rev()),
            }
        }
        out
    }

    /// Checks `data`, the materialised values of `weight`, when its expression can
    /// overflow: an error when the computation turned finite inputs into NaN or Inf.
    pub(crate) fn check_computed(&self, weight: &Weight, data: &[f32]) -> Result<(), WeightError> {
        if !self.can_overflow(weight)? || !NonFinite::of(data).any() {
            return Ok(());
        }
        let inputs = self.inputs_of(weight)?;
        let mut new = NonFinite::default();
        for (i, v) in data.iter().enumerate() {
            if !v.is_finite() && inputs.iter().all(|x| x[i].is_finite()) {
                if v.is_nan() {
                    new.nan += 1;
                } else {
                    new.inf += 1;
                }
            }
        }
        if !new.any() {
            return Ok(());
        }
        Err(WeightError::NonFinite {
            name: weight.name.clone(),
            expr: self.describe(weight),
            nan: new.nan,
            inf: new.inf,
        })
    }

    /// Checks the encoding of finite `values` of `weight` as `dtype` when that is
    /// narrower than the weight's own dtype (rounding never makes a non-finite value
    /// finite, so new non-finite values show as a larger count).
    pub(crate) fn check_encoding(
        &self,
        weight: &Weight,
        values: &[f32],
        dtype: DType,
    ) -> Result<(), WeightError> {
        if !narrows(dtype, weight.dtype.plain()) {
            return Ok(());
        }
        let mut rounded = values.to_vec();
        dtype.round_in_place(&mut rounded, weight.cols());
        let (before, after) = (NonFinite::of(values), NonFinite::of(&rounded));
        if after == before {
            return Ok(());
        }
        Err(WeightError::NonFinite {
            name: weight.name.clone(),
            expr: format!("encoding {} values as {}", weight.dtype, range_of(dtype)),
            nan: after.nan - before.nan,
            inf: after.inf - before.inf,
        })
    }

    /// Whether materialising `weight` computes values that may overflow.
    fn can_overflow(&self, weight: &Weight) -> Result<bool, WeightError> {
        let to = weight.dtype;
        Ok(match &weight.expr {
            WeightExpr::Mean(_) | WeightExpr::WeightedSum { .. } | WeightExpr::Scale(..) => true,
            WeightExpr::Source { dtype, .. } => narrows(to, *dtype),
            WeightExpr::Literal(_) | WeightExpr::Random { .. } => narrows(to, DType::F32),
            WeightExpr::Rows(id, _)
            | WeightExpr::Columns { of: id, .. }
            | WeightExpr::Pruned { of: id, .. } => narrows(to, self.get(*id)?.dtype),
            WeightExpr::Concat(ids) => {
                let mut any = false;
                for id in ids {
                    any |= narrows(to, self.get(*id)?.dtype);
                }
                any
            }
        })
    }

    /// The values `weight` is computed from, each as long as the weight: its operands for
    /// arithmetic, else its own values before rounding to its dtype.
    fn inputs_of(&self, weight: &Weight) -> Result<Vec<Vec<f32>>, WeightError> {
        if !matches!(
            weight.expr,
            WeightExpr::Mean(_) | WeightExpr::WeightedSum { .. } | WeightExpr::Scale(..)
        ) {
            return Ok(vec![self.eval(weight)?]);
        }
        weight
            .expr
            .operands()
            .into_iter()
            .map(|id| Ok(self.materialize(id)?.data))
            .collect()
    }

    /// The computation of `weight`, for error messages: operands by name, with their
    /// file when read from one (operands of different models often share a name).
    fn describe(&self, weight: &Weight) -> String {
        let name = |id: &WeightId| match self.get(*id) {
            Ok(w) => match &w.expr {
                WeightExpr::Source { file, .. } => {
                    format!("`{}` ({})", w.name, file.path().display())
                }
                _ => format!("`{}`", w.name),
            },
            Err(_) => format!("{id:?}"),
        };
        let what = match &weight.expr {
            WeightExpr::Mean(ids) => {
                let names: Vec<String> = ids.iter().map(name).collect();
                format!("the mean of {}", names.join(", "))
            }
            WeightExpr::WeightedSum { terms, normalize } => {
                let terms: Vec<String> = terms
                    .iter()
                    .map(|(f, id)| format!("{f} * {}", name(id)))
                    .collect();
                let kind = if *normalize { "normalised " } else { "" };
                format!("the {kind}weighted sum {}", terms.join(" + "))
            }
            WeightExpr::Scale(factor, id) => format!("scaling {} by {factor}", name(id)),
            _ => return format!("rounding to {}", range_of(weight.dtype)),
        };
        if narrows(weight.dtype, DType::F32) {
            format!("{what}, rounded to {},", range_of(weight.dtype))
        } else {
            what
        }
    }
}

/// Whether rounding values of dtype `from` to `to` can overflow.
fn narrows(to: DType, from: DType) -> bool {
    match to {
        DType::F16 => from != DType::F16,
        // bf16 has f32's range, but rounding the largest f32 values up overflows.
        DType::BF16 => !matches!(from, DType::F16 | DType::BF16),
        // ggml's block scales are f16: a block of huge values overflows its scale.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => from != to,
        _ => false,
    }
}

/// A dtype's name with its largest finite magnitude.
fn range_of(dtype: DType) -> String {
    match dtype {
        DType::F16 => "f16 (largest finite magnitude 65504)".into(),
        DType::BF16 => "bf16 (largest finite magnitude 3.39e38)".into(),
        other => other.to_string(),
    }
}

/// Counts NaN and infinite values of a plain float tensor straight from its file bytes,
/// a few MB at a time (no conversion, no whole-tensor buffer): a value is non-finite when
/// its exponent bits are all set, and NaN when its mantissa is not zero as well.
fn scan_floats(
    file: &crate::MappedFile,
    offset: usize,
    len: usize,
    dtype: DType,
) -> std::io::Result<NonFinite> {
    const CHUNK: usize = 8 << 20;
    let (size, exponent, mantissa): (usize, u32, u32) = match dtype {
        DType::F32 => (4, 0x7f80_0000, 0x007f_ffff),
        DType::F16 => (2, 0x7c00, 0x03ff),
        _ => (2, 0x7f80, 0x007f),
    };
    let mut count = NonFinite::default();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK);
        let bytes = file.read(offset + at, n)?;
        let bits = |c: &[u8]| match size {
            4 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            _ => u16::from_le_bytes([c[0], c[1]]) as u32,
        };
        let bad = bytes
            .chunks_exact(size)
            .filter(|c| bits(c) & exponent == exponent)
            .count();
        if bad > 0 {
            let nan = bytes
                .chunks_exact(size)
                .filter(|c| bits(c) & exponent == exponent && bits(c) & mantissa != 0)
                .count();
            count.nan += nan;
            count.inf += bad - nan;
        }
        at += n;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::HostTensor;

    fn literal(t: &mut WeightTable, name: &str, values: Vec<f32>, dtype: DType) -> WeightId {
        t.add(Weight {
            name: name.into(),
            shape: vec![values.len()],
            dtype,
            expr: WeightExpr::Literal(Arc::new(HostTensor::new(vec![values.len()], values))),
        })
        .unwrap()
    }

    #[test]
    fn counts_nan_and_inf_apart() {
        let v = [1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0];
        assert_eq!(NonFinite::of(&v), NonFinite { nan: 1, inf: 2 });
        assert!(!NonFinite::of(&[1.0, 2.0]).any());
    }

    #[test]
    fn overflowing_sum_is_an_error_naming_weight_and_expression() {
        let mut t = WeightTable::new();
        let a = literal(&mut t, "a", vec![3e38, 1.0], DType::F32);
        let b = literal(&mut t, "b", vec![3e38, 1.0], DType::F32);
        let sum = t
            .add(Weight {
                name: "sum".into(),
                shape: vec![2],
                dtype: DType::F32,
                expr: WeightExpr::WeightedSum {
                    terms: vec![(1.0, a), (1.0, b)],
                    normalize: false,
                },
            })
            .unwrap();
        let err = t.materialize(sum).unwrap_err().to_string();
        assert_eq!(
            err,
            "weight `sum`: the weighted sum 1 * `a` + 1 * `b` turns finite values into 0 NaN and 1 Inf"
        );
    }

    #[test]
    fn non_finite_inputs_pass_through_and_f16_overflow_does_not() {
        let mut t = WeightTable::new();
        let a = literal(&mut t, "a", vec![f32::NAN, 1.0], DType::F32);
        let mean = t
            .add(Weight {
                name: "mean".into(),
                shape: vec![2],
                dtype: DType::F32,
                expr: WeightExpr::Mean(vec![a, a]),
            })
            .unwrap();
        assert!(t.materialize(mean).unwrap().data[0].is_nan());
        let big = literal(&mut t, "big", vec![1e6, 1.0], DType::F16);
        let err = t.materialize(big).unwrap_err().to_string();
        assert!(err.contains("weight `big`: rounding to f16"), "{err}");
        assert!(err.contains("0 NaN and 1 Inf"), "{err}");
        assert_eq!(t.count_non_finite(a).unwrap(), NonFinite { nan: 1, inf: 0 });
    }

    #[test]
    fn sources_are_counted_from_their_bytes_in_every_float_dtype() {
        let dir = std::env::temp_dir().join(format!("upmix-finite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases: [(DType, Vec<u8>); 3] = [
            // 1.0, NaN, +Inf, -Inf, 2.0
            (
                DType::F32,
                [1.0f32, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                DType::F16,
                [0x3c00u16, 0x7e00, 0x7c00, 0xfc00, 0x4000]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                DType::BF16,
                [0x3f80u16, 0x7fc0, 0x7f80, 0xff80, 0x4000]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        for (dtype, bytes) in cases {
            let path = dir.join(format!("{dtype}.bin"));
            // Two bytes in front, so the tensor starts at an offset.
            std::fs::write(&path, [&[0u8, 0][..], &bytes].concat()).unwrap();
            let mut t = WeightTable::new();
            let id = t
                .add(Weight {
                    name: "w".into(),
                    shape: vec![5],
                    dtype,
                    expr: WeightExpr::Source {
                        file: crate::MappedFile::open(&path).unwrap(),
                        offset: 2,
                        dtype,
                    },
                })
                .unwrap();
            let count = t.count_non_finite(id).unwrap();
            assert_eq!(count, NonFinite { nan: 1, inf: 2 }, "{dtype}");
            // The same as counting the materialised values.
            assert_eq!(
                count,
                NonFinite::of(&t.materialize(id).unwrap().data),
                "{dtype}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
