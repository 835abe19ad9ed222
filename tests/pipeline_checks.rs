//! Pipelines that are wrong are refused when they are read, before any model is loaded
//! (`Pipeline::parse` loads none: it reads the checkpoints' headers at most), each with
//! the file, line and column of the setting at fault, and each cause printed once.

use std::path::{Path, PathBuf};

use upmix::pipeline::Pipeline;

mod common;

/// A pipeline file in the golden directory's parent, so that model paths resolve.
fn origin() -> PathBuf {
    common::golden_dir().join("hostile.ron")
}

/// The error `text` is refused with, as the CLI prints it.
fn refused(text: &str) -> String {
    match Pipeline::parse(text, &origin()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => upmix::error_chain(&e),
    }
}

/// The `file:line:column:` an error starts with.
fn position(err: &str) -> (usize, usize) {
    let prefix = format!("{}:", origin().display());
    let rest = err
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("no position: {err}"));
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().unwrap().parse().unwrap();
    let col = parts.next().unwrap().parse().unwrap();
    (line, col)
}

const MODELS: &str = r#"models: { "a": Hf("models/llama"), "b": Hf("models/llama_b") },"#;

#[test]
fn a_layer_range_past_the_model_is_refused_at_its_setting() {
    let text = format!(
        "Pipeline(\n    {MODELS}\n    passes: [\n        Upcycle(into: \"moe\", experts: [\"a\", \"b\"], top_k: 1,\n                layers: \"0..99\"),\n    ],\n)"
    );
    let err = refused(&text);
    assert_eq!(position(&err).0, 5, "{err}");
    assert!(
        err.contains("Upcycle: `a` has 2 layers (0..2): layer 98 in layers 0..99 does not exist"),
        "{err}"
    );
    // A model a pass creates has the layers of the model it came from.
    let text = format!(
        "Pipeline(\n    {MODELS}\n    passes: [\n        Merge(into: \"m\", models: [\"a\", \"b\"]),\n        Quantize(model: \"m\", targets: [(select: [\"attn.q\"], layers: \"1..3\", dtype: \"q8_0\")]),\n    ],\n)"
    );
    let err = refused(&text);
    assert_eq!(position(&err).0, 5, "{err}");
    assert!(
        err.contains("layer 2 in layers 1..3 does not exist"),
        "{err}"
    );
}

#[test]
fn a_learning_rate_that_is_not_positive_is_refused_where_it_is_written() {
    for lr in ["-1.0", "0.0", "inf"] {
        let text = format!(
            "Pipeline(\n    {MODELS}\n    passes: [\n        Train(model: \"a\", data: {{\"x\": \"x.txt\"}}, steps: 1, batch: 1,\n              seq_len: 8, trainable: [\"all\"], lr: {lr}),\n    ],\n)"
        );
        let err = refused(&text);
        assert_eq!(position(&err).0, 5, "{err}");
        assert!(err.contains("learning rate `lr"), "{err}");
        assert!(err.contains("must be positive and finite"), "{err}");
    }
}

#[test]
fn two_emits_to_one_path_are_refused_at_the_second() {
    let text = format!(
        "Pipeline(\n    {MODELS}\n    emit: [\n        Hf(model: \"a\", dir: \"out/x\"),\n        Hf(model: \"b\", dir: \"out/../out/x\"),\n    ],\n)"
    );
    let err = refused(&text);
    // The second emit differs in spelling only; it is refused, not the first.
    assert!(err.contains("emit 2 writes"), "{err}");
    assert!(err.contains("like emit 1 (of `a`) does"), "{err}");
    assert_eq!(position(&err).0, 5, "{err}");
}

#[test]
fn merge_weights_that_sum_to_zero_are_refused_once() {
    let text = format!(
        "Pipeline(\n    {MODELS}\n    passes: [\n        Merge(into: \"m\", models: [\"a\", \"b\"],\n              weights: [1.0, -1.0]),\n    ],\n)"
    );
    let err = refused(&text);
    assert_eq!(position(&err).0, 5, "{err}");
    assert!(err.contains("sum to zero"), "{err}");
    assert_eq!(err.matches("sum to zero").count(), 1, "{err}");
    // One weight per model.
    let err = refused(&text.replace("[1.0, -1.0]", "[1.0]"));
    assert!(err.contains("1 weights given for 2 models"), "{err}");
}

#[test]
fn typed_settings_name_the_value_and_its_position() {
    let cases = [
        ("Cast(model: \"a\", dtype: \"bf61\")", "unknown type `bf61`"),
        ("Cast(model: \"a\", dtype: \"q4_0\")", "unknown type `q4_0`"),
        (
            "Prune(model: \"a\", targets: [(select: [\"attn.*\"], pattern: \"4:2\")])",
            "pattern `4:2` is not N:M",
        ),
        (
            "Prune(model: \"a\", scope: \"rows\", targets: [(select: [\"attn.*\"], sparsity: 0.5)])",
            "scope `rows` is not `row` or `tensor`",
        ),
        (
            "Prune(model: \"a\", targets: [(select: [\"re:(\"], sparsity: 0.5)])",
            "selector `re:(` is not a valid regular expression",
        ),
        (
            "Upcycle(into: \"m\", experts: [\"a\", \"b\"], top_k: 1, layers: \"2..1\")",
            "layers `2..1` is not a range",
        ),
        (
            "Plan(table: \"t.json\", target: Fdt(1.0), statistic: \"p52\")",
            "statistic `p52` is not `p25`, `median` or `mean`",
        ),
    ];
    for (pass, want) in cases {
        let text = format!("Pipeline(\n    {MODELS}\n    passes: [\n        {pass},\n    ],\n)");
        let err = refused(&text);
        assert_eq!(position(&err).0, 4, "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
    for (field, value, want) in [
        ("device", "\"gpu\"", "gpu"),
        ("activations", "\"int8\"", "activations `int8`"),
    ] {
        let text = format!("Pipeline(\n    {field}: {value},\n    {MODELS}\n)");
        let err = refused(&text);
        assert_eq!(position(&err).0, 2, "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn checks_that_need_models_read_headers_only() {
    // A model that does not exist cannot be checked against, and is not loaded here:
    // reading the file succeeds, and loading it later says why it fails.
    let text = "Pipeline(\n    models: { \"a\": Hf(\"nowhere\") },\n    passes: [ Quantize(model: \"a\", targets: [(select: [\"attn.q\"], layers: \"0..99\", dtype: \"f16\")]) ],\n)";
    Pipeline::parse(text, Path::new("/tmp/p.ron")).unwrap();
}

#[test]
fn unknown_pass_by_name_lists_the_valid_ones() {
    let err = match upmix_passes::create("Frobnicate", "(model: \"a\")") {
        Ok(_) => panic!("created a pass named Frobnicate"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("`Frobnicate`") && err.contains("valid passes: Cast, Merge"),
        "{err}"
    );
    // The mirrored positive: arguments written as in pipeline files.
    upmix_passes::create("Cast", "(model: \"a\", dtype: \"bf16\")").unwrap();
    upmix_passes::create(
        "Merge",
        "(into: \"m\", models: [\"a\", \"b\"], weights: [0.3, 0.7])",
    )
    .unwrap();
}
