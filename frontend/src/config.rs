//! `config.json` of a Hugging Face checkpoint: the fields upmix reads, and their meaning
//! as IR settings.

use std::path::Path;

use serde::Deserialize;
use upmix_ir::{Rope, RopeScaling};

use crate::error::{io, FrontendError};

/// The subset of a transformers config that describes a Llama-family decoder.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers < 5 spelling of the RoPE settings.
    #[serde(default)]
    pub rope_scaling: Option<RopeParams>,
    /// transformers >= 5 spelling: theta and scaling in one object.
    #[serde(default)]
    pub rope_parameters: Option<RopeParams>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    /// Qwen2-MoE: routed experts, their FFN size, the shared expert's FFN size.
    #[serde(default)]
    pub num_experts: Option<usize>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    /// Qwen2-MoE: every `decoder_sparse_step`-th layer is sparse, except `mlp_only_layers`.
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Sliding-window attention span. `Some(None)`: written as `null`; `None`: absent
    /// (then Mistral's default, 4096, applies to Mistral checkpoints).
    #[serde(default, deserialize_with = "present")]
    pub sliding_window: Option<Option<usize>>,
    /// Qwen2 / Qwen2-MoE: the window applies only when this is set, to the layers
    /// `max_window_layers` and `layer_types` say.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `sliding_attention` or `full_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

/// Deserialises a field that may be present as `null`: `Some(None)`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// RoPE settings as transformers writes them (`rope_scaling` or `rope_parameters`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RopeParams {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

impl HfConfig {
    /// Reads and parses `path`; a missing field or a syntax error names the file.
    pub fn read(path: &Path) -> Result<HfConfig, FrontendError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        serde_json::from_str(&text).map_err(|e| FrontendError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The first token id of a `bos_token_id` / `eos_token_id` field (int or list).
    pub fn token_id(value: &Option<serde_json::Value>) -> Option<u32> {
        match value {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|v| v.as_u64()).map(|v| v as u32)
            }
            _ => None,
        }
    }

    /// The sliding window of each layer, as transformers applies it for architecture
    /// `arch`: Mistral and Mixtral window every layer (Mistral's default is 4096 when the
    /// field is absent); Qwen2 and Qwen2-MoE only with `use_sliding_window`, on the layers
    /// `layer_types` names, else those `max_window_layers` selects; Llama never.
    pub fn windows(&self, arch: &str) -> Vec<Option<usize>> {
        let layers = self.num_hidden_layers;
        let window = self.sliding_window.flatten();
        let from_types = |w: Option<usize>| -> Option<Vec<Option<usize>>> {
            let types = self.layer_types.as_ref()?;
            Some(
                (0..layers)
                    .map(|i| w.filter(|_| types.get(i).is_some_and(|t| t == "sliding_attention")))
                    .collect(),
            )
        };
        match arch {
            "MistralForCausalLM" => {
                let w = self.sliding_window.unwrap_or(Some(4096));
                vec![w; layers]
            }
            "MixtralForCausalLM" => vec![window; layers],
            "Qwen2ForCausalLM" | "Qwen2MoeForCausalLM" => {
                let w = window.filter(|_| self.use_sliding_window == Some(true));
                if let Some(windows) = from_types(w) {
                    return windows;
                }
                let max = self.max_window_layers.unwrap_or(28);
                (0..layers)
                    .map(|i| {
                        let sliding = if arch == "Qwen2ForCausalLM" {
                            i >= max
                        } else {
                            i % 2 == 0 && i < max
                        };
                        w.filter(|_| sliding)
                    })
                    .collect()
            }
            _ => vec![None; layers],
        }
    }

    /// The RoPE settings, from whichever spelling the file uses.
    pub fn rope(&self, path: &Path) -> Result<Rope, FrontendError> {
        let params = self
            .rope_parameters
            .clone()
            .or(self.rope_scaling.clone())
            .unwrap_or_default();
        let theta = params.rope_theta.or(self.rope_theta).unwrap_or(10_000.0) as f32;
        let need = |v: Option<f64>, field: &str| {
            v.map(|v| v as f32).ok_or_else(|| FrontendError::Config {
                path: path.to_path_buf(),
                message: format!("rope scaling is missing `{field}`"),
            })
        };
        let scaling = match params.rope_type.as_deref() {
            None | Some("default") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: need(params.factor, "factor")?,
            },
            Some("llama3") => RopeScaling::Llama3 {
                factor: need(params.factor, "factor")?,
                low_freq_factor: need(params.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(params.high_freq_factor, "high_freq_factor")?,
                original_max_position: params.original_max_position_embeddings.ok_or_else(
                    || FrontendError::Config {
                        path: path.to_path_buf(),
                        message: "rope scaling is missing `original_max_position_embeddings`"
                            .into(),
                    },
                )?,
            },
            Some(other) => {
                return Err(FrontendError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "rope type `{other}` is not supported (supported: default, linear, llama3)"
                    ),
                })
            }
        };
        Ok(Rope { theta, scaling })
    }
}
