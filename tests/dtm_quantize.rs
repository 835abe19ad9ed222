//! Divergent Token Metrics for quantization: a sweep that quantizes one component at a
//! time measures what the `Quantize` pass and a full run give for that component, and a
//! `Plan` over such a table meets a bits-per-parameter target and writes a `Quantize`
//! pass that runs.

mod common;

use common::{device, load, plan, run_fragment, run_pass};
use upmix::backends::load_runtime;
use upmix::ir::DType;
use upmix::passes::components::components;
use upmix::passes::divergence::{continuations, divergences, summarize};
use upmix::passes::sensitivity::{Compression, SensitivityRow, SensitivityTable, Sweep};
use upmix::passes::{Pass, PassContext, Plan, PlanTarget, Quantize, QuantizeTarget};

#[test]
fn a_quantize_sweep_measures_what_the_quantize_pass_gives() {
    let m = load("llama");
    let g = &m.graphs["llama"];
    let prompts: Vec<Vec<u32>> = vec![(70..80).collect(), (100..104).collect()];
    let mut rt = load_runtime(&m, "llama", &device()).unwrap();
    let ys = continuations(rt.as_mut(), &prompts, 8, 16).unwrap();
    let levels = Compression::parse_list("quantize:q8_0, q4_0,int8_channel").unwrap();
    assert_eq!(
        levels,
        [DType::Q8_0, DType::Q4_0, DType::Int8PerChannel].map(Compression::Quantize)
    );
    let table = Sweep {
        graph: g,
        weights: &m.weights,
        prompts: &prompts,
        continuations: &ys,
        levels: &levels,
        norms: &Default::default(),
    }
    .run(rt.as_mut(), &mut |_, _, _| {})
    .unwrap();
    assert_eq!(table.rows.len(), 14 * 3);
    let q4 = &table.rows[1];
    assert_eq!(
        (q4.method.as_str(), q4.pattern.as_str(), q4.sparsity),
        ("quantize", "q4_0", 0.0)
    );
    // Q4_0: 18 bytes per 32 values; the fixture is f32.
    assert_eq!((q4.bits, q4.base_bits), (Some(4.5), Some(32.0)));
    // int8 per channel: a byte per value and a 4-byte scale per row of 64 (or 96).
    let int8 = &table.rows[2];
    let cols = if int8.component.ends_with("down") {
        96.0
    } else {
        64.0
    };
    assert_eq!(int8.bits, Some(8.0 + 32.0 / cols));
    assert!(
        table.rows.iter().any(|r| r.mean_fdt < 8.0),
        "some component must diverge when quantized, or this test shows nothing"
    );
    // Each row equals the Quantize pass applied to that component alone, run from the
    // start with its weight kept quantized.
    for row in table.rows.iter().step_by(4) {
        let mut m2 = load("llama");
        run_pass(
            &mut m2,
            Quantize {
                model: "llama".into(),
                into: None,
                dtype: None,
                targets: vec![QuantizeTarget {
                    select: vec![row.component.parse().unwrap()],
                    layers: None,
                    dtype: row.pattern.parse().unwrap(),
                }],
                ignore: Vec::new(),
            },
        )
        .unwrap();
        let mut full = load_runtime(&m2, "llama", &device()).unwrap();
        let s = summarize(&divergences(full.as_mut(), &prompts, &ys, 16).unwrap());
        let tag = format!("{} {}", row.component, row.pattern);
        assert_eq!(
            (row.mean_fdt, row.mean_sdt),
            (s.mean_fdt, s.mean_sdt),
            "{tag}"
        );
        assert!(
            (row.perplexity - s.perplexity).abs() <= 1e-4 * s.perplexity,
            "{tag}: {} against {}",
            row.perplexity,
            s.perplexity
        );
    }
    for bad in [
        "quantize:q5_k",
        "quantize:f32",
        "quantize:q8_0,int4",
        "quantize:",
    ] {
        let err = Compression::parse_list(bad).unwrap_err();
        assert!(err.contains("not a type to quantize to"), "{bad}: {err}");
    }
}

#[test]
fn quantization_levels_are_refused_with_ggml_activations() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "abc\n").unwrap();
    let m = load("llama");
    let opts = upmix::sensitivity::SensitivityOptions {
        prompts,
        n: 4,
        levels: Compression::parse_list("quantize:q8_0").unwrap(),
        calibration: None,
        window: 64,
        exec: upmix::Exec {
            device: device(),
            activations: upmix::backends::Activations::Ggml,
        },
    };
    let err = upmix::sensitivity::sweep(&m, "llama", &opts, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("measured with float activations"), "{err}");
}

fn qrow(component: &str, params: usize, dtype: &str, bits: f64, p25: f64) -> SensitivityRow {
    SensitivityRow {
        component: component.into(),
        layer: Some(0),
        part: component.into(),
        params,
        method: "quantize".into(),
        pattern: dtype.into(),
        sparsity: 0.0,
        bits: Some(bits),
        base_bits: Some(32.0),
        mean_fdt: p25,
        median_fdt: p25,
        p25_fdt: p25,
        mean_sdt: 0.0,
        perplexity: 1.0,
    }
}

fn write_table(dir: &std::path::Path, table: &SensitivityTable) -> std::path::PathBuf {
    let path = dir.join("table.json");
    std::fs::write(&path, serde_json::to_string(table).unwrap()).unwrap();
    path
}

#[test]
fn a_quantization_plan_meets_a_bits_target() {
    // a: robust at 4.5 bits; b: robust at 8.5, fragile at 4.5; c: fragile at both.
    let table = SensitivityTable {
        model: "m".into(),
        prompts: 4,
        n: 32,
        base_mean_fdt: 32.0,
        rows: vec![
            qrow("a", 100, "q8_0", 8.5, 32.0),
            qrow("a", 100, "q4_0", 4.5, 30.0),
            qrow("b", 100, "q8_0", 8.5, 31.0),
            qrow("b", 100, "q4_0", 4.5, 3.0),
            qrow("c", 200, "q8_0", 8.5, 2.0),
            qrow("c", 200, "q4_0", 4.5, 1.0),
        ],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = write_table(dir.path(), &table);
    // tau 32: a@q8_0 -> (100*8.5 + 300*32) / 400 = 26.125; tau 31: a, b @ q8_0 -> 20.25;
    // tau 30: a@q4_0, b@q8_0 -> 19.25.
    let a = plan(&path, PlanTarget::Bits(20.0)).assign(&table).unwrap();
    assert_eq!((a.threshold, a.average_bits()), (30.0, 19.25));
    assert_eq!(a.base_bits, 32.0);
    let a = plan(&path, PlanTarget::Bits(26.125))
        .assign(&table)
        .unwrap();
    assert_eq!((a.threshold, a.average_bits()), (32.0, 26.125));
    // Everything at q4_0 is the least the table allows.
    let a = plan(&path, PlanTarget::Bits(4.5)).assign(&table).unwrap();
    assert_eq!((a.threshold, a.rows.len(), a.average_bits()), (1.0, 3, 4.5));
    for (target, message) in [
        (
            PlanTarget::Bits(4.0),
            "reach at least 4.500 bits per parameter, above the target 4",
        ),
        (PlanTarget::Bits(40.0), "outside (0, 32.000]"),
        (PlanTarget::Sparsity(0.5), "give the target as `Bits(b)`"),
    ] {
        let err = plan(&path, target).assign(&table).unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
    // A table mixing pruning and quantization rows is refused.
    let mut mixed = table.clone();
    mixed.rows[3].method = "magnitude".into();
    let path = write_table(dir.path(), &mixed);
    let err = plan(&path, PlanTarget::Bits(20.0))
        .run(&mut upmix::ir::Module::new(), &mut PassContext::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row `b` (magnitude q4_0) does not fit a plan of quantization"),
        "{err}"
    );
}

#[test]
fn a_quantization_plan_fragment_is_a_quantize_pass_that_runs() {
    let m0 = load("llama");
    let comps = components(&m0.graphs["llama"]);
    // Even components keep FDT 8 at q4_0, odd ones only at q8_0.
    let rows: Vec<SensitivityRow> = comps
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let p = 4096;
            let q4 = qrow(&c.name, p, "q4_0", 4.5, if i % 2 == 0 { 8.0 } else { 1.0 });
            [qrow(&c.name, p, "q8_0", 8.5, 8.0), q4]
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
    let path = write_table(dir.path(), &table);
    let fragment = dir.path().join("plan.ron");
    let mut m = load("llama");
    Plan {
        fragment: Some(fragment.clone()),
        model: Some("llama".into()),
        into: Some("planned".into()),
        ..plan(&path, PlanTarget::Fdt(8.0))
    }
    .run(&mut m, &mut PassContext::default())
    .unwrap();
    let text = std::fs::read_to_string(&fragment).unwrap();
    assert!(
        text.contains("Quantize(") && text.contains("6.5000 bits per parameter"),
        "{text}"
    );
    // The fragment, pasted into a pipeline, quantizes the same way.
    let m2 = run_fragment(&text, dir.path());
    let dtype_of = |m: &upmix::ir::Module, graph: &str, name: &str| {
        let id = m.graphs[graph]
            .weight_ids()
            .into_iter()
            .find(|id| m.weights.get(*id).unwrap().name == name)
            .unwrap();
        m.weights.get(id).unwrap().dtype
    };
    for (i, c) in comps.iter().enumerate() {
        let want = if i % 2 == 0 { DType::Q4_0 } else { DType::Q8_0 };
        assert_eq!(dtype_of(&m, "planned", &c.name), want, "{}", c.name);
        assert_eq!(dtype_of(&m2, "llama", &c.name), want, "{}", c.name);
    }
    // `levels` restricts the plan to some of the table's levels.
    Plan {
        model: Some("llama".into()),
        into: Some("q8".into()),
        levels: Some(vec!["q8_0".into()]),
        ..plan(&path, PlanTarget::Fdt(8.0))
    }
    .run(&mut m, &mut PassContext::default())
    .unwrap();
    for c in &comps {
        assert_eq!(dtype_of(&m, "q8", &c.name), DType::Q8_0, "{}", c.name);
    }
    let err = Plan {
        levels: Some(vec!["q4_1".into()]),
        ..plan(&path, PlanTarget::Fdt(8.0))
    }
    .run(&mut m, &mut PassContext::default())
    .unwrap_err()
    .to_string();
    assert!(err.contains("table.json has no level `q4_1`"), "{err}");
}
