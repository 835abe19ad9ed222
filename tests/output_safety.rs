//! Output safety: what `upmix run` does to an emit destination that already exists, when
//! it is killed mid-emit, and when the disk fills up.
//!
//! The rules (README, "Output directories"): a destination is replaced only when it is
//! empty or a previous upmix output (its `upmix-manifest.json` lists every file in it, at
//! the size written); anything else is refused with the foreign file named, unless
//! `overwrite: true` / `--overwrite`. A killed run leaves the old output or the new one,
//! whole, never a partial one; running out of space is a clear error and changes nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::model_dir;
use upmix::emitters::{write_dir_atomically, EmitError, MANIFEST};

/// A pipeline that loads fixture `model`, optionally casts it, and emits it to `out`.
fn pipeline(dir: &Path, model: &Path, cast: Option<&str>, out: &Path, extra: &str) -> PathBuf {
    let passes = cast.map_or(String::new(), |d| {
        format!("passes: [ Cast(model: \"m\", dtype: \"{d}\") ],")
    });
    let text = format!(
        "Pipeline(\n    models: {{ \"m\": Hf(\"{}\") }},\n    {passes}\n    emit: [ Hf(model: \"m\", dir: \"{}\"{extra}) ],\n)\n",
        model.display(),
        out.display()
    );
    let path = dir.join(format!("p{}.ron", text.len()));
    std::fs::write(&path, text).unwrap();
    path
}

fn upmix(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The names in `dir`, sorted, except the pipeline files the tests write there.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".ron"))
        .collect();
    names.sort();
    names
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

#[test]
fn a_foreign_file_in_the_destination_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "my notes").unwrap();
    let p = pipeline(tmp.path(), &model_dir("llama"), None, &out, "");
    let o = upmix(&["run", p.to_str().unwrap()]);
    assert!(!o.status.success(), "the run should fail");
    let e = stderr(&o);
    assert!(
        e.contains("notes.txt") && e.contains("overwrite"),
        "the error names the file and the way out: {e}"
    );
    assert_eq!(
        files(&out).into_keys().collect::<Vec<_>>(),
        vec![out.join("notes.txt")]
    );
    assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"my notes");
}

#[test]
fn a_previous_output_is_replaced_without_asking() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let f32 = pipeline(tmp.path(), &model_dir("llama"), None, &out, "");
    let bf16 = pipeline(tmp.path(), &model_dir("llama"), Some("bf16"), &out, "");
    for p in [&f32, &bf16, &f32] {
        let o = upmix(&["run", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(out.join(MANIFEST).is_file());
    }
    // Only the output itself is left in the parent: no temporaries.
    assert_eq!(entries(tmp.path()), vec!["out"]);
}

#[test]
fn a_changed_output_or_a_file_in_the_way_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let p = pipeline(tmp.path(), &model_dir("llama"), None, &out, "");
    assert!(upmix(&["run", p.to_str().unwrap()]).status.success());
    let mut config = std::fs::read_to_string(out.join("config.json")).unwrap();
    config.push_str("\n\n");
    std::fs::write(out.join("config.json"), &config).unwrap();
    let o = upmix(&["run", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        config
    );

    let file = tmp.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let p = pipeline(tmp.path(), &model_dir("llama"), None, &file, "");
    let o = upmix(&["run", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}

#[test]
fn overwrite_replaces_foreign_files_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, flag) in [(", overwrite: true", None), ("", Some("--overwrite"))] {
        let out = tmp.path().join(format!("out{}", extra.len()));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "my notes").unwrap();
        let p = pipeline(tmp.path(), &model_dir("llama"), None, &out, extra);
        let mut args = vec!["run", p.to_str().unwrap()];
        args.extend(flag);
        let o = upmix(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(!out.join("notes.txt").exists() && out.join("model.safetensors").is_file());
    }
}

#[test]
fn overwrite_never_writes_over_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("llama");
    std::fs::create_dir(&input).unwrap();
    for (name, bytes) in files(&model_dir("llama")) {
        std::fs::write(input.join(name.file_name().unwrap()), bytes).unwrap();
    }
    let before = files(&input);
    let p = pipeline(tmp.path(), &input, None, &input, ", overwrite: true");
    let o = upmix(&["run", p.to_str().unwrap(), "--overwrite"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("input of the model"), "{}", stderr(&o));
    assert_eq!(files(&input), before);
}

/// SmolLM2's dequantized checkpoint (scripts/fetch-models.sh), large enough that an emit
/// takes a while.
fn smollm2_f32() -> PathBuf {
    let cache = std::env::var("UPMIX_MODEL_CACHE").map_or_else(
        |_| {
            let base = std::env::var("XDG_CACHE_HOME").map_or_else(
                |_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"),
                PathBuf::from,
            );
            base.join("upmix")
        },
        PathBuf::from,
    );
    let dir = cache.join("SmolLM2-135M-Instruct-f32");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

/// What a destination holds after a run: its files (relative) and sizes.
fn listing(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_dir() {
            for (rel, size) in listing(&entry.path()) {
                out.insert(format!("{name}/{rel}"), size);
            }
        } else {
            out.insert(name, meta.len());
        }
    }
    out
}

/// Kills `upmix run` with SIGKILL at points spread over a whole run, and checks after
/// each kill that the destination holds the old output or the new one, whole, and that
/// nothing but hidden temporaries is left beside it; the next run cleans those up.
#[test]
fn killing_a_run_leaves_the_old_or_the_new_output_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let model = smollm2_f32();
    // Old output: one file; new output: 100 MB shards.
    let old = pipeline(tmp.path(), &model, None, &out, "");
    let new = pipeline(tmp.path(), &model, None, &out, ", max_shard_mb: 100");
    let run = |p: &Path| upmix(&["run", p.to_str().unwrap()]);
    assert!(run(&new).status.success());
    let new_files = listing(&out);
    assert!(run(&old).status.success());
    let old_files = listing(&out);
    // How long a run takes, to spread the kill points over it.
    let start = Instant::now();
    assert!(run(&old).status.success());
    assert!(run(&new).status.success());
    assert!(run(&old).status.success());
    let span = start.elapsed() / 2;
    let points: u32 = std::env::var("UPMIX_KILL_POINTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(16);
    let (mut mid_emit, mut as_old, mut as_new) = (0, 0, 0);
    for i in 0..points {
        // Every other point stops a run of the new output, the others one of the old, so
        // both directions of the swap are covered.
        let p = if i % 2 == 0 { &new } else { &old };
        let before = listing(&out);
        let delay = span.mul_f64((i as f64 + 0.5) / points as f64);
        let mut child = Command::new(env!("CARGO_BIN_EXE_upmix"))
            .args(["run", p.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        child.wait().unwrap();
        let after = listing(&out);
        assert!(
            after == old_files || after == new_files,
            "kill point {i} ({delay:?}): the destination holds neither output whole: {after:?}"
        );
        if after == old_files {
            as_old += 1;
        } else {
            as_new += 1;
        }
        let leftovers: Vec<String> = entries(tmp.path())
            .into_iter()
            .filter(|n| n != "out")
            .collect();
        for name in &leftovers {
            assert!(
                name.starts_with(".out.upmix-tmp-"),
                "kill point {i}: {name} left beside the output"
            );
        }
        if !finished && (!leftovers.is_empty() || after != before) {
            mid_emit += 1;
        }
    }
    eprintln!(
        "{points} kill points over {span:?}: {mid_emit} inside an emit; {as_old} left the old-model output, {as_new} the new"
    );
    // A later run works and removes what killed runs left.
    assert!(run(&old).status.success());
    assert_eq!(listing(&out), old_files);
    assert_eq!(entries(tmp.path()), vec!["out"]);
    assert!(mid_emit > 0, "no kill point landed inside an emit");
}

/// A small tmpfs, unmounted when dropped; None where mounting is not allowed (not root).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(kib: usize) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed although running as root");
        Some(SmallDisk(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_changes_nothing() {
    let Some(disk) = SmallDisk::mount(600) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The previous output fits (about 390 KB); a second copy beside it does not.
    let out = disk.path().join("out");
    let p = pipeline(tmp.path(), &model_dir("llama"), None, &out, "");
    let o = upmix(&["run", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = files(&out);
    let o = upmix(&["run", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("no space left") && e.contains("out"), "{e}");
    assert_eq!(files(&out), before, "the previous output changed");
    let inputs = files(&model_dir("llama"));
    assert_eq!(files(&model_dir("llama")), inputs);
    assert_eq!(std::fs::read_dir(disk.path()).unwrap().count(), 1);

    // The same when the space runs out during the writing itself (no estimate given).
    let fill = |dir: &Path| -> Result<(), EmitError> {
        let chunk = vec![7u8; 64 << 10];
        let path = dir.join("big.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        loop {
            std::io::Write::write_all(&mut f, &chunk).map_err(|source| EmitError::Io {
                path: path.clone(),
                source,
            })?;
        }
    };
    let e = write_dir_atomically(&out, &[], false, 0, fill).unwrap_err();
    assert!(matches!(e, EmitError::DiskFull { .. }), "{e}");
    assert!(e.to_string().contains("big.bin"), "{e}");
    assert_eq!(files(&out), before, "the previous output changed");
    assert_eq!(std::fs::read_dir(disk.path()).unwrap().count(), 1);
}
