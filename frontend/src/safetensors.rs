//! A safetensors reader: parses and validates the header of a memory-mapped file and
//! hands out byte ranges; tensor data is never read here.
//!
//! Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names
//! to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end of the
//! header), an optional `__metadata__` entry, then the data. Every header claim is checked
//! against the file before use: a truncated file or a lying header (offsets past the end,
//! or two tensors sharing bytes) is an error naming the file and tensor, never a panic or
//! an out-of-bounds read.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use upmix_ir::{DType, MappedFile};

use crate::error::{io, FrontendError};

/// Largest header we accept (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: usize,
}

/// A mapped safetensors file and its validated header.
pub struct SafetensorsFile {
    pub file: Arc<MappedFile>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

impl SafetensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<SafetensorsFile, FrontendError> {
        let file = MappedFile::open(path).map_err(io(path))?;
        let tensors = parse_header(path, file.bytes())?;
        Ok(SafetensorsFile { file, tensors })
    }
}

/// The validated tensor infos of the safetensors bytes read from `path`.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, TensorInfo>, FrontendError> {
    let (data_start, header) = header_json(path, bytes)?;
    let data_len = (bytes.len() - data_start) as u64;
    let mut tensors = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let (info, [begin, end]) = tensor_info(path, &name, value, data_start, data_len)?;
        if begin < end {
            ranges.push((begin, end, name.clone()));
        }
        tensors.insert(name, info);
    }
    check_disjoint(path, ranges)?;
    Ok(tensors)
}

/// Where the data starts, and the header's JSON object, checked against the file's length.
fn header_json(
    path: &Path,
    bytes: &[u8],
) -> Result<(usize, serde_json::Map<String, serde_json::Value>), FrontendError> {
    let bad = |message: String| FrontendError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < 8 {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER || n > (bytes.len() - 8) as u64 {
        return Err(bad(format!(
            "header length {n} exceeds the file ({} bytes) or the 100 MB limit",
            bytes.len()
        )));
    }
    let data_start = 8 + n as usize;
    let header = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    Ok((data_start, header))
}

/// The checked info of the header entry `name`, and its byte range within the data
/// section of `data_len` bytes that starts at `data_start`.
fn tensor_info(
    path: &Path,
    name: &str,
    value: serde_json::Value,
    data_start: usize,
    data_len: u64,
) -> Result<(TensorInfo, [u64; 2]), FrontendError> {
    let bad_tensor = |message: String| FrontendError::BadTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    let raw: RawInfo = serde_json::from_value(value)
        .map_err(|e| bad_tensor(format!("malformed header entry: {e}")))?;
    let dtype = match raw.dtype.as_str() {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => {
            return Err(bad_tensor(format!(
                "dtype {other} is not supported (supported: F32, F16, BF16)"
            )))
        }
    };
    let numel = raw
        .shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .and_then(|n| n.checked_mul(dtype.size() as u64))
        .ok_or_else(|| bad_tensor(format!("shape {:?} overflows", raw.shape)))?;
    let [begin, end] = raw.data_offsets;
    if begin > end || end - begin != numel {
        return Err(bad_tensor(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, shape {:?} of {} needs {numel}",
            end.saturating_sub(begin),
            raw.shape,
            raw.dtype
        )));
    }
    if end > data_len {
        return Err(bad_tensor(format!(
            "data_offsets end {end} runs past the end of the data ({data_len} bytes): the file is truncated or the header lies"
        )));
    }
    let info = TensorInfo {
        dtype,
        shape: raw.shape.iter().map(|d| *d as usize).collect(),
        offset: data_start + begin as usize,
    };
    Ok((info, [begin, end]))
}

/// Rejects two tensors whose (non-empty) byte ranges overlap.
fn check_disjoint(path: &Path, mut ranges: Vec<(u64, u64, String)>) -> Result<(), FrontendError> {
    // Tensors own disjoint byte ranges: a header that hands the same bytes to two tensors
    // lies about at least one of them.
    ranges.sort_unstable();
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
        let ((b0, e0, first), (b1, e1, second)) = (&w[0], &w[1]);
        return Err(FrontendError::BadTensor {
            path: path.to_path_buf(),
            tensor: second.clone(),
            message: format!(
                "data_offsets [{b1}, {e1}] overlap those of tensor `{first}` [{b0}, {e0}]"
            ),
        });
    }
    Ok(())
}
