//! One model configuration for every family, read from an HF `config.json`
//! (both the transformers 4.x and 5.x spellings) or from GGUF metadata.

use serde_json::Value;

use super::ModelError;

/// The model families kairos implements. Each has exactly one definition in
/// `model::family`; DeepSeek-V3 (MLA) and MiMo-V2 (hybrid sliding window) slot in here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Mixtral,
    GptOss,
}

impl Arch {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" | "mistral" | "smollm" | "smollm2" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            "gpt_oss" | "gpt-oss" => Arch::GptOss,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
            Arch::GptOss => "gpt_oss",
        }
    }
}

/// Rotary position embedding variants (how the inverse frequencies are made).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position: f64 },
    Yarn {
        factor: f64,
        original_max_position: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        /// Multiplies cos/sin; `None` means transformers' default 0.1·ln(factor)+1.
        attention_factor: Option<f64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// softmax over all experts, top-k, optionally renormalised (Qwen3-MoE, Mixtral).
    SoftmaxTopK { renormalize: bool },
    /// top-k on the raw logits, then softmax over the k (gpt-oss).
    TopKSoftmax,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub expert_intermediate: usize,
    pub router: RouterKind,
    pub router_bias: bool,
    pub expert_bias: bool,
    /// Layers that use a dense MLP instead (Qwen3-MoE `mlp_only_layers` / sparse step).
    pub dense_layers: Vec<usize>,
}

/// The MLP's gated activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// silu(gate) * up
    SiluGlu,
    /// gpt-oss: gate clamped above at `limit`, up clamped to ±limit,
    /// (up + 1) * gate * sigmoid(alpha * gate)
    GptOssGlu { alpha: f32, limit: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Full,
    Sliding(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: bool,
    pub attention_sinks: bool,
    pub layer_attention: Vec<AttentionKind>,
    pub activation: Activation,
    pub moe: Option<MoeConfig>,
}

fn get<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| v.get(*k).filter(|x| !x.is_null()))
}

fn req_usize(v: &Value, keys: &[&str]) -> Result<usize, ModelError> {
    get(v, keys)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config(format!("config.json: missing or non-integer `{}`", keys[0])))
}

fn opt_usize(v: &Value, keys: &[&str]) -> Option<usize> {
    get(v, keys).and_then(Value::as_u64).map(|x| x as usize)
}

fn opt_f64(v: &Value, keys: &[&str]) -> Option<f64> {
    get(v, keys).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, keys: &[&str]) -> Option<bool> {
    get(v, keys).and_then(Value::as_bool)
}

fn parse_rope(v: &Value) -> RopeConfig {
    // transformers 5 nests everything under `rope_parameters`; 4.x uses `rope_theta` + `rope_scaling`.
    let params = get(v, &["rope_parameters"]);
    let theta = params
        .and_then(|p| opt_f64(p, &["rope_theta"]))
        .or_else(|| opt_f64(v, &["rope_theta"]))
        .unwrap_or(10000.0);
    let scaling_obj = get(v, &["rope_scaling"]).or(params);
    let scaling = match scaling_obj {
        None => RopeScaling::None,
        Some(s) => {
            let kind = get(s, &["rope_type", "type"]).and_then(Value::as_str).unwrap_or("default");
            let factor = opt_f64(s, &["factor"]).unwrap_or(1.0);
            let orig = opt_f64(s, &["original_max_position_embeddings"])
                .or_else(|| opt_f64(v, &["original_max_position_embeddings"]));
            match kind {
                "linear" => RopeScaling::Linear { factor },
                "llama3" => RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: opt_f64(s, &["low_freq_factor"]).unwrap_or(1.0),
                    high_freq_factor: opt_f64(s, &["high_freq_factor"]).unwrap_or(4.0),
                    original_max_position: orig.unwrap_or(8192.0),
                },
                "yarn" => RopeScaling::Yarn {
                    factor,
                    original_max_position: orig
                        .or_else(|| opt_f64(v, &["max_position_embeddings"]).map(|m| m / factor))
                        .unwrap_or(4096.0),
                    beta_fast: opt_f64(s, &["beta_fast"]).unwrap_or(32.0),
                    beta_slow: opt_f64(s, &["beta_slow"]).unwrap_or(1.0),
                    truncate: opt_bool(s, &["truncate"]).unwrap_or(true),
                    attention_factor: opt_f64(s, &["attention_factor"]),
                },
                _ => RopeScaling::None,
            }
        }
    };
    RopeConfig { theta, scaling }
}

impl ModelConfig {
    /// Parse an HF `config.json` value.
    pub fn from_hf_json(v: &Value) -> Result<Self, ModelError> {
        let model_type = get(v, &["model_type"]).and_then(Value::as_str).unwrap_or("");
        let arch = Arch::from_model_type(model_type).ok_or_else(|| {
            ModelError::UnknownArchitecture(format!(
                "model_type `{model_type}` (supported: llama, qwen2, qwen3, qwen3_moe, mixtral, gpt_oss)"
            ))
        })?;
        let hidden_size = req_usize(v, &["hidden_size"])?;
        let num_heads = req_usize(v, &["num_attention_heads"])?;
        let num_kv_heads = opt_usize(v, &["num_key_value_heads"]).unwrap_or(num_heads);
        let head_dim = opt_usize(v, &["head_dim"]).unwrap_or(hidden_size / num_heads.max(1));
        let num_layers = req_usize(v, &["num_hidden_layers"])?;
        let intermediate_size = opt_usize(v, &["intermediate_size"]).unwrap_or(0);
        let sliding = opt_usize(v, &["sliding_window"]);
        let layer_attention = match get(v, &["layer_types"]).and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| match (t.as_str(), sliding) {
                    (Some("sliding_attention"), Some(w)) => AttentionKind::Sliding(w),
                    _ => AttentionKind::Full,
                })
                .collect(),
            None => {
                let use_sw = opt_bool(v, &["use_sliding_window"]).unwrap_or(arch == Arch::Mixtral);
                let kind = match sliding {
                    Some(w) if use_sw => AttentionKind::Sliding(w),
                    _ => AttentionKind::Full,
                };
                vec![kind; num_layers]
            }
        };
        if layer_attention.len() != num_layers {
            return Err(ModelError::Config(format!(
                "config.json: `layer_types` has {} entries but num_hidden_layers is {num_layers}",
                layer_attention.len()
            )));
        }
        let attention_bias = opt_bool(v, &["attention_bias"]);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::GptOss => (true, true),
            _ => (attention_bias.unwrap_or(false), attention_bias.unwrap_or(false)),
        };
        let moe = match arch {
            Arch::Qwen3Moe | Arch::Mixtral | Arch::GptOss => {
                let num_experts = req_usize(v, &["num_local_experts", "num_experts"])?;
                let top_k = req_usize(v, &["num_experts_per_tok", "experts_per_token", "num_experts_per_token"])?;
                let expert_intermediate = match arch {
                    Arch::Qwen3Moe => opt_usize(v, &["moe_intermediate_size"]).unwrap_or(intermediate_size),
                    _ => intermediate_size,
                };
                let mut dense_layers: Vec<usize> = get(v, &["mlp_only_layers"])
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
                    .unwrap_or_default();
                if arch == Arch::Qwen3Moe {
                    let step = opt_usize(v, &["decoder_sparse_step"]).unwrap_or(1).max(1);
                    for l in 0..num_layers {
                        if (l + 1) % step != 0 && !dense_layers.contains(&l) {
                            dense_layers.push(l);
                        }
                    }
                }
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate,
                    router: match arch {
                        Arch::GptOss => RouterKind::TopKSoftmax,
                        Arch::Mixtral => RouterKind::SoftmaxTopK { renormalize: true },
                        _ => RouterKind::SoftmaxTopK {
                            renormalize: opt_bool(v, &["norm_topk_prob"]).unwrap_or(false),
                        },
                    },
                    router_bias: arch == Arch::GptOss,
                    expert_bias: arch == Arch::GptOss,
                    dense_layers,
                })
            }
            _ => None,
        };
        let activation = match arch {
            Arch::GptOss => Activation::GptOssGlu {
                alpha: 1.702,
                limit: opt_f64(v, &["swiglu_limit"]).unwrap_or(7.0) as f32,
            },
            _ => Activation::SiluGlu,
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "config.json: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        Ok(ModelConfig {
            arch,
            vocab_size: req_usize(v, &["vocab_size"])?,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, &["rms_norm_eps"]).unwrap_or(1e-6) as f32,
            rope: parse_rope(v),
            max_position_embeddings: opt_usize(v, &["max_position_embeddings"]).unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, &["tie_word_embeddings"]).unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe),
            attention_sinks: arch == Arch::GptOss,
            layer_attention,
            activation,
            moe,
        })
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| !m.dense_layers.contains(&layer))
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_both_rope_spellings_and_expert_keys() {
        let old = serde_json::json!({"model_type":"qwen3_moe","hidden_size":64,"num_attention_heads":4,
            "num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":10,"rope_theta":5e5,
            "num_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":32,"norm_topk_prob":true});
        let new = serde_json::json!({"model_type":"qwen3_moe","hidden_size":64,"num_attention_heads":4,
            "num_key_value_heads":2,"num_hidden_layers":2,"vocab_size":10,
            "rope_parameters":{"rope_type":"default","rope_theta":5e5},
            "num_local_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":32,"norm_topk_prob":true});
        let a = ModelConfig::from_hf_json(&old).unwrap();
        let b = ModelConfig::from_hf_json(&new).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope.theta, 5e5);
        assert_eq!(a.rope.scaling, RopeScaling::None);
        assert_eq!(a.moe.as_ref().unwrap().router, RouterKind::SoftmaxTopK { renormalize: true });
    }

    #[test]
    fn unknown_architecture_is_a_clear_error() {
        let v = serde_json::json!({"model_type":"bert","hidden_size":64});
        let e = ModelConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("bert"), "{e}");
    }
}
