//! A streaming safetensors writer: the header is computed from shapes alone, then the
//! tensors are materialised in parallel, a small window at a time, while the previous
//! window is written out in order. Memory holds at most a few windows of tensors, never
//! the model.

use std::io::Write;

use rayon::prelude::*;
use std::path::Path;

use upmix_ir::{DType, WeightId, WeightTable};

use super::{io, EmitError};

/// Writes `tensors` (file name, weight) to `path` in order, calling `written` with each
/// tensor's byte count once it is out. Block-quantized weights are written dequantized,
/// as f32 (safetensors has no block formats).
pub fn write_safetensors(
    path: &Path,
    weights: &WeightTable,
    tensors: &[(String, WeightId)],
    written: &mut dyn FnMut(u64),
) -> Result<u64, EmitError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for (name, id) in tensors {
        let w = weights.get(*id)?;
        let dtype = w.dtype.plain();
        let len = dtype.nbytes(w.numel()).unwrap_or(0) as u64;
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
    let file = std::fs::File::create(path).map_err(io(path))?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(&(json.len() as u64).to_le_bytes())
        .and_then(|_| out.write_all(&json))
        .map_err(io(path))?;
    // Tensors materialised together; the writer holds one window while the next is computed.
    let window = 2 * rayon::current_num_threads().max(1);
    std::thread::scope(|scope| -> Result<(), EmitError> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            for chunk in tensors.chunks(window) {
                let bytes: Result<Vec<Vec<u8>>, EmitError> = chunk
                    .par_iter()
                    .map(|(_, id)| {
                        let dtype = weights.get(*id)?.dtype.plain();
                        Ok(weights.materialize_bytes_as(*id, dtype)?)
                    })
                    .collect();
                let failed = bytes.is_err();
                if send.send(bytes).is_err() || failed {
                    break;
                }
            }
        });
        for chunk in receive {
            for bytes in chunk? {
                out.write_all(&bytes).map_err(io(path))?;
                written(bytes.len() as u64);
            }
        }
        Ok(())
    })?;
    out.flush().map_err(io(path))?;
    out.get_ref().sync_all().map_err(io(path))?;
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
