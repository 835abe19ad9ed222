//! A streaming safetensors writer. The header is computed from shapes alone; then the
//! tensors are written in file order while workers materialise the next window of
//! computed tensors in parallel, so memory holds a few windows of tensors, never the
//! model. Bytes that already lie in an input file (a tensor taken unchanged, or
//! concatenated from such tensors) are copied file to file by the kernel.

use std::fs::File;
use std::path::Path;

use rayon::prelude::*;
use upmix_ir::{DType, FileRange, MappedFile, WeightId, WeightTable};

use super::{io, EmitError};

/// Writes `tensors` (file name, weight) to `path`, calling `written` with each tensor's
/// byte count once it is out. Block-quantized weights are
/// written dequantized, as f32 (safetensors has no block formats).
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
    let file = File::create(path).map_err(io(path))?;
    write_at(&file, &(json.len() as u64).to_le_bytes(), 0).map_err(io(path))?;
    write_at(&file, &json, 8).map_err(io(path))?;
    let mut at = 8 + json.len() as u64;

    // Tensors are prepared in parallel, a window at a time, ahead of the writer: computed
    // ones materialised, the others resolved to the input byte ranges that hold them.
    let window = 2 * rayon::current_num_threads().max(1);
    std::thread::scope(|scope| -> Result<(), EmitError> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        scope.spawn(move || {
            for chunk in tensors.chunks(window) {
                let prepared: Result<Vec<Prepared>, EmitError> = chunk
                    .par_iter()
                    .map(|(_, id)| {
                        let dtype = weights.get(*id)?.dtype.plain();
                        Ok(match weights.file_ranges(*id, dtype)? {
                            Some(ranges) => Prepared::InFiles(ranges),
                            None => Prepared::Bytes(weights.materialize_bytes_as(*id, dtype)?),
                        })
                    })
                    .collect();
                let failed = prepared.is_err();
                if send.send(prepared).is_err() || failed {
                    break;
                }
            }
        });
        // The writer goes through the file in order.
        for prepared in receive {
            for tensor in prepared? {
                match tensor {
                    Prepared::Bytes(bytes) => {
                        write_at(&file, &bytes, at).map_err(io(path))?;
                        at += bytes.len() as u64;
                        written(bytes.len() as u64);
                    }
                    Prepared::InFiles(ranges) => {
                        for (src, offset, len) in ranges {
                            copy_range(&src, offset as u64, &file, at, len).map_err(io(path))?;
                            at += len as u64;
                            written(len as u64);
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    file.sync_all().map_err(io(path))?;
    Ok(offset)
}

/// A tensor ready for the writer.
enum Prepared {
    /// Computed bytes.
    Bytes(Vec<u8>),
    /// Byte ranges of input files that hold it, in order.
    InFiles(Vec<FileRange>),
}

/// Copies `len` bytes at `offset` of `src` to `at` in `dst`: with `copy_file_range` on
/// Linux (page cache to page cache, no copy through this process), else read and write.
fn copy_range(
    src: &MappedFile,
    mut offset: u64,
    dst: &File,
    mut at: u64,
    mut len: usize,
) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        while len > 0 {
            let (mut from, mut to) = (offset as libc::loff_t, at as libc::loff_t);
            // SAFETY: both descriptors are open for the duration of the call, and the
            // offsets are plain integers the kernel updates.
            let n = unsafe {
                libc::copy_file_range(
                    src.file().as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    len,
                    0,
                )
            };
            if n <= 0 {
                break; // unsupported here, or the source ended: fall back to read/write
            }
            let n = n as usize;
            (offset, at, len) = (offset + n as u64, at + n as u64, len - n);
        }
    }
    if len > 0 {
        write_at(dst, &src.read(offset as usize, len)?, at)?;
    }
    Ok(())
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        q => unreachable!("{q} is written as f32"),
    }
}
