//! The training loop's options on the tiny Llama over the law corpus: gradient
//! accumulation equals one larger batch, clipping scales to the global norm, held-out
//! evaluation, a diverging run stops before its update, Ctrl-C stops with a checkpoint.

mod common;

use common::{model_dir, repo_root, run_pipeline, values_of};

/// A Train pipeline on the tiny Llama over the law corpus, with `fields` added.
fn law_pipeline(fields: &str) -> String {
    let data = repo_root().join("examples/data/law");
    format!(
        r#"Pipeline(models: {{ "llama": Hf({:?}) }}, passes: [Train(model: "llama",
            data: {{ "law": {:?} }}, seq_len: 24, trainable: ["attn.*", "ffn.*"], lr: 3e-3,
            {fields})])"#,
        model_dir("llama").display().to_string(),
        data.join("train.txt").display().to_string(),
    )
}

/// A column of a loss CSV, empty cells as `None`.
fn log_column(path: &std::path::Path, name: &str) -> Vec<Option<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let i = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(i).unwrap().parse().ok())
        .collect()
}

#[test]
fn gradient_accumulation_equals_one_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (accumulated, _) = run_pipeline(
        &law_pipeline(r#"steps: 3, batch: 2, grad_accum: 3, log: "a.csv""#),
        dir.path(),
    )
    .unwrap();
    let (large, _) = run_pipeline(
        &law_pipeline(r#"steps: 3, batch: 6, log: "b.csv""#),
        dir.path(),
    )
    .unwrap();
    // The same six windows a step (drawn in the same order), their gradients averaged.
    let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
    for (x, y) in log_column(&a, "loss").iter().zip(log_column(&b, "loss")) {
        assert!((x.unwrap() - y.unwrap()).abs() < 1e-5, "{x:?} {y:?}");
    }
    let mut worst = 0f32;
    for ((name, x), (_, y)) in values_of(&accumulated, "llama", "layers.")
        .iter()
        .zip(values_of(&large, "llama", "layers."))
    {
        for (p, q) in x.iter().zip(&y) {
            worst = worst.max((p - q).abs());
        }
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

#[test]
fn clipping_scales_the_gradient_to_the_global_norm() {
    let dir = tempfile::tempdir().unwrap();
    let (clipped, _) = run_pipeline(
        &law_pipeline(r#"steps: 3, batch: 2, max_grad_norm: 0.001, log: "a.csv""#),
        dir.path(),
    )
    .unwrap();
    let (free, _) = run_pipeline(
        &law_pipeline(r#"steps: 3, batch: 2, log: "b.csv""#),
        dir.path(),
    )
    .unwrap();
    // The logged norm is the one before clipping: equal at the first step (same weights,
    // same batch), far above the cap.
    let (a, b) = (
        log_column(&dir.path().join("a.csv"), "grad_norm"),
        log_column(&dir.path().join("b.csv"), "grad_norm"),
    );
    assert_eq!(a[0], b[0]);
    assert!(a[0].unwrap() > 0.1, "{a:?}");
    // AdamW is blind to one constant scale of every gradient; clipping scales each step
    // by another factor, which changes the later steps.
    let (x, y) = (
        values_of(&clipped, "llama", "layers.0.attn.q"),
        values_of(&free, "llama", "layers.0.attn.q"),
    );
    assert_ne!(x[0].1, y[0].1);
}

#[test]
fn evaluation_logs_the_held_out_cross_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let eval = repo_root().join("examples/data/law/eval.txt");
    let pipeline = law_pipeline(&format!(
        r#"into: "trained", steps: 4, batch: 2, eval: {{ "law": {:?} }}, eval_every: 2,
           log: "a.csv""#,
        eval.display().to_string()
    ))
    .replace(
        "])",
        &format!(
            r#"], eval: [Perplexity(model: "trained", text: {:?}, window: 24, bos: false)])"#,
            eval.display().to_string()
        ),
    );
    let (_, report) = run_pipeline(&pipeline, dir.path()).unwrap();
    let column = log_column(&dir.path().join("a.csv"), "eval_law");
    assert!(column[0].is_none() && column[2].is_none(), "{column:?}");
    let last = column[3].unwrap();
    assert!(column[1].unwrap() > last, "{column:?}");
    // The pipeline's own perplexity of the trained model over the same windows.
    let ppl: f64 = report
        .lines()
        .find(|l| l.contains("perplexity of trained"))
        .and_then(|l| l.split(": ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap();
    assert!((ppl.ln() - last).abs() < 1e-4, "{} {last}", ppl.ln());
    assert!(report.contains(&format!("eval law {last:.4}")), "{report}");
}

#[test]
fn a_diverging_run_stops_before_updating_and_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_pipeline(
        &law_pipeline(
            r#"steps: 20, batch: 2, checkpoint: "ckpt", checkpoint_every: 1, log: "a.csv""#,
        )
        .replace("lr: 3e-3", "lr: 1e30"),
        dir.path(),
    )
    .unwrap_err();
    let step: usize = err
        .split(" at step ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(err.contains("the weights were not updated"), "{err}");
    assert!(
        err.contains(&format!("the last checkpoint, of step {}", step - 1)),
        "{err}"
    );
    let logged = log_column(&dir.path().join("a.csv"), "loss");
    assert_eq!(logged.len(), step - 1);
}

#[test]
fn ctrl_c_stops_after_a_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.ron");
    std::fs::write(
        &file,
        law_pipeline(
            r#"steps: 100000, batch: 1, checkpoint: "ckpt", checkpoint_every: 1000, log: "a.csv""#,
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(["run", file.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once it trains (the first checkpoint is on disk), ask it to stop.
    let ckpt = dir.path().join("ckpt");
    let start = std::time::Instant::now();
    while !ckpt.join("step-1000.ckpt").exists() {
        assert!(start.elapsed().as_secs() < 600, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signals a child this test started and has not yet waited for.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let step: usize = stderr
        .split("stopped after step ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(stderr.contains("--resume"), "{stderr}");
    // The step it stopped at has its checkpoint and log rows; nothing half written.
    assert!(ckpt.join(format!("step-{step}.ckpt")).exists());
    assert_eq!(log_column(&dir.path().join("a.csv"), "loss").len(), step);
    assert!(dir.path().join("a.svg").exists());
    let names: Vec<_> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".ckpt")), "{names:?}");
}

/// Training the routers of a top-1 renormalised mixture (every weight 1: the router only
/// picks) says that the cross-entropy gives them no gradient; top-2 says nothing.
#[test]
fn training_routers_that_only_pick_is_noted() {
    let data = repo_root().join("examples/data/law/train.txt");
    for (top_k, noted) in [(1, true), (2, false)] {
        let pipeline = format!(
            r#"Pipeline(models: {{ "a": Hf({:?}), "b": Hf({:?}) }}, passes: [
                Upcycle(into: "moe", experts: ["a", "b"], top_k: {top_k}),
                Train(model: "moe", data: {{ "law": {:?} }}, steps: 2, batch: 2, seq_len: 24,
                      trainable: ["ffn.router"])])"#,
            model_dir("llama").display().to_string(),
            model_dir("llama_b").display().to_string(),
            data.display().to_string(),
        );
        let dir = tempfile::tempdir().unwrap();
        let (_, report) = run_pipeline(&pipeline, dir.path()).unwrap();
        assert_eq!(
            report.contains("routers get no gradient"),
            noted,
            "{report}"
        );
    }
}
