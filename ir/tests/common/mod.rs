//! Modules for the text-format tests: every op kind and every weight expression, over
//! a small file of source bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use upmix_ir::*;

/// A directory of its own per test, with a small file for source weights to read.
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("text_format_{test}"));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        Files { dir }
    }

    pub fn open(&self, name: &str) -> Option<Arc<MappedFile>> {
        MappedFile::open(&self.dir.join(name)).ok()
    }
}

fn add(m: &mut Module, name: &str, shape: &[usize], dtype: DType, expr: WeightExpr) -> WeightId {
    let weight = Weight {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype,
        expr,
    };
    m.weights.add(weight).unwrap()
}

fn random(m: &mut Module, name: &str, shape: &[usize], seed: u64) -> WeightId {
    let expr = WeightExpr::Random { seed, std: 0.02 };
    add(m, name, shape, DType::F32, expr)
}

fn literal(m: &mut Module, name: &str, values: Vec<f32>) -> WeightId {
    m.weights
        .literal(name, HostTensor::new(vec![values.len()], values))
        .unwrap()
}

/// Values whose text forms are easy to get wrong.
pub fn awkward_values(n: usize) -> Vec<f32> {
    let special = [
        1.0,
        -0.0,
        0.1,
        1e-30,
        f32::MIN_POSITIVE,
        1e-45,
        f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -3.5e12,
        1.0 / 3.0,
    ];
    (0..n).map(|i| special[i % special.len()]).collect()
}

/// An attention over hidden 32 (4 heads of 8, 2 KV heads) with every option set.
fn full_attention(m: &mut Module, p: &str, f: &Files) -> Attention {
    let q = add(
        m,
        &format!("{p}.q"),
        &[32, 32],
        DType::Q4_0,
        WeightExpr::Source {
            file: f.open("model.safetensors").unwrap(),
            offset: 1024,
            dtype: DType::Q4_0,
        },
    );
    let random_as = |m: &mut Module, name: &str, shape: &[usize], dtype| {
        let expr = WeightExpr::Random { seed: 9, std: 0.5 };
        add(m, &format!("{p}.{name}"), shape, dtype, expr)
    };
    Attention {
        q,
        k: random_as(m, "k", &[16, 32], DType::Q8_0),
        v: random_as(m, "v", &[16, 32], DType::Int8PerChannel),
        o: random(m, &format!("{p}.o"), &[32, 32], 4),
        q_bias: Some(literal(m, &format!("{p}.q_bias"), awkward_values(32))),
        k_bias: Some(random(m, &format!("{p}.k_bias"), &[16], 5)),
        v_bias: None,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope: Some(Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position: 8192,
            },
            pairs: RopePairs::Halves,
        }),
        qk_norm: Some(QkNorm {
            q: random(m, &format!("{p}.q_norm"), &[4, 8], 6),
            k: random(m, &format!("{p}.k_norm"), &[2, 8], 7),
            eps: 1e-6,
        }),
        window: Some(4),
    }
}

/// A plain attention: no rope, biases, norms or window.
fn bare_attention(m: &mut Module, p: &str, seed: u64) -> Attention {
    let [q, k, v, o] = [("q", 32), ("k", 16), ("v", 16), ("o", 32)]
        .map(|(x, rows)| random(m, &format!("{p}.{x}"), &[rows, 32], seed));
    Attention {
        q,
        k,
        v,
        o,
        q_bias: None,
        k_bias: None,
        v_bias: None,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        rope: None,
        qk_norm: None,
        window: None,
    }
}

fn ffn(m: &mut Module, p: &str, seed: u64) -> FeedForward {
    FeedForward {
        gate: random(m, &format!("{p}.gate"), &[64, 32], seed),
        up: random(m, &format!("{p}.up"), &[64, 32], seed + 1),
        down: random(m, &format!("{p}.down"), &[32, 64], seed + 2),
    }
}

fn dense_meta() -> ModelMeta {
    ModelMeta {
        vocab_size: 16,
        hidden_size: 32,
        max_position_embeddings: 64,
        bos_token_id: Some(1),
        eos_token_id: None,
        aux_files: vec![
            "/models/a/tokenizer_config.json".into(),
            "/models/a/special tokens.json".into(),
        ],
        config_file: Some("/models/a/config.json".into()),
        tokenizer: Some("/models/a/tokenizer.json".into()),
    }
}

/// A feed-forward block of pruned (by magnitude, by Wanda) and sliced weights.
fn pruned_ffn(m: &mut Module) -> FeedForward {
    let raw = ffn(m, "layers.0.ffn.raw", 20);
    let wide = random(m, "layers.0.ffn.down.wide", &[32, 96], 30);
    let scale: Vec<f32> = (0..32).map(|i| i as f32 / 7.0).collect();
    let magnitude = PruneRule::magnitude(Pattern::Row(0.5));
    let wanda = PruneRule {
        pattern: Pattern::NofM { n: 2, m: 4 },
        column_scale: Some(scale.into()),
    };
    let pruned = |m: &mut Module, name: &str, of, rule| {
        let expr = WeightExpr::Pruned {
            of,
            rule: Arc::new(rule),
        };
        add(m, name, &[64, 32], DType::F32, expr)
    };
    let columns = WeightExpr::Columns {
        of: wide,
        start: 16,
    };
    FeedForward {
        gate: pruned(m, "layers.0.ffn.gate", raw.gate, magnitude),
        up: pruned(m, "layers.0.ffn.up", raw.up, wanda),
        down: add(m, "layers.0.ffn.down", &[32, 64], DType::F32, columns),
    }
}

/// A linear head of reordered rows, with a bias.
fn head(m: &mut Module) -> Op {
    let raw = random(m, "lm_head.raw", &[16, 32], 40);
    let rows: Vec<u32> = (0..16).rev().collect();
    let expr = WeightExpr::Rows(raw, rows.into());
    Op::Linear {
        weight: add(m, "lm_head.weight", &[16, 32], DType::F32, expr),
        bias: Some(literal(m, "lm_head.bias", vec![0.5; 16])),
    }
}

/// A graph with every dense op kind; weights of every kind that reads no other graph.
/// Returns its feed-forward block.
fn dense(m: &mut Module, f: &Files) -> FeedForward {
    let source = WeightExpr::Source {
        file: f.open("model.safetensors").unwrap(),
        offset: 0,
        dtype: DType::BF16,
    };
    let embed = add(m, "embed.table", &[16, 32], DType::BF16, source);
    let attn_norm = literal(m, "layers.0.attn_norm.weight", awkward_values(32));
    let block = DecoderBlock {
        attn_norm,
        attn: Op::Attention(full_attention(m, "layers.0.attn", f)),
        ffn_norm: attn_norm,
        mlp: Op::FeedForward(pruned_ffn(m)),
        eps: 1e-5,
    };
    let mlp = match &block.mlp {
        Op::FeedForward(f) => f.clone(),
        _ => unreachable!(),
    };
    let ln = random(m, "layers.0.ffn_norm.weight", &[32], 3);
    let ln_bias = literal(m, "layers.0.ffn_norm.bias", vec![0.25; 32]);
    let mut interleaved = bare_attention(m, "layers.1.attn", 50);
    interleaved.rope = Some(Rope {
        theta: 10000.0,
        scaling: RopeScaling::Linear { factor: 2.0 },
        pairs: RopePairs::Interleaved,
    });
    let nope = bare_attention(m, "layers.1.nope", 60);
    let final_norm = random(m, "final_norm.weight", &[32], 70);
    let head = head(m);

    let mut b = GraphBuilder::new("dense", dense_meta());
    let x = b.input();
    let h = b.embedding(x, embed);
    let h = b.decoder_block(0, h, block);
    let n = b.layer_norm("layers.1.norm", h, (ln, Some(ln_bias)), 1e-6);
    let n2 = b.layer_norm("layers.1.norm2", n, (ln, None), 1e-5);
    let a = b.attention("layers.1.attn", n2, interleaved);
    let c = b.attention("layers.1.nope", n2, nope);
    let h = b.add("layers.1.residual", a, c);
    let h = b.rms_norm("final_norm", h, final_norm, 1e-5);
    let h = b.node("lm_head", head, &[h]);
    let h = b.scale("logit_scale", h, 0.0625);
    m.insert(b.output(h));
    mlp
}

/// A Nexus mixture: a projected router, experts that are `dense`'s block, half of it and
/// a new one, and a gated shared expert.
fn projected_moe(m: &mut Module, dense_ffn: &FeedForward) -> MixtureOfExperts {
    let halved = |m: &mut Module, id: WeightId, name: &str, shape: &[usize]| {
        add(m, name, shape, DType::F32, WeightExpr::Scale(0.5, id))
    };
    let p = "layers.0.ffn";
    let expert1 = FeedForward {
        gate: halved(m, dense_ffn.gate, &format!("{p}.experts.1.gate"), &[64, 32]),
        up: halved(m, dense_ffn.up, &format!("{p}.experts.1.up"), &[64, 32]),
        down: halved(m, dense_ffn.down, &format!("{p}.experts.1.down"), &[32, 64]),
    };
    let projection = FeedForward {
        gate: random(m, &format!("{p}.router.projection.gate"), &[16, 8], 84),
        up: random(m, &format!("{p}.router.projection.up"), &[16, 8], 85),
        down: random(m, &format!("{p}.router.projection.down"), &[32, 16], 86),
    };
    MixtureOfExperts {
        router: Router::Projected(ProjectedRouter {
            domains: random(m, &format!("{p}.router.domains"), &[3, 8], 83),
            projection,
        }),
        experts: vec![
            dense_ffn.clone(),
            expert1,
            ffn(m, &format!("{p}.experts.2"), 87),
        ],
        routing: Routing {
            top_k: 2,
            normalize: true,
        },
        shared_expert: Some(SharedExpert {
            ffn: ffn(m, &format!("{p}.shared"), 90),
            gate: Some(random(m, &format!("{p}.shared.gate_proj"), &[1, 32], 93)),
        }),
    }
}

/// A mixture with a router of concatenated rows, soft routing, an expert whose gate is a
/// weighted sum, and a shared expert without gate.
fn rows_moe(m: &mut Module, dense_ffn: &FeedForward) -> MixtureOfExperts {
    let rows = [94, 95].map(|s| random(m, "layers.1.ffn.router.row", &[1, 32], s));
    let router = add(
        m,
        "layers.1.ffn.router",
        &[2, 32],
        DType::F32,
        WeightExpr::Concat(rows.to_vec()),
    );
    let delta = random(m, "layers.1.ffn.experts.0.gate.delta", &[64, 32], 197);
    let sum = WeightExpr::WeightedSum {
        terms: vec![(2.0, dense_ffn.gate), (-1.0, delta)],
        normalize: false,
    };
    let gate = add(m, "layers.1.ffn.experts.0.gate", &[64, 32], DType::F32, sum);
    MixtureOfExperts {
        router: Router::Rows(router),
        experts: vec![
            FeedForward {
                gate,
                ..dense_ffn.clone()
            },
            ffn(m, "layers.1.ffn.experts.1", 96),
        ],
        routing: Routing::soft(2),
        shared_expert: Some(SharedExpert {
            ffn: ffn(m, "layers.1.ffn.shared", 99),
            gate: None,
        }),
    }
}

fn small_meta() -> ModelMeta {
    ModelMeta {
        vocab_size: 16,
        hidden_size: 32,
        ..Default::default()
    }
}

/// Mixtures of experts reading `dense`'s weights, and merges of every kind.
fn moe(m: &mut Module, dense_ffn: &FeedForward) {
    let dense = &m.graphs["dense"];
    let embed = dense.node(dense.find("embed").unwrap()).op.weights()[0].1;
    let other = random(m, "moe.embed.other", &[16, 32], 80);
    let expr = WeightExpr::WeightedSum {
        terms: vec![(0.25, embed), (0.75, other)],
        normalize: true,
    };
    let embed = add(m, "embed.table", &[16, 32], DType::F32, expr);
    let norms = [81, 82].map(|s| random(m, "norm.part", &[32], s));
    let mean = WeightExpr::Mean(norms.to_vec());
    let norm = add(m, "norm.weight", &[32], DType::BF16, mean);
    let (projected, rows) = (projected_moe(m, dense_ffn), rows_moe(m, dense_ffn));
    let mut b = GraphBuilder::new("moe", small_meta());
    let x = b.input();
    let h = b.embedding(x, embed);
    let n = b.rms_norm("layers.0.ffn_norm", h, norm, 1e-5);
    let f = b.mixture_of_experts("layers.0.ffn", n, projected);
    let h = b.add("layers.0.ffn_residual", h, f);
    let f = b.mixture_of_experts("layers.1.ffn", h, rows);
    let h = b.add("layers.1.ffn_residual", h, f);
    m.insert(b.output(h));
}

/// Mixtures of attention: shared KV and soft routing; own KV, top-1 routing and experts
/// whose settings differ. Node names that need quoting.
fn moa(m: &mut Module, f: &Files) {
    let shared = full_attention(m, "layers.0.attn.experts.0", f);
    let mut other = bare_attention(m, "layers.0.attn.experts.1", 100);
    other.rope = shared.rope.clone();
    other.window = shared.window;
    other.q_bias = Some(random(m, "layers.0.attn.experts.1.q_bias", &[32], 101));
    other.qk_norm = Some(QkNorm {
        eps: 1e-6,
        ..shared.qk_norm.clone().unwrap()
    });
    (other.k, other.v, other.k_bias, other.v_bias) =
        (shared.k, shared.v, shared.k_bias, shared.v_bias);
    let kv_shared = MixtureOfAttention {
        router: random(m, "layers.0.attn.router", &[2, 32], 102),
        experts: vec![shared, other],
        routing: Routing::soft(2),
    };
    let first = bare_attention(m, "layers.1.attn.experts.0", 103);
    let mut second = bare_attention(m, "layers.1.attn.experts.1", 104);
    second.window = Some(8);
    second.rope = Some(Rope {
        theta: 1e4,
        scaling: RopeScaling::None,
        pairs: RopePairs::Interleaved,
    });
    let own_kv = MixtureOfAttention {
        router: random(m, "layers.1.attn.router", &[3, 32], 105),
        experts: vec![first.clone(), second, first],
        routing: Routing {
            top_k: 1,
            normalize: true,
        },
    };
    let embed = random(m, "weird name: embed \"table\"", &[16, 32], 106);
    let mut b = GraphBuilder::new("moa", small_meta());
    let x = b.input();
    let h = b.embedding(x, embed);
    let a = b.mixture_of_attention("layers.0 (attention, shared kv)", h, kv_shared);
    let h = b.add("layers.0.residual", h, a);
    let a = b.mixture_of_attention("layers.1.attn", h, own_kv);
    let h = b.add("layers.1.residual", h, a);
    m.insert(b.output(h));
}

/// Three graphs over one weight table with every op kind and weight expression.
pub fn everything(f: &Files) -> Module {
    let mut m = Module::new();
    let dense_ffn = dense(&mut m, f);
    moe(&mut m, &dense_ffn);
    moa(&mut m, f);
    m
}

/// Prints `m`, parses the text, checks the result equals `m` and prints the same text.
pub fn round_trip(m: &Module, f: &Files) -> String {
    let text = print_module(m);
    let parsed =
        parse_module(&text, &|name| f.open(name)).unwrap_or_else(|e| panic!("{e}\n{text}"));
    if let Some(d) = structural_diff(&parsed, m) {
        panic!("the parsed module differs: {d}\n{text}");
    }
    assert_eq!(print_module(&parsed), text);
    text
}
