//! Builds a small two-layer decoder in Rust code with the graph builder, runs passes on it
//! through the pass manager (merge two seeds, then cast to bf16), executes the result on the
//! CPU and prints its logits and a greedy continuation.
//!
//! Run: `cargo run --example graph_api`

use upmix::backends::{load_runtime, DeviceSpec};
use upmix::ir::{
    print_graph, Attention, DecoderBlock, FeedForward, GraphBuilder, HostTensor, ModelMeta, Module,
    Op, Rope, RopePairs, RopeScaling, WeightId,
};
use upmix::passes::{create, PassContext, PassManager};

const VOCAB: usize = 32;
const HIDDEN: usize = 16;
const FFN: usize = 24;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;

/// Deterministic pseudo-random weights (a 64-bit LCG), scaled by `scale`.
fn random(m: &mut Module, name: &str, shape: Vec<usize>, seed: &mut u64, scale: f32) -> WeightId {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    m.weights
        .literal(name, HostTensor::new(shape, data))
        .expect("literal weight")
}

fn ones(m: &mut Module, name: &str) -> WeightId {
    m.weights
        .literal(name, HostTensor::new(vec![HIDDEN], vec![1.0; HIDDEN]))
        .expect("literal weight")
}

/// A Llama-style decoder with random weights.
fn build(m: &mut Module, name: &str, mut seed: u64) {
    let meta = ModelMeta {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        max_position_embeddings: 64,
        bos_token_id: None,
        eos_token_id: None,
        aux_files: vec![],
        config_file: None,
        tokenizer: None,
    };
    let s = &mut seed;
    let proj = 1.0 / (HIDDEN as f32).sqrt();
    let embed = random(m, "embed.table", vec![VOCAB, HIDDEN], s, 1.0);
    let mut b = GraphBuilder::new(name, meta);
    let input = b.input();
    let mut x = b.embedding(input, embed);
    for layer in 0..2 {
        let p = format!("layers.{layer}");
        let attn = Attention {
            q: random(
                m,
                &format!("{p}.attn.q"),
                vec![HEADS * HEAD_DIM, HIDDEN],
                s,
                proj,
            ),
            k: random(
                m,
                &format!("{p}.attn.k"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                s,
                proj,
            ),
            v: random(
                m,
                &format!("{p}.attn.v"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                s,
                proj,
            ),
            o: random(
                m,
                &format!("{p}.attn.o"),
                vec![HIDDEN, HEADS * HEAD_DIM],
                s,
                proj,
            ),
            q_bias: None,
            k_bias: None,
            v_bias: None,
            n_heads: HEADS,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rope: Some(Rope {
                theta: 10_000.0,
                scaling: RopeScaling::None,
                pairs: RopePairs::Halves,
            }),
            qk_norm: None,
            window: None,
        };
        let ffn = FeedForward {
            gate: random(m, &format!("{p}.ffn.gate"), vec![FFN, HIDDEN], s, proj),
            up: random(m, &format!("{p}.ffn.up"), vec![FFN, HIDDEN], s, proj),
            down: random(m, &format!("{p}.ffn.down"), vec![HIDDEN, FFN], s, proj),
        };
        let block = DecoderBlock {
            attn_norm: ones(m, &format!("{p}.attn_norm.weight")),
            attn: Op::Attention(attn),
            ffn_norm: ones(m, &format!("{p}.ffn_norm.weight")),
            mlp: Op::FeedForward(ffn),
            eps: 1e-5,
        };
        x = b.decoder_block(layer, x, block);
    }
    let norm = ones(m, "final_norm.weight");
    x = b.rms_norm("final_norm", x, norm, 1e-5);
    let head = random(m, "lm_head.weight", vec![VOCAB, HIDDEN], s, proj);
    x = b.linear("lm_head", x, head);
    m.insert(b.output(x));
}

fn main() -> anyhow::Result<()> {
    let mut m = Module::new();
    build(&mut m, "a", 1);
    build(&mut m, "b", 2);

    let mut manager = PassManager::new();
    manager.add(create(
        "Merge",
        r#"(into: "merged", models: ["a", "b"], weights: Some([0.5, 0.5]))"#,
    )?);
    manager.add(create("Cast", r#"(model: "merged", dtype: "bf16")"#)?);
    for r in manager.run(&mut m, &mut PassContext::default())? {
        println!(
            "pass {:<6} -> {} ({} weight bytes) in {:.4}s",
            r.pass,
            r.graphs.join(", "),
            r.weight_bytes,
            r.seconds
        );
    }
    let ir = print_graph(&m.graphs["merged"], &m.weights);
    println!("{}", ir.lines().take(6).collect::<Vec<_>>().join("\n"));

    let mut rt = load_runtime(&m, "merged", &DeviceSpec::Cpu)?;
    let tokens = [1u32, 5, 9, 14];
    let logits = rt.logits(&tokens)?;
    let last = logits.row(tokens.len() - 1);
    let shown: Vec<String> = last[..8].iter().map(|v| format!("{v:+.4}")).collect();
    println!("logits[{}][..8] = [{}]", tokens.len() - 1, shown.join(", "));
    println!("greedy continuation: {:?}", rt.generate(&tokens, 8, None)?);
    Ok(())
}
