//! Streaming tensor data into a file, in order: workers prepare the next window of
//! tensors in parallel (computed ones materialised, the others resolved to the input byte
//! ranges that hold them) while the writer goes through the file, so memory holds a few
//! windows of tensors, never the model. Bytes that already lie in an input file (a tensor
//! taken unchanged, or concatenated from such tensors) are copied file to file by the
//! kernel.

use std::fs::File;
use std::path::Path;

use rayon::prelude::*;
use upmix_ir::{FileRange, MappedFile};

use super::{io, EmitError};

/// A tensor ready for the writer.
pub(crate) enum Prepared {
    /// Computed bytes.
    Bytes(Vec<u8>),
    /// Byte ranges of input files that hold it, in order.
    InFiles(Vec<FileRange>),
}

/// Writes tensors `0..count`, each from `prepare(i)`, one after another from byte
/// `start` of `file`, each starting at a multiple of `align` (zero bytes between), and
/// calls `written` with each tensor's byte count once it is out.
pub(crate) fn write_in_order(
    file: &File,
    path: &Path,
    start: u64,
    align: u64,
    count: usize,
    prepare: impl Fn(usize) -> Result<Prepared, EmitError> + Sync,
    written: &dyn Fn(u64),
) -> Result<(), EmitError> {
    let mut at = start;
    let window = 2 * rayon::current_num_threads().max(1);
    let indices: Vec<usize> = (0..count).collect();
    std::thread::scope(|scope| -> Result<(), EmitError> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        let prepare = &prepare;
        scope.spawn(move || {
            for chunk in indices.chunks(window) {
                let prepared: Result<Vec<Prepared>, EmitError> =
                    chunk.par_iter().map(|&i| prepare(i)).collect();
                let failed = prepared.is_err();
                if send.send(prepared).is_err() || failed {
                    break;
                }
            }
        });
        for prepared in receive {
            for tensor in prepared? {
                let padding = at.next_multiple_of(align) - at;
                if padding > 0 {
                    write_at(file, &vec![0u8; padding as usize], at).map_err(io(path))?;
                    at += padding;
                }
                match tensor {
                    Prepared::Bytes(bytes) => {
                        write_at(file, &bytes, at).map_err(io(path))?;
                        at += bytes.len() as u64;
                        written(bytes.len() as u64);
                    }
                    Prepared::InFiles(ranges) => {
                        for (src, offset, len) in ranges {
                            copy_range(&src, offset as u64, file, at, len).map_err(io(path))?;
                            at += len as u64;
                            written(len as u64);
                        }
                    }
                }
            }
        }
        Ok(())
    })
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
pub(crate) fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
pub(crate) fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(file, bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}
