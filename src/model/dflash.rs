//! DFlash drafter checkpoints (arXiv 2602.06036; the layout z-lab publishes
//! and `tools/train_dflash.py` exports): a Qwen3-style `config.json` with a
//! `dflash_config` object (`target_layer_ids`, `block_size`, `mask_token_id`)
//! and one `model.safetensors` holding
//!
//! ```text
//! fc.weight                      [hidden, len(target_layer_ids) * target_hidden]
//! hidden_norm.weight             [hidden]
//! layers.{i}.input_layernorm.weight, post_attention_layernorm.weight
//! layers.{i}.self_attn.{q,k,v,o}_proj.weight, q_norm.weight, k_norm.weight
//! layers.{i}.mlp.{gate,up,down}_proj.weight
//! norm.weight                    [hidden]
//! ```
//!
//! The drafter has no embedding and no lm_head: it borrows the target's.

use std::path::Path;

use serde_json::Value;

use super::config::ModelConfig;
use super::family::{check_shape, GatedMlp, Loader};
use super::tensors::{SafetensorsSource, TensorSource};
use super::weights::Linear;
use super::ModelError;

/// What a drafter needs beyond its decoder shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DFlashConfig {
    /// Shape of the draft decoder layers (a Qwen3 config: q/k norms, GQA, RoPE).
    pub decoder: ModelConfig,
    /// Target layers whose outputs are concatenated into the context features.
    pub target_layer_ids: Vec<usize>,
    /// Block size the drafter was trained for (position 0 + B−1 masks).
    pub block_size: usize,
    /// The token id filling positions 1..B of a block.
    pub mask_token_id: u32,
}

/// The reference recipe's choice of target layers: one layer for a one-layer
/// drafter (the middle), else evenly spaced from layer 1 to L−3.
pub fn default_target_layers(num_target_layers: usize, num_draft_layers: usize) -> Vec<usize> {
    if num_draft_layers <= 1 {
        return vec![num_target_layers / 2];
    }
    let (start, end) = (1.0, num_target_layers.saturating_sub(3).max(1) as f64);
    (0..num_draft_layers)
        .map(|i| (start + i as f64 * (end - start) / (num_draft_layers - 1) as f64).round() as usize)
        .collect()
}

impl DFlashConfig {
    pub fn from_json(v: &Value) -> Result<Self, ModelError> {
        let decoder = ModelConfig::from_hf_json(v)?;
        // Fields live in `dflash_config` (z-lab) or at the top level (older exports).
        let field = |name: &str| v.get("dflash_config").and_then(|d| d.get(name)).or_else(|| v.get(name));
        let target_layer_ids = match field("target_layer_ids").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ModelError::Config("dflash_config.target_layer_ids: not a list of integers".into()))?,
            None => {
                let n = field("num_target_layers").and_then(Value::as_u64).ok_or_else(|| {
                    ModelError::Config("drafter config: neither dflash_config.target_layer_ids nor num_target_layers".into())
                })?;
                default_target_layers(n as usize, decoder.num_layers)
            }
        };
        if target_layer_ids.is_empty() {
            return Err(ModelError::Config("dflash_config.target_layer_ids is empty".into()));
        }
        let block_size = field("block_size").and_then(Value::as_u64).unwrap_or(16) as usize;
        if block_size < 2 {
            return Err(ModelError::Config(format!("dflash_config.block_size must be >= 2, got {block_size}")));
        }
        let mask_token_id = field("mask_token_id").and_then(Value::as_u64).ok_or_else(|| {
            ModelError::Config("drafter config: no dflash_config.mask_token_id (the block's mask token)".into())
        })? as u32;
        Ok(Self { decoder, target_layer_ids, block_size, mask_token_id })
    }
}

/// One draft decoder layer. K/V projections apply to the block and to the
/// injected target context alike.
pub struct DraftLayer {
    pub input_norm: Vec<f32>,
    pub post_attention_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub mlp: GatedMlp,
}

pub struct DFlashWeights {
    pub config: DFlashConfig,
    /// `[hidden, n_target_layers * target_hidden]`: the context projection.
    pub fc: Linear,
    pub hidden_norm: Vec<f32>,
    pub layers: Vec<DraftLayer>,
    pub norm: Vec<f32>,
}

impl DFlashWeights {
    /// Loads `dir/config.json` + `dir/model.safetensors` and checks them
    /// against the target's hidden size, depth and vocabulary.
    pub fn load(dir: &Path, target: &ModelConfig) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
        let config = DFlashConfig::from_json(&raw)?;
        let src = SafetensorsSource::open_dir(dir)?;
        Self::from_source(config, &src, target)
    }

    pub fn from_source(config: DFlashConfig, src: &dyn TensorSource, target: &ModelConfig) -> Result<Self, ModelError> {
        let c = &config.decoder;
        if c.hidden_size != target.hidden_size {
            return Err(ModelError::Config(format!(
                "drafter hidden size {} differs from the target's {} (it must share the target's embedding)",
                c.hidden_size, target.hidden_size
            )));
        }
        if let Some(&l) = config.target_layer_ids.iter().find(|&&l| l >= target.num_layers) {
            return Err(ModelError::Config(format!(
                "drafter reads target layer {l} but the target has {} layers",
                target.num_layers
            )));
        }
        if config.mask_token_id as usize >= target.vocab_size {
            return Err(ModelError::Config(format!(
                "drafter mask token {} is outside the target vocabulary of {}",
                config.mask_token_id, target.vocab_size
            )));
        }
        let ld = Loader { src };
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let bias = c.qkv_bias;
        let ctx_width = config.target_layer_ids.len() * target.hidden_size;
        let fc = ld.linear("fc", h, ctx_width, false)?;
        check_shape("fc.weight", &[fc.out_features(), fc.in_features()], &[h, ctx_width])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for li in 0..c.num_layers {
            let p = format!("layers.{li}");
            let a = format!("{p}.self_attn");
            layers.push(DraftLayer {
                input_norm: ld.vector(&format!("{p}.input_layernorm.weight"), h)?,
                post_attention_norm: ld.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                q: ld.linear(&format!("{a}.q_proj"), c.q_dim(), h, bias)?,
                k: ld.linear(&format!("{a}.k_proj"), c.kv_dim(), h, bias)?,
                v: ld.linear(&format!("{a}.v_proj"), c.kv_dim(), h, bias)?,
                o: ld.linear(&format!("{a}.o_proj"), h, c.q_dim(), c.o_bias)?,
                q_norm: ld.vector(&format!("{a}.q_norm.weight"), hd)?,
                k_norm: ld.vector(&format!("{a}.k_norm.weight"), hd)?,
                mlp: GatedMlp {
                    gate: ld.linear(&format!("{p}.mlp.gate_proj"), i, h, false)?,
                    up: ld.linear(&format!("{p}.mlp.up_proj"), i, h, false)?,
                    down: ld.linear(&format!("{p}.mlp.down_proj"), h, i, false)?,
                },
            });
        }
        Ok(Self {
            fc,
            hidden_norm: ld.vector("hidden_norm.weight", h)?,
            layers,
            norm: ld.vector("norm.weight", h)?,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layers_span_one_to_l_minus_three() {
        assert_eq!(default_target_layers(36, 5), vec![1, 9, 17, 25, 33]);
        assert_eq!(default_target_layers(30, 1), vec![15]);
        assert_eq!(default_target_layers(30, 3), vec![1, 14, 27]);
    }

    #[test]
    fn reads_z_lab_config_fields() {
        let v = serde_json::json!({"model_type":"qwen3","hidden_size":64,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":16,"num_hidden_layers":1,"intermediate_size":128,
            "vocab_size":512,"block_size":16,
            "dflash_config":{"target_layer_ids":[1],"mask_token_id":500,"block_size":8}});
        let c = DFlashConfig::from_json(&v).unwrap();
        assert_eq!((c.target_layer_ids.clone(), c.block_size, c.mask_token_id), (vec![1], 8, 500));
        let no_mask = serde_json::json!({"model_type":"qwen3","hidden_size":64,"num_attention_heads":4,
            "num_hidden_layers":1,"vocab_size":512,"dflash_config":{"target_layer_ids":[1]}});
        assert!(DFlashConfig::from_json(&no_mask).unwrap_err().to_string().contains("mask_token_id"));
    }
}
