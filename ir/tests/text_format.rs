//! The IR text form both ways: `print_module` then `parse_module` rebuilds a structurally
//! equal module (every op kind, every weight expression), `print_graph`'s snapshot texts
//! read back and print byte for byte, hand-written text builds a model that verifies, and
//! `structural_diff` notices a changed value, setting or edge.

use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{awkward_values, everything, round_trip, Files};
use upmix_ir::*;

#[test]
fn every_op_and_expression_round_trips() {
    let f = Files::new("round_trip");
    let m = everything(&f);
    let text = round_trip(&m, &f);
    let kinds = [
        "Input",
        "Embedding",
        "RmsNorm",
        "LayerNorm",
        "Attention",
        "FeedForward",
        "MixtureOfExperts",
        "MixtureOfAttention",
        "Add",
        "Linear",
        "Scale",
        "Output",
    ];
    let exprs = [
        "source(",
        "literal(",
        "rows(",
        "columns(",
        "pruned(",
        "random(",
        "concat(",
        "scale(",
        "mean(",
        "weighted_sum(",
    ];
    let details = [
        ", normalized)",
        "magnitude 0.5 per row",
        "wanda 2:4, scale=[",
        "q4_0[",
        "q8_0[",
        "int8_channel[",
        "router.domains=",
        "shared.gate_proj=",
        "kv=shared",
        "kv=per_expert",
        "experts.1.heads=",
        "rope=none",
        "rope_pairs=interleaved",
        "rope_scaling=llama3(",
        "rope_scaling=linear(",
        "qk_norm_eps=",
        "window=4",
        "inf, -inf, NaN, -3500000000000.0",
        "  files: tokenizer=\"/models/a/tokenizer.json\"",
        "\"layers.0 (attention, shared kv)\"",
    ];
    for kind in kinds {
        assert!(
            text.contains(&format!(" = {kind}(")),
            "no {kind} op in\n{text}"
        );
    }
    for part in exprs.iter().chain(&details) {
        assert!(text.contains(part), "no `{part}` in\n{text}");
    }
}

#[test]
fn print_graph_text_reads_back_when_nothing_is_abbreviated() {
    // Short lists and no model files: print_graph prints what print_module does.
    let m = parse_module(TINY, &|_| None).unwrap();
    let text = print_graph(&m.graphs["tiny"], &m.weights);
    assert_eq!(text, print_module(&m));
    let parsed = parse_module(&text, &|_| None).unwrap();
    assert_eq!(structural_diff(&parsed, &m), None);
    assert_eq!(print_graph(&parsed.graphs["tiny"], &parsed.weights), text);
}

#[test]
fn print_graph_abbreviates_long_lists_and_the_parser_says_so() {
    let f = Files::new("abbreviated");
    let m = everything(&f);
    let text = print_graph(&m.graphs["dense"], &m.weights);
    assert!(text.contains("= literal(32 values)"), "{text}");
    assert!(text.contains(", wanda 2:4)\n"), "{text}");
    assert!(text.contains("rows(%w"), "{text}");
    assert!(!text.contains("files:"), "{text}");
    let err = parse_module(&text, &|name| f.open(name)).unwrap_err();
    assert!(err.message.contains("abbreviated"), "{err}");
}

#[test]
fn snapshot_texts_read_back_and_print_byte_for_byte() {
    // The committed `print_graph` snapshots of the workspace's fixtures: reading one and
    // printing it again must give it back exactly, so the printer cannot drift.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/snapshots");
    let files = Path::new(env!("CARGO_TARGET_TMPDIR")).join("text_format_snapshots");
    std::fs::create_dir_all(&files).unwrap();
    let big = files.join("model.safetensors");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 24)
        .unwrap();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("inspect__") && !name.starts_with("inspect__cli")
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "snapshots: {names:?}");
    for path in names {
        let snap = std::fs::read_to_string(&path).unwrap();
        let body = snap.splitn(3, "---\n").nth(2).unwrap();
        let m = parse_module(body, &|name| MappedFile::open(&files.join(name)).ok())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(m.graphs.len(), 1);
        let g = m.graphs.values().next().unwrap();
        let again = print_graph(g, &m.weights);
        assert_eq!(again.trim_end(), body.trim_end(), "{}", path.display());
        verify(g, &m.weights).unwrap();
    }
}

/// A two-layer model as one would write it by hand.
const TINY: &str = r#"
; Two pre-norm layers, random weights, the embedding tied to the head.
graph tiny (vocab 16, hidden 8, max_positions 32, bos 1, eos 2)
  input = Input()
  embed = Embedding(input) table=%w0
  layers.0.attn_norm = RmsNorm(embed) eps=1e-5 weight=%w1
  layers.0.attn = Attention(layers.0.attn_norm) heads=2 kv_heads=1 head_dim=4 rope_theta=10000.0 q=%w2 k=%w3 v=%w4 o=%w5
  layers.0.attn_residual = Add(embed, layers.0.attn)
  layers.0.ffn_norm = RmsNorm(layers.0.attn_residual) eps=1e-5 weight=%w1
  layers.0.ffn = FeedForward(layers.0.ffn_norm) gate=%w6 up=%w7 down=%w8
  layers.0.ffn_residual = Add(layers.0.attn_residual, layers.0.ffn)

  layers.1.attn_norm = RmsNorm(layers.0.ffn_residual) eps=1e-5 weight=%w1
  layers.1.attn = Attention(layers.1.attn_norm) heads=2 kv_heads=1 head_dim=4 rope_theta=10000.0 q=%w12 k=%w3 v=%w4 o=%w5
  layers.1.attn_residual = Add(layers.0.ffn_residual, layers.1.attn)
  layers.1.ffn_norm = RmsNorm(layers.1.attn_residual) eps=1e-5 weight=%w1
  layers.1.ffn = FeedForward(layers.1.ffn_norm) gate=%w9 up=%w10 down=%w11
  layers.1.ffn_residual = Add(layers.1.attn_residual, layers.1.ffn)
  final_norm = RmsNorm(layers.1.ffn_residual) eps=1e-5 weight=%w1
  lm_head = Linear(final_norm) weight=%w0  ; tied
  output = Output(lm_head)

weights:
  %w12 layers.1.attn.q f32[8, 8] = scale(0.5, %w2)  ; refers to a later weight
  %w0 embed.table f32[16, 8] = random(seed=1, std=0.02)
  %w1 norm.weight f32[8] = literal(1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5)
  %w2 layers.0.attn.q f32[8, 8] = random(seed=2, std=0.02)
  %w3 layers.attn.k f32[4, 8] = random(seed=3, std=0.02)
  %w4 layers.attn.v f32[4, 8] = random(seed=4, std=0.02)
  %w5 layers.attn.o f32[8, 8] = random(seed=5, std=0.02)
  %w6 layers.0.ffn.gate f32[16, 8] = random(seed=6, std=0.02)
  %w7 layers.0.ffn.up f32[16, 8] = random(seed=7, std=0.02)
  %w8 layers.0.ffn.down f32[8, 16] = random(seed=8, std=0.02)
  %w9 layers.1.ffn.gate f32[16, 8] = random(seed=9, std=0.02)
  %w10 layers.1.ffn.up f32[16, 8] = random(seed=10, std=0.02)
  %w11 layers.1.ffn.down f32[8, 16] = random(seed=11, std=0.02)
"#;

#[test]
fn a_hand_written_model_parses_and_verifies() {
    let m = parse_module(TINY, &|_| None).unwrap();
    let g = &m.graphs["tiny"];
    verify(g, &m.weights).unwrap();
    assert_eq!(g.node_count(), 17);
    assert_eq!(
        (g.meta.bos_token_id, g.meta.eos_token_id),
        (Some(1), Some(2))
    );
    let add = g.find("layers.1.attn_residual").unwrap();
    let inputs: Vec<&str> = g
        .inputs(add)
        .iter()
        .map(|i| g.node(*i).name.as_str())
        .collect();
    assert_eq!(inputs, ["layers.0.ffn_residual", "layers.1.attn"]);
    let q1 = match &g.node(g.find("layers.1.attn").unwrap()).op {
        Op::Attention(a) => a.q,
        op => panic!("{op:?}"),
    };
    let q0 = m.weights.get(q1).unwrap().expr.operands()[0];
    let (a, b) = (
        m.weights.materialize(q0).unwrap(),
        m.weights.materialize(q1).unwrap(),
    );
    assert!(a.data.iter().zip(&b.data).all(|(x, y)| *y == 0.5 * x));
    // Its canonical text reads back to the same model.
    let f = Files::new("tiny");
    round_trip(&m, &f);
}

/// `text` with weights and a node line in place: line 3 is `node`, line 7 is `weight`.
fn with_lines(node: &str, weight: &str) -> String {
    format!(
        "graph g (vocab 4, hidden 2)\n  input = Input()\n{node}\n  output = Output(input)\n\
         weights:\n  %w0 a f32[2] = literal(1.0, 2.0)\n{weight}\n"
    )
}

fn error_of(text: &str) -> ParseError {
    match parse_module(text, &|_| None) {
        Ok(_) => panic!("parsed:\n{text}"),
        Err(e) => e,
    }
}

/// Node lines (line 3) that are errors: where, and what the message says.
const NODE_ERRORS: &[(&str, usize, &str)] = &[
    (
        "  x = Frobnicate(input) weight=%w0",
        7,
        "unknown op kind `Frobnicate`",
    ),
    (
        "  n = RmsNorm(input) eps=1e-5 weight=%w9",
        38,
        "undefined weight %w9",
    ),
    (
        "  input = Input()",
        3,
        "node `input` is defined twice in graph `g` (first on line 2)",
    ),
    ("  n = Add(input, nope)", 18, "unknown input node `nope`"),
    (
        "  n = RmsNorm(input) weight=%w0",
        7,
        "RmsNorm needs `eps=...`",
    ),
    (
        "  n = RmsNorm(input) eps=1e-5 weight=%w0 bias=%w0",
        42,
        "unexpected attribute `bias` for RmsNorm",
    ),
    (
        "  n = RmsNorm(input) eps=small weight=%w0",
        26,
        "expected a number for `eps`, found `small`",
    ),
    (
        "  n = Attention(input) heads=1 kv_heads=1 head_dim=2 q=%w0 k=%w0 v=%w0 o=%w0",
        7,
        "Attention needs `rope_theta=...`",
    ),
    (
        "  n = RmsNorm(input eps=1e-5",
        21,
        "expected `,` or `)`, found `eps`",
    ),
    (
        "  n = Attention(input) heads=1 kv_heads=1 head_dim=2 rope=none rope_theta=1.0",
        64,
        "`rope_theta` is given with `rope=none`",
    ),
];

/// Weight lines (line 7) that are errors.
const WEIGHT_ERRORS: &[(&str, usize, &str)] = &[
    (
        "  %w1 b f32[2] = mean(%w0, %w7)",
        28,
        "undefined weight %w7",
    ),
    (
        "  %w1 b f32[2, x] = random(seed=1, std=0.5)",
        16,
        "expected a dimension",
    ),
    (
        "  %w1 b f32[3] = mean(%w0)",
        18,
        "operand `a` has shape [2], expected [3]",
    ),
    (
        "  %w1 b f32[2, 2] = literal(1.0, 2.0, 3.0)",
        21,
        "literal has 3 values, shape [2, 2] holds 4",
    ),
    (
        "  %w1 b f32[2] = source(missing.bin @0 f32)",
        25,
        "no file `missing.bin`",
    ),
    (
        "  %w0 b f32[2] = random(seed=1, std=0.5)",
        3,
        "weight %w0 is defined twice (first on line 6)",
    ),
    (
        "  %w1 b f32[2] = gaussian(seed=1)",
        18,
        "unknown weight expression `gaussian`",
    ),
    (
        "  %w1 b q3_k[2] = random(seed=1, std=0.5)",
        9,
        "expected a dtype",
    ),
    (
        "  %w1 b f32[2, 2] = pruned(%w2, magnitude 0.5 per column)",
        43,
        "expected a pruning pattern",
    ),
    (
        "  %w1 b f32[2] = weighted_sum(1.0*%w0, normalized, 2.0*%w0)",
        52,
        "expected `)` after `normalized`",
    ),
    ("  %w1 b f32[2, 2] = rows(%w0, 2 rows)", 31, "abbreviated"),
];

#[track_caller]
fn assert_error(text: &str, (line, column): (usize, usize), says: &str) {
    let e = error_of(text);
    assert_eq!((e.line, e.column), (line, column), "{e}");
    assert!(e.message.contains(says), "`{e}` does not say `{says}`");
}

#[test]
fn node_line_errors_name_line_and_column() {
    for (node, column, says) in NODE_ERRORS {
        assert_error(&with_lines(node, ""), (3, *column), says);
    }
}

#[test]
fn weight_line_errors_name_line_and_column() {
    for (weight, column, says) in WEIGHT_ERRORS {
        assert_error(&with_lines("", weight), (7, *column), says);
    }
    let e = error_of(&with_lines("", "  %w1 b f32[2] = mean(foo)"));
    assert_eq!(
        e.to_string(),
        "line 7, column 23: expected a weight reference like %w3, found `foo`"
    );
}

#[test]
fn cycles_and_misplaced_lines_are_errors() {
    let cycle = "  %w1 b f32[2] = scale(2.0, %w2)\n  %w2 c f32[2] = scale(0.5, %w1)";
    let e = error_of(&with_lines("", cycle));
    assert_eq!((e.line, e.column), (8, 29), "{e}");
    assert!(e.message.contains("%w1 -> %w2 -> %w1"), "{e}");
    let e = error_of("  input = Input()\n");
    assert_eq!((e.line, e.column), (1, 3), "{e}");
    assert!(e.message.contains("`graph NAME (...)` header"), "{e}");
    let e = error_of("weights:\n  files: config=\"c.json\"\n");
    assert_eq!((e.line, e.column), (2, 3), "{e}");
    let e = error_of("graph g (vocab 4)\ngraph g (vocab 4)\n");
    assert_eq!(
        (e.line, e.column, e.message.as_str()),
        (2, 1, "graph `g` is defined twice (first on line 1)")
    );
}

/// The id of the weight `label` of node `node` in graph `graph`.
fn weight_of(m: &Module, graph: &str, node: &str, label: &str) -> WeightId {
    let g = &m.graphs[graph];
    let op = &g.node(g.find(node).unwrap()).op;
    op.weights()
        .into_iter()
        .find(|(l, _)| l == label)
        .unwrap()
        .1
}

#[test]
fn structural_diff_reports_a_changed_value_setting_or_edge() {
    let f = Files::new("diff");
    let m = everything(&f);
    assert_eq!(structural_diff(&m, &m.clone()), None);

    let mut changed = m.clone();
    let id = weight_of(&m, "dense", "layers.0.attn_norm", "weight");
    let mut values = awkward_values(32);
    values[3] = f32::from_bits(values[3].to_bits() + 1);
    changed.weights.get_mut(id).unwrap().expr =
        WeightExpr::Literal(Arc::new(HostTensor::new(vec![32], values)));
    let d = structural_diff(&m, &changed).unwrap();
    assert!(
        d.contains("node `layers.0.attn_norm`") && d.contains("literal value 3"),
        "{d}"
    );

    let mut changed = m.clone();
    let g = changed.graph_mut("dense").unwrap();
    let norm = g.find("layers.1.norm").unwrap();
    if let Op::LayerNorm { eps, .. } = &mut g.node_mut(norm).op {
        *eps = 1e-7;
    }
    let d = structural_diff(&m, &changed).unwrap();
    assert!(
        d.contains("graph `dense`: node `layers.1.norm`: settings differ"),
        "{d}"
    );

    let mut changed = m.clone();
    let g = changed.graph_mut("moa").unwrap();
    let add = g.find("layers.1.residual").unwrap();
    let inputs = g.inputs(add);
    g.disconnect_inputs(add);
    g.connect(inputs[1], add);
    g.connect(inputs[0], add);
    let d = structural_diff(&m, &changed).unwrap();
    assert!(
        d.contains("node `layers.1.residual`: inputs (layers.0.residual, layers.1.attn) vs"),
        "{d}"
    );

    // A parameter deep in an operand, through the text.
    let text = print_module(&m).replace("= random(seed=197,", "= random(seed=198,");
    let parsed = parse_module(&text, &|name| f.open(name)).unwrap();
    let d = structural_diff(&m, &parsed).unwrap();
    assert!(
        d.contains("operand 1 of `layers.1.ffn.experts.0.gate`") && d.contains("seeds"),
        "{d}"
    );

    let mut fewer = m.clone();
    fewer.graphs.remove("moa");
    assert_eq!(
        structural_diff(&m, &fewer).unwrap(),
        "graph `moa` is only in the first module"
    );
}
