//! `Prune` against torch goldens (scripts/make_prune_goldens.py) on the tiny llama fixture:
//! magnitude (per row, per tensor) and 2:4 bit for bit; Wanda's activation norms within
//! 1e-6 and its masks equal, on the same calibration text. Bad requests are clear errors.

mod common;

use common::{golden, golden_dir, load, safetensors_f32};
use upmix::ir::{HostTensor, Module};
use upmix::passes::components::Selector;
use upmix::passes::settings::NofM;
use upmix::passes::{PassContext, PassManager, Prune, PruneMethod, PruneTarget, RuntimeProvider};
use upmix::pipeline::DeviceRuntimes;

fn target(sparsity: Option<f64>, pattern: Option<&str>) -> PruneTarget {
    PruneTarget {
        select: vec!["attn.*".parse().unwrap(), "ffn.*".parse().unwrap()],
        layers: None,
        sparsity,
        pattern: pattern.map(|p| p.parse().unwrap()),
    }
}

fn prune(method: PruneMethod, scope: Option<&str>, t: PruneTarget) -> Prune {
    Prune {
        model: "m".into(),
        into: Some("p".into()),
        method,
        scope: scope.map(|s| s.parse().unwrap()),
        targets: vec![t],
        ignore: Vec::new(),
    }
}

/// Runs `pass` on the llama fixture loaded as `m`, with a CPU runtime for Wanda.
fn run(pass: Prune) -> Result<Module, String> {
    let mut m = Module::new();
    upmix::frontend::load(&common::model_dir("llama"), "m", &mut m).unwrap();
    let mut provider = DeviceRuntimes::new(common::device());
    let mut cx = PassContext {
        runtimes: Some(&mut provider as &mut dyn RuntimeProvider),
        notes: Vec::new(),
        ..PassContext::default()
    };
    let mut pm = PassManager::new();
    pm.add(Box::new(pass));
    pm.run(&mut m, &mut cx).map_err(|e| e.to_string())?;
    Ok(m)
}

/// The pruned value of every golden weight, by its Hugging Face name.
fn pruned(m: &Module) -> Vec<(String, HostTensor)> {
    let g = golden("prune/golden.json");
    let graph = &m.graphs["p"];
    let mut out = Vec::new();
    for hf in g["weights"].as_array().unwrap() {
        let hf = hf.as_str().unwrap();
        let name = common::canonical_of_hf(hf);
        let id = graph
            .weight_ids()
            .into_iter()
            .find(|id| m.weights.get(*id).unwrap().name == name)
            .unwrap_or_else(|| panic!("no weight {name}"));
        out.push((hf.to_string(), m.weights.materialize(id).unwrap()));
    }
    out
}

/// `got` and `want` hold the same f32 bit patterns (+0.0 and -0.0 differ).
fn assert_bits_equal(got: &HostTensor, want: &HostTensor, what: &str) {
    assert_eq!(got.shape, want.shape, "{what}");
    let same = got
        .data
        .iter()
        .zip(&want.data)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{what}: the values differ");
}

fn wanda() -> PruneMethod {
    PruneMethod::Wanda {
        calibration: golden_dir().join("prune/calibration.txt"),
        window: Some(64),
        max_windows: None,
    }
}

#[test]
fn magnitude_and_2_of_4_match_torch_bit_for_bit() {
    for (file, pass) in [
        (
            "magnitude_row_0.5",
            prune(PruneMethod::Magnitude, None, target(Some(0.5), None)),
        ),
        (
            "magnitude_tensor_0.3",
            prune(
                PruneMethod::Magnitude,
                Some("tensor"),
                target(Some(0.3), None),
            ),
        ),
        (
            "magnitude_2of4",
            prune(PruneMethod::Magnitude, None, target(None, Some("2:4"))),
        ),
    ] {
        let m = run(pass).unwrap();
        let path = golden_dir().join(format!("prune/{file}.safetensors"));
        for (hf, got) in pruned(&m) {
            let want = safetensors_f32(&path, &hf);
            assert_bits_equal(&got, &want, &format!("{file}: {hf}"));
        }
    }
}

#[test]
fn wanda_norms_and_masks_match_torch() {
    let g = golden("prune/golden.json");
    // The norms, as the pass computes them from the calibration text.
    let mut m = load("llama");
    let text = std::fs::read_to_string(golden_dir().join("prune/calibration.txt")).unwrap();
    let mut provider = DeviceRuntimes::new(common::device());
    let ids = provider.tokenize(&m, "llama", &text).unwrap();
    let want_windows: Vec<Vec<u32>> = g["calibration"]["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(common::ids)
        .collect();
    let windows: Vec<&[u32]> = ids.chunks(64).collect();
    assert_eq!(windows.len(), want_windows.len());
    assert!(windows.iter().zip(&want_windows).all(|(a, b)| a == b));
    let mut rt = provider.runtime(&m, "llama").unwrap();
    let norms = rt.linear_input_norms(&windows).unwrap();
    let mut worst = 0f32;
    for hf in g["weights"].as_array().unwrap() {
        let hf = hf.as_str().unwrap();
        let name = common::canonical_of_hf(hf);
        let id = m.graphs["llama"]
            .weight_ids()
            .into_iter()
            .find(|id| m.weights.get(*id).unwrap().name == name)
            .unwrap();
        let got = &norms.iter().find(|(w, _)| *w == id).unwrap().1;
        let want = safetensors_f32(&golden_dir().join("prune/wanda_norms.safetensors"), hf);
        for (a, b) in got.iter().zip(&want.data) {
            worst = worst.max((a - b).abs() / b.abs().max(1e-12));
        }
    }
    println!("wanda norms: largest relative difference {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    drop(rt);
    m.graphs.clear();

    for (file, t) in [
        ("wanda_0.5", target(Some(0.5), None)),
        ("wanda_2of4", target(None, Some("2:4"))),
    ] {
        let m = run(prune(wanda(), None, t)).unwrap();
        let path = golden_dir().join(format!("prune/{file}.safetensors"));
        for (hf, got) in pruned(&m) {
            let want = safetensors_f32(&path, &hf);
            let mask = |v: &[f32]| v.iter().map(|x| *x == 0.0).collect::<Vec<_>>();
            assert_eq!(
                mask(&got.data),
                mask(&want.data),
                "{file}: {hf} mask differs"
            );
            assert_bits_equal(&got, &want, &format!("{file}: {hf}"));
        }
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let nothing = PruneTarget {
        select: vec!["ffn.experts.*.gate".parse().unwrap()],
        ..target(Some(0.5), None)
    };
    let err = run(prune(PruneMethod::Magnitude, None, nothing)).unwrap_err();
    assert!(
        err.contains("selector `ffn.experts.*.gate` matches no component of `m`"),
        "{err}"
    );
    assert!(
        err.contains("attn.q, attn.k, attn.v, attn.o, ffn.gate, ffn.up, ffn.down"),
        "{err}"
    );

    let layers = PruneTarget {
        layers: Some("5..8".parse().unwrap()),
        ..target(Some(0.5), None)
    };
    let err = run(prune(PruneMethod::Magnitude, None, layers)).unwrap_err();
    assert!(err.contains("in layers 5..8"), "{err}");

    for s in [1.0, -0.1, 1.5] {
        let err = run(prune(PruneMethod::Magnitude, None, target(Some(s), None))).unwrap_err();
        assert!(
            err.contains(&format!("sparsity {s} is outside [0, 1)")),
            "{err}"
        );
    }
    // Patterns and selectors are typed when read.
    let err = "4:2".parse::<NofM>().unwrap_err();
    assert!(err.contains("pattern `4:2` is not N:M with N < M"), "{err}");
    // The fixture's input widths (64, 96) are multiples of 4 but not of 5.
    let err = run(prune(
        PruneMethod::Magnitude,
        None,
        target(None, Some("2:5")),
    ))
    .unwrap_err();
    assert!(
        err.contains("`layers.0.attn.q`: 2:5 needs the input dimension (64) to be a multiple of 5"),
        "{err}"
    );
    let err = run(prune(
        PruneMethod::Magnitude,
        None,
        target(Some(0.5), Some("2:4")),
    ))
    .unwrap_err();
    assert!(err.contains("give either `sparsity` or `pattern`"), "{err}");
    let err = "re:(".parse::<Selector>().unwrap_err();
    assert!(
        err.contains("selector `re:(` is not a valid regular expression"),
        "{err}"
    );
    let missing = PruneMethod::Wanda {
        calibration: "/nonexistent/calibration.txt".into(),
        window: None,
        max_windows: None,
    };
    let err = run(prune(missing, None, target(Some(0.5), None))).unwrap_err();
    assert!(
        err.contains("reading calibration text /nonexistent/calibration.txt"),
        "{err}"
    );
    let err = run(prune(wanda(), Some("tensor"), target(Some(0.5), None))).unwrap_err();
    assert!(
        err.contains("Wanda compares scores within rows only"),
        "{err}"
    );
}

#[test]
fn ignore_lists_later_targets_and_layer_ranges_pick_components() {
    let pass = Prune {
        targets: vec![
            target(Some(0.5), None),
            PruneTarget {
                select: vec![r"re:layers\.1\.ffn\.(up|down)".parse().unwrap()],
                layers: Some("1..2".parse().unwrap()),
                sparsity: Some(0.25),
                pattern: None,
            },
        ],
        ignore: vec!["attn.o".parse().unwrap(), "layers.0.ffn.*".parse().unwrap()],
        ..prune(PruneMethod::Magnitude, None, target(Some(0.5), None))
    };
    let m = run(pass).unwrap();
    let zeros = |name: &str| {
        let id = m.graphs["p"]
            .weight_ids()
            .into_iter()
            .find(|id| m.weights.get(*id).unwrap().name == name)
            .unwrap();
        let v = m.weights.materialize(id).unwrap();
        v.data.iter().filter(|x| **x == 0.0).count() as f64 / v.data.len() as f64
    };
    assert_eq!(zeros("layers.0.attn.q"), 0.5);
    assert_eq!(zeros("layers.0.attn.o"), 0.0);
    assert_eq!(zeros("layers.0.ffn.up"), 0.0);
    assert_eq!(zeros("layers.1.ffn.gate"), 0.5);
    assert_eq!(zeros("layers.1.ffn.up"), 0.25);
    assert_eq!(zeros("layers.1.ffn.down"), 0.25);
    // The source model is untouched.
    let m0 = &m.graphs["m"];
    assert!(m0.weight_ids().iter().all(|id| !matches!(
        m.weights.get(*id).unwrap().expr,
        upmix::ir::WeightExpr::Pruned { .. }
    )));
}

#[test]
fn two_of_four_needs_a_width_divisible_by_four() {
    let mut m = load("llama");
    // The same graph 62 wide: every projection reading the hidden state has 62 inputs.
    common::add_rewidthed_copy(&mut m, "llama", "narrow", 62);
    let pass = Prune {
        model: "narrow".into(),
        ..prune(PruneMethod::Magnitude, None, target(None, Some("2:4")))
    };
    let err = common::run_pass(&mut m, pass).unwrap_err();
    assert!(
        err.contains("`layers.0.attn.q`: 2:4 needs the input dimension (62) to be a multiple of 4"),
        "{err}"
    );
    assert!(m.graph("p").is_none(), "nothing was created");
}

#[test]
fn a_pruned_model_is_written_and_read_back_exactly() {
    let m = run(prune(
        PruneMethod::Magnitude,
        None,
        target(None, Some("2:4")),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pruned");
    upmix::emitters::emit_hf(&m, "p", &out, &Default::default()).unwrap();
    let mut back = Module::new();
    upmix::frontend::load(&out, "back", &mut back).unwrap();
    let weights = |m: &Module, g: &str| -> Vec<(String, HostTensor)> {
        m.graphs[g]
            .weight_ids()
            .into_iter()
            .map(|id| {
                let name = m.weights.get(id).unwrap().name.clone();
                (name, m.weights.materialize(id).unwrap())
            })
            .collect()
    };
    let (ours, read) = (weights(&m, "p"), weights(&back, "back"));
    assert_eq!(ours.len(), read.len());
    for ((name, a), (read_name, b)) in ours.iter().zip(&read) {
        assert_eq!(name, read_name);
        assert_bits_equal(a, b, name);
    }
}
