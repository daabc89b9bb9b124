//! Entry point: a path (HF folder or `.gguf` file) -> config, weights, tokenizer.

use std::path::Path;

use serde_json::{json, Value};

use super::config::ModelConfig;
use super::family::{load_weights, ModelWeights};
use super::gguf::GgufFile;
use super::tensors::{GgufSource, SafetensorsSource, TensorSource};
use super::tokenizer::TextTokenizer;
use super::upcycle::{Upcycle, UpcycledSource};
use super::ModelError;

pub struct LoadedModel {
    /// Short name for headers and logs (folder or file stem).
    pub name: String,
    pub weights: ModelWeights,
    pub tokenizer: TextTokenizer,
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }
}

pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    load_model_with(path, None)
}

/// `load_model`, with the dense model's MLPs upcycled into identical experts
/// (see [`super::upcycle`]) when `upcycle` is given.
pub fn load_model_with(path: &Path, upcycle: Option<Upcycle>) -> Result<LoadedModel, ModelError> {
    let ck = open_checkpoint_with(path, upcycle)?;
    let mut weights = load_weights(ck.config, ck.source.as_ref())?;
    if let Some(raw) = &ck.hf_config {
        super::quantize::restore_recorded(raw, &mut weights)?;
    }
    Ok(LoadedModel { name: ck.name, weights, tokenizer: ck.tokenizer })
}

/// A checkpoint opened, with no weights read yet: config, tokenizer and the
/// tensor source (sharded loading then reads only each rank's slices).
pub struct OpenCheckpoint {
    /// Short name for headers and logs (folder or file stem).
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub source: Box<dyn TensorSource>,
    /// An HF folder's `config.json` (quantization recorded by `kairos quantize`
    /// is re-applied from it by `load_model`, not by sharded loading).
    pub hf_config: Option<Value>,
}

/// Opens an HF folder or a `.gguf` file.
pub fn open_checkpoint(path: &Path) -> Result<OpenCheckpoint, ModelError> {
    open_checkpoint_with(path, None)
}

/// `open_checkpoint`, seen as its upcycled MoE when `upcycle` is given.
pub fn open_checkpoint_with(path: &Path, upcycle: Option<Upcycle>) -> Result<OpenCheckpoint, ModelError> {
    if !path.exists() {
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let (config, tokenizer, source, hf_config): (_, _, Box<dyn TensorSource>, _) = if path.is_dir() {
        let (raw, config) = read_hf_config(path)?;
        let tokenizer = TextTokenizer::from_hf_dir(path, &raw)?;
        (config, tokenizer, Box::new(SafetensorsSource::open_dir(path)?), Some(raw))
    } else {
        let file = GgufFile::open(path)?;
        let (_, config) = gguf_config(&file)?;
        let tokenizer = TextTokenizer::from_gguf(super::gguf_tokenizer::tokenizer_from_gguf(&file)?);
        let permuted = file.get_str("general.architecture") == Some("llama");
        (config.clone(), tokenizer, Box::new(GgufSource::new(path, file, config.num_heads, config.num_kv_heads, permuted)), None)
    };
    let (config, source) = match upcycle {
        None => (config, source),
        Some(u) => {
            let moe = u.config(&config)?;
            let up: Box<dyn TensorSource> = Box::new(UpcycledSource::new(source, u, config.hidden_size));
            (moe, up)
        }
    };
    Ok(OpenCheckpoint { name, config, tokenizer, source, hf_config })
}

/// Reads and parses `config.json` of an HF folder.
pub fn read_hf_config(dir: &Path) -> Result<(Value, ModelConfig), ModelError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: not valid JSON: {e}", cfg_path.display())))?;
    let cfg = ModelConfig::from_hf_json(&raw)?;
    Ok((raw, cfg))
}

/// Builds an HF-style config from GGUF metadata (`{arch}.*` keys).
pub fn gguf_config(f: &GgufFile) -> Result<(Value, ModelConfig), ModelError> {
    let arch = f
        .get_str("general.architecture")
        .ok_or_else(|| ModelError::Format("GGUF: no `general.architecture` key".into()))?
        .to_owned();
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        other => {
            return Err(ModelError::UnknownArchitecture(format!(
                "GGUF architecture `{other}` (supported in GGUF: llama, qwen2, qwen3)"
            )))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| {
        f.get_u64(&key(k))
            .ok_or_else(|| ModelError::Format(format!("GGUF: missing metadata key `{}`", key(k))))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = f.get_u64(&key("attention.head_count_kv")).unwrap_or(heads);
    let vocab = match f.get_u64(&key("vocab_size")) {
        Some(v) => v,
        None => f.tensor_info("token_embd.weight").and_then(|t| t.dims.get(1).copied()).ok_or_else(|| {
            ModelError::Format("GGUF: no vocab size and no token_embd.weight tensor".into())
        })?,
    };
    let head_dim = f.get_u64(&key("attention.key_length")).unwrap_or(hidden / heads.max(1));
    let raw = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length")?,
        "num_hidden_layers": need("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": f.get_f32(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": f.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": f.get_u64(&key("context_length")).unwrap_or(4096),
        "tie_word_embeddings": f.tensor_info("output.weight").is_none(),
    });
    let cfg = ModelConfig::from_hf_json(&raw)?;
    Ok((raw, cfg))
}
