//! GGUF files -> IR: hyper-parameters from the `{arch}.*` metadata, tensors as lazy
//! `Source` weights in their stored (possibly block-quantized) dtype.
//!
//! llama.cpp's converter reorders the rows of the Q and K projections of `llama` models
//! (each head's two rotary halves interleaved); the loader undoes that with a `Rows`
//! expression, so the IR holds the Hugging Face layout whatever the source format.
//! Cohere models (`command-r`, `cohere2`) rotate interleaved pairs in both formats and
//! are read as stored.

use std::path::Path;
use std::sync::Arc;

use upmix_formats::{canonical, gguf as names, Family, Role};
use upmix_ir::{
    FeedForward, MixtureOfExperts, ModelMeta, Module, Op, Rope, RopePairs, RopeScaling, Routing,
    Weight, WeightExpr, WeightId,
};

use crate::config::Windows;
use crate::decoder::{build_decoder, dense_mlp, family, CohereParts, Hyper, TensorSource};
use crate::error::FrontendError;
use crate::gguf::{GgufFile, GgufTensor};

/// Loads the GGUF file at `path` into `module` as a graph called `name`.
pub fn load_gguf(path: &Path, name: &str, module: &mut Module) -> Result<(), FrontendError> {
    let gguf = GgufFile::open(path)?;
    let arch = gguf
        .require("general.architecture")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    let family = family(names::ARCHITECTURES, &arch, path)?;
    let experts = expert_routing(&gguf, &arch)?;
    let hyper = hyper(&gguf, &arch, family)?;
    let meta = model_meta(&gguf, &arch, &hyper);
    let mut loader = Loader {
        gguf: &gguf,
        module,
        unpermute_qk: family == Family::Llama,
        hyper: hyper.clone(),
        experts,
    };
    let graph = build_decoder(name, meta, (&hyper, path), false, &mut loader)?;
    module.insert(graph);
    Ok(())
}

/// The routing of a mixture-of-experts file (`{arch}.expert_count`), `None` without one.
fn expert_routing(gguf: &GgufFile, arch: &str) -> Result<Option<Routing>, FrontendError> {
    let path = gguf.path();
    let key = |k: &str| format!("{arch}.{k}");
    Ok(match gguf.get(&key("expert_count")) {
        None => None,
        Some(_) if arch != "llama" => {
            return Err(FrontendError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "mixture-of-experts `{arch}` GGUF files are not supported (llama is)"
                ),
            })
        }
        Some(_) => {
            let n = gguf.require_u64(&key("expert_count"))? as usize;
            let top_k = gguf.require_u64(&key("expert_used_count"))? as usize;
            if n == 0 || top_k == 0 || top_k > n {
                return Err(FrontendError::Config {
                    path: path.to_path_buf(),
                    message: format!("expert_used_count {top_k} must be in 1..={n} (expert_count)"),
                });
            }
            Some(Routing {
                top_k,
                normalize: true,
            })
        }
    })
}

/// The decoder's hyper-parameters from the `{arch}.*` metadata and the embedding's shape.
fn hyper(gguf: &GgufFile, arch: &str, family: Family) -> Result<Hyper, FrontendError> {
    let path = gguf.path();
    let key = |k: &str| format!("{arch}.{k}");
    let heads = gguf.require_u64(&key("attention.head_count"))? as usize;
    let hidden = gguf.require_u64(&key("embedding_length"))? as usize;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(FrontendError::Config {
            path: path.to_path_buf(),
            message: format!("embedding_length {hidden} is not divisible by head_count {heads}"),
        });
    }
    let head_dim = match gguf.get(&key("attention.key_length")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => hidden / heads,
    };
    let embed_name = names::name(Role::Embed, 0).expect("GGUF names the embedding");
    let embed_shape = gguf
        .tensors
        .get(&embed_name)
        .map(|t| t.shape.clone())
        .ok_or_else(|| FrontendError::MissingTensor {
            path: path.to_path_buf(),
            tensor: embed_name.clone(),
        })?;
    let layers = gguf.require_u64(&key("block_count"))? as usize;
    let cohere = family.parallel();
    let mut rope = rope(gguf, arch)?;
    if cohere {
        rope.pairs = RopePairs::Interleaved;
    }
    Ok(Hyper {
        layers,
        hidden,
        ffn: gguf.require_u64(&key("feed_forward_length"))? as usize,
        heads,
        kv_heads: match gguf.get(&key("attention.head_count_kv")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => heads,
        },
        head_dim,
        vocab: embed_shape[0],
        eps: match cohere {
            true => gguf.require_f64(&key("attention.layer_norm_epsilon"))?,
            false => gguf.require_f64(&key("attention.layer_norm_rms_epsilon"))?,
        } as f32,
        rope,
        attn_bias: family == Family::Qwen2,
        windows: windows(gguf, arch, family, layers)?,
        cohere: match cohere {
            true => Some(CohereParts {
                qk_norm: gguf
                    .tensors
                    .contains_key(&names::name(Role::QkNorm(0), 0).expect("GGUF names q norms")),
                logit_scale: gguf.require_f64(&key("logit_scale"))? as f32,
                nope_global: family == Family::Cohere2,
            }),
            false => None,
        },
        parallel: cohere,
        attention_experts: None,
    })
}

/// The model's metadata: sizes, context length, special tokens and embedded tokenizer.
fn model_meta(gguf: &GgufFile, arch: &str, hyper: &Hyper) -> ModelMeta {
    let token = |k: &str| gguf.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    ModelMeta {
        vocab_size: hyper.vocab,
        hidden_size: hyper.hidden,
        max_position_embeddings: gguf
            .get(&format!("{arch}.context_length"))
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize,
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_id: token("tokenizer.ggml.eos_token_id"),
        aux_files: Vec::new(),
        config_file: None,
        tokenizer: gguf
            .get("tokenizer.ggml.tokens")
            .map(|_| gguf.path().to_path_buf()),
    }
}

/// Cohere2's sliding windows: `{arch}.attention.sliding_window` on three of every
/// `{arch}.attention.sliding_window_pattern` layers (4 when absent, as llama.cpp has it).
fn windows(
    gguf: &GgufFile,
    arch: &str,
    family: Family,
    layers: usize,
) -> Result<Windows, FrontendError> {
    if family != Family::Cohere2 {
        return Ok(Windows::None);
    }
    let window = gguf.require_u64(&format!("{arch}.attention.sliding_window"))? as usize;
    let pattern = match gguf.get(&format!("{arch}.attention.sliding_window_pattern")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None => 4,
    };
    if pattern == 0 {
        return Err(FrontendError::Config {
            path: gguf.path().to_path_buf(),
            message: format!("{arch}.attention.sliding_window_pattern is 0; it must be positive"),
        });
    }
    let sliding = (0..layers).map(|i| !(i + 1).is_multiple_of(pattern));
    Ok(Windows::Layers(sliding.collect(), window))
}

/// RoPE settings from `{arch}.rope.*`.
fn rope(gguf: &GgufFile, arch: &str) -> Result<Rope, FrontendError> {
    let get = |k: &str| gguf.get(&format!("{arch}.rope.{k}"));
    let theta = get("freq_base")
        .and_then(|v| v.as_f64())
        .unwrap_or(10_000.0) as f32;
    let scaling = match get("scaling.type").and_then(|v| v.as_str()) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: get("scaling.factor")
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0) as f32,
        },
        Some(other) => {
            return Err(FrontendError::Config {
                path: gguf.path().to_path_buf(),
                message: format!("rope scaling type `{other}` is not supported (none, linear)"),
            })
        }
    };
    Ok(Rope {
        theta,
        scaling,
        pairs: RopePairs::Halves,
    })
}

struct Loader<'a> {
    gguf: &'a GgufFile,
    module: &'a mut Module,
    /// Undo llama.cpp's Q/K row permutation.
    unpermute_qk: bool,
    hyper: Hyper,
    /// A Mixtral-style mixture in every layer (`{arch}.expert_count`): its routing; the
    /// expert count is the router's rows.
    experts: Option<Routing>,
}

impl TensorSource for Loader<'_> {
    fn tensor(
        &mut self,
        role: Role,
        layer: usize,
        shape: &[usize],
    ) -> Result<WeightId, FrontendError> {
        let canonical = canonical(role, layer, 0);
        let gguf_name = names::name(role, layer).expect("the decoder asks only for GGUF roles");
        let t = self.info(&gguf_name, shape)?;
        let permuted = match role {
            Role::Attn(0) => Some(self.hyper.heads),
            Role::Attn(1) => Some(self.hyper.kv_heads),
            _ => None,
        }
        .filter(|_| self.unpermute_qk);
        let source = Weight {
            name: if permuted.is_some() {
                format!("{canonical}.gguf_rows")
            } else {
                canonical.clone()
            },
            shape: t.shape.clone(),
            dtype: t.dtype,
            expr: WeightExpr::Source {
                file: self.gguf.file.clone(),
                offset: t.offset,
                dtype: t.dtype,
            },
        };
        let id = self.module.weights.add(source)?;
        let Some(n_heads) = permuted else {
            return Ok(id);
        };
        let rows = unpermute_rows(shape[0], n_heads);
        Ok(self.module.weights.add(Weight {
            name: canonical,
            shape: shape.to_vec(),
            // Rows of whole quantized rows are still stored as the source's dtype.
            dtype: t.dtype,
            expr: WeightExpr::Rows(id, rows),
        })?)
    }

    fn mlp(&mut self, layer: usize, h: &Hyper) -> Result<Op, FrontendError> {
        let Some(routing) = self.experts else {
            return dense_mlp(self, layer, h);
        };
        let router_name = names::name(Role::Router, layer).expect("GGUF names routers");
        let n = match self.gguf.tensors.get(&router_name) {
            Some(t) => t.shape[0],
            None => {
                return Err(FrontendError::MissingTensor {
                    path: self.gguf.path().to_path_buf(),
                    tensor: router_name,
                })
            }
        };
        let router = self.tensor(Role::Router, layer, &[n, h.hidden])?;
        // Each expert's matrix is a contiguous run of the stacked `[experts, out, in]`.
        let mut parts = Vec::new();
        for (k, shape) in [[h.ffn, h.hidden], [h.ffn, h.hidden], [h.hidden, h.ffn]]
            .into_iter()
            .enumerate()
        {
            let name = names::name(Role::Expert(k), layer).expect("GGUF names experts");
            let t = self.info(&name, &[n, shape[0], shape[1]])?;
            let each = t.dtype.nbytes(&shape).unwrap_or(0);
            let mut ids = Vec::with_capacity(n);
            for e in 0..n {
                ids.push(self.module.weights.add(Weight {
                    name: canonical(Role::Expert(k), layer, e),
                    shape: shape.to_vec(),
                    dtype: t.dtype,
                    expr: WeightExpr::Source {
                        file: self.gguf.file.clone(),
                        offset: t.offset + e * each,
                        dtype: t.dtype,
                    },
                })?);
            }
            parts.push(ids);
        }
        let experts = (0..n)
            .map(|e| FeedForward {
                gate: parts[0][e],
                up: parts[1][e],
                down: parts[2][e],
            })
            .collect();
        Ok(Op::MixtureOfExperts(MixtureOfExperts {
            router: upmix_ir::Router::Rows(router),
            experts,
            routing,
            shared_expert: None,
        }))
    }

    fn has_lm_head(&self) -> bool {
        let name = names::name(Role::LmHead, 0).expect("GGUF names the lm head");
        self.gguf.tensors.contains_key(&name)
    }
}

impl Loader<'_> {
    /// The tensor `name`, checked to have `shape`.
    fn info(&self, name: &str, shape: &[usize]) -> Result<GgufTensor, FrontendError> {
        let t = self
            .gguf
            .tensors
            .get(name)
            .ok_or_else(|| FrontendError::MissingTensor {
                path: self.gguf.path().to_path_buf(),
                tensor: name.to_string(),
            })?;
        if t.shape != shape {
            return Err(FrontendError::TensorShape {
                path: self.gguf.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t.clone())
    }
}

/// Row order that undoes llama.cpp's Q/K permutation: within each head of `head_dim`
/// rows, the GGUF file stores the rotary halves interleaved (row `2b + a` holds the
/// Hugging Face row `a * head_dim / 2 + b`). `rows` is `n_heads` heads of an even
/// `head_dim` (checked by `Hyper::check` and the tensor's shape).
fn unpermute_rows(rows: usize, n_heads: usize) -> Arc<[u32]> {
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, i) = (r / head_dim, r % head_dim);
            let (a, b) = (i / half, i % half);
            (h * head_dim + 2 * b + a) as u32
        })
        .collect()
}
