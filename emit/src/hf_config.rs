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
use upmix_ir::{DType, Graph, Module, Op, Rope, RopeScaling, WeightTable};

use super::hf_config_family::{family_fields, Layout};
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

/// The fields upmix models, from the graph: those every family writes, then the
/// family's own (module `hf_config_family`).
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
    let (rotary, window) = uniform_attention(s, unsupported)?;
    let hidden = w.get(s.embed)?.shape[1];
    let vocab = w.get(s.embed)?.shape[0];
    if family == Family::Cohere && a.n_heads * a.head_dim != hidden {
        return Err(unsupported(format!(
            "Cohere derives the head dimension from the hidden size; {} heads of {} are not {hidden}",
            a.n_heads, a.head_dim
        )));
    }
    let (ffn, moe) = match first.mlp {
        Op::FeedForward(f) => (w.get(f.gate)?.shape[0], None),
        Op::MixtureOfExperts(moe) => (w.get(moe.experts[0].gate)?.shape[0], Some(moe)),
        _ => unreachable!("read_stack admits only FFN and MoE"),
    };
    let (theta, rope) = rope_parameters(rotary);
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
    if rotary.is_some_and(|r| r.scaling != RopeScaling::None) {
        c["rope_scaling"] = rope; // transformers 4 reads this spelling
    }
    if let Some(scale) = s.logit_scale {
        let c = c.as_object_mut().expect("an object");
        c.remove("rms_norm_eps");
        c.remove("mlp_bias");
        c.insert("layer_norm_eps".into(), json!(s.final_norm.eps));
        c.insert("logit_scale".into(), json!(scale));
    }
    let layout = Layout {
        attn: a,
        window,
        ffn,
        moe,
        mixture: first.mixture,
    };
    family_fields(family, &mut c, s, w, &layout)?;
    Ok(c)
}

/// The RoPE settings every layer shares (Cohere2's global layers have none: those of
/// the first rotating layer) and the sliding window; an error when layers differ in
/// attention settings or norms in epsilon.
fn uniform_attention<'s>(
    s: &Stack<'s>,
    unsupported: &dyn Fn(String) -> EmitError,
) -> Result<(Option<&'s Rope>, Option<usize>), EmitError> {
    let a = s.layers[0].attn;
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
    Ok((rotary, window))
}

/// `rope_theta` and `rope_parameters` (theta 10000 without RoPE).
fn rope_parameters(rotary: Option<&Rope>) -> (f32, Value) {
    let Some(rotary) = rotary else {
        return (
            10_000.0,
            json!({ "rope_type": "default", "rope_theta": 10_000.0 }),
        );
    };
    let theta = rotary.theta;
    let rope = match &rotary.scaling {
        RopeScaling::None => json!({ "rope_type": "default", "rope_theta": theta }),
        RopeScaling::Linear { factor } => {
            json!({ "rope_type": "linear", "rope_theta": theta, "factor": factor })
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => json!({
            "rope_type": "llama3", "rope_theta": theta, "factor": factor,
            "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position,
        }),
    };
    (theta, rope)
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
