//! `config.json` of a Hugging Face checkpoint: the fields upmix reads, and their meaning
//! as IR settings.

use std::path::Path;

use serde::Deserialize;
use upmix_formats::Family;
use upmix_ir::{Rope, RopePairs, RopeScaling};

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
    /// Llama-style families' norm epsilon (required for them).
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// Cohere's LayerNorm epsilon (required for it).
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
    /// Cohere: the logits are the lm head's output times this (required for it).
    #[serde(default)]
    pub logit_scale: Option<f64>,
    /// Cohere: per-head LayerNorms of queries and keys.
    #[serde(default)]
    pub use_qk_norm: Option<bool>,
    /// upmix's BAM layout (`UpmixBamForCausalLM`): parallel blocks, and attention experts
    /// (`attention_experts`, 0 for none) routed to `attention_top_k`, renormalised when
    /// `attention_normalize`, sharing K/V when `shared_kv`.
    #[serde(default)]
    pub parallel_blocks: Option<bool>,
    #[serde(default)]
    pub attention_experts: Option<usize>,
    #[serde(default)]
    pub attention_top_k: Option<usize>,
    #[serde(default)]
    pub attention_normalize: Option<bool>,
    #[serde(default)]
    pub shared_kv: Option<bool>,
    /// Cohere2 before `layer_types`: layer `i` is global when `(i + 1) % pattern == 0`.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
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
    /// upmix's BAM layout: a Nexus router's domain embedding width and projection width
    /// (absent or 0: a router matrix).
    #[serde(default)]
    pub router_embed_size: Option<usize>,
    #[serde(default)]
    pub router_projection_size: Option<usize>,
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

/// Which layers of a decoder attend through a sliding window, and its span.
#[derive(Clone, Debug, PartialEq)]
pub enum Windows {
    None,
    /// Every layer.
    Every(usize),
    /// Layers `i >= max` (Qwen2's `max_window_layers`).
    From(usize, usize),
    /// Even layers below `max` (Qwen2-MoE).
    EvenBelow(usize, usize),
    /// The layers marked `true` (transformers 5's `layer_types`).
    Layers(Vec<bool>, usize),
}

impl Windows {
    /// The window of layer `layer`, if it has one.
    pub fn of(&self, layer: usize) -> Option<usize> {
        match *self {
            Windows::None => None,
            Windows::Every(w) => Some(w),
            Windows::From(max, w) => (layer >= max).then_some(w),
            Windows::EvenBelow(max, w) => (layer.is_multiple_of(2) && layer < max).then_some(w),
            Windows::Layers(ref sliding, w) => sliding.get(layer).copied()?.then_some(w),
        }
    }

    /// The span, `None` if no layer has a window.
    pub fn span(&self) -> Option<usize> {
        match *self {
            Windows::None => None,
            Windows::Every(w) | Windows::From(_, w) | Windows::EvenBelow(_, w) => Some(w),
            Windows::Layers(_, w) => Some(w),
        }
    }
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

    /// `layer_types` as one flag per layer (`true`: sliding), checked: one entry per
    /// layer, each `sliding_attention` or `full_attention`.
    pub fn sliding_layers(&self) -> Result<Option<Vec<bool>>, String> {
        let Some(types) = &self.layer_types else {
            return Ok(None);
        };
        if types.len() != self.num_hidden_layers {
            return Err(format!(
                "`layer_types` has {} entries for {} layers (num_hidden_layers)",
                types.len(),
                self.num_hidden_layers
            ));
        }
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(format!(
                    "`layer_types[{i}]` is `{other}`; expected `sliding_attention` or `full_attention`"
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The sliding windows, as transformers applies them for `family`: Mistral
    /// and Mixtral window every layer (Mistral's default is 4096 when the field is
    /// absent); Qwen2 and Qwen2-MoE only with `use_sliding_window`, on the layers
    /// `layer_types` names, else those `max_window_layers` selects; Cohere2 on the layers
    /// `layer_types` names, else three of every `sliding_window_pattern` (default 4); Llama
    /// and Cohere never. A malformed `layer_types` or a Cohere2 config without a window is
    /// an error naming the field.
    pub fn windows(&self, family: Family) -> Result<Windows, String> {
        let window = self.sliding_window.flatten();
        let sliding = self.sliding_layers()?;
        if family == Family::Cohere2 {
            let w = window.ok_or("missing field `sliding_window` (Cohere2 requires it)")?;
            let pattern = self.sliding_window_pattern.unwrap_or(4);
            if pattern == 0 {
                return Err("`sliding_window_pattern` is 0; it must be positive".into());
            }
            let sliding = sliding.unwrap_or_else(|| {
                (0..self.num_hidden_layers)
                    .map(|i| !(i + 1).is_multiple_of(pattern))
                    .collect()
            });
            return Ok(Windows::Layers(sliding, w));
        }
        Ok(match family {
            Family::Mistral => match self.sliding_window.unwrap_or(Some(4096)) {
                Some(w) => Windows::Every(w),
                None => Windows::None,
            },
            Family::Mixtral => window.map_or(Windows::None, Windows::Every),
            Family::Qwen2 | Family::Qwen2Moe => {
                let Some(w) = window.filter(|_| self.use_sliding_window == Some(true)) else {
                    return Ok(Windows::None);
                };
                if let Some(sliding) = sliding {
                    return Ok(Windows::Layers(sliding, w));
                }
                let max = self.max_window_layers.unwrap_or(28);
                if family == Family::Qwen2 {
                    Windows::From(max, w)
                } else {
                    Windows::EvenBelow(max, w)
                }
            }
            _ => Windows::None,
        })
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
        Ok(Rope {
            theta,
            scaling,
            pairs: RopePairs::Halves,
        })
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    fn config(extra: &str) -> HfConfig {
        let text = format!(
            r#"{{"architectures": ["X"], "hidden_size": 8, "intermediate_size": 8,
                "num_hidden_layers": 4, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
                "vocab_size": 8 {extra}}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    fn per_layer(c: &HfConfig, family: Family) -> Vec<Option<usize>> {
        let w = c.windows(family).unwrap();
        (0..4).map(|i| w.of(i)).collect()
    }

    #[test]
    fn sliding_windows_follow_transformers_defaults() {
        // Mistral: absent means transformers' default 4096, null means none.
        assert_eq!(per_layer(&config(""), Family::Mistral), vec![Some(4096); 4]);
        let null = config(r#", "sliding_window": null"#);
        assert_eq!(per_layer(&null, Family::Mistral), vec![None; 4]);
        let set = config(r#", "sliding_window": 16"#);
        assert_eq!(per_layer(&set, Family::Mixtral), vec![Some(16); 4]);
        assert_eq!(per_layer(&set, Family::Llama), vec![None; 4]);
        // Qwen2: only with use_sliding_window, from max_window_layers on.
        assert_eq!(per_layer(&set, Family::Qwen2), vec![None; 4]);
        let qwen =
            config(r#", "sliding_window": 16, "use_sliding_window": true, "max_window_layers": 2"#);
        assert_eq!(
            per_layer(&qwen, Family::Qwen2),
            vec![None, None, Some(16), Some(16)]
        );
        assert_eq!(
            per_layer(&qwen, Family::Qwen2Moe),
            vec![Some(16), None, None, None]
        );
        let typed = config(
            r#", "sliding_window": 16, "use_sliding_window": true,
               "layer_types": ["full_attention", "sliding_attention", "full_attention",
                               "full_attention"]"#,
        );
        assert_eq!(
            per_layer(&typed, Family::Qwen2),
            vec![None, Some(16), None, None]
        );
    }

    #[test]
    fn cohere2_windows_three_sliding_to_one_global() {
        let c = config(r#", "sliding_window": 16"#);
        assert_eq!(
            per_layer(&c, Family::Cohere2),
            vec![Some(16), Some(16), Some(16), None]
        );
        let c = config(r#", "sliding_window": 16, "sliding_window_pattern": 2"#);
        assert_eq!(
            per_layer(&c, Family::Cohere2),
            vec![Some(16), None, Some(16), None]
        );
        let err = config("").windows(Family::Cohere2).unwrap_err();
        assert!(err.contains("sliding_window"), "{err}");
    }

    #[test]
    fn malformed_layer_types_name_the_field() {
        let short = config(r#", "sliding_window": 16, "layer_types": ["full_attention"]"#);
        let err = short.windows(Family::Cohere2).unwrap_err();
        assert!(
            err.contains("`layer_types` has 1 entries for 4 layers"),
            "{err}"
        );
        let odd = config(
            r#", "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention",
                "chunked_attention", "full_attention"]"#,
        );
        let err = odd.windows(Family::Cohere2).unwrap_err();
        assert!(
            err.contains("`layer_types[2]` is `chunked_attention`"),
            "{err}"
        );
    }
}
