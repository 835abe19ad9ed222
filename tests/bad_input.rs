//! Bad inputs end in clear errors, never in panics or partial output.
//!
//! Every case works on a copy of a golden fixture in a temporary directory, damages one
//! thing, and checks that the error names the file / tensor / field / line at fault, that
//! nothing panicked, and that nothing was written (the directory's files are byte-for-byte
//! what they were before the failing call).

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;
use upmix::pipeline::{run_file, RunOptions};
use upmix_ir::Module;

/// The checkpoint files every copied fixture gets.
const CHECKPOINT_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/models")
        .join(name)
}

/// Copies the checkpoint files of fixture `name` into `dest` (created).
fn copy_fixture(name: &str, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for file in CHECKPOINT_FILES {
        std::fs::copy(fixture(name).join(file), dest.join(file))
            .unwrap_or_else(|e| panic!("copying {file} of {name}: {e}"));
    }
}

/// A temporary directory holding a copy of fixture `name` in `<tmp>/<name>`.
fn temp_fixture(name: &str) -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy_fixture(name, &dir);
    (tmp, dir)
}

/// Every file under `root` (recursively) with its bytes.
fn files_under(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), bytes);
            }
        }
    }
    out
}

/// Asserts that `f` does not panic and that nothing under `root` changed while it ran.
fn no_panic_no_output<T>(root: &Path, what: &str, f: impl FnOnce() -> T) -> T {
    let before = files_under(root);
    let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what} panicked"));
    let after = files_under(root);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{what} created or removed files"
    );
    for (path, bytes) in &before {
        assert!(after[path] == *bytes, "{what} changed {}", path.display());
    }
    result
}

/// Loads `dir` with the frontend, expecting an error; returns its message.
fn load_err(root: &Path, dir: &Path) -> String {
    let result = no_panic_no_output(root, "loading", || {
        let mut m = Module::new();
        upmix_frontend::load(dir, "m", &mut m)
    });
    match result {
        Ok(()) => panic!("loading {} succeeded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Runs the pipeline file `path`, expecting an error; returns its full chain.
fn pipeline_err(root: &Path, path: &Path) -> String {
    let result = no_panic_no_output(root, "the pipeline", || {
        run_file(path, &RunOptions::default())
    });
    match result {
        Ok((_, report)) => panic!("pipeline {} succeeded:\n{report}", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_contains(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "expected the error to contain {needle:?}, got:\n{message}"
        );
    }
}

/// A safetensors header as JSON, and where the data section starts.
fn read_header(path: &Path) -> (serde_json::Map<String, serde_json::Value>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

/// Rewrites the header of the safetensors file at `path` in place with `edit`, keeping the
/// header length (padding with spaces) and so the file length and data offsets.
fn rewrite_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let mut bytes = std::fs::read(path).unwrap();
    let (mut header, data_start) = read_header(path);
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    let n = data_start - 8;
    assert!(
        json.len() <= n,
        "the edited header ({} bytes) no longer fits in {n} bytes",
        json.len()
    );
    json.resize(n, b' ');
    bytes[8..data_start].copy_from_slice(&json);
    std::fs::write(path, bytes).unwrap();
}

/// `[begin, end]` of tensor `name` in a header.
fn offsets(header: &serde_json::Map<String, serde_json::Value>, name: &str) -> [u64; 2] {
    let o = &header[name]["data_offsets"];
    [o[0].as_u64().unwrap(), o[1].as_u64().unwrap()]
}

/// Writes `text` as `<dir>/pipeline.ron` and returns its path.
fn write_pipeline(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pipeline.ron");
    std::fs::write(&path, text).unwrap();
    path
}

/// A path as a RON string literal.
fn ron_path(path: &Path) -> String {
    format!("{:?}", path.to_str().unwrap())
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    let (header, data_start) = read_header(&st);
    let len = std::fs::metadata(&st).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&st).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);

    let data_len = len / 2 - data_start as u64;
    let past_end: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__" && offsets(&header, k)[1] > data_len)
        .map(|k| format!("`{k}`"))
        .collect();
    assert!(!past_end.is_empty());

    let msg = load_err(tmp.path(), &dir);
    assert_contains(&msg, &[&st.display().to_string(), "runs past the end"]);
    assert!(
        past_end.iter().any(|t| msg.contains(t.as_str())),
        "expected the error to name one of the cut-off tensors {past_end:?}, got:\n{msg}"
    );
}

#[test]
fn file_shorter_than_the_header_length() {
    for len in [0, 5] {
        let (tmp, dir) = temp_fixture("llama");
        let st = dir.join("model.safetensors");
        std::fs::write(&st, &b"\x10\x00\x00\x00\x00"[..len]).unwrap();
        let msg = load_err(tmp.path(), &dir);
        assert_contains(
            &msg,
            &[
                &st.display().to_string(),
                "not a valid safetensors file",
                &format!("file is {len} bytes"),
            ],
        );
    }
}

#[test]
fn header_length_larger_than_the_file() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\": 1}");
    std::fs::write(&st, &bytes).unwrap();
    let msg = load_err(tmp.path(), &dir);
    assert_contains(
        &msg,
        &[
            &st.display().to_string(),
            "header length 1000000 exceeds the file (16 bytes)",
        ],
    );
}

#[test]
fn data_offsets_past_the_end_of_the_file() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    let (header, data_start) = read_header(&st);
    let data_len = len - data_start as u64;
    // Move the tensor that ends the data section one tensor further: its size still
    // matches its shape, but its bytes would lie beyond the end of the file.
    let last = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .max_by_key(|k| offsets(&header, k)[1])
        .unwrap()
        .clone();
    let [begin, end] = offsets(&header, &last);
    assert_eq!(end, data_len);
    rewrite_header(&st, |h| {
        h[&last]["data_offsets"] = serde_json::json!([end, 2 * end - begin]);
    });
    assert_eq!(std::fs::metadata(&st).unwrap().len(), len);

    let msg = load_err(tmp.path(), &dir);
    assert_contains(
        &msg,
        &[
            &st.display().to_string(),
            &format!("tensor `{last}`"),
            &format!("data_offsets end {} runs past the end", 2 * end - begin),
        ],
    );
}

#[test]
fn data_offsets_inconsistent_with_shape_and_dtype() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    let tensor = "model.layers.1.self_attn.k_proj.weight";
    let (header, _) = read_header(&st);
    let [begin, end] = offsets(&header, tensor);
    assert_eq!(end - begin, 32 * 64 * 4);
    rewrite_header(&st, |h| {
        h[tensor]["data_offsets"] = serde_json::json!([begin, end - 4]);
    });

    let msg = load_err(tmp.path(), &dir);
    assert_contains(
        &msg,
        &[
            &st.display().to_string(),
            &format!("tensor `{tensor}`"),
            &format!("hold {} bytes", end - begin - 4),
            "shape [32, 64] of F32 needs 8192",
        ],
    );
}

#[test]
fn config_missing_a_field() {
    let (tmp, dir) = temp_fixture("llama");
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("hidden_size").unwrap();
    std::fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();

    let msg = load_err(tmp.path(), &dir);
    assert_contains(&msg, &[&config.display().to_string(), "`hidden_size`"]);
}

/// The error of loading fixture `name` with `edit` applied to its config.json, which it
/// must name.
fn edited_config_err(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (tmp, dir) = temp_fixture(name);
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let msg = load_err(tmp.path(), &dir);
    assert_contains(&msg, &[&config.display().to_string()]);
    msg
}

#[test]
fn malformed_cohere_configs_name_the_field() {
    let msg = edited_config_err("cohere2", |c| {
        c["layer_types"].as_array_mut().unwrap().pop();
    });
    assert_contains(&msg, &["`layer_types` has 3 entries for 4 layers"]);
    let msg = edited_config_err("cohere2", |c| {
        c["layer_types"][1] = "chunked_attention".into();
    });
    assert_contains(&msg, &["`layer_types[1]` is `chunked_attention`"]);
    let msg = edited_config_err("cohere2", |c| {
        c.as_object_mut().unwrap().remove("sliding_window");
    });
    assert_contains(&msg, &["`sliding_window`"]);
    for fixture in ["cohere", "cohere2"] {
        let msg = edited_config_err(fixture, |c| {
            c.as_object_mut().unwrap().remove("logit_scale");
        });
        assert_contains(&msg, &["missing field `logit_scale`"]);
        let msg = edited_config_err(fixture, |c| {
            c.as_object_mut().unwrap().remove("layer_norm_eps");
        });
        assert_contains(&msg, &["missing field `layer_norm_eps`"]);
    }
}

#[test]
fn unknown_architecture_lists_the_supported_ones() {
    let (tmp, dir) = temp_fixture("llama");
    let config = dir.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"LlamaForCausalLM\""));
    std::fs::write(
        &config,
        text.replace("\"LlamaForCausalLM\"", "\"FooForCausalLM\""),
    )
    .unwrap();

    let msg = load_err(tmp.path(), &dir);
    assert_contains(
        &msg,
        &[
            &config.display().to_string(),
            "unknown architecture `FooForCausalLM`",
            "supported: ",
        ],
    );
    for (arch, _, _) in upmix::formats::hf::ARCHITECTURES {
        assert_contains(&msg, &[arch]);
    }
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    // Same element count, so the header stays self-consistent; only the config disagrees.
    rewrite_header(&st, |h| {
        h["model.norm.weight"]["shape"] = serde_json::json!([8, 8]);
    });

    let msg = load_err(tmp.path(), &dir);
    assert_contains(
        &msg,
        &[
            &st.display().to_string(),
            "tensor `model.norm.weight`",
            "[8, 8]",
            "[64]",
        ],
    );
}

#[test]
fn unknown_pass_names_the_valid_ones_and_the_position() {
    let (tmp, dir) = temp_fixture("llama");
    let path = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(\n    models: {{ \"a\": Hf({}) }},\n    passes: [\n        Frobnicate(model: \"a\"),\n    ],\n)\n",
            ron_path(&dir)
        ),
    );
    let msg = pipeline_err(tmp.path(), &path);
    assert_contains(
        &msg,
        &[
            // Line 4, column 9: where `Frobnicate` starts.
            &format!("{}:4:9: ", path.display()),
            "`Frobnicate`",
            "Cast",
            "Merge",
        ],
    );
    for name in upmix_passes::pass_names() {
        assert_contains(&msg, &[&name]);
    }
}

#[test]
fn ron_syntax_error_has_file_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    // The `:` after `models` is missing.
    let path = write_pipeline(
        tmp.path(),
        "Pipeline(\n    device: \"cpu\",\n    models { \"a\": Hf(\"a\") },\n)\n",
    );
    let msg = pipeline_err(tmp.path(), &path);
    // Line 3, column 11: where the `:` should be.
    assert_contains(
        &msg,
        &[&format!("{}:3:11: ", path.display()), "Expected colon"],
    );
}

#[test]
fn failing_pass_writes_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("llama"), tmp.path().join("qwen2"));
    copy_fixture("llama", &a);
    copy_fixture("qwen2", &b);
    let out = tmp.path().join("out");
    let path = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(\n    models: {{ \"a\": Hf({}), \"b\": Hf({}) }},\n    passes: [ Merge(into: \"m\", models: [\"a\", \"b\"], weights: [0.5, 0.5]) ],\n    emit: [ Hf(model: \"m\", dir: {}) ],\n)\n",
            ron_path(&a),
            ron_path(&b),
            ron_path(&out)
        ),
    );
    let msg = pipeline_err(tmp.path(), &path);
    assert_contains(&msg, &["Merge", "models do not match", "node `"]);
    assert!(!out.exists(), "{} was created", out.display());
}

#[test]
fn emitting_over_the_models_own_input_is_refused() {
    let (tmp, dir) = temp_fixture("llama");
    let path = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(\n    models: {{ \"m\": Hf({0}) }},\n    emit: [ Hf(model: \"m\", dir: {0}) ],\n)\n",
            ron_path(&dir)
        ),
    );
    // `pipeline_err` also checks every input file is byte-for-byte unchanged and that no
    // temporary directory is left behind.
    let msg = pipeline_err(tmp.path(), &path);
    assert_contains(
        &msg,
        &[
            "refusing to write",
            &dir.display().to_string(),
            "writing `m`",
        ],
    );
}

#[test]
fn emit_into_a_fresh_directory_works() {
    let (tmp, dir) = temp_fixture("llama");
    let out = tmp.path().join("emitted").join("out");
    let path = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(\n    models: {{ \"m\": Hf({}) }},\n    emit: [ Hf(model: \"m\", dir: {}) ],\n)\n",
            ron_path(&dir),
            ron_path(&out)
        ),
    );
    run_file(&path, &RunOptions::default()).unwrap();
    assert!(out.join("config.json").is_file());
    assert!(out.join("model.safetensors").is_file());
    for parent in [tmp.path(), out.parent().unwrap()] {
        for entry in std::fs::read_dir(parent).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".upmix-"), "left behind: {name}");
        }
    }
    // The output is a checkpoint upmix reads back.
    let mut m = Module::new();
    upmix_frontend::load(&out, "back", &mut m).unwrap();
}

#[test]
fn cli_inspect_of_a_truncated_checkpoint_fails_cleanly() {
    let (tmp, dir) = temp_fixture("llama");
    let st = dir.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&st)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let before = files_under(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_upmix"))
        .arg("inspect")
        .arg(&dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "inspect succeeded:\n{stderr}");
    assert_contains(
        &stderr,
        &[&format!("Error: {}", st.display()), "runs past the end"],
    );
    assert!(!stderr.contains("panicked"), "inspect panicked:\n{stderr}");
    assert!(out.stdout.is_empty());
    assert!(files_under(tmp.path()) == before, "inspect wrote files");
}

#[test]
fn cast_to_f16_of_a_value_beyond_its_range_names_the_tensor() {
    let (tmp, dir) = temp_fixture("llama");
    common::write_f32_values(&dir, "model.layers.0.self_attn.q_proj.weight", &[1e6, 0.5]);
    let out = tmp.path().join("out");
    let path = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(\n    models: {{ \"m\": Hf({}) }},\n    passes: [ Cast(model: \"m\", dtype: \"f16\") ],\n    emit: [ Hf(model: \"m\", dir: {}) ],\n)\n",
            ron_path(&dir),
            ron_path(&out)
        ),
    );
    let msg = pipeline_err(tmp.path(), &path);
    assert_contains(
        &msg,
        &[
            "writing `m`",
            "weight `layers.0.attn.q`",
            "f16",
            "0 NaN and 1 Inf",
        ],
    );
    assert!(!out.exists(), "{} was created", out.display());
}

#[test]
fn emitting_a_mixtral_without_experts_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Through a pipeline: the config's expert count is checked when loading.
    let (_keep, dir) = temp_fixture("mixtral");
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["num_local_experts"] = 0.into();
    std::fs::write(&config, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let out = tmp.path().join("out");
    let pipeline = write_pipeline(
        tmp.path(),
        &format!(
            "Pipeline(models: {{ \"m\": Hf({}) }}, emit: [ Hf(model: \"m\", dir: {}) ])",
            ron_path(&dir),
            ron_path(&out)
        ),
    );
    let msg = pipeline_err(tmp.path(), &pipeline);
    assert_contains(&msg, &[&config.display().to_string(), "0 experts"]);
    assert!(!out.exists());

    // Through the API: a graph whose MoE lost its experts is verified before writing.
    let mut m = Module::new();
    upmix::frontend::load(&fixture("mixtral"), "m", &mut m).unwrap();
    let g = m.graphs.get_mut("m").unwrap();
    for id in g.node_ids() {
        if let upmix_ir::Op::MixtureOfExperts(moe) = &mut g.node_mut(id).op {
            moe.experts.clear();
        }
    }
    let out = tmp.path().join("api");
    let msg = no_panic_no_output(tmp.path(), "emit", || {
        upmix::emitters::emit_hf(&m, "m", &out, &Default::default())
            .unwrap_err()
            .to_string()
    });
    assert_contains(
        &msg,
        &[
            "nothing was written",
            "layers.0.ffn",
            "top_k 2 must be in 1..=0",
        ],
    );
}
