//! Tests of the burn runtime on the CPU backend, on tiny models with seeded weights: the
//! models and a naive f64 reference written with plain loops over the host weights, here;
//! the tests, in the submodules.
//!
//! Besides self-consistency (cached decoding vs full recomputation, identical experts vs
//! one dense FFN, GQA vs the equivalent multi-head model), the runtime is checked against
//! the naive reference.

mod calls;
mod numerics;

use std::collections::HashMap;

use burn_flex::{Flex, FlexDevice};
use upmix_ir::{
    Attention, DecoderBlock, FeedForward, GraphBuilder, HostTensor, MixtureOfExperts, ModelMeta,
    Module, Op, Rope, RopePairs, RopeScaling, Routing, SharedExpert, WeightId,
};

use super::BurnRuntime;

// ---------------------------------------------------------------------------------------
// Tiny models with seeded weights

/// A 64-bit linear congruential generator: deterministic weights without a rand crate.
struct Lcg(u64);

impl Lcg {
    /// Uniform in `[-1, 1)`.
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }

    /// Norm weights: around one.
    fn norm(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 1.0 + 0.2 * self.next()).collect()
    }
}

#[derive(Clone, Copy)]
struct Config {
    vocab: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    layers: usize,
    theta: f32,
    eps: f32,
    biases: bool,
    tied: bool,
    window: Option<usize>,
}

const BASE: Config = Config {
    vocab: 32,
    hidden: 16,
    heads: 4,
    kv_heads: 2,
    head_dim: 4,
    ffn: 24,
    layers: 2,
    theta: 10000.0,
    eps: 1e-5,
    biases: false,
    tied: false,
    window: None,
};

/// A SwiGLU block's weights, row-major `[out, in]`.
#[derive(Clone)]
struct HostFfn {
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

#[derive(Clone)]
enum HostMlp {
    Dense(HostFfn),
    Moe {
        router: Vec<f32>,
        experts: Vec<HostFfn>,
        top_k: usize,
        normalize: bool,
        /// The shared expert and its optional `[1, hidden]` gate.
        shared: Option<(HostFfn, Option<Vec<f32>>)>,
    },
}

#[derive(Clone)]
struct HostLayer {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    mlp: HostMlp,
}

/// A whole decoder model on the host.
#[derive(Clone)]
struct HostModel {
    cfg: Config,
    embed: Vec<f32>,
    layers: Vec<HostLayer>,
    final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    lm_head: Option<Vec<f32>>,
}

fn random_ffn(rng: &mut Lcg, cfg: &Config) -> HostFfn {
    let (h, f) = (cfg.hidden, cfg.ffn);
    HostFfn {
        gate: rng.vec(f * h, 0.4),
        up: rng.vec(f * h, 0.4),
        down: rng.vec(h * f, 0.3),
    }
}

impl HostModel {
    fn random(cfg: Config, seed: u64) -> Self {
        let mut rng = Lcg(seed);
        let (h, q, kv) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let bias = |rng: &mut Lcg, n| cfg.biases.then(|| rng.vec(n, 0.2));
        let layers = (0..cfg.layers)
            .map(|_| HostLayer {
                attn_norm: rng.norm(h),
                q: rng.vec(q * h, 0.5),
                k: rng.vec(kv * h, 0.5),
                v: rng.vec(kv * h, 0.5),
                o: rng.vec(h * q, 0.4),
                q_bias: bias(&mut rng, q),
                k_bias: bias(&mut rng, kv),
                v_bias: bias(&mut rng, kv),
                ffn_norm: rng.norm(h),
                mlp: HostMlp::Dense(random_ffn(&mut rng, &cfg)),
            })
            .collect();
        HostModel {
            cfg,
            embed: rng.vec(cfg.vocab * h, 1.0),
            layers,
            final_norm: rng.norm(h),
            lm_head: (!cfg.tied).then(|| rng.vec(cfg.vocab * h, 0.5)),
        }
    }

    /// Replaces every dense FFN by a mixture of experts built by `moe(rng, layer)`.
    fn with_moe(mut self, seed: u64, moe: impl Fn(&mut Lcg, &HostFfn) -> HostMlp) -> Self {
        let mut rng = Lcg(seed);
        for layer in &mut self.layers {
            if let HostMlp::Dense(ffn) = &layer.mlp {
                layer.mlp = moe(&mut rng, ffn);
            }
        }
        self
    }

    /// The module with one graph, `tiny`, holding these weights as literals.
    fn module(&self) -> Module {
        let cfg = self.cfg;
        let mut m = Module::new();
        let (h, q, kv) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let meta = ModelMeta {
            vocab_size: cfg.vocab,
            hidden_size: h,
            ..Default::default()
        };
        let mut b = GraphBuilder::new("tiny", meta);
        let input = b.input();
        let embed = lit(&mut m, "embed", vec![cfg.vocab, h], &self.embed);
        let mut x = b.embedding(input, embed);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("layers.{i}");
            let attn = Attention {
                q: lit(&mut m, &format!("{p}.q"), vec![q, h], &l.q),
                k: lit(&mut m, &format!("{p}.k"), vec![kv, h], &l.k),
                v: lit(&mut m, &format!("{p}.v"), vec![kv, h], &l.v),
                o: lit(&mut m, &format!("{p}.o"), vec![h, q], &l.o),
                q_bias: l
                    .q_bias
                    .as_ref()
                    .map(|b| lit(&mut m, &format!("{p}.qb"), vec![q], b)),
                k_bias: l
                    .k_bias
                    .as_ref()
                    .map(|b| lit(&mut m, &format!("{p}.kb"), vec![kv], b)),
                v_bias: l
                    .v_bias
                    .as_ref()
                    .map(|b| lit(&mut m, &format!("{p}.vb"), vec![kv], b)),
                n_heads: cfg.heads,
                n_kv_heads: cfg.kv_heads,
                head_dim: cfg.head_dim,
                rope: Some(Rope {
                    theta: cfg.theta,
                    scaling: RopeScaling::None,
                    pairs: RopePairs::Halves,
                }),
                qk_norm: None,
                window: cfg.window,
            };
            let mlp = match &l.mlp {
                HostMlp::Dense(x) => {
                    Op::FeedForward(ffn_weights(&mut m, &cfg, &format!("{p}.ffn"), x))
                }
                HostMlp::Moe {
                    router,
                    experts,
                    top_k,
                    normalize,
                    shared,
                } => Op::MixtureOfExperts(MixtureOfExperts {
                    router: upmix_ir::Router::Rows(lit(
                        &mut m,
                        &format!("{p}.router"),
                        vec![experts.len(), h],
                        router,
                    )),
                    experts: experts
                        .iter()
                        .enumerate()
                        .map(|(e, x)| ffn_weights(&mut m, &cfg, &format!("{p}.experts.{e}"), x))
                        .collect(),
                    routing: Routing {
                        top_k: *top_k,
                        normalize: *normalize,
                    },
                    shared_expert: shared.as_ref().map(|(x, gate)| SharedExpert {
                        ffn: ffn_weights(&mut m, &cfg, &format!("{p}.shared"), x),
                        gate: gate
                            .as_ref()
                            .map(|g| lit(&mut m, &format!("{p}.shared_gate"), vec![1, h], g)),
                    }),
                }),
            };
            let block = DecoderBlock {
                attn_norm: lit(&mut m, &format!("{p}.attn_norm"), vec![h], &l.attn_norm),
                attn: Op::Attention(attn),
                ffn_norm: lit(&mut m, &format!("{p}.ffn_norm"), vec![h], &l.ffn_norm),
                mlp,
                eps: cfg.eps,
            };
            x = b.decoder_block(i, x, block);
        }
        let norm = lit(&mut m, "final_norm", vec![h], &self.final_norm);
        let x = b.rms_norm("final_norm", x, norm, cfg.eps);
        let head = match &self.lm_head {
            Some(w) => lit(&mut m, "lm_head", vec![cfg.vocab, h], w),
            None => embed,
        };
        let x = b.linear("lm_head", x, head);
        m.insert(b.output(x));
        m
    }

    fn runtime(&self) -> BurnRuntime<Flex> {
        BurnRuntime::new(&self.module(), "tiny", &FlexDevice).unwrap()
    }
}

/// Adds a literal weight to `m`.
fn lit(m: &mut Module, name: &str, shape: Vec<usize>, data: &[f32]) -> WeightId {
    m.weights
        .literal(name, HostTensor::new(shape, data.to_vec()))
        .unwrap()
}

/// Adds a SwiGLU block's weights to `m` under prefix `p`.
fn ffn_weights(m: &mut Module, cfg: &Config, p: &str, x: &HostFfn) -> FeedForward {
    let (h, f) = (cfg.hidden, cfg.ffn);
    FeedForward {
        gate: lit(m, &format!("{p}.gate"), vec![f, h], &x.gate),
        up: lit(m, &format!("{p}.up"), vec![f, h], &x.up),
        down: lit(m, &format!("{p}.down"), vec![h, f], &x.down),
    }
}

// ---------------------------------------------------------------------------------------
// The naive f64 reference

/// `W x` for a row-major `[out, in]` weight.
fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum())
        .collect()
}

fn add_bias(mut y: Vec<f64>, b: &Option<Vec<f32>>) -> Vec<f64> {
    if let Some(b) = b {
        y.iter_mut().zip(b).for_each(|(y, &b)| *y += b as f64);
    }
    y
}

fn rms_norm_ref(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * inv * w as f64).collect()
}

fn silu_ref(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn softmax_ref(x: &[f64]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

fn ffn_ref(f: &HostFfn, x: &[f64]) -> Vec<f64> {
    let gate = matvec(&f.gate, x);
    let up = matvec(&f.up, x);
    let act: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(g, u)| silu_ref(*g) * u)
        .collect();
    matvec(&f.down, &act)
}

fn mlp_ref(mlp: &HostMlp, x: &[f64]) -> Vec<f64> {
    match mlp {
        HostMlp::Dense(f) => ffn_ref(f, x),
        HostMlp::Moe {
            router,
            experts,
            top_k,
            normalize,
            shared,
        } => {
            let p = softmax_ref(&matvec(router, x));
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
            let chosen = &order[..*top_k];
            let total: f64 = chosen.iter().map(|&e| p[e]).sum();
            let mut out = vec![0.0; x.len()];
            for &e in chosen {
                let w = if *normalize { p[e] / total } else { p[e] };
                let y = ffn_ref(&experts[e], x);
                out.iter_mut().zip(&y).for_each(|(o, y)| *o += w * y);
            }
            if let Some((ffn, gate)) = shared {
                let y = ffn_ref(ffn, x);
                let g = gate
                    .as_ref()
                    .map_or(1.0, |g| 1.0 / (1.0 + (-matvec(g, x)[0]).exp()));
                out.iter_mut().zip(&y).for_each(|(o, y)| *o += g * y);
            }
            out
        }
    }
}

/// Causal attention over all positions of `xs` (each `[hidden]`), by the definition.
fn attention_ref(cfg: &Config, l: &HostLayer, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let d = cfg.head_dim;
    let half = d / 2;
    let inv_freq = Rope {
        theta: cfg.theta,
        scaling: RopeScaling::None,
        pairs: RopePairs::Halves,
    }
    .inv_freq(d);
    // Rotates each head of a projected vector for position `t`.
    let rope = |v: Vec<f64>, t: usize| -> Vec<f64> {
        let mut out = v.clone();
        for (hd, x) in v.chunks_exact(d).enumerate() {
            for i in 0..half {
                let angle = t as f64 * inv_freq[i] as f64;
                let (sin, cos) = angle.sin_cos();
                out[hd * d + i] = x[i] * cos - x[i + half] * sin;
                out[hd * d + i + half] = x[i + half] * cos + x[i] * sin;
            }
        }
        out
    };
    let qs: Vec<Vec<f64>> = (0..xs.len())
        .map(|t| rope(add_bias(matvec(&l.q, &xs[t]), &l.q_bias), t))
        .collect();
    let ks: Vec<Vec<f64>> = (0..xs.len())
        .map(|t| rope(add_bias(matvec(&l.k, &xs[t]), &l.k_bias), t))
        .collect();
    let vs: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| add_bias(matvec(&l.v, x), &l.v_bias))
        .collect();
    let group = cfg.heads / cfg.kv_heads;
    (0..xs.len())
        .map(|t| {
            let mut context = vec![0.0; cfg.heads * d];
            for h in 0..cfg.heads {
                let kvh = h / group;
                let q = &qs[t][h * d..(h + 1) * d];
                // A windowed query sees the last `window` positions, itself included.
                let first = cfg.window.map_or(0, |w| (t + 1).saturating_sub(w));
                let scores: Vec<f64> = (first..=t)
                    .map(|j| {
                        let k = &ks[j][kvh * d..(kvh + 1) * d];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let p = softmax_ref(&scores);
                for (j, pj) in (first..=t).zip(&p) {
                    for i in 0..d {
                        context[h * d + i] += pj * vs[j][kvh * d + i];
                    }
                }
            }
            matvec(&l.o, &context)
        })
        .collect()
}

/// Every named activation of the model on `tokens`, `[tokens][width]` each.
fn reference(model: &HostModel, tokens: &[u32]) -> HashMap<String, Vec<Vec<f64>>> {
    let cfg = model.cfg;
    let h = cfg.hidden;
    let mut acts = HashMap::new();
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            let row = &model.embed[t as usize * h..(t as usize + 1) * h];
            row.iter().map(|&v| v as f64).collect()
        })
        .collect();
    acts.insert("embed".to_string(), x.clone());
    let add = |a: &[Vec<f64>], b: &[Vec<f64>]| -> Vec<Vec<f64>> {
        a.iter()
            .zip(b)
            .map(|(a, b)| a.iter().zip(b).map(|(a, b)| a + b).collect())
            .collect()
    };
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("layers.{i}");
        let n1: Vec<Vec<f64>> = x
            .iter()
            .map(|r| rms_norm_ref(r, &l.attn_norm, cfg.eps))
            .collect();
        let a = attention_ref(&cfg, l, &n1);
        let hres = add(&x, &a);
        let n2: Vec<Vec<f64>> = hres
            .iter()
            .map(|r| rms_norm_ref(r, &l.ffn_norm, cfg.eps))
            .collect();
        let f: Vec<Vec<f64>> = n2.iter().map(|r| mlp_ref(&l.mlp, r)).collect();
        x = add(&hres, &f);
        for (name, v) in [
            ("attn_norm", n1),
            ("attn", a),
            ("attn_residual", hres),
            ("ffn_norm", n2),
            ("ffn", f),
            ("ffn_residual", x.clone()),
        ] {
            acts.insert(format!("{p}.{name}"), v);
        }
    }
    let n: Vec<Vec<f64>> = x
        .iter()
        .map(|r| rms_norm_ref(r, &model.final_norm, cfg.eps))
        .collect();
    let head = model.lm_head.as_ref().unwrap_or(&model.embed);
    let logits = n.iter().map(|r| matvec(head, r)).collect();
    acts.insert("final_norm".to_string(), n);
    acts.insert("lm_head".to_string(), logits);
    acts
}

/// Largest absolute difference between a runtime tensor and reference rows.
fn max_diff(got: &HostTensor, want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.shape, vec![want.len(), want[0].len()]);
    want.iter()
        .enumerate()
        .flat_map(|(i, row)| {
            row.iter()
                .zip(got.row(i))
                .map(|(w, &g)| (w - g as f64).abs())
        })
        .fold(0.0, f64::max)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

const PROMPT: [u32; 5] = [3, 17, 9, 30, 1];

/// The id of the weight called `name` in `m`.
fn weight_id(m: &Module, name: &str) -> WeightId {
    (0..m.weights.len() as u32)
        .map(WeightId)
        .find(|&id| m.weights.get(id).unwrap().name == name)
        .unwrap()
}
