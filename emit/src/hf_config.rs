//! `config.json` of an emitted Hugging Face checkpoint.
//!
//! The fields upmix models (architecture, sizes, attention, RoPE, experts, dtype, tied
//! embeddings) are computed from the graph. Every other field of the model's own
//! `config.json` (the base model's, for a merge or an upcycle) is kept: pad and unk
//! token ids, `max_position_embeddings`, initialiser settings, model-specific extras. Kept
//! fields are dropped only where the output contradicts them: the expert settings of
//! another architecture family, remote-code hooks, a quantisation the output no longer
//! has.

use std::path::Path;

use serde_json::{json, Map, Value};
use upmix_formats::{hf, Family};
use upmix_ir::{DType, Graph, Module, Op, RopeScaling, Router, WeightTable};

use super::stack::Stack;
use super::{io, EmitError};

/// Fields that belong to one architecture family (by `model_type`): dropped from a kept
/// config when the output is of another family.
const FAMILY_FIELDS: &[(&str, &[&str])] = &[
    (
        "mixtral",
        &[
            "num_local_experts",
            "num_experts_per_tok",
            "router_aux_loss_coef",
            "output_router_logits",
            "router_jitter_noise",
        ],
    ),
    (
        "qwen2_moe",
        &[
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
            "router_aux_loss_coef",
            "output_router_logits",
            "qkv_bias",
        ],
    ),
    ("llama", &["pretraining_tp"]),
    ("mistral", &["sliding_window"]),
];

/// Fields the computed config of one family replaces wholesale, dropped from the kept base
/// config first: Cohere2's `sliding_window_pattern` would otherwise contradict the written
/// `layer_types`, and JetMoE derives its head count and names its activation otherwise.
const REPLACED_FIELDS: &[(&str, &[&str])] = &[
    ("cohere2", &["sliding_window_pattern"]),
    (
        "jetmoe",
        &[
            "num_attention_heads",
            "head_dim",
            "hidden_act",
            "mlp_bias",
            "attention_bias",
        ],
    ),
];

/// Fields never kept: remote-code hooks and names that point at the base model, a
/// quantisation the emitted (plain float) weights do not have, and the transformers 4
/// spelling of RoPE settings (rewritten from the graph).
const DROPPED_FIELDS: &[&str] = &[
    "auto_map",
    "_name_or_path",
    "_model_name_or_path",
    "quantization_config",
    "rope_scaling",
];

/// Computed fields for which the base config's value wins when it has one (it may hold
/// more than the graph does, e.g. a list of end-of-sequence ids).
const BASE_WINS: &[&str] = &["bos_token_id", "eos_token_id", "use_cache"];

/// The config of the graph's emitted checkpoint: the base config with the computed
/// fields laid over it.
pub(super) fn config_json(
    m: &Module,
    g: &Graph,
    s: &Stack,
    family: Family,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Value, EmitError> {
    let computed = computed_fields(m, g, s, family, unsupported)?;
    let base = match &g.meta.config_file {
        Some(path) => read_base(path)?,
        None => Map::new(),
    };
    Ok(Value::Object(lay_over(base, computed)))
}

/// The base model's config.json as an object.
fn read_base(path: &Path) -> Result<Map<String, Value>, EmitError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(EmitError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the model's config.json is no longer a JSON object",
            ),
        }),
    }
}

/// `computed` over `base`, minus the base fields the output contradicts.
fn lay_over(mut base: Map<String, Value>, computed: Value) -> Map<String, Value> {
    let Value::Object(computed) = computed else {
        unreachable!("computed_fields builds an object")
    };
    let family = |c: &Map<String, Value>| {
        c.get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if family(&base) != family(&computed) {
        if let Some((_, fields)) = FAMILY_FIELDS
            .iter()
            .find(|(f, _)| Some(*f) == family(&base).as_deref())
        {
            fields.iter().for_each(|f| drop(base.remove(*f)));
        }
    }
    DROPPED_FIELDS.iter().for_each(|f| drop(base.remove(*f)));
    if let Some((_, fields)) = REPLACED_FIELDS
        .iter()
        .find(|(f, _)| Some(*f) == family(&computed).as_deref())
    {
        fields.iter().for_each(|f| drop(base.remove(*f)));
    }
    if base.contains_key("torch_dtype") {
        base.insert("torch_dtype".into(), computed["dtype"].clone());
    }
    for (key, value) in computed {
        if !(BASE_WINS.contains(&key.as_str()) && base.contains_key(&key)) {
            base.insert(key, value);
        }
    }
    base
}

/// The fields upmix models, from the graph.
fn computed_fields(
    m: &Module,
    g: &Graph,
    s: &Stack,
    family: Family,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<Value, EmitError> {
    let w = &m.weights;
    let first = s
        .layers
        .first()
        .ok_or_else(|| unsupported("no layers".into()))?;
    let a = first.attn;
    // Cohere2's global layers have no RoPE: the settings of the first rotating layer.
    let rotary = s.layers.iter().find_map(|l| l.attn.rope.as_ref());
    let window = s.layers.iter().find_map(|l| l.attn.window);
    if s.layers.iter().any(|l| {
        l.attn.n_heads != a.n_heads
            || l.attn.n_kv_heads != a.n_kv_heads
            || l.attn.head_dim != a.head_dim
            || l.attn.rope.as_ref().is_some_and(|r| Some(r) != rotary)
            || l.attn.window.is_some_and(|w| Some(w) != window)
            || l.attn.qk_norm.is_some() != a.qk_norm.is_some()
            || l.attn
                .qk_norm
                .as_ref()
                .is_some_and(|n| n.eps != s.final_norm.eps)
    }) {
        return Err(unsupported("layers differ in attention settings".into()));
    }
    let norms = s
        .layers
        .iter()
        .flat_map(|l| [Some(l.attn_norm), l.ffn_norm]);
    if norms.flatten().any(|n| n.eps != s.final_norm.eps) {
        return Err(unsupported("norms differ in epsilon".into()));
    }
    let hidden = w.get(s.embed)?.shape[1];
    let vocab = w.get(s.embed)?.shape[0];
    if family == Family::Cohere && a.n_heads * a.head_dim != hidden {
        return Err(unsupported(format!(
            "Cohere derives the head dimension from the hidden size; {} heads of {} are not {hidden}",
            a.n_heads, a.head_dim
        )));
    }
    let (ffn, experts) = match first.mlp {
        Op::FeedForward(f) => (w.get(f.gate)?.shape[0], None),
        Op::MixtureOfExperts(moe) => (w.get(moe.experts[0].gate)?.shape[0], Some(moe)),
        _ => unreachable!("read_stack admits only FFN and MoE"),
    };
    let default_rope = upmix_ir::Rope {
        theta: 10_000.0,
        scaling: RopeScaling::None,
        pairs: Default::default(),
    };
    let rotary = rotary.unwrap_or(&default_rope);
    let theta = rotary.theta;
    let mut rope = json!({ "rope_type": "default", "rope_theta": theta });
    match &rotary.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            rope = json!({ "rope_type": "linear", "rope_theta": theta, "factor": factor });
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            rope = json!({
                "rope_type": "llama3", "rope_theta": theta, "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position,
            });
        }
    }
    let (arch, model_type) = hf::architecture(family);
    let mut c = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": s.layers.len(),
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": s.final_norm.eps,
        "vocab_size": vocab,
        "max_position_embeddings": g.meta.max_position_embeddings,
        "rope_theta": theta,
        "rope_parameters": rope.clone(),
        "tie_word_embeddings": s.lm_head == s.embed,
        "bos_token_id": g.meta.bos_token_id,
        "eos_token_id": g.meta.eos_token_id,
        "dtype": torch_dtype(dominant_dtype(w, g)),
        "attention_bias": false,
        "mlp_bias": false,
        "use_cache": true,
    });
    if rotary.scaling != RopeScaling::None {
        c["rope_scaling"] = rope; // transformers 4 reads this spelling
    }
    if let Some(scale) = s.logit_scale {
        let c = c.as_object_mut().expect("an object");
        c.remove("rms_norm_eps");
        c.remove("mlp_bias");
        c.insert("layer_norm_eps".into(), json!(s.final_norm.eps));
        c.insert("logit_scale".into(), json!(scale));
    }
    match (family, experts) {
        (Family::JetMoe, Some(moe)) => {
            let c = c.as_object_mut().expect("an object");
            for field in [
                "num_attention_heads",
                "head_dim",
                "hidden_act",
                "mlp_bias",
                "attention_bias",
            ] {
                c.remove(field);
            }
            // JetMoE: as many KV heads as query heads per expert (`kv_channels` each).
            c.insert("num_key_value_heads".into(), json!(a.n_heads));
            c.insert("kv_channels".into(), json!(a.head_dim));
            c.insert("num_local_experts".into(), json!(moe.experts.len()));
            c.insert("num_experts_per_tok".into(), json!(moe.routing.top_k));
            c.insert("activation_function".into(), json!("silu"));
            c.insert("rms_norm_eps".into(), json!(super::jetmoe::NORM_EPS));
        }
        (Family::UpmixBam, moe) => {
            let mixture = first.mixture;
            let routing = mixture.map(|m| m.routing);
            c["parallel_blocks"] = json!(s.parallel() == Some(true));
            c["attention_experts"] = json!(mixture.map_or(0, |m| m.experts.len()));
            c["attention_top_k"] = json!(routing.map_or(0, |r| r.top_k));
            c["attention_normalize"] = json!(routing.is_some_and(|r| r.normalize));
            c["shared_kv"] = json!(mixture.is_some_and(|m| m.shared_kv()));
            c["num_experts"] = json!(moe.map_or(0, |m| m.experts.len()));
            c["num_experts_per_tok"] = json!(moe.map_or(0, |m| m.routing.top_k));
            c["norm_topk_prob"] = json!(moe.is_some_and(|m| m.routing.normalize));
            let shared = moe.and_then(|m| m.shared_expert.as_ref());
            let shared = shared.map(|s| w.get(s.ffn.gate)).transpose()?;
            c["shared_expert_intermediate_size"] = json!(shared.map_or(0, |s| s.shape[0]));
            // A Nexus router: domain embeddings of this width, projected through a SwiGLU
            // of this width (0 and 0: a plain router matrix).
            let (embed, width) = match moe.map(|m| &m.router) {
                Some(Router::Projected(p)) => (
                    w.get(p.domains)?.shape[1],
                    w.get(p.projection.gate)?.shape[0],
                ),
                _ => (0, 0),
            };
            c["router_embed_size"] = json!(embed);
            c["router_projection_size"] = json!(width);
            let auto_map: Map<String, Value> = hf::UPMIX_BAM_AUTO_MAP
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            c["auto_map"] = Value::Object(auto_map);
        }
        (Family::Qwen2Moe, Some(moe)) => {
            let shared = match &moe.shared_expert {
                Some(s) => w.get(s.ffn.gate)?.shape[0],
                None => unreachable!("architecture() requires shared experts"),
            };
            c["num_experts"] = json!(moe.experts.len());
            c["num_experts_per_tok"] = json!(moe.routing.top_k);
            c["moe_intermediate_size"] = json!(ffn);
            c["shared_expert_intermediate_size"] = json!(shared);
            c["intermediate_size"] = json!(shared);
            c["norm_topk_prob"] = json!(moe.routing.normalize);
            c["decoder_sparse_step"] = json!(1);
            c["mlp_only_layers"] = json!([]);
            c["qkv_bias"] = json!(a.q_bias.is_some());
            c["use_sliding_window"] = json!(false);
        }
        (_, Some(moe)) => {
            c["num_local_experts"] = json!(moe.experts.len());
            c["num_experts_per_tok"] = json!(moe.routing.top_k);
            c["sliding_window"] = json!(window);
        }
        (Family::Mistral, None) => c["sliding_window"] = json!(window),
        (Family::Cohere, None) => c["use_qk_norm"] = json!(a.qk_norm.is_some()),
        (Family::Cohere2, None) => {
            c["sliding_window"] = json!(window);
            let types: Vec<_> = s
                .layers
                .iter()
                .map(|l| match l.attn.window {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect();
            c["layer_types"] = json!(types);
        }
        (Family::Qwen2, None) => c["use_sliding_window"] = json!(false),
        _ => {}
    }
    Ok(c)
}

/// The dtype holding the most bytes.
fn dominant_dtype(w: &WeightTable, g: &Graph) -> DType {
    let mut bytes = std::collections::BTreeMap::new();
    for id in g.weight_ids() {
        if let Ok(t) = w.get(id) {
            *bytes.entry(t.dtype.plain()).or_insert(0usize) += t.numel() * t.dtype.plain().size();
        }
    }
    bytes
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map_or(DType::F32, |(d, _)| d)
}

fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}
