//! Numeric goldens: upmix's runtime against Hugging Face transformers on the tiny fixtures
//! (logits of every position, 16-token greedy continuations) and tokenizer ids against the
//! `tokenizers` library.

mod common;

use common::{device, golden, ids, load, tolerance, FIXTURES};
use upmix::backends::load_runtime;
use upmix::frontend::TextTokenizer;

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let m = load(name);
        let g = golden(&format!("{name}/golden.json"));
        let mut rt = load_runtime(&m, name, &device()).unwrap();
        let logits = rt.logits(&ids(&g["input_ids"])).unwrap();
        let expected = g["logits"].as_array().unwrap();
        assert_eq!(logits.shape, vec![expected.len(), 256], "{name}");
        let mut worst = 0f32;
        for (t, row) in expected.iter().enumerate() {
            for (v, x) in row.as_array().unwrap().iter().enumerate() {
                worst = worst.max((logits.row(t)[v] - x.as_f64().unwrap() as f32).abs());
            }
        }
        println!("{name} on {}: max abs logit difference {worst:e}", device());
        assert!(
            worst <= tolerance().tiny_logits,
            "{name}: max abs difference {worst}"
        );
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in FIXTURES {
        let m = load(name);
        let g = golden(&format!("{name}/golden.json"));
        let mut rt = load_runtime(&m, name, &device()).unwrap();
        let got = rt.generate(&ids(&g["prompt"]), 16, None).unwrap();
        assert_eq!(got, ids(&g["greedy"]), "{name}");
    }
}

/// The GGUF files gguf-py wrote from the Cohere fixtures (llama.cpp's `command-r` and
/// `cohere2`) give transformers' logits of the Hugging Face originals.
#[test]
fn cohere_gguf_files_give_the_transformers_logits() {
    for name in ["cohere", "cohere2"] {
        let mut m = upmix::ir::Module::new();
        let path = common::model_dir(name).with_extension("gguf");
        upmix::frontend::load(&path, name, &mut m).unwrap();
        let g = golden(&format!("{name}/golden.json"));
        let mut rt = load_runtime(&m, name, &device()).unwrap();
        let logits = rt.logits(&ids(&g["input_ids"])).unwrap();
        let expected = g["logits"].as_array().unwrap();
        let mut worst = 0f32;
        for (t, row) in expected.iter().enumerate() {
            for (v, x) in row.as_array().unwrap().iter().enumerate() {
                worst = worst.max((logits.row(t)[v] - x.as_f64().unwrap() as f32).abs());
            }
        }
        println!(
            "{name}.gguf on {}: max abs logit difference {worst:e}",
            device()
        );
        assert!(worst <= tolerance().tiny_logits, "{name}.gguf: {worst}");
        let got = rt.generate(&ids(&g["prompt"]), 16, None).unwrap();
        assert_eq!(got, ids(&g["greedy"]), "{name}.gguf");
    }
}

#[test]
fn both_mixtral_layouts_load_the_same_weights() {
    let (a, b) = (load("mixtral"), load("mixtral_fused"));
    let (ga, gb) = (&a.graphs["mixtral"], &b.graphs["mixtral_fused"]);
    let (wa, wb) = (ga.weight_ids(), gb.weight_ids());
    assert_eq!(wa.len(), wb.len());
    for (x, y) in wa.iter().zip(&wb) {
        let (tx, ty) = (
            a.weights.materialize(*x).unwrap(),
            b.weights.materialize(*y).unwrap(),
        );
        assert_eq!(tx, ty, "{}", a.weights.get(*x).unwrap().name);
    }
}

#[test]
fn tokenizer_ids_match_the_tokenizers_library() {
    let g = golden("tokenizer.json");
    let tok = TextTokenizer::load(&common::model_dir("llama")).unwrap();
    let texts = g["texts"].as_array().unwrap();
    assert!(!texts.is_empty());
    for (text, expected) in texts.iter().zip(g["ids"].as_array().unwrap()) {
        let text = text.as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(expected), "{text:?}");
        assert_eq!(tok.decode(&ids(expected)).unwrap(), text);
    }
}
