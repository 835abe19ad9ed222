//! Hugging Face checkpoint directories -> IR.
//!
//! A directory with `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) becomes one [`Graph`] whose weights are `Source`
//! expressions over the memory-mapped shards: loading reads headers only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use upmix_ir::{
    FeedForward, MappedFile, MixtureOfExperts, ModelMeta, Module, Op, ProjectedRouter, RopePairs,
    Router, Routing, SharedExpert, Weight, WeightExpr, WeightId,
};

use upmix_formats::{canonical, hf, Family, Role};

use crate::config::HfConfig;
use crate::decoder::{
    build_decoder, dense_mlp, family, AttentionMix, CohereParts, Hyper, TensorSource,
};
use crate::error::{io, FrontendError};
use crate::safetensors::{SafetensorsFile, TensorInfo};

/// Files besides weights and config that travel with a checkpoint: everything a loader
/// needs to tokenize, render chats and generate. `additional_chat_templates` is a
/// directory (transformers 5 saves named chat templates there).
const AUX_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
];

/// Loads the checkpoint in `dir` into `module` as a graph called `name`.
pub fn load_hf(dir: &Path, name: &str, module: &mut Module) -> Result<(), FrontendError> {
    let config_path = dir.join("config.json");
    if !dir.is_dir() || !config_path.is_file() {
        return Err(FrontendError::NotACheckpoint {
            path: dir.to_path_buf(),
        });
    }
    let config = HfConfig::read(&config_path)?;
    let arch = config.architectures.first().cloned().unwrap_or_default();
    let archs: Vec<_> = hf::ARCHITECTURES.iter().map(|(a, _, f)| (*a, *f)).collect();
    let family = family(&archs, &arch, &config_path)?;
    check_supported(&config, family, &config_path)?;
    let hyper = hyper(&config, family, &arch, &config_path)?;
    let moe = moe_spec(&config, family, &config_path)?;
    let meta = model_meta(&config, dir, &config_path);
    let mut loader = Loader {
        family,
        dir: dir.to_path_buf(),
        shards: open_shards(dir)?,
        module,
        moe,
    };
    // Tied when the config says so (Cohere by default), or when the checkpoint has no lm head.
    let tied = config.tie_word_embeddings.unwrap_or(family.parallel());
    let graph = build_decoder(name, meta, (&hyper, &config_path), tied, &mut loader)?;
    module.insert(graph);
    Ok(())
}

/// A config error about the `config.json` at `config_path`.
fn bad_config(config_path: &Path) -> impl Fn(String) -> FrontendError + '_ {
    |message| FrontendError::Config {
        path: config_path.to_path_buf(),
        message,
    }
}

/// Rejects config settings the loader does not support.
fn check_supported(
    config: &HfConfig,
    family: Family,
    config_path: &Path,
) -> Result<(), FrontendError> {
    let bad_config = bad_config(config_path);
    if let Some(act) = config.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad_config(format!(
            "hidden_act `{act}` is not supported (only silu)"
        )));
    }
    if family.parallel() && config.attention_bias == Some(true) {
        return Err(bad_config(
            "attention_bias = true is not supported for Cohere models".into(),
        ));
    }
    if config.mlp_bias == Some(true) {
        return Err(bad_config("mlp_bias = true is not supported".into()));
    }
    if config.num_attention_heads == 0 || config.num_hidden_layers == 0 {
        return Err(bad_config(
            "num_attention_heads and num_hidden_layers must be positive".into(),
        ));
    }
    Ok(())
}

/// The decoder's hyper-parameters from the config of an `arch` model.
fn hyper(
    config: &HfConfig,
    family: Family,
    arch: &str,
    config_path: &Path,
) -> Result<Hyper, FrontendError> {
    let bad_config = bad_config(config_path);
    let need_f = |v: Option<f64>, field: &str| {
        v.ok_or_else(|| bad_config(format!("missing field `{field}` ({arch} requires it)")))
    };
    let mut rope = config.rope(config_path)?;
    let cohere = if family.parallel() {
        rope.pairs = RopePairs::Interleaved;
        Some(CohereParts {
            qk_norm: config.use_qk_norm == Some(true),
            logit_scale: need_f(config.logit_scale, "logit_scale")? as f32,
            nope_global: family == Family::Cohere2,
        })
    } else {
        None
    };
    let eps = match family.parallel() {
        true => need_f(config.layer_norm_eps, "layer_norm_eps")?,
        false => need_f(config.rms_norm_eps, "rms_norm_eps")?,
    };
    Ok(Hyper {
        layers: config.num_hidden_layers,
        hidden: config.hidden_size,
        ffn: config.intermediate_size,
        heads: config.num_attention_heads,
        kv_heads: config.n_kv_heads(),
        head_dim: config.head_dim(),
        vocab: config.vocab_size,
        eps: eps as f32,
        rope,
        attn_bias: match family {
            Family::Qwen2 => true,
            Family::Qwen2Moe => config.qkv_bias.unwrap_or(true),
            _ => config.attention_bias == Some(true),
        },
        windows: config.windows(family).map_err(&bad_config)?,
        cohere,
        parallel: family.parallel() || config.parallel_blocks == Some(true),
        attention_experts: attention_experts(config).map_err(&bad_config)?,
    })
}

/// The checked MoE settings of Mixtral, Qwen2-MoE and sparse UpmixBam configs; `None`
/// for dense models.
fn moe_spec(
    config: &HfConfig,
    family: Family,
    config_path: &Path,
) -> Result<Option<MoeSpec>, FrontendError> {
    let bad_config = bad_config(config_path);
    let need = |v: Option<usize>, field: &str| {
        v.ok_or_else(|| bad_config(format!("missing field `{field}`")))
    };
    let moe = match family {
        Family::Mixtral => Some(MoeSpec {
            experts: need(config.num_local_experts, "num_local_experts")?,
            top_k: need(config.num_experts_per_tok, "num_experts_per_tok")?,
            ffn: config.intermediate_size,
            normalize_top_k: true,
            shared_ffn: None,
            sparse_step: 1,
            dense_layers: Vec::new(),
            nexus: None,
        }),
        Family::UpmixBam if config.num_experts.unwrap_or(0) > 0 => Some(MoeSpec {
            experts: need(config.num_experts, "num_experts")?,
            top_k: need(config.num_experts_per_tok, "num_experts_per_tok")?,
            ffn: config.intermediate_size,
            normalize_top_k: config.norm_topk_prob.unwrap_or(false),
            shared_ffn: config.shared_expert_intermediate_size.filter(|&f| f > 0),
            sparse_step: 1,
            dense_layers: Vec::new(),
            nexus: match (config.router_embed_size, config.router_projection_size) {
                (None | Some(0), None | Some(0)) => None,
                (Some(d), Some(h)) if d > 0 && h > 0 => Some((d, h)),
                (d, h) => {
                    return Err(bad_config(format!(
                        "router_embed_size {d:?} and router_projection_size {h:?} must both \
                         be positive (a Nexus router) or both 0"
                    )))
                }
            },
        }),
        Family::Qwen2Moe => Some(MoeSpec {
            experts: need(config.num_experts, "num_experts")?,
            top_k: need(config.num_experts_per_tok, "num_experts_per_tok")?,
            ffn: need(config.moe_intermediate_size, "moe_intermediate_size")?,
            normalize_top_k: config.norm_topk_prob.unwrap_or(false),
            shared_ffn: Some(need(
                config.shared_expert_intermediate_size,
                "shared_expert_intermediate_size",
            )?),
            sparse_step: config.decoder_sparse_step.unwrap_or(1).max(1),
            dense_layers: config.mlp_only_layers.clone().unwrap_or_default(),
            nexus: None,
        }),
        _ => None,
    };
    if let Some(spec) = &moe {
        spec.check().map_err(&bad_config)?;
    }
    Ok(moe)
}

/// The model's metadata: sizes, special tokens and the files that travel with it.
fn model_meta(config: &HfConfig, dir: &Path, config_path: &Path) -> ModelMeta {
    ModelMeta {
        vocab_size: config.vocab_size,
        hidden_size: config.hidden_size,
        max_position_embeddings: config.max_position_embeddings.unwrap_or(4096),
        bos_token_id: HfConfig::token_id(&config.bos_token_id),
        eos_token_id: HfConfig::token_id(&config.eos_token_id),
        aux_files: AUX_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file() || p.is_dir())
            .collect(),
        config_file: Some(config_path.to_path_buf()),
        tokenizer: Some(dir.join("tokenizer.json")).filter(|p| p.is_file()),
    }
}

/// The attention experts of an `UpmixBamForCausalLM` config, checked: `None` without
/// (`attention_experts` absent or 0).
fn attention_experts(config: &HfConfig) -> Result<Option<AttentionMix>, String> {
    let experts = config.attention_experts.unwrap_or(0);
    if experts == 0 {
        return Ok(None);
    }
    let top_k = config
        .attention_top_k
        .ok_or("missing field `attention_top_k`")?;
    if top_k == 0 || top_k > experts {
        return Err(format!(
            "`attention_top_k` {top_k} must be between 1 and `attention_experts` ({experts})"
        ));
    }
    Ok(Some(AttentionMix {
        experts,
        routing: Routing {
            top_k,
            normalize: config.attention_normalize.unwrap_or(false),
        },
        shared_kv: config.shared_kv.unwrap_or(false),
    }))
}

/// Opens `model.safetensors`, or every shard named in `model.safetensors.index.json`.
fn open_shards(dir: &Path) -> Result<HashMap<String, Tensor>, FrontendError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| FrontendError::Config {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| FrontendError::Config {
                path: index.clone(),
                message: "missing object field `weight_map`".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        files.iter().map(|f| dir.join(f)).collect()
    } else {
        let single = dir.join("model.safetensors");
        if !single.is_file() {
            return Err(FrontendError::NotACheckpoint {
                path: dir.to_path_buf(),
            });
        }
        vec![single]
    };
    let mut out = HashMap::new();
    for path in &files {
        let st = SafetensorsFile::open(path)?;
        for (name, info) in st.tensors {
            out.insert(
                name,
                Tensor {
                    file: st.file.clone(),
                    info,
                },
            );
        }
    }
    Ok(out)
}

/// A tensor of some shard.
#[derive(Clone)]
struct Tensor {
    file: Arc<MappedFile>,
    info: TensorInfo,
}

struct Loader<'a> {
    family: Family,
    dir: PathBuf,
    shards: HashMap<String, Tensor>,
    module: &'a mut Module,
    /// The MoE settings of Mixtral and Qwen2-MoE checkpoints.
    moe: Option<MoeSpec>,
}

/// How a checkpoint's sparse layers are shaped.
struct MoeSpec {
    experts: usize,
    top_k: usize,
    /// FFN size of each routed expert.
    ffn: usize,
    normalize_top_k: bool,
    /// FFN size of the gated shared expert (Qwen2-MoE).
    shared_ffn: Option<usize>,
    /// Every `sparse_step`-th layer is sparse (MoE), except `dense_layers`.
    sparse_step: usize,
    dense_layers: Vec<usize>,
    /// A Nexus router's domain embedding width and projection width (upmix's layout).
    nexus: Option<(usize, usize)>,
}

impl MoeSpec {
    /// Rejects expert settings no model can have, before any shape is computed from them.
    fn check(&self) -> Result<(), String> {
        if self.experts == 0 || self.top_k == 0 || self.top_k > self.experts {
            return Err(format!(
                "{} experts with {} per token: both must be positive, and top-k at most the experts",
                self.experts, self.top_k
            ));
        }
        if self.ffn == 0 || self.ffn.checked_mul(2).is_none() || self.shared_ffn == Some(0) {
            return Err(format!(
                "expert FFN size {} (shared: {:?}) must be positive and not overflow",
                self.ffn, self.shared_ffn
            ));
        }
        Ok(())
    }

    /// Whether `layer` has a mixture of experts.
    fn is_sparse(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer) && (layer + 1).is_multiple_of(self.sparse_step)
    }
}

impl TensorSource for Loader<'_> {
    fn tensor(
        &mut self,
        role: Role,
        layer: usize,
        shape: &[usize],
    ) -> Result<WeightId, FrontendError> {
        self.expert_tensor(role, (layer, 0), shape)
    }

    fn expert_tensor(
        &mut self,
        role: Role,
        (layer, expert): (usize, usize),
        shape: &[usize],
    ) -> Result<WeightId, FrontendError> {
        let name = hf::name(self.family, role, layer, expert)
            .expect("the decoder asks only for its family's roles");
        self.weight(role, (layer, expert), &name, shape)
    }

    fn has_lm_head(&self) -> bool {
        self.has(&hf::name(self.family, Role::LmHead, 0, 0).expect("every family"))
    }

    fn mlp(&mut self, layer: usize, h: &Hyper) -> Result<Op, FrontendError> {
        match self.moe.take() {
            Some(spec) if spec.is_sparse(layer) => {
                let op = self.sparse_moe(layer, &spec, h.hidden);
                self.moe = Some(spec);
                op
            }
            spec => {
                self.moe = spec;
                dense_mlp(self, layer, h)
            }
        }
    }
}

impl Loader<'_> {
    fn has(&self, hf_name: &str) -> bool {
        self.shards.contains_key(hf_name)
    }

    /// The tensor `hf_name`, checked against `shape`.
    fn info(&self, hf_name: &str, shape: &[usize]) -> Result<Tensor, FrontendError> {
        let t = self
            .shards
            .get(hf_name)
            .cloned()
            .ok_or_else(|| FrontendError::MissingTensor {
                path: self.dir.clone(),
                tensor: hf_name.to_string(),
            })?;
        if t.info.shape != shape {
            return Err(FrontendError::TensorShape {
                path: t.file.path().to_path_buf(),
                tensor: hf_name.to_string(),
                expected: shape.to_vec(),
                found: t.info.shape,
            });
        }
        Ok(t)
    }

    /// A weight reading `shape` from `t`'s file at byte `offset`.
    fn source(
        &mut self,
        canonical: String,
        t: &Tensor,
        offset: usize,
        shape: Vec<usize>,
    ) -> Result<WeightId, FrontendError> {
        Ok(self.module.weights.add(Weight {
            name: canonical,
            shape,
            dtype: t.info.dtype,
            expr: WeightExpr::Source {
                file: t.file.clone(),
                offset,
                dtype: t.info.dtype,
            },
        })?)
    }

    /// Adds the tensor `hf_name` as the source weight of `role` in `(layer, expert)`.
    fn weight(
        &mut self,
        role: Role,
        (layer, expert): (usize, usize),
        hf_name: &str,
        shape: &[usize],
    ) -> Result<WeightId, FrontendError> {
        let t = self.info(hf_name, shape)?;
        let name = canonical(role, layer, expert);
        self.source(name, &t, t.info.offset, shape.to_vec())
    }

    /// The MoE of `layer`, from whichever layout the checkpoint uses: Mixtral's classic
    /// per-expert tensors, per-expert tensors in Qwen2-MoE's naming, or the fused stacks.
    fn sparse_moe(&mut self, layer: usize, spec: &MoeSpec, d: usize) -> Result<Op, FrontendError> {
        let (n, f) = (spec.experts, spec.ffn);
        let name = |family, role, e| hf::name(family, role, layer, e).expect("an MoE family");
        let naming = match self.has(&name(Family::Mixtral, Role::Router, 0)) {
            true => Family::Mixtral,
            false => Family::Qwen2Moe,
        };
        let router = match spec.nexus {
            Some((embed, width)) => {
                let role = Role::RouterDomains;
                let domains =
                    self.weight(role, (layer, 0), &name(self.family, role, 0), &[n, embed])?;
                let projection = self.swiglu(
                    self.family,
                    Role::RouterProjection,
                    (layer, 0),
                    width,
                    (embed, d),
                )?;
                Router::Projected(ProjectedRouter {
                    domains,
                    projection,
                })
            }
            None => {
                let router_name = name(naming, Role::Router, 0);
                Router::Rows(self.weight(Role::Router, (layer, 0), &router_name, &[n, d])?)
            }
        };
        // The router's shape matched the file's, so `n` is as large as the file allows.
        let mut experts = Vec::with_capacity(n);
        let gate_up = upmix_formats::fill(hf::MIXTRAL_FUSED_GATE_UP, layer, 0);
        if self.has(&gate_up) {
            let down = upmix_formats::fill(hf::MIXTRAL_FUSED_DOWN, layer, 0);
            // `2 * f` cannot overflow: checked by `MoeSpec::check`.
            let gu = self.info(&gate_up, &[n, 2 * f, d])?;
            let dn = self.info(&down, &[n, d, f])?;
            // Each expert's slices are contiguous runs of the fused tensors.
            let (gs, ds) = (gu.info.dtype.size(), dn.info.dtype.size());
            for e in 0..n {
                let name = |i| canonical(Role::Expert(i), layer, e);
                let base = gu.info.offset + e * 2 * f * d * gs;
                let down_at = dn.info.offset + e * d * f * ds;
                experts.push(FeedForward {
                    gate: self.source(name(0), &gu, base, vec![f, d])?,
                    up: self.source(name(1), &gu, base + f * d * gs, vec![f, d])?,
                    down: self.source(name(2), &dn, down_at, vec![d, f])?,
                });
            }
        } else {
            for e in 0..n {
                experts.push(self.ffn(naming, Role::Expert, (layer, e), f, d)?);
            }
        }
        let shared_expert = match spec.shared_ffn {
            None => None,
            Some(fs) => {
                let gate = name(Family::Qwen2Moe, Role::SharedGate, 0);
                Some(SharedExpert {
                    ffn: self.ffn(Family::Qwen2Moe, Role::Shared, (layer, 0), fs, d)?,
                    gate: Some(self.weight(Role::SharedGate, (layer, 0), &gate, &[1, d])?),
                })
            }
        };
        Ok(Op::MixtureOfExperts(MixtureOfExperts {
            router,
            experts,
            routing: Routing {
                top_k: spec.top_k,
                normalize: spec.normalize_top_k,
            },
            shared_expert,
        }))
    }

    /// A SwiGLU FFN of size `f` whose gate, up and down have roles `role(0..3)` in
    /// `family`'s naming, for `(layer, expert)`.
    fn ffn(
        &mut self,
        family: Family,
        role: fn(usize) -> Role,
        (layer, e): (usize, usize),
        f: usize,
        d: usize,
    ) -> Result<FeedForward, FrontendError> {
        self.swiglu(family, role, (layer, e), f, (d, d))
    }

    /// A SwiGLU block of inner size `f` from width `input` to width `output`, its gate,
    /// up and down with roles `role(0..3)` in `family`'s naming.
    fn swiglu(
        &mut self,
        family: Family,
        role: fn(usize) -> Role,
        (layer, e): (usize, usize),
        f: usize,
        (input, output): (usize, usize),
    ) -> Result<FeedForward, FrontendError> {
        let mut one = |i: usize, shape: &[usize]| {
            let name = hf::name(family, role(i), layer, e).expect("an MoE family");
            self.weight(role(i), (layer, e), &name, shape)
        };
        Ok(FeedForward {
            gate: one(0, &[f, input])?,
            up: one(1, &[f, input])?,
            down: one(2, &[output, f])?,
        })
    }
}
