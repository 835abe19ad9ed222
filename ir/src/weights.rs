//! The lazy weight table.
//!
//! Every parameter of every graph in a [`crate::Module`] lives in one [`WeightTable`] as a
//! [`WeightExpr`]: a byte range of a memory-mapped checkpoint, or an expression over other
//! weights (mean, weighted sum, scale) or a literal. Passes build expressions; nothing is
//! read or computed until a runtime or an emitter calls [`WeightTable::materialize`], one
//! tensor at a time, so the whole model never needs to be in memory at once. Computed
//! values that overflow to NaN or Inf are an error (see [`crate::NonFinite`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use thiserror::Error;

use crate::{DType, HostTensor, PruneRule};

/// `len` bytes at `offset` of a file.
pub type FileRange = (Arc<MappedFile>, usize, usize);

/// Index of a weight in a [`WeightTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WeightId(pub u32);

/// A read-only memory-mapped checkpoint file.
pub struct MappedFile {
    path: PathBuf,
    file: std::fs::File,
    map: Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Arc<MappedFile>> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only; upmix never writes to its inputs (emitters refuse
        // to write over an input), so the mapped bytes do not change under us unless another
        // process truncates the file, which is the usual caveat of every mmap-based loader.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Arc::new(MappedFile {
            path: path.to_path_buf(),
            file,
            map,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The open file (e.g. for copying byte ranges file to file).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Reads `len` bytes at `offset` into a new buffer. Weights are read this way rather
    /// than through the map: a read copies straight from the page cache, without faulting
    /// every page into this process, so streaming a model leaves resident memory at the
    /// tensors in flight.
    pub fn read(&self, offset: usize, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        #[cfg(unix)]
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut buf, offset as u64)?;
        #[cfg(not(unix))]
        buf.copy_from_slice(&self.map[offset..offset + len]);
        Ok(buf)
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedFile({})", self.path.display())
    }
}

/// How a weight's values are obtained.
#[derive(Clone, Debug)]
pub enum WeightExpr {
    /// `dtype.nbytes(shape)` bytes at `offset` in `file`, stored as `dtype`.
    Source {
        file: Arc<MappedFile>,
        offset: usize,
        dtype: DType,
    },
    /// Element-wise mean of same-shape weights.
    Mean(Vec<WeightId>),
    /// `sum_i w_i * t_i`, divided by `sum_i w_i` when `normalize` is set (mergekit's
    /// `linear` method computes exactly this, in this order).
    WeightedSum {
        terms: Vec<(f32, WeightId)>,
        normalize: bool,
    },
    /// `factor * t`.
    Scale(f32, WeightId),
    /// Values held in memory.
    Literal(Arc<HostTensor>),
    /// Rows of a 2-D weight, reordered: row `i` of the result is row `rows[i]` of the
    /// operand (e.g. undoing a checkpoint format's permutation of attention heads).
    Rows(WeightId, Arc<[u32]>),
    /// Columns `start..start + width` of a 2-D weight, `width` being the result's second
    /// dimension (e.g. one shard of a down projection split along its input dimension).
    Columns { of: WeightId, start: usize },
    /// Normal samples `N(0, std^2)` from a generator seeded with `seed` (SplitMix64 bits,
    /// Box-Muller), so the same seed always gives the same tensor.
    Random { seed: u64, std: f32 },
    /// The operands' values one after another (row-major), e.g. per-expert matrices
    /// stacked into one `[experts, rows, cols]` tensor; the element counts must add up.
    Concat(Vec<WeightId>),
    /// A 2-D weight with the entries `rule` selects set to zero (module `sparsity`).
    Pruned { of: WeightId, rule: Arc<PruneRule> },
}

impl WeightExpr {
    /// The weights this expression reads, in order (none for sources, literals and
    /// random samples).
    pub fn operands(&self) -> Vec<WeightId> {
        match self {
            WeightExpr::Source { .. } | WeightExpr::Literal(_) | WeightExpr::Random { .. } => {
                Vec::new()
            }
            WeightExpr::Mean(ids) | WeightExpr::Concat(ids) => ids.clone(),
            WeightExpr::WeightedSum { terms, .. } => terms.iter().map(|(_, id)| *id).collect(),
            WeightExpr::Scale(_, id) | WeightExpr::Rows(id, _) => vec![*id],
            WeightExpr::Columns { of, .. } | WeightExpr::Pruned { of, .. } => vec![*of],
        }
    }
}

/// One entry of the weight table.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Canonical name (e.g. `layers.0.attn.q`), used in errors and printouts.
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype the weight is stored in: materialised values are rounded to it, and
    /// emitters write it.
    pub dtype: DType,
    pub expr: WeightExpr,
}

impl Weight {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of a row (the last dimension; 1 for a scalar): quantized storage runs along
    /// rows.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes the weight takes when stored in its dtype (a whole number of blocks: checked
    /// when the weight is added to a table).
    pub fn nbytes(&self) -> usize {
        self.dtype.nbytes(&self.shape).unwrap_or(0)
    }
}

/// Errors building or materialising weights.
#[derive(Debug, Error)]
pub enum WeightError {
    #[error("weight {0:?} does not exist in the weight table")]
    Missing(WeightId),
    #[error("weight `{name}`: {message}")]
    Invalid { name: String, message: String },
    /// A computation turned finite inputs into NaN or Inf values.
    #[error("weight `{name}`: {expr} turns finite values into {nan} NaN and {inf} Inf")]
    NonFinite {
        name: String,
        /// What was computed, e.g. "rounding to f16".
        expr: String,
        nan: usize,
        inf: usize,
    },
}

/// All weights of a module.
#[derive(Clone, Debug, Default)]
pub struct WeightTable {
    weights: Vec<Weight>,
}

impl WeightTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a weight after checking its expression against its shape.
    pub fn add(&mut self, weight: Weight) -> Result<WeightId, WeightError> {
        self.check(&weight)?;
        let id = WeightId(self.weights.len() as u32);
        self.weights.push(weight);
        Ok(id)
    }

    /// Adds a literal f32 weight.
    pub fn literal(&mut self, name: &str, tensor: HostTensor) -> Result<WeightId, WeightError> {
        self.add(Weight {
            name: name.to_string(),
            shape: tensor.shape.clone(),
            dtype: DType::F32,
            expr: WeightExpr::Literal(Arc::new(tensor)),
        })
    }

    pub fn get(&self, id: WeightId) -> Result<&Weight, WeightError> {
        self.weights
            .get(id.0 as usize)
            .ok_or(WeightError::Missing(id))
    }

    pub fn get_mut(&mut self, id: WeightId) -> Result<&mut Weight, WeightError> {
        self.weights
            .get_mut(id.0 as usize)
            .ok_or(WeightError::Missing(id))
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    pub(crate) fn invalid(weight: &Weight, message: String) -> WeightError {
        WeightError::Invalid {
            name: weight.name.clone(),
            message,
        }
    }

    /// Computes a weight's values in f32, rounded to the weight's dtype (a quantized
    /// source is dequantized). Computed values that are NaN or Inf although their inputs
    /// are finite (an overflowing sum, a value beyond the range of f16) are an error.
    pub fn materialize(&self, id: WeightId) -> Result<HostTensor, WeightError> {
        let weight = self.get(id)?;
        if weight.dtype.is_quantized() {
            if let Some(bytes) = self.stored_bytes(weight, weight.dtype)? {
                // Values rearranged from stored ones are exact: decode, do not re-round.
                let mut data = Vec::with_capacity(weight.numel());
                weight.dtype.decode(&bytes, weight.cols(), &mut data);
                return Ok(HostTensor::new(weight.shape.clone(), data));
            }
        }
        let mut data = self.eval(weight)?;
        weight.dtype.round_in_place(&mut data, weight.cols());
        self.check_computed(weight, &data)?;
        Ok(HostTensor::new(weight.shape.clone(), data))
    }

    /// The weight's bytes in its stored dtype. A source read in its own dtype is copied
    /// byte for byte, so a load -> emit round trip is bit-identical.
    pub fn materialize_bytes(&self, id: WeightId) -> Result<Vec<u8>, WeightError> {
        self.materialize_bytes_as(id, self.get(id)?.dtype)
    }

    /// The weight's bytes encoded as `dtype`. Bytes already stored as `dtype` (a source
    /// in that dtype, or rows or parts of such sources) are copied, never re-encoded, so a
    /// load -> emit round trip is bit-identical; other values are computed in f32 and
    /// encoded (quantized types: quantized).
    pub fn materialize_bytes_as(&self, id: WeightId, dtype: DType) -> Result<Vec<u8>, WeightError> {
        let weight = self.get(id)?;
        if let Some(bytes) = self.stored_bytes(weight, dtype)? {
            return Ok(bytes);
        }
        if !dtype.can_encode() {
            return Err(Self::invalid(
                weight,
                format!("upmix cannot encode values as {dtype} (it reads K-quants only)"),
            ));
        }
        if dtype.nbytes(&weight.shape).is_none() {
            return Err(Self::invalid(
                weight,
                format!(
                    "rows of {} elements are not a whole number of {dtype} blocks",
                    weight.cols()
                ),
            ));
        }
        // A weight stored in a quantized `dtype` is quantized from its unrounded values
        // (quantizing its dequantized values again could move them); the check is of the
        // quantized encoding.
        let values = if weight.dtype == dtype && dtype.is_quantized() {
            let data = self.eval(weight)?;
            self.check_computed(weight, &data)?;
            let plain = Weight {
                dtype: DType::F32,
                ..weight.clone()
            };
            self.check_encoding(&plain, &data, dtype)?;
            data
        } else {
            let data = self.materialize(id)?.data;
            self.check_encoding(weight, &data, dtype)?;
            data
        };
        let mut out = Vec::new();
        dtype.encode(&values, weight.cols(), &mut out);
        Ok(out)
    }

    /// The weight's bytes in `dtype` when they exist without computing: a source stored
    /// as `dtype`, rows of one, or a concatenation of such (whole rows each). `None` when
    /// values must be computed and encoded.
    fn stored_bytes(&self, weight: &Weight, dtype: DType) -> Result<Option<Vec<u8>>, WeightError> {
        if weight.dtype != dtype {
            return Ok(None);
        }
        match &weight.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype: stored,
            } if *stored == dtype => Self::read(weight, file, *offset, weight.nbytes()).map(Some),
            WeightExpr::Rows(of, rows) => {
                let operand = self.get(*of)?;
                let Some(src) = self.stored_bytes(operand, dtype)? else {
                    return Ok(None);
                };
                let row = src.len() / operand.shape[0].max(1);
                let mut out = Vec::with_capacity(rows.len() * row);
                for &r in rows.iter() {
                    out.extend_from_slice(&src[r as usize * row..(r as usize + 1) * row]);
                }
                Ok(Some(out))
            }
            WeightExpr::Concat(ids) => {
                let mut out = Vec::with_capacity(weight.nbytes());
                for id in ids {
                    let operand = self.get(*id)?;
                    // Quantized rows must stay whole: operands of the result's row length.
                    if dtype.is_quantized() && operand.cols() != weight.cols() {
                        return Ok(None);
                    }
                    match self.stored_bytes(operand, dtype)? {
                        Some(bytes) => out.extend(bytes),
                        None => return Ok(None),
                    }
                }
                Ok(Some(out))
            }
            _ => Ok(None),
        }
    }

    fn read(
        weight: &Weight,
        file: &MappedFile,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, WeightError> {
        file.read(offset, len)
            .map_err(|e| Self::invalid(weight, format!("reading {}: {e}", file.path().display())))
    }

    /// Where the weight's bytes encoded as `dtype` already lie in its input files: byte
    /// ranges `(file, offset, len)` whose concatenation is exactly what
    /// [`materialize_bytes_as`](Self::materialize_bytes_as) returns, or `None` when the
    /// bytes must be computed. Lets an emitter copy them file to file.
    pub fn file_ranges(
        &self,
        id: WeightId,
        dtype: DType,
    ) -> Result<Option<Vec<FileRange>>, WeightError> {
        let weight = self.get(id)?;
        Ok(match &weight.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype: stored,
            } if *stored == dtype && weight.dtype == dtype => {
                Some(vec![(file.clone(), *offset, weight.nbytes())])
            }
            WeightExpr::Concat(ids) if weight.dtype == dtype => {
                let mut out = Vec::new();
                for id in ids {
                    if dtype.is_quantized() && self.get(*id)?.cols() != weight.cols() {
                        return Ok(None);
                    }
                    match self.file_ranges(*id, dtype)? {
                        Some(r) => out.extend(r),
                        None => return Ok(None),
                    }
                }
                Some(out)
            }
            _ => None,
        })
    }

    /// Evaluates an expression in f32 (operands rounded to their own dtypes).
    pub(crate) fn eval(&self, weight: &Weight) -> Result<Vec<f32>, WeightError> {
        Ok(match &weight.expr {
            WeightExpr::Source {
                file,
                offset,
                dtype,
            } => {
                let len = dtype.nbytes(&weight.shape).unwrap_or(0);
                let mut out = Vec::new();
                dtype.decode(
                    &Self::read(weight, file, *offset, len)?,
                    weight.cols(),
                    &mut out,
                );
                out
            }
            WeightExpr::Literal(t) => t.data.clone(),
            WeightExpr::Random { seed, std } => normal_samples(*seed, *std, weight.numel()),
            WeightExpr::Concat(ids) => {
                let mut out = Vec::with_capacity(weight.numel());
                for id in ids {
                    out.extend(self.materialize(*id)?.data);
                }
                out
            }
            WeightExpr::Rows(id, rows) => {
                let src = self.materialize(*id)?;
                let cols = src.shape[1];
                let mut out = Vec::with_capacity(rows.len() * cols);
                for r in rows.iter() {
                    out.extend_from_slice(src.row(*r as usize));
                }
                out
            }
            WeightExpr::Columns { of, start } => {
                let src = self.materialize(*of)?;
                let width = weight.shape[1];
                let mut out = Vec::with_capacity(weight.numel());
                for r in 0..src.shape[0] {
                    out.extend_from_slice(&src.row(r)[*start..*start + width]);
                }
                out
            }
            WeightExpr::Pruned { of, rule } => {
                let mut v = self.materialize(*of)?.data;
                rule.apply(&mut v, weight.shape[1]);
                v
            }
            WeightExpr::Scale(factor, id) => {
                let mut v = self.materialize(*id)?.data;
                v.iter_mut().for_each(|x| *x *= factor);
                v
            }
            WeightExpr::Mean(ids) => {
                let terms: Vec<(f32, WeightId)> = ids.iter().map(|id| (1.0, *id)).collect();
                self.weighted_sum(weight, &terms, true)?
            }
            WeightExpr::WeightedSum { terms, normalize } => {
                self.weighted_sum(weight, terms, *normalize)?
            }
        })
    }

    fn weighted_sum(
        &self,
        weight: &Weight,
        terms: &[(f32, WeightId)],
        normalize: bool,
    ) -> Result<Vec<f32>, WeightError> {
        let mut acc = vec![0f32; weight.numel()];
        for (w, id) in terms {
            let t = self.materialize(*id)?;
            acc.iter_mut().zip(&t.data).for_each(|(a, x)| *a += w * x);
        }
        if normalize {
            let total: f32 = terms.iter().map(|(w, _)| w).sum();
            acc.iter_mut().for_each(|a| *a /= total);
        }
        Ok(acc)
    }
}

/// The next 64 bits of SplitMix64 (Steele, Lea and Flood 2014) from `state`, which it
/// advances: the seeded generator of random weights and of training's data order.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` samples of `N(0, std^2)`: SplitMix64 supplies uniform bits, Box-Muller turns each
/// pair into two normals. The values of [`WeightExpr::Random`].
pub fn normal_samples(seed: u64, std: f32, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = move || {
        let z = splitmix64(&mut state);
        // 53 random bits in (0, 1]: never 0, so the logarithm below is finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32 * std);
        out.push((r * theta.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}
