//! A real pretrained model end to end: SmolLM2-135M-Instruct (GGUF, Q4_1) against Hugging
//! Face transformers' own GGUF loader (goldens in tests/golden/smollm2, made by
//! scripts/make_fixtures.py), and its dequantized Hugging Face checkpoint against the GGUF.
//!
//! The model comes from `scripts/fetch-models.sh` (`.ci/run` calls it); these tests fail
//! with instructions when it is missing rather than skip.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use common::{cache_dir, device, gguf_path, golden, ids};
use upmix::backends::load_runtime;
use upmix::frontend::{SafetensorsFile, TextTokenizer};
use upmix::ir::{Module, Runtime};

/// The dequantized Hugging Face checkpoint written by scripts/gguf_to_hf.py.
fn hf_dir() -> PathBuf {
    let dir = std::env::var("UPMIX_SMOLLM2_HF")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("SmolLM2-135M-Instruct-f32"));
    assert!(
        dir.join("config.json").is_file(),
        "{} is missing: run scripts/fetch-models.sh (or set UPMIX_SMOLLM2_HF)",
        dir.display()
    );
    dir
}

/// The GGUF model, loaded once per test binary.
fn model() -> &'static Module {
    static MODEL: OnceLock<Module> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut m = Module::new();
        upmix::frontend::load(&gguf_path(), "smollm2", &mut m).unwrap();
        m
    })
}

fn runtime() -> Box<dyn Runtime> {
    load_runtime(model(), "smollm2", &device()).unwrap()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::load(&gguf_path()).unwrap()
}

#[test]
fn token_ids_match_transformers() {
    let g = golden("smollm2/golden.json");
    let tok = tokenizer();
    let mut texts = Vec::new();
    for case in g["tokenizer"].as_array().unwrap() {
        texts.push((
            case["text"].as_str().unwrap().to_string(),
            ids(&case["ids"]),
        ));
    }
    for p in g["prompts"].as_array().unwrap() {
        texts.push((p["text"].as_str().unwrap().to_string(), ids(&p["ids"])));
    }
    let paragraph =
        std::fs::read_to_string(common::golden_dir().join("smollm2/paragraph.txt")).unwrap();
    texts.push((paragraph, ids(&g["perplexity"]["ids"])));
    assert!(texts.len() >= 10);
    for (text, expected) in texts {
        assert_eq!(tok.encode(&text, true).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn chat_template_matches_transformers() {
    let g = golden("smollm2/golden.json");
    let chat = &g["chat"];
    let tok = tokenizer();
    let messages: Vec<(&str, &str)> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let text = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(text, chat["text"].as_str().unwrap());
    assert_eq!(tok.encode(&text, false).unwrap(), ids(&chat["ids"]));
}

#[test]
fn top1_agrees_with_transformers_and_logits_are_close() {
    let g = golden("smollm2/golden.json");
    let last = SafetensorsFile::open(&common::golden_dir().join("smollm2/last_logits.safetensors"))
        .unwrap();
    let mut rt = runtime();
    let (mut positions, mut agree) = (0, 0);
    let mut worst_topk = 0f32;
    for (i, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let logits = rt.logits(&ids(&p["ids"])).unwrap();
        let top_ids = p["top_k"]["ids"].as_array().unwrap();
        let top_values = p["top_k"]["logits"].as_array().unwrap();
        for (t, (want_ids, want_values)) in top_ids.iter().zip(top_values).enumerate() {
            let row = logits.row(t);
            let argmax = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            positions += 1;
            agree += usize::from(argmax == ids(want_ids)[0]);
            for (id, v) in ids(want_ids).iter().zip(want_values.as_array().unwrap()) {
                worst_topk = worst_topk.max((row[*id as usize] - v.as_f64().unwrap() as f32).abs());
            }
        }
        // The full last-position logits.
        let info = &last.tensors[&format!("prompt{i}")];
        let mut want = Vec::new();
        info.dtype.decode(
            &last.file.bytes()[info.offset..info.offset + info.shape[0] * 4],
            1,
            &mut want,
        );
        let got = logits.row(logits.shape[0] - 1);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("prompt {i}: max abs difference of the last position's logits {diff:e}");
        assert!(
            diff < common::tolerance().smollm2_logits,
            "prompt {i}: last-position logits differ by {diff}"
        );
    }
    println!(
        "top-1 agreement {agree}/{positions}; max abs difference on top-10 logits {worst_topk:e}"
    );
    assert!(
        agree as f64 >= 0.99 * positions as f64,
        "top-1 agreement {agree}/{positions}"
    );
    assert!(
        worst_topk < common::tolerance().smollm2_logits,
        "top-10 logits differ by {worst_topk}"
    );
}

#[test]
fn greedy_continuations_match_transformers() {
    let g = golden("smollm2/golden.json");
    let mut rt = runtime();
    for p in g["prompts"].as_array().unwrap() {
        let got = rt.generate(&ids(&p["ids"]), 20, None).unwrap();
        assert_eq!(got, ids(&p["greedy"]), "{}", p["text"]);
    }
}

#[test]
fn perplexity_is_within_half_a_percent_of_transformers() {
    let g = golden("smollm2/golden.json");
    let want = g["perplexity"]["ppl"].as_f64().unwrap();
    let tokens = ids(&g["perplexity"]["ids"]);
    let ppl = runtime().log_likelihood(&tokens).unwrap().perplexity();
    println!(
        "perplexity: upmix {ppl:.4}, transformers {want:.4} over {} tokens",
        tokens.len()
    );
    assert!(
        (ppl - want).abs() / want < 0.005,
        "upmix {ppl}, transformers {want}"
    );
}

#[test]
fn dequantized_hf_checkpoint_gives_the_gguf_logits() {
    let mut m = Module::new();
    upmix::frontend::load(&hf_dir(), "hf", &mut m).unwrap();
    let tokens = ids(&golden("smollm2/golden.json")["prompts"][2]["ids"]);
    let a = runtime().logits(&tokens).unwrap();
    let b = load_runtime(&m, "hf", &device())
        .unwrap()
        .logits(&tokens)
        .unwrap();
    let diff = a.max_abs_diff(&b);
    println!("GGUF vs dequantized HF checkpoint: max abs logit difference {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}

/// Runs the `upmix` binary; returns stdout, asserting success.
fn upmix(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_upmix"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upmix {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cli_inspect_shows_each_tensors_stored_type() {
    let text = upmix(&["inspect", gguf_path().to_str().unwrap()]);
    assert!(
        text.contains("graph model (vocab 49152, hidden 576"),
        "{text}"
    );
    assert!(text.contains("heads=9 kv_heads=3 head_dim=64 rope_theta=100000.0"));
    assert!(text.contains("embed.table q8_0[49152, 576] = source(SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(text.contains("layers.0.ffn.gate q4_1[1536, 576]"));
    // Q and K are read through the row permutation that undoes llama.cpp's; whole rows
    // of Q4_1 blocks, they stay Q4_1.
    assert!(text.contains("layers.0.attn.q q4_1[576, 576] = rows("));
    assert_eq!(text.matches(" = Attention(").count(), 30);
}

#[test]
fn cli_ppl_on_gguf_and_hf_matches_transformers() {
    let g = golden("smollm2/golden.json");
    let want = g["perplexity"]["ppl"].as_f64().unwrap();
    let text = common::golden_dir().join("smollm2/paragraph.txt");
    // The dequantized checkpoint has no tokenizer.json of its own: take the GGUF's.
    let gguf = gguf_path();
    for model in [gguf.clone(), hf_dir()] {
        let out = upmix(&[
            "ppl",
            model.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--tokenizer",
            gguf.to_str().unwrap(),
        ]);
        let ppl: f64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            (ppl - want).abs() / want < 0.005,
            "{}: {out}",
            model.display()
        );
    }
}

#[test]
fn cli_chat_generation_answers() {
    let out = upmix(&[
        "generate",
        gguf_path().to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "-n",
        "12",
    ]);
    assert!(out.contains("Paris"), "{out}");
    assert!(!out.contains("<|im_end|>"), "{out}");
}

/// SmolLM2 as a transformers 5 user has it on disk (tests/golden/smollm2_hf: every file
/// transformers' save_pretrained writes except the weights, which come from
/// scripts/gguf_to_hf.py), through `Cast` and emit: every file except the weights and
/// config.json comes out byte for byte, config.json keeps the token ids, and the chat
/// template renders what transformers rendered (scripts/make_fixtures.py
/// check-smollm2-hf runs transformers itself on such an output).
#[test]
fn transformers_files_survive_a_cast_and_emit() {
    let fixture = common::golden_dir().join("smollm2_hf");
    let chat = golden("smollm2_hf/chat.json");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("smollm2");
    std::fs::create_dir(&input).unwrap();
    let saved: Vec<&str> = chat["saved_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for file in &saved {
        let from = match *file {
            "model.safetensors" => hf_dir().join(file),
            _ => fixture.join(file),
        };
        std::os::unix::fs::symlink(&from, input.join(file)).unwrap();
    }
    let out = tmp.path().join("out");
    let pipeline = tmp.path().join("cast.ron");
    std::fs::write(
        &pipeline,
        format!(
            "Pipeline(models: {{ \"s\": Hf(\"{}\") }}, passes: [ Cast(model: \"s\", dtype: \"bf16\") ], emit: [ Hf(model: \"s\", dir: \"{}\") ])",
            input.display(),
            out.display()
        ),
    )
    .unwrap();
    upmix(&["run", pipeline.to_str().unwrap()]);
    for file in saved
        .iter()
        .filter(|f| !["model.safetensors", "config.json"].contains(f))
    {
        assert!(
            std::fs::read(out.join(file)).ok() == std::fs::read(fixture.join(file)).ok(),
            "{file} is missing or differs"
        );
    }
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    let (ours, theirs) = (config(&out), config(&fixture));
    for key in [
        "pad_token_id",
        "unk_token_id",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["pad_token_id"], 2);
    assert_eq!(ours["dtype"], "bfloat16");
    let tokenizer = TextTokenizer::load(&out).unwrap();
    for c in chat["chats"].as_array().unwrap() {
        let messages: Vec<(&str, &str)> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            tokenizer.apply_chat_template(&messages, true).unwrap(),
            c["text"].as_str().unwrap()
        );
    }
}

#[test]
fn upcycled_sparse_experts_equal_the_dense_reference() {
    use upmix::passes::{PassContext, PassManager, RouterInit, Upcycle};
    let mut m = Module::new();
    upmix::frontend::load(&gguf_path(), "s", &mut m).unwrap();
    // Four distinct experts: the FFN split four ways along its intermediate dimension.
    let mut pm = PassManager::new();
    pm.add(Box::new(Upcycle {
        into: "moe".into(),
        experts: vec!["s".into()],
        top_k: 2,
        router: RouterInit::Random { seed: 5, std: 0.5 },
        base: None,
        weights: None,
        shared_expert: None,
        layers: None,
        granularity: Some(4),
        normalize_top_k: None,
    }));
    pm.run(&mut m, &mut PassContext::default()).unwrap();
    let text = std::fs::read_to_string(common::golden_dir().join("smollm2/paragraph.txt")).unwrap();
    let tokens = &tokenizer().encode(&text, false).unwrap()[..64];
    let diff = common::sparse_dense_diff(&m, "moe", tokens);
    println!(
        "upcycled SmolLM2 on {}: sparse vs dense max abs difference {diff:e}",
        device()
    );
    assert!(diff <= 1e-5, "{diff}");
}

/// Sixteen prompts, continued greedily in one batch, then scored teacher-forced in one
/// batch: the argmax at every continuation position is the token generation chose.
#[test]
fn teacher_forced_argmax_agrees_with_greedy_generation() {
    let tok = tokenizer();
    let subjects = [
        "The capital of France",
        "Photosynthesis",
        "A good cup of coffee",
        "The ocean",
        "Rust's borrow checker",
        "My favourite book",
        "Mountains in winter",
        "The moon",
        "A healthy breakfast",
        "Learning to play the piano",
        "The history of Rome",
        "Electric cars",
        "A rainy afternoon",
        "The best way to learn",
        "Volcanoes",
        "Bees",
    ];
    let prompts: Vec<Vec<u32>> = subjects
        .iter()
        .map(|s| tok.encode(&format!("{s} is"), false).unwrap())
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let mut rt = runtime();
    let continued = rt.generate_batch(&refs, 64, None).unwrap();
    let full: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&continued)
        .map(|(p, c)| [p.as_slice(), c].concat())
        .collect();
    let refs: Vec<&[u32]> = full.iter().map(|f| f.as_slice()).collect();
    let scores = rt.score(&refs).unwrap();
    for ((prompt, cont), score) in prompts.iter().zip(&continued).zip(&scores) {
        assert_eq!(cont.len(), 64);
        let predicted = &score.argmax[prompt.len() - 1..prompt.len() - 1 + cont.len()];
        assert_eq!(predicted, cont.as_slice(), "{:?}", tok.decode(prompt));
    }
}

/// Divergent Token Metrics of a magnitude-pruned SmolLM2 against an independent
/// transformers computation (scripts/make_dtm_goldens.py): the same entries zeroed (the
/// Q4_1 weights tie often, so this checks the tie rule), the same base continuations, and
/// per prompt the same FDT, SDT and divergent positions.
#[test]
fn divergent_token_metrics_of_a_pruned_model_match_transformers() {
    use upmix::passes::{Prune, PruneMethod, PruneTarget};

    let g = golden("dtm/golden.json");
    let p = &g["pruning"];
    assert_eq!(p["method"], "magnitude_row");
    let layers = p["layers"].as_array().unwrap();
    let (start, end) = (layers[0].as_u64().unwrap(), layers[1].as_u64().unwrap());
    let mut m = model().clone();
    let pass = Prune {
        model: "smollm2".into(),
        into: Some("pruned".into()),
        method: PruneMethod::Magnitude,
        scope: None,
        targets: vec![PruneTarget {
            select: vec!["attn.*".parse().unwrap(), "ffn.*".parse().unwrap()],
            layers: Some(format!("{start}..{end}").parse().unwrap()),
            sparsity: Some(p["sparsity"].as_f64().unwrap()),
            pattern: None,
        }],
        ignore: Vec::new(),
    };
    common::run_pass(&mut m, pass).unwrap();
    // The zeroed entries: count, sum of |w| and sum of column indices per tensor.
    let by_name: std::collections::HashMap<String, upmix::ir::WeightId> = m.graphs["pruned"]
        .weight_ids()
        .into_iter()
        .map(|id| (m.weights.get(id).unwrap().name.clone(), id))
        .collect();
    for t in p["tensors"].as_array().unwrap() {
        let hf = t[0].as_str().unwrap();
        let name = common::canonical_of_hf(hf);
        let pruned = m.weights.materialize(by_name[&name]).unwrap();
        let upmix::ir::WeightExpr::Pruned { of, .. } = m.weights.get(by_name[&name]).unwrap().expr
        else {
            panic!("{name} is not pruned");
        };
        let original = m.weights.materialize(of).unwrap();
        // Removed: the entries pruning changed to zero, plus, in each row, as many of the
        // entries that were zero already (score 0: first in line, lower index first) as
        // make up k.
        let cols = original.shape[1];
        let k = t[3].as_u64().unwrap() as usize;
        let (mut abs_sum, mut col_sum, mut count) = (0f64, 0u64, 0u64);
        for (row, new) in original.data.chunks(cols).zip(pruned.data.chunks(cols)) {
            let mut removed = 0;
            for (j, (a, b)) in row.iter().zip(new).enumerate() {
                if *b == 0.0 && *a != 0.0 {
                    abs_sum += a.abs() as f64;
                    col_sum += j as u64;
                    removed += 1;
                }
            }
            let zeros = row
                .iter()
                .enumerate()
                .filter(|(_, a)| **a == 0.0)
                .map(|(j, _)| j);
            for j in zeros.take(k.saturating_sub(removed)) {
                col_sum += j as u64;
                removed += 1;
            }
            count += removed as u64;
        }
        let rows = t[1].as_u64().unwrap();
        assert_eq!(count, rows * k as u64, "{name}: zero count");
        assert_eq!(
            col_sum,
            t[6].as_u64().unwrap(),
            "{name}: zeroed columns differ"
        );
        assert!(
            (abs_sum - t[5].as_f64().unwrap()).abs() <= 1e-9 * abs_sum,
            "{name}"
        );
    }
    let prompts = common::golden_dir().join("dtm/prompts.txt");
    let n = g["n"].as_u64().unwrap() as usize;
    let report =
        upmix::dtm::divergence(&m, "smollm2", "pruned", &prompts, n, &device().into()).unwrap();
    let want = g["candidate"]["prompts"].as_array().unwrap();
    assert_eq!(report.rows.len(), want.len());
    for (i, (got, w)) in report.rows.iter().zip(want).enumerate() {
        assert_eq!(report.prompt_ids[i], ids(&w["ids"]), "prompt {i}: ids");
        assert_eq!(
            report.continuations[i],
            ids(&w["y"]),
            "prompt {i}: base continuation"
        );
        let divergent: Vec<usize> = ids(&w["divergent"]).iter().map(|&d| d as usize).collect();
        assert_eq!(got.divergent, divergent, "prompt {i}: divergent positions");
        assert_eq!(
            got.fdt as u64,
            w["fdt"].as_u64().unwrap(),
            "prompt {i}: FDT"
        );
        assert_eq!(got.sdt, w["sdt"].as_f64().unwrap(), "prompt {i}: SDT");
    }
    let s = &g["candidate"]["summary"];
    assert_eq!(report.summary.mean_fdt, s["fdt_mean"].as_f64().unwrap());
    assert_eq!(report.summary.median_fdt, s["fdt_median"].as_f64().unwrap());
    assert_eq!(report.summary.p25_fdt, s["fdt_p25"].as_f64().unwrap());
    assert_eq!(report.summary.mean_sdt, s["sdt_mean"].as_f64().unwrap());
    println!("pruned SmolLM2: {}", report.summary_line());
}
