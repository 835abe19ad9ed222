//! Checking a weight before it joins a [`WeightTable`].
//!
//! [`WeightTable::add`] calls [`WeightTable::check`], which refuses a weight whose rows are
//! not a whole number of its dtype's blocks, and one whose expression does not fit its
//! shape: a source's byte range must lie inside its file, a literal must have the weight's
//! shape, a random weight a finite `std >= 0`, a concatenation the weight's element count,
//! rows and columns must be taken from inside a 2-D operand, a pruning rule must accept
//! the shape, and element-wise expressions (mean, weighted sum, scale, pruning) need
//! operands of the weight's shape, at least one, with weights that do not sum to zero when
//! normalised. Every operand must already be in the table.

use crate::{
    DType, HostTensor, MappedFile, PruneRule, Weight, WeightError, WeightExpr, WeightId,
    WeightTable,
};

impl WeightTable {
    /// Checks that an expression fits the weight's shape and that its operands exist.
    pub fn check(&self, weight: &Weight) -> Result<(), WeightError> {
        Self::check_whole_blocks(weight)?;
        match &weight.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype,
            } => Self::check_source(weight, file, *offset, *dtype),
            WeightExpr::Literal(t) => Self::check_literal(weight, t),
            WeightExpr::Random { std, .. } => Self::check_random(weight, *std),
            WeightExpr::Concat(ids) => self.check_concat(weight, ids),
            WeightExpr::Mean(ids) => self.check_operands(weight, ids),
            WeightExpr::WeightedSum { terms, normalize } => {
                self.check_weighted_sum(weight, terms, *normalize)
            }
            WeightExpr::Scale(_, id) => self.check_operand_shapes(weight, &[*id]),
            WeightExpr::Columns { of, start } => self.check_columns(weight, *of, *start),
            WeightExpr::Pruned { of, rule } => self.check_pruned(weight, *of, rule),
            WeightExpr::Rows(id, rows) => self.check_rows(weight, *id, rows),
        }
    }

    /// The weight's rows are a whole number of its dtype's blocks.
    fn check_whole_blocks(weight: &Weight) -> Result<(), WeightError> {
        if weight.dtype.nbytes(&weight.shape).is_none() {
            return Err(Self::invalid(
                weight,
                format!(
                    "rows of {} elements are not a whole number of {} blocks",
                    weight.cols(),
                    weight.dtype
                ),
            ));
        }
        Ok(())
    }

    /// The source's bytes, stored as `dtype`, lie inside its file.
    fn check_source(
        weight: &Weight,
        file: &MappedFile,
        offset: usize,
        dtype: DType,
    ) -> Result<(), WeightError> {
        let len = dtype.nbytes(&weight.shape).ok_or_else(|| {
            Self::invalid(weight, format!("not a whole number of {dtype} blocks"))
        })?;
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > file.bytes().len()) {
            return Err(Self::invalid(
                weight,
                format!(
                    "bytes {offset}..{offset}+{len} run past the end of {} ({} bytes)",
                    file.path().display(),
                    file.bytes().len()
                ),
            ));
        }
        Ok(())
    }

    /// The literal has the weight's shape.
    fn check_literal(weight: &Weight, t: &HostTensor) -> Result<(), WeightError> {
        if t.shape != weight.shape {
            return Err(Self::invalid(
                weight,
                format!(
                    "literal has shape {:?}, weight has {:?}",
                    t.shape, weight.shape
                ),
            ));
        }
        Ok(())
    }

    /// The random weight's `std` is finite and not negative.
    fn check_random(weight: &Weight, std: f32) -> Result<(), WeightError> {
        if !std.is_finite() || std < 0.0 {
            return Err(Self::invalid(
                weight,
                format!("std {std} must be finite and >= 0"),
            ));
        }
        Ok(())
    }

    /// The operands exist and their element counts add up to the weight's (at least one).
    fn check_concat(&self, weight: &Weight, ids: &[WeightId]) -> Result<(), WeightError> {
        let mut total = 0usize;
        for id in ids {
            total += self.get(*id)?.numel();
        }
        if ids.is_empty() || total != weight.numel() {
            return Err(Self::invalid(
                weight,
                format!(
                    "concatenates {} elements into shape {:?} ({} elements)",
                    total,
                    weight.shape,
                    weight.numel()
                ),
            ));
        }
        Ok(())
    }

    /// A weighted sum's operands, and weights that do not sum to zero when normalised.
    fn check_weighted_sum(
        &self,
        weight: &Weight,
        terms: &[(f32, WeightId)],
        normalize: bool,
    ) -> Result<(), WeightError> {
        let ids: Vec<WeightId> = terms.iter().map(|(_, id)| *id).collect();
        self.check_operands(weight, &ids)?;
        if normalize {
            let total: f32 = terms.iter().map(|(w, _)| w).sum();
            if total == 0.0 {
                return Err(Self::invalid(
                    weight,
                    "weights sum to zero, cannot normalise".into(),
                ));
            }
        }
        Ok(())
    }

    /// An element-wise expression has at least one operand, each of the weight's shape.
    fn check_operands(&self, weight: &Weight, ids: &[WeightId]) -> Result<(), WeightError> {
        if ids.is_empty() {
            return Err(Self::invalid(weight, "expression has no operands".into()));
        }
        self.check_operand_shapes(weight, ids)
    }

    /// Every operand exists and has the weight's shape.
    fn check_operand_shapes(&self, weight: &Weight, ids: &[WeightId]) -> Result<(), WeightError> {
        for id in ids {
            let operand = self.get(*id)?;
            if operand.shape != weight.shape {
                return Err(Self::invalid(
                    weight,
                    format!(
                        "operand `{}` has shape {:?}, expected {:?}",
                        operand.name, operand.shape, weight.shape
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The weight is columns `start..` of a 2-D operand with as many rows.
    fn check_columns(
        &self,
        weight: &Weight,
        of: WeightId,
        start: usize,
    ) -> Result<(), WeightError> {
        let operand = self.get(of)?;
        let bad = operand.shape.len() != 2
            || weight.shape.len() != 2
            || weight.shape[0] != operand.shape[0]
            || start + weight.shape[1] > operand.shape[1];
        if bad {
            return Err(Self::invalid(
                weight,
                format!(
                    "cannot take columns {start}..{} of `{}` {:?} as shape {:?}",
                    start + weight.shape.get(1).copied().unwrap_or(0),
                    operand.name,
                    operand.shape,
                    weight.shape
                ),
            ));
        }
        Ok(())
    }

    /// The rule accepts the weight's shape, and the operand has that shape.
    fn check_pruned(
        &self,
        weight: &Weight,
        of: WeightId,
        rule: &PruneRule,
    ) -> Result<(), WeightError> {
        rule.check(&weight.shape)
            .map_err(|m| Self::invalid(weight, m))?;
        self.check_operand_shapes(weight, &[of])
    }

    /// The weight is `rows` (each in range) of a 2-D operand, as wide as the operand.
    fn check_rows(&self, weight: &Weight, id: WeightId, rows: &[u32]) -> Result<(), WeightError> {
        let operand = self.get(id)?;
        let bad = operand.shape.len() != 2
            || weight.shape.len() != 2
            || weight.shape != [rows.len(), operand.shape[1]]
            || rows.iter().any(|r| *r as usize >= operand.shape[0]);
        if bad {
            return Err(Self::invalid(
                weight,
                format!(
                    "cannot take {} rows of `{}` {:?} as shape {:?}",
                    rows.len(),
                    operand.name,
                    operand.shape,
                    weight.shape
                ),
            ));
        }
        Ok(())
    }
}
