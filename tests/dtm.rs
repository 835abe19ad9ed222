//! Divergent Token Metrics, the sensitivity sweep and the `Plan` pass on tiny models:
//! identical models never diverge, a hand-built model diverges exactly where it was made
//! to, resumed scoring equals a full pass, and bad requests are clear errors. The
//! comparison with transformers on a pruned SmolLM2 is in tests/smollm2.rs.

mod common;

use std::collections::HashMap;

use common::{device, golden_dir, load, model_dir, plan, run_fragment};
use upmix::backends::load_runtime;
use upmix::dtm::divergence;
use upmix::ir::{GraphBuilder, HostTensor, ModelMeta, Module, Pattern, PruneRule};
use upmix::passes::components::components;
use upmix::passes::divergence::{continuations, divergences, summarize};
use upmix::passes::sensitivity::{Compression, SensitivityRow, SensitivityTable, Sweep};
use upmix::passes::{Pass, PassContext, Plan, PlanTarget, PruneMethod};

fn prompts_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("prompts.txt");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn identical_models_never_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path(), "hello world\nthe cat sat\n\nabc\n");
    let mut m = load("llama");
    upmix::frontend::load(&model_dir("llama"), "copy", &mut m).unwrap();
    let r = divergence(&m, "llama", "copy", &prompts, 16, &device().into()).unwrap();
    assert_eq!(r.rows.len(), 3, "blank lines are not prompts");
    for row in &r.rows {
        assert_eq!((row.fdt, row.sdt, row.divergent.len()), (16, 0.0, 0));
    }
    assert_eq!(
        (r.summary.mean_fdt, r.summary.p25_fdt, r.summary.mean_sdt),
        (16.0, 16.0, 0.0)
    );
}

/// `embed` (identity) -> `lm_head`: the logits after token `t` are column `t` of the head,
/// so the model predicts `next[t]` whatever came before.
fn successor_model(m: &mut Module, name: &str, next: &[usize]) {
    let v = next.len();
    let mut eye = vec![0f32; v * v];
    let mut head = vec![0f32; v * v];
    for t in 0..v {
        eye[t * v + t] = 1.0;
        head[next[t] * v + t] = 1.0;
    }
    let table = m
        .weights
        .literal(&format!("{name}.embed"), HostTensor::new(vec![v, v], eye))
        .unwrap();
    let head = m
        .weights
        .literal(&format!("{name}.head"), HostTensor::new(vec![v, v], head))
        .unwrap();
    let meta = ModelMeta {
        vocab_size: v,
        hidden_size: v,
        max_position_embeddings: 64,
        ..ModelMeta::default()
    };
    let mut b = GraphBuilder::new(name, meta);
    let input = b.input();
    let x = b.embedding(input, table);
    let logits = b.linear("lm_head", x, head);
    m.insert(b.output(logits));
}

#[test]
fn a_hand_built_model_diverges_where_it_was_made_to() {
    let mut m = Module::new();
    // Base: t -> t + 1 (mod 8). Candidate: the same except 3 -> 6.
    let base: Vec<usize> = (0..8).map(|t| (t + 1) % 8).collect();
    let mut changed = base.clone();
    changed[3] = 6;
    successor_model(&mut m, "base", &base);
    successor_model(&mut m, "candidate", &changed);
    let prompts = vec![vec![0u32], vec![5, 6]];
    let mut rt = load_runtime(&m, "base", &device()).unwrap();
    let ys = continuations(rt.as_mut(), &prompts, 12, 16).unwrap();
    assert_eq!(ys[0], [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4]);
    let mut cand = load_runtime(&m, "candidate", &device()).unwrap();
    let rows = divergences(cand.as_mut(), &prompts, &ys, 1).unwrap();
    // y[i] is predicted from y[i - 1] (the prompt's last token for i = 0): wrong after a 3.
    assert_eq!((rows[0].fdt, rows[0].divergent.clone()), (3, vec![3, 11]));
    assert_eq!(rows[0].sdt, 2.0 / 12.0);
    // From 6: 7 0 1 2 3 | 4 ... : the 3 is y[4], so y[5] diverges, and y[5 + 8].
    assert_eq!(ys[1][..6], [7, 0, 1, 2, 3, 4]);
    assert_eq!((rows[1].fdt, rows[1].divergent.clone()), (5, vec![5]));
    let s = summarize(&rows);
    assert_eq!((s.mean_fdt, s.median_fdt, s.p25_fdt), (4.0, 4.0, 3.5));
}

#[test]
fn resumed_scores_equal_full_passes_after_a_swap() {
    let m = load("llama");
    let g = &m.graphs["llama"];
    let seqs: Vec<Vec<u32>> = vec![(10..40).collect(), (50..62).collect(), vec![7, 8, 9]];
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let comps = components(g);
    let nodes: Vec<&str> = vec!["layers.0.attn", "layers.1.ffn"];
    let mut rt = load_runtime(&m, "llama", &device()).unwrap();
    rt.save_states(&refs, &nodes).unwrap();
    for c in comps
        .iter()
        .filter(|c| c.layer == Some(1) && c.part.starts_with("ffn"))
    {
        let mut w = m.weights.materialize(c.weight).unwrap();
        PruneRule::magnitude(Pattern::Row(0.5)).apply(&mut w.data, w.shape[1]);
        rt.replace_weights(&[(c.weight, w)]).unwrap();
        let full = rt.score(&refs).unwrap();
        for node in &nodes {
            let resumed = rt.score_saved(node).unwrap();
            assert_eq!(resumed.len(), full.len());
            for (a, b) in resumed.iter().zip(&full) {
                assert_eq!(a.argmax, b.argmax, "{} at {node}", c.name);
                let worst = a
                    .log_probs
                    .iter()
                    .zip(&b.log_probs)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-5, "{} at {node}: {worst}", c.name);
            }
        }
        rt.restore_weights();
    }
    let err = rt.score_saved("layers.0.ffn").unwrap_err().to_string();
    assert!(err.contains("layers.0.ffn (no saved state)"), "{err}");
}

#[test]
fn a_sweep_measures_each_component_alone() {
    let m = load("llama");
    let g = &m.graphs["llama"];
    let prompts: Vec<Vec<u32>> = vec![(70..80).collect(), (100..104).collect()];
    let mut rt = load_runtime(&m, "llama", &device()).unwrap();
    let ys = continuations(rt.as_mut(), &prompts, 8, 16).unwrap();
    let levels = Compression::parse_list("magnitude:0.5,2:4").unwrap();
    let table = Sweep {
        graph: g,
        weights: &m.weights,
        prompts: &prompts,
        continuations: &ys,
        levels: &levels,
        norms: &HashMap::new(),
    }
    .run(rt.as_mut(), &mut |_, _, _| {})
    .unwrap();
    assert_eq!(table.rows.len(), 14 * 2);
    assert_eq!(table.base_mean_fdt, 8.0);
    // Each row equals pruning that one component in a copy of the model and measuring it
    // with full passes.
    for row in table.rows.iter().step_by(5) {
        let mut m2 = load("llama");
        let c = components(&m2.graphs["llama"])
            .into_iter()
            .find(|c| c.name == row.component)
            .unwrap();
        let pattern = if row.pattern == "2:4" {
            Pattern::NofM { n: 2, m: 4 }
        } else {
            Pattern::Row(0.5)
        };
        let mut w = m2.weights.materialize(c.weight).unwrap();
        PruneRule::magnitude(pattern).apply(&mut w.data, w.shape[1]);
        let mut full = load_runtime(&m2, "llama", &device()).unwrap();
        full.replace_weights(&[(c.weight, w)]).unwrap();
        let s = summarize(&divergences(full.as_mut(), &prompts, &ys, 16).unwrap());
        assert_eq!(
            (row.mean_fdt, row.mean_sdt),
            (s.mean_fdt, s.mean_sdt),
            "{}",
            row.component
        );
        assert!((row.perplexity - s.perplexity).abs() <= 1e-4 * s.perplexity);
        m2.graphs.clear();
    }
    for bad in [
        "wanda",
        "sparse:0.5",
        "magnitude:1.0",
        "magnitude:0.5,x",
        "magnitude:4:2",
    ] {
        assert!(Compression::parse_list(bad).is_err(), "{bad}");
    }
}

fn row(component: &str, params: usize, sparsity: f64, p25: f64) -> SensitivityRow {
    SensitivityRow {
        component: component.into(),
        layer: Some(0),
        part: component.into(),
        params,
        method: "magnitude".into(),
        pattern: format!("{sparsity}"),
        sparsity,
        bits: None,
        base_bits: None,
        mean_fdt: p25,
        median_fdt: p25,
        p25_fdt: p25,
        mean_sdt: 0.0,
        perplexity: 1.0,
    }
}

#[test]
fn the_plan_lowers_a_threshold_until_the_target_sparsity() {
    // a: robust (keeps 30 tokens at 0.9); b: fragile beyond 0.5; c: fragile everywhere.
    let table = SensitivityTable {
        model: "m".into(),
        prompts: 4,
        n: 32,
        base_mean_fdt: 32.0,
        rows: vec![
            row("a", 100, 0.5, 32.0),
            row("a", 100, 0.9, 30.0),
            row("b", 100, 0.5, 20.0),
            row("b", 100, 0.9, 4.0),
            row("c", 200, 0.5, 2.0),
            row("c", 200, 0.9, 1.0),
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.json");
    std::fs::write(&path, serde_json::to_string(&table).unwrap()).unwrap();
    let a = plan(&path, PlanTarget::Sparsity(0.2))
        .assign(&table)
        .unwrap();
    // tau 32: a@0.5 -> 50/400; tau 30: a@0.9 -> 90/400 >= 0.2.
    assert_eq!(a.threshold, 30.0);
    assert_eq!(a.average_gain, 90.0 / 400.0);
    let a = plan(&path, PlanTarget::Sparsity(0.3))
        .assign(&table)
        .unwrap();
    assert_eq!((a.threshold, a.average_gain), (20.0, 140.0 / 400.0));
    let a = plan(&path, PlanTarget::Fdt(4.0)).assign(&table).unwrap();
    assert_eq!(a.average_gain, 180.0 / 400.0);
    // A step that raises two components at once raises only as many as the target needs.
    let pair = SensitivityTable {
        rows: vec![
            row("x", 100, 0.5, 10.0),
            row("y", 100, 0.5, 10.0),
            row("z", 100, 0.5, 9.0),
        ],
        ..table.clone()
    };
    let a = plan(&path, PlanTarget::Sparsity(0.15))
        .assign(&pair)
        .unwrap();
    assert_eq!(
        a.rows
            .iter()
            .map(|r| r.component.as_str())
            .collect::<Vec<_>>(),
        ["x"]
    );
    assert_eq!((a.threshold, a.average_gain), (10.0, 50.0 / 300.0));
    let err = plan(&path, PlanTarget::Sparsity(0.95))
        .assign(&table)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reach at most 0.900 average sparsity, below the target 0.95"),
        "{err}"
    );
    let err = plan(&path, PlanTarget::Sparsity(1.5))
        .assign(&table)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target sparsity 1.5 is outside [0, 1)"),
        "{err}"
    );
}

#[test]
fn a_plan_fragment_is_a_prune_pass_that_runs() {
    let m0 = load("llama");
    let comps = components(&m0.graphs["llama"]);
    let rows: Vec<SensitivityRow> = comps
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let mut lo = row(&c.name, 4096, 0.5, 8.0);
            let mut hi = row(&c.name, 4096, 0.9, if i % 2 == 0 { 8.0 } else { 1.0 });
            lo.part = c.part.clone();
            hi.part = c.part.clone();
            [lo, hi]
        })
        .collect();
    let table = SensitivityTable {
        model: "llama".into(),
        prompts: 2,
        n: 8,
        base_mean_fdt: 8.0,
        rows,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.json");
    std::fs::write(&path, serde_json::to_string(&table).unwrap()).unwrap();
    let fragment = dir.path().join("plan.ron");
    let mut m = load("llama");
    let p = Plan {
        fragment: Some(fragment.clone()),
        model: Some("llama".into()),
        into: Some("planned".into()),
        ..plan(&path, PlanTarget::Fdt(8.0))
    };
    p.run(&mut m, &mut PassContext::default()).unwrap();
    let text = std::fs::read_to_string(&fragment).unwrap();
    assert!(
        text.contains("Prune(") && text.contains("sparsity: 0.9") && text.contains("sparsity: 0.5"),
        "{text}"
    );
    // The fragment, pasted into a pipeline, prunes the same way.
    let m2 = run_fragment(&text, dir.path());
    for c in &comps {
        let a = m
            .weights
            .materialize(
                m.graphs["planned"]
                    .weight_ids()
                    .into_iter()
                    .find(|id| m.weights.get(*id).unwrap().name == c.name)
                    .unwrap(),
            )
            .unwrap();
        let b = m2
            .weights
            .materialize(
                m2.graphs["llama"]
                    .weight_ids()
                    .into_iter()
                    .find(|id| m2.weights.get(*id).unwrap().name == c.name)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(a.data, b.data, "{}", c.name);
    }
    // Mismatched methods are refused.
    let wanda = Plan {
        method: PruneMethod::Wanda {
            calibration: golden_dir().join("prune/calibration.txt"),
            window: None,
            max_windows: None,
        },
        ..plan(&path, PlanTarget::Fdt(8.0))
    };
    let err = wanda
        .run(&mut m, &mut PassContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row `layers.0.attn.q` (magnitude 0.5) does not fit a plan of wanda pruning"),
        "{err}"
    );
}

#[test]
fn bad_dtm_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = prompts_file(dir.path(), "\n  \n");
    let mut m = load("llama");
    upmix::frontend::load(&model_dir("llama"), "copy", &mut m).unwrap();
    let err = format!(
        "{:#}",
        divergence(&m, "llama", "copy", &empty, 8, &device().into()).unwrap_err()
    );
    assert!(err.contains("holds no prompts (one per line)"), "{err}");
    let prompts = prompts_file(dir.path(), "abc\n");
    let err = format!(
        "{:#}",
        divergence(&m, "llama", "copy", &prompts, 0, &device().into()).unwrap_err()
    );
    assert!(err.contains("at least 1 token"), "{err}");
    let err = format!(
        "{:#}",
        divergence(&m, "llama", "nope", &prompts, 4, &device().into()).unwrap_err()
    );
    assert!(err.contains("nope"), "{err}");
    let missing = dir.path().join("missing.txt");
    let err = format!(
        "{:#}",
        divergence(&m, "llama", "copy", &missing, 4, &device().into()).unwrap_err()
    );
    assert!(err.contains("missing.txt"), "{err}");
}

#[test]
fn base_continuations_are_cached_by_model_content() {
    use upmix::dtm::{base_continuations_in, cache_key};
    let cache = tempfile::tempdir().unwrap();
    let mut m = load("llama");
    upmix::frontend::load(&model_dir("llama"), "same", &mut m).unwrap();
    upmix::frontend::load(&model_dir("llama_b"), "other", &mut m).unwrap();
    let prompts = vec![vec![5u32, 6, 7], vec![9]];
    let key = |m: &Module, g: &str, n: usize| cache_key(m, g, &prompts, n).unwrap();
    assert_eq!(
        key(&m, "llama", 8),
        key(&m, "same", 8),
        "the name is not content"
    );
    assert_ne!(key(&m, "llama", 8), key(&m, "other", 8));
    assert_ne!(key(&m, "llama", 8), key(&m, "llama", 9));
    assert_ne!(
        key(&m, "llama", 8),
        cache_key(&m, "llama", &prompts[..1], 8).unwrap()
    );
    let (first, hit) =
        base_continuations_in(cache.path(), &m, "llama", &prompts, 8, &device().into()).unwrap();
    assert!(!hit);
    let (again, hit) =
        base_continuations_in(cache.path(), &m, "same", &prompts, 8, &device().into()).unwrap();
    assert!(hit, "a model with the same content reads the cache");
    assert_eq!(first, again);
    let (_, hit) =
        base_continuations_in(cache.path(), &m, "other", &prompts, 8, &device().into()).unwrap();
    assert!(!hit);
    // A pruned model is other content.
    let pass = upmix::passes::Prune {
        model: "llama".into(),
        into: None,
        method: PruneMethod::Magnitude,
        scope: None,
        targets: vec![upmix::passes::PruneTarget {
            select: vec!["ffn.up".parse().unwrap()],
            layers: None,
            sparsity: Some(0.5),
            pattern: None,
        }],
        ignore: Vec::new(),
    };
    common::run_pass(&mut m, pass).unwrap();
    assert_ne!(key(&m, "llama", 8), key(&m, "same", 8));
    // A damaged cache file is recomputed, not trusted.
    let file = cache
        .path()
        .join("continuations")
        .join(format!("{}.json", key(&m, "same", 8)));
    assert!(file.is_file());
    std::fs::write(&file, "{").unwrap();
    let (ys, hit) =
        base_continuations_in(cache.path(), &m, "same", &prompts, 8, &device().into()).unwrap();
    assert!(!hit);
    assert_eq!(ys, first);
}

fn upmix(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_dtm_json_and_sensitivity_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts_file(dir.path(), "hello world\nthe cat\n");
    let (a, b) = (model_dir("llama"), model_dir("llama_b"));
    let (a, b, p) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        prompts.to_str().unwrap(),
    );
    let out = upmix(&["dtm", a, b, "--prompts", p, "-n", "6", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["continuation"].as_array().unwrap().len(), 6);
        let fdt = row["fdt"].as_u64().unwrap();
        let divergent = row["divergent"].as_array().unwrap();
        assert_eq!(divergent.first().map_or(6, |d| d.as_u64().unwrap()), fdt);
        assert_eq!(row["sdt"].as_f64().unwrap(), divergent.len() as f64 / 6.0);
    }
    let out_dir = dir.path().join("sens");
    let out = upmix(&[
        "sensitivity",
        a,
        "--prompts",
        p,
        "-n",
        "4",
        "--method",
        "magnitude:0.5,2:4",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table: SensitivityTable =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("sensitivity.json")).unwrap())
            .unwrap();
    assert_eq!((table.rows.len(), table.model.as_str()), (28, "llama"));
    let csv = std::fs::read_to_string(out_dir.join("sensitivity.csv")).unwrap();
    assert_eq!(csv.lines().count(), 29);
    for svg in ["heatmap-magnitude-0.5.svg", "heatmap-magnitude-2of4.svg"] {
        let text = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("layer 1") && text.contains("ffn.down"));
    }
    // Bad requests.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap();
    fails_with(&["dtm", a, b, "--prompts", empty], "holds no prompts");
    let sweep = |method| {
        [
            "sensitivity",
            a,
            "--prompts",
            p,
            "--method",
            method,
            "--out",
            "x",
        ]
    };
    fails_with(
        &sweep("magnitude:1.2"),
        "--method: sparsity `1.2` is not a number in [0, 1)",
    );
    fails_with(&sweep("wanda:0.5"), "--calibration");
}

/// `upmix args` fails with a message containing `text`.
fn fails_with(args: &[&str], text: &str) {
    let out = upmix(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(text),
        "{args:?}: {err}"
    );
}
