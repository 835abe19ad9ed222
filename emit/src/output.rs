//! Where emitters write: output directories and files that are replaced atomically and
//! never destroy what upmix did not write.
//!
//! The rules, for a destination `out`:
//!
//! - `out` is never a model's own input, nor a directory holding one (always refused).
//! - A missing or empty `out` is written. An existing non-empty `out` is replaced only when
//!   it is a previous upmix output: it holds a [`MANIFEST`] listing every file in it with
//!   the size and the content hash (XXH3-64, taken as the output is sealed, while its
//!   files are still in the page cache) upmix wrote. Any other file (a user's notes, a
//!   file changed since, even to the same size) is named in the refusal, unless the caller
//!   says `overwrite`.
//! - The new output is written into a hidden sibling (`.out.upmix-tmp-PID-N`), flushed to
//!   disk, and swapped with `out` in one `renameat2(RENAME_EXCHANGE)` (a pair of renames
//!   where that call is missing); the old output is removed only after the swap. A crash
//!   at any moment leaves the old output or the new one at `out`, whole, and at most a
//!   hidden temporary sibling, which the next emit beside it removes once its process is
//!   gone.
//! - Running out of disk space is a [`EmitError::DiskFull`] naming the file being written;
//!   the destination is untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{io, EmitError};

/// The file every upmix output directory carries: its files, their sizes and hashes.
pub const MANIFEST: &str = "upmix-manifest.json";

/// Writes the directory `dir`: `fill` populates a fresh temporary directory beside it,
/// which then replaces `dir` under the rules in the module doc. `inputs` are the files the
/// model reads (never overwritten); `bytes` is roughly how much will be written (checked
/// against the free space first, 0 to skip).
pub fn write_dir_atomically(
    dir: &Path,
    inputs: &[PathBuf],
    overwrite: bool,
    bytes: u64,
    fill: impl FnOnce(&Path) -> Result<(), EmitError>,
) -> Result<(), EmitError> {
    refuse_inputs(dir, inputs)?;
    if !overwrite {
        check_replaceable(dir)?;
    }
    let (parent, base) = split(dir);
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_stale_temporaries(&parent, &base);
    check_free_space(&parent, dir, bytes)?;
    let tmp = temporary(&parent, &base);
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let written = fill(&tmp).and_then(|()| seal(&tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(disk_full(e, dir));
    }
    put_in_place(&tmp, dir)?;
    sync_dir(&parent)?;
    Ok(())
}

/// Writes the single file `path` under the same rules: an existing file is replaced only
/// when `is_ours` recognises it as an upmix output (e.g. by its metadata), or with
/// `overwrite`.
pub fn write_file_atomically(
    path: &Path,
    inputs: &[PathBuf],
    overwrite: bool,
    is_ours: impl Fn(&Path) -> bool,
    fill: impl FnOnce(&Path) -> Result<(), EmitError>,
) -> Result<(), EmitError> {
    refuse_inputs(path, inputs)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let ours = meta.is_file() && is_ours(path);
        if !(overwrite || ours) {
            return Err(EmitError::Foreign {
                dest: path.to_path_buf(),
                file: path.to_path_buf(),
                why: "it is not an upmix output",
            });
        }
    }
    let (parent, base) = split(path);
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    remove_stale_temporaries(&parent, &base);
    let tmp = temporary(&parent, &base);
    let written = fill(&tmp).and_then(|()| sync_file(&tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(disk_full(e, path));
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(&parent)
}

/// Refuses `dest` when it is, or contains, one of the model's inputs.
fn refuse_inputs(dest: &Path, inputs: &[PathBuf]) -> Result<(), EmitError> {
    let Ok(canon) = dest.canonicalize() else {
        return Ok(()); // does not exist yet
    };
    for input in inputs {
        if input.canonicalize().is_ok_and(|p| p.starts_with(&canon)) {
            return Err(EmitError::WouldOverwriteInput {
                dir: dest.to_path_buf(),
                input: input.clone(),
            });
        }
    }
    Ok(())
}

/// Ok when `dir` is missing, empty, or a previous upmix output left as upmix wrote it.
fn check_replaceable(dir: &Path) -> Result<(), EmitError> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    let foreign = |file: PathBuf, why| EmitError::Foreign {
        dest: dir.to_path_buf(),
        file,
        why,
    };
    if !meta.is_dir() {
        return Err(foreign(dir.to_path_buf(), "it is not a directory"));
    }
    let files = list_files(dir)?;
    if files.is_empty() {
        return Ok(());
    }
    let manifest = read_manifest(dir);
    for (name, size) in files {
        if name == MANIFEST {
            continue;
        }
        let file = dir.join(&name);
        let changed = "it changed since upmix wrote it";
        match manifest.as_ref().and_then(|m| m.get(&name)) {
            None => return Err(foreign(file, "upmix did not write it")),
            Some(r) if r.size != size => return Err(foreign(file, changed)),
            Some(Recorded {
                hash: Some(hash), ..
            }) if content_hash(&file)? != *hash => return Err(foreign(file, changed)),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Every file under `dir` (symbolic links and other non-directories included, not
/// followed), as `/`-separated relative paths with sizes.
fn list_files(dir: &Path) -> Result<BTreeMap<String, u64>, EmitError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&path).map_err(io(&path))? {
            let entry = entry.map_err(io(&path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(entry.path()).map_err(io(&entry.path()))?;
            if meta.is_dir() {
                stack.push((entry.path(), rel));
            } else {
                out.insert(rel, meta.len());
            }
        }
    }
    Ok(out)
}

/// What a manifest records of one file.
struct Recorded {
    size: u64,
    /// Absent in manifests of upmix versions that recorded sizes only.
    hash: Option<u64>,
}

/// The files a manifest in `dir` lists, if it has a readable one: `{"size": n, "xxh3":
/// "hex"}` per file (or, from older versions, the size alone).
fn read_manifest(dir: &Path) -> Option<BTreeMap<String, Recorded>> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let entry = |v: &serde_json::Value| match v.as_u64() {
        Some(size) => Some(Recorded { size, hash: None }),
        None => Some(Recorded {
            size: v["size"].as_u64()?,
            hash: Some(u64::from_str_radix(v["xxh3"].as_str()?, 16).ok()?),
        }),
    };
    json["files"]
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), entry(v)?)))
        .collect()
}

/// The XXH3-64 hash of a file's bytes, read in 1 MiB pieces.
fn content_hash(path: &Path) -> Result<u64, EmitError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(io(path))? {
            0 => return Ok(hasher.digest()),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// Lists what `dir` holds in its manifest, with each file's size and hash, then flushes
/// every file and directory in it to disk.
fn seal(dir: &Path) -> Result<(), EmitError> {
    use rayon::prelude::*;
    let files = list_files(dir)?;
    let hashes: Vec<u64> = files
        .par_iter()
        .map(|(name, _)| content_hash(&dir.join(name)))
        .collect::<Result<_, _>>()?;
    let entries: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .zip(hashes)
        .map(|((name, size), hash)| {
            let entry = serde_json::json!({ "size": size, "xxh3": format!("{hash:016x}") });
            (name.clone(), entry)
        })
        .collect();
    let json = serde_json::json!({
        "written_by": concat!("upmix ", env!("CARGO_PKG_VERSION")),
        "files": entries,
    });
    let manifest = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&json).expect("json serialises") + "\n";
    std::fs::write(&manifest, text).map_err(io(&manifest))?;
    let mut dirs = BTreeSet::from([dir.to_path_buf()]);
    for name in files.keys().map(String::as_str).chain([MANIFEST]) {
        let path = dir.join(name);
        sync_file(&path)?;
        dirs.extend(path.parent().map(Path::to_path_buf));
    }
    dirs.iter().try_for_each(|d| sync_dir(d))
}

/// Moves the finished `tmp` to `dest`, swapping it with an existing `dest` and removing
/// the old one afterwards.
fn put_in_place(tmp: &Path, dest: &Path) -> Result<(), EmitError> {
    if std::fs::symlink_metadata(dest).is_err() {
        return std::fs::rename(tmp, dest).map_err(io(dest));
    }
    if !exchange(tmp, dest) {
        // No atomic exchange here: move the old output aside, then the new one in.
        let (parent, base) = split(dest);
        let old = temporary(&parent, &base);
        std::fs::rename(dest, &old).map_err(io(dest))?;
        std::fs::rename(tmp, dest).map_err(io(dest))?;
        return remove_any(&old);
    }
    // `tmp` now holds the old output.
    remove_any(tmp)
}

/// Atomically swaps two paths; false where the system cannot.
fn exchange(a: &Path, b: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let (Ok(a), Ok(b)) = (
            std::ffi::CString::new(a.as_os_str().as_bytes()),
            std::ffi::CString::new(b.as_os_str().as_bytes()),
        ) else {
            return false;
        };
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them relative to
        // the working directory like rename(2).
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        false
    }
}

fn remove_any(path: &Path) -> Result<(), EmitError> {
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path).map_err(io(path))
    } else {
        std::fs::remove_file(path).map_err(io(path))
    }
}

/// The parent directory of `dest` (`.` for a bare name) and its file name.
fn split(dest: &Path) -> (PathBuf, String) {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dest
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    (parent, base)
}

/// A fresh hidden sibling name for `base`, unique in this process.
fn temporary(parent: &Path, base: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent.join(format!(".{base}.upmix-tmp-{}-{n}", std::process::id()))
}

/// Removes the temporary siblings of `base` left by upmix processes that no longer run
/// (killed mid-emit). Only names upmix itself makes are touched.
fn remove_stale_temporaries(parent: &Path, base: &str) {
    let prefix = format!(".{base}.upmix-tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = remove_any(&entry.path());
        }
    }
}

fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks whether the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Refuses up front when the file system holding `parent` has less than `bytes` free.
fn check_free_space(parent: &Path, dest: &Path, bytes: u64) -> Result<(), EmitError> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(parent.as_os_str().as_bytes()) else {
            return Ok(());
        };
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid path and `s` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0 {
            let free = s.f_bavail as u64 * s.f_frsize as u64;
            if free < bytes {
                return Err(EmitError::DiskFull {
                    path: parent.to_path_buf(),
                    dest: dest.to_path_buf(),
                    detail: format!(
                        "the output needs {:.1} MB, {:.1} MB are free",
                        bytes as f64 / 1e6,
                        free as f64 / 1e6
                    ),
                });
            }
        }
    }
    let _ = (parent, dest, bytes);
    Ok(())
}

/// An I/O error from running out of space, as [`EmitError::DiskFull`].
fn disk_full(e: EmitError, dest: &Path) -> EmitError {
    match e {
        EmitError::Io { path, source } if is_no_space(&source) => EmitError::DiskFull {
            path,
            dest: dest.to_path_buf(),
            detail: source.to_string(),
        },
        e => e,
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::StorageFull
}

fn sync_file(path: &Path) -> Result<(), EmitError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), EmitError> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))?;
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill_with(files: &'static [&'static str]) -> impl FnOnce(&Path) -> Result<(), EmitError> {
        move |d: &Path| {
            for f in files {
                std::fs::write(d.join(f), f.as_bytes()).map_err(io(d))?;
            }
            Ok(())
        }
    }

    #[test]
    fn a_previous_output_is_replaced_and_foreign_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        write_dir_atomically(&out, &[], false, 0, fill_with(&["a.txt"])).unwrap();
        assert!(out.join(MANIFEST).is_file());
        // Ours: replaced, and only the new files remain.
        write_dir_atomically(&out, &[], false, 0, fill_with(&["b.txt"])).unwrap();
        assert!(!out.join("a.txt").exists() && out.join("b.txt").is_file());
        // A user's file: refused, named, kept.
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let e = write_dir_atomically(&out, &[], false, 0, fill_with(&["c.txt"])).unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
        assert!(out.join("b.txt").is_file());
        // A file of ours changed since: refused too.
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        std::fs::write(out.join("b.txt"), "edited by hand").unwrap();
        let e = write_dir_atomically(&out, &[], false, 0, fill_with(&["c.txt"])).unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
        // With overwrite, replaced.
        write_dir_atomically(&out, &[], true, 0, fill_with(&["c.txt"])).unwrap();
        assert!(out.join("c.txt").is_file() && !out.join("b.txt").exists());
        // No temporaries are left beside it.
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn an_edit_that_keeps_the_size_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        write_dir_atomically(&out, &[], false, 0, fill_with(&["a.txt"])).unwrap();
        std::fs::write(out.join("a.txt"), "A.txt").unwrap();
        let e = write_dir_atomically(&out, &[], false, 0, fill_with(&["b.txt"])).unwrap_err();
        assert!(
            e.to_string().contains("a.txt") && e.to_string().contains("changed"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "A.txt");
        // Put back as written, it is ours again.
        std::fs::write(out.join("a.txt"), "a.txt").unwrap();
        write_dir_atomically(&out, &[], false, 0, fill_with(&["b.txt"])).unwrap();
        // A manifest of sizes alone (older versions) still lets its output be replaced.
        let legacy = r#"{"written_by": "upmix 0.1.0", "files": {"b.txt": 5}}"#;
        std::fs::write(out.join(MANIFEST), legacy).unwrap();
        write_dir_atomically(&out, &[], false, 0, fill_with(&["c.txt"])).unwrap();
    }

    #[test]
    fn empty_directories_are_written_and_failures_leave_the_old_output() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        write_dir_atomically(&out, &[], false, 0, fill_with(&["a.txt"])).unwrap();
        let failing = |d: &Path| -> Result<(), EmitError> {
            std::fs::write(d.join("half.txt"), "x").map_err(io(d))?;
            Err(EmitError::UnknownGraph("boom".into()))
        };
        assert!(write_dir_atomically(&out, &[], false, 0, failing).is_err());
        assert!(out.join("a.txt").is_file() && !out.join("half.txt").exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn single_files_follow_the_same_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("model.gguf");
        let fill = |p: &Path| std::fs::write(p, "new").map_err(io(p));
        std::fs::write(&out, "user's").unwrap();
        let e = write_file_atomically(&out, &[], false, |_| false, fill).unwrap_err();
        assert!(e.to_string().contains("model.gguf"), "{e}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "user's");
        write_file_atomically(&out, &[], false, |_| true, fill).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        let input = out.clone();
        let e = write_file_atomically(&out, &[input], true, |_| true, fill).unwrap_err();
        assert!(matches!(e, EmitError::WouldOverwriteInput { .. }), "{e}");
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        // No process has this id (above the kernel's maximum pid).
        let stale = tmp.path().join(".out.upmix-tmp-4194305-0");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("config.json"), "{}").unwrap();
        let unrelated = tmp.path().join(".out.mine");
        std::fs::create_dir(&unrelated).unwrap();
        write_dir_atomically(&tmp.path().join("out"), &[], false, 0, fill_with(&["a"])).unwrap();
        assert!(!stale.exists() && unrelated.exists());
    }
}
