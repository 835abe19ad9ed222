//! A streaming safetensors writer. The header is computed from shapes alone; then the
//! tensors stream into the file in order (module `stream`).

use std::fs::File;
use std::path::Path;

use upmix_ir::{DType, WeightId, WeightTable};

use super::stream::{write_at, write_in_order, Prepared};
use super::{io, EmitError};

/// Writes `tensors` (file name, weight) to `path`, calling `written` with each tensor's
/// byte count once it is out. Quantized weights are written dequantized, as f32
/// (safetensors has no quantized formats): [`super::emit_hf`] lets them through only
/// when asked to dequantize.
pub fn write_safetensors(
    path: &Path,
    weights: &WeightTable,
    tensors: &[(String, WeightId)],
    written: &dyn Fn(u64),
) -> Result<u64, EmitError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for (name, id) in tensors {
        let w = weights.get(*id)?;
        let dtype = w.dtype.plain();
        let len = dtype.nbytes(&w.shape).unwrap_or(0) as u64;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(dtype),
                "shape": w.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).expect("header serialises");
    // Pad the header with spaces so the data starts 8-byte aligned.
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let file = File::create(path).map_err(io(path))?;
    write_at(&file, &(json.len() as u64).to_le_bytes(), 0).map_err(io(path))?;
    write_at(&file, &json, 8).map_err(io(path))?;
    let prepare = |i: usize| {
        let id = tensors[i].1;
        let dtype = weights.get(id)?.dtype.plain();
        Ok(match weights.file_ranges(id, dtype)? {
            Some(ranges) => Prepared::InFiles(ranges),
            None => Prepared::Bytes(weights.materialize_bytes_as(id, dtype)?),
        })
    };
    let start = 8 + json.len() as u64;
    write_in_order(&file, path, start, 1, tensors.len(), prepare, written)?;
    file.sync_all().map_err(io(path))?;
    Ok(offset)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        q => unreachable!("{q} is written as f32"),
    }
}
