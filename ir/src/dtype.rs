//! Element types of stored weights and their byte encodings.

/// The element type a weight is stored in (in a checkpoint file, or when emitted).
/// Computation always happens in f32; a weight's dtype says how it is stored.
///
/// Besides plain floats, the block-quantized formats of ggml (as found in GGUF files):
/// values are stored in blocks of 32 or 256 with per-block scales; and weight-only int8
/// with one scale per row ([`DType::Int8PerChannel`]). See [`crate::quant`].
///
/// Quantized storage runs along rows: every row (the last dimension) is a whole number of
/// blocks, as ggml requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q5K,
    Q6K,
    /// Weight-only int8 per output channel: each row stores its f32 scale
    /// `absmax / 127`, then its values `round(x / scale)` as i8 (ties to even).
    Int8PerChannel,
}

impl DType {
    /// `(elements, bytes)` of one storage block (1 element for plain floats). An
    /// [`Int8PerChannel`](DType::Int8PerChannel) block is a whole row plus its scale: see
    /// [`row_bytes`](DType::row_bytes); here it counts as one byte per element.
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 => (1, 4),
            DType::Int8PerChannel => (1, 1),
            DType::F16 | DType::BF16 => (1, 2),
            DType::Q8_0 => (32, 34),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
        }
    }

    /// Bytes of one row of `cols` elements, or `None` when `cols` is not a whole number of
    /// blocks (or overflows).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        let blocks = cols
            .is_multiple_of(elems)
            .then(|| (cols / elems).checked_mul(bytes))??;
        match self {
            DType::Int8PerChannel => blocks.checked_add(4),
            _ => Some(blocks),
        }
    }

    /// Bytes per element of a plain float type.
    ///
    /// # Panics
    /// On block-quantized types, whose size is per block: use [`DType::nbytes`].
    pub fn size(self) -> usize {
        assert!(!self.is_quantized(), "{self} has no per-element size");
        self.block().1
    }

    /// Bytes that a tensor of `shape` takes, or `None` when its rows (the last
    /// dimension; a scalar is one row of one) are not a whole number of blocks.
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        let cols = shape.last().copied().unwrap_or(1);
        let rows: usize = shape.iter().rev().skip(1).product();
        rows.checked_mul(self.row_bytes(cols)?)
    }

    /// Whether this is a quantized type (not a plain float).
    pub fn is_quantized(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The plain float type computed results of this type are stored in: itself for plain
    /// floats, f32 for quantized types (a new value is not representable in a block format
    /// without a quantization pass).
    pub fn plain(self) -> DType {
        if self.is_quantized() {
            DType::F32
        } else {
            self
        }
    }

    /// Short lower-case name, as printed in the IR text form.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
            DType::Int8PerChannel => "int8_channel",
        }
    }

    /// Every type, in the order of [`DType::name`]'s table.
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::Int8PerChannel,
    ];

    /// Parses a short name (`f32`, `bf16`, `q8_0`, `int8_channel`, ...).
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Whether upmix can quantize f32 values to this type ([`DType::encode`]); the
    /// K-quants are read only.
    pub fn can_encode(self) -> bool {
        !matches!(self, DType::Q4K | DType::Q5K | DType::Q6K)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`DType`]'s (see [`DType::name`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{0}` (expected one of f32, f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, int8_channel)")]
pub struct ParseDTypeError(pub String);

/// The inverse of `Display`: `"q4_0".parse::<DType>()`.
impl std::str::FromStr for DType {
    type Err = ParseDTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::parse(s).ok_or_else(|| ParseDTypeError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::DType;

    #[test]
    fn every_dtype_parses_from_its_display() {
        for d in DType::ALL {
            assert_eq!(d.to_string().parse::<DType>(), Ok(d));
        }
        let err = "q3_k".parse::<DType>().unwrap_err();
        assert!(err.to_string().contains("unknown dtype `q3_k`"), "{err}");
    }
}
