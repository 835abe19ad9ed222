//! A GGUF reader (versions 2 and 3): metadata of every value type and tensor infos,
//! parsed from a memory-mapped file with every count and length checked against the bytes
//! that are actually there, so a truncated or lying file is an error naming the file (and
//! tensor or key), never a panic or a huge allocation. Tensor data is not read here.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; metadata as
//! (string key, u32 value type, value); tensor infos as (string name, u32 n_dims, u64 dims
//! (innermost first), u32 ggml type, u64 offset); then, aligned to `general.alignment`
//! (default 32), the data section that tensor offsets are relative to. Strings are a u64
//! length and UTF-8 bytes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use upmix_ir::{DType, MappedFile};

use crate::error::{io, FrontendError};
use upmix_formats::gguf::{
    GgufValue, GGML_TYPES, T_ARRAY, T_BOOL, T_F32, T_F64, T_I16, T_I32, T_I64, T_I8, T_STRING,
    T_U16, T_U32, T_U64, T_U8,
};

/// Where one tensor lives.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    pub dtype: DType,
    /// Row-major shape (outermost first, the reverse of GGUF's order).
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
}

/// A mapped GGUF file with its metadata and tensor infos.
pub struct GgufFile {
    pub file: Arc<MappedFile>,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: BTreeMap<String, GgufTensor>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path())
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<GgufFile, FrontendError> {
        let file = MappedFile::open(path).map_err(io(path))?;
        let (version, metadata, tensors) = parse(path, file.bytes())?;
        Ok(GgufFile {
            file,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required metadata key, or an error naming it and the file.
    pub fn require(&self, key: &str) -> Result<&GgufValue, FrontendError> {
        self.get(key).ok_or_else(|| FrontendError::Config {
            path: self.path().to_path_buf(),
            message: format!("metadata key `{key}` is missing"),
        })
    }

    /// A required unsigned integer.
    pub fn require_u64(&self, key: &str) -> Result<u64, FrontendError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.bad_key(key, "an unsigned integer", v))
    }

    /// A required number.
    pub fn require_f64(&self, key: &str) -> Result<f64, FrontendError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.bad_key(key, "a number", v))
    }

    fn bad_key(&self, key: &str, what: &str, v: &GgufValue) -> FrontendError {
        FrontendError::Config {
            path: self.path().to_path_buf(),
            message: format!("metadata key `{key}` should be {what}, is {v:?}"),
        }
    }

    /// A string-array metadata value.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, FrontendError> {
        let v = self.require(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(|s| s.as_str()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad_key(key, "an array of strings", &GgufValue::Bool(false)))
    }
}

/// Deepest nesting of arrays accepted.
const MAX_DEPTH: usize = 4;

/// Capacity reserved up front for `count` items read from the file. A count is checked
/// against the bytes left before any item is read, but an item takes more memory than its
/// smallest encoding (a `GgufValue` is 32 bytes, a u8 item one byte): beyond this, vectors
/// grow only as items are actually read.
fn capacity(count: u64) -> usize {
    count.min(1 << 16) as usize
}

struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
    /// What is being read, for error messages.
    context: String,
}

type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    BTreeMap<String, GgufTensor>,
);

/// One tensor info as stored: name, GGUF-order dims, ggml type id and relative offset.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

/// Where the data section starts, how long it is, and the alignment of tensor offsets.
struct DataSection {
    start: usize,
    len: u64,
    alignment: usize,
}

/// Parses the header, metadata and tensor infos of the GGUF bytes read from `path`.
fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed, FrontendError> {
    let mut r = Reader {
        path,
        bytes,
        pos: 0,
        context: "the header".into(),
    };
    let (version, n_tensors, n_kv) = r.header()?;
    let metadata = r.metadata(n_kv)?;
    let alignment = r.alignment(&metadata)?;
    let infos = r.tensor_infos(n_tensors)?;
    check_unique_names(path, &infos)?;
    let start = r.pos.div_ceil(alignment) * alignment;
    let data = DataSection {
        start,
        len: bytes.len().saturating_sub(start) as u64,
        alignment,
    };
    let mut tensors = BTreeMap::new();
    for raw in infos {
        let tensor = locate(path, &raw, &data)?;
        tensors.insert(raw.name, tensor);
    }
    Ok((version, metadata, tensors))
}

/// Rejects two tensor infos with the same name.
fn check_unique_names(path: &Path, infos: &[RawTensor]) -> Result<(), FrontendError> {
    let mut names: Vec<&str> = infos.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(FrontendError::BadTensor {
            path: path.to_path_buf(),
            tensor: twice[0].to_string(),
            message: "two tensors have this name".into(),
        });
    }
    Ok(())
}

/// The name and dtype of ggml type `ty`, or why it cannot be read.
fn ggml_type(ty: u32) -> Result<(&'static str, DType), String> {
    let Some((_, type_name, dtype)) = GGML_TYPES.iter().find(|(id, _, _)| *id == ty) else {
        return Err(format!("unknown ggml type id {ty}"));
    };
    let Some(dtype) = dtype else {
        return Err(format!(
            "ggml type {type_name} is not supported (supported: {})",
            GGML_TYPES
                .iter()
                .filter(|t| t.2.is_some())
                .map(|t| t.1)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    Ok((type_name, *dtype))
}

/// The checked dtype, shape and absolute offset of `raw` within the data section.
fn locate(path: &Path, raw: &RawTensor, data: &DataSection) -> Result<GgufTensor, FrontendError> {
    let bad = |message: String| FrontendError::BadTensor {
        path: path.to_path_buf(),
        tensor: raw.name.clone(),
        message,
    };
    let (dims, offset, alignment, data_len) = (&raw.dims, raw.offset, data.alignment, data.len);
    let (type_name, dtype) = ggml_type(raw.ty).map_err(bad)?;
    let numel = dims
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n <= usize::MAX as u64)
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if dims[0] % dtype.block().0 as u64 != 0 {
        return Err(bad(format!(
            "row length {} is not a multiple of the {type_name} block size {}",
            dims[0],
            dtype.block().0
        )));
    }
    let cols = dims[0] as usize;
    let rows = (numel as usize).checked_div(cols).unwrap_or(0);
    let nbytes = dtype
        .row_bytes(cols)
        .and_then(|row| row.checked_mul(rows))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))? as u64;
    if offset % alignment as u64 != 0 {
        return Err(bad(format!(
            "offset {offset} is not aligned to {alignment}"
        )));
    }
    if offset.checked_add(nbytes).is_none_or(|end| end > data_len) {
        return Err(bad(format!(
            "data at offset {offset} ({nbytes} bytes) runs past the end of the file (data section has {data_len} bytes): the file is truncated or the header lies"
        )));
    }
    Ok(GgufTensor {
        dtype,
        shape: dims.iter().rev().map(|d| *d as usize).collect(),
        offset: data.start + offset as usize,
    })
}

impl Reader<'_> {
    /// Checks the magic and version; the version, tensor count and metadata count.
    fn header(&mut self) -> Result<(u32, u64, u64), FrontendError> {
        if self.take(4)? != b"GGUF" {
            return Err(self.error("bad magic: not a GGUF file".into()));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(self.error(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        // Each tensor info takes at least 8 (name) + 4 + 4 + 8 bytes, each pair at least 8 + 4 + 1.
        self.check_count(n_tensors, 24, "tensor count")?;
        self.check_count(n_kv, 13, "metadata count")?;
        Ok((version, n_tensors, n_kv))
    }

    /// The `n_kv` metadata pairs, each key at most once.
    fn metadata(&mut self, n_kv: u64) -> Result<BTreeMap<String, GgufValue>, FrontendError> {
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            self.context = format!("metadata entry {i}");
            let key = self.string()?;
            self.context = format!("metadata key `{key}`");
            let ty = self.u32()?;
            let value = self.value(ty, 0)?;
            if metadata.insert(key, value).is_some() {
                return Err(self.error("the key appears twice".into()));
            }
        }
        Ok(metadata)
    }

    /// `general.alignment` (32 when absent), checked to be a power of two.
    fn alignment(&self, metadata: &BTreeMap<String, GgufValue>) -> Result<usize, FrontendError> {
        Ok(match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(self.error(format!("general.alignment {v:?} is not a power of two")))
                }
            },
        })
    }

    /// The `n_tensors` tensor infos, as stored.
    fn tensor_infos(&mut self, n_tensors: u64) -> Result<Vec<RawTensor>, FrontendError> {
        let mut infos = Vec::with_capacity(capacity(n_tensors));
        for i in 0..n_tensors {
            self.context = format!("tensor info {i}");
            let name = self.string()?;
            self.context = format!("tensor `{name}`");
            let n_dims = self.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(self.error(format!("{n_dims} dimensions (1 to 4 are valid)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64()?);
            }
            let ty = self.u32()?;
            let offset = self.u64()?;
            infos.push(RawTensor {
                name,
                dims,
                ty,
                offset,
            });
        }
        Ok(infos)
    }
}

impl Reader<'_> {
    fn error(&self, message: String) -> FrontendError {
        FrontendError::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{}: {message}", self.context),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], FrontendError> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "needs {n} bytes at offset {}, the file ends after {}: truncated",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Rejects a count whose items (at least `min_size` bytes each) cannot fit in the rest
    /// of the file, before anything is allocated for them.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), FrontendError> {
        if count.saturating_mul(min_size) > self.remaining() as u64 {
            return Err(self.error(format!(
                "{what} {count} cannot fit in the {} bytes left in the file: truncated, or the header lies",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrontendError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, FrontendError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FrontendError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, FrontendError> {
        let len = self.u64()?;
        self.check_count(len, 1, "string length")?;
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("string is not UTF-8".into()))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, FrontendError> {
        Ok(match ty {
            T_U8 => GgufValue::U8(self.array::<1>()?[0]),
            T_I8 => GgufValue::I8(self.array::<1>()?[0] as i8),
            T_U16 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            T_I16 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            T_U32 => GgufValue::U32(self.u32()?),
            T_I32 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            T_U64 => GgufValue::U64(self.u64()?),
            T_I64 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            T_F32 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            T_F64 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            T_BOOL => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.error(format!("bool byte {b} is neither 0 nor 1"))),
            },
            T_STRING => GgufValue::String(self.string()?),
            T_ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(self.error("arrays nested too deeply".into()));
                }
                let item = self.u32()?;
                let len = self.u64()?;
                let min = match item {
                    T_U8 | T_I8 | T_BOOL => 1,
                    T_U16 | T_I16 => 2,
                    T_U32 | T_I32 | T_F32 => 4,
                    T_ARRAY => 12,
                    _ => 8,
                };
                self.check_count(len, min, "array length")?;
                let mut items = Vec::with_capacity(capacity(len));
                for _ in 0..len {
                    items.push(self.value(item, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            other => return Err(self.error(format!("unknown value type {other}"))),
        })
    }
}
