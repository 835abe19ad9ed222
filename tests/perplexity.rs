//! Perplexity windows: with `bos`, every window starts with the BOS token, as llama.cpp
//! scores and as scripts/train_examples.py trained and evaluated the example models; the
//! default follows the tokenizer (BOS when it adds one to a text, as transformers does).

mod common;

use common::{device, repo_root};
use upmix::ir::Module;
use upmix::pipeline::{perplexities, PerplexityOptions};

#[test]
fn bos_windows_match_the_training_scripts_perplexity() {
    let root = repo_root().join("examples");
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("models/perplexity.json")).unwrap(),
    )
    .unwrap();
    let domains = ["code", "law", "math"];
    let texts: Vec<String> = domains
        .iter()
        .map(|d| std::fs::read_to_string(root.join(format!("data/{d}/eval.txt"))).unwrap())
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut m = Module::new();
    upmix::frontend::load(&root.join("models/seed"), "seed", &mut m).unwrap();
    let bos = PerplexityOptions {
        window: Some(128),
        bos: Some(true),
    };
    let got = perplexities(&m, "seed", &texts, bos, &device().into()).unwrap();
    for (d, (ppl, _)) in domains.iter().zip(&got) {
        let want = want["seed"][d].as_f64().unwrap();
        println!("seed on {d}: upmix {ppl:.4}, training script {want:.4}");
        // The script prints four decimals.
        assert!(
            (ppl - want).abs() <= 6e-5 + 1e-5 * want,
            "{d}: {ppl} vs {want}"
        );
    }
    // The example tokenizer adds no BOS, so by default windows get none: other numbers.
    let plain = PerplexityOptions {
        window: Some(128),
        bos: None,
    };
    let default = perplexities(&m, "seed", &texts, plain, &device().into()).unwrap();
    let off = PerplexityOptions {
        bos: Some(false),
        ..plain
    };
    assert_eq!(
        default,
        perplexities(&m, "seed", &texts, off, &device().into()).unwrap()
    );
    assert!(default.iter().zip(&got).all(|(a, b)| a.0 != b.0));
}

#[test]
fn bos_windows_need_a_bos_token() {
    let mut m = common::load("llama");
    m.graphs.get_mut("llama").unwrap().meta.bos_token_id = None;
    let opts = PerplexityOptions {
        window: None,
        bos: Some(true),
    };
    let err = perplexities(&m, "llama", &["some text here"], opts, &device().into()).unwrap_err();
    assert!(err.to_string().contains("has no BOS token"), "{err}");
}
