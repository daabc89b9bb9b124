//! Sharding a model over ranks: the plan (who holds what) and loading one
//! rank's slices through the ordinary family loader.

pub mod cost;
pub mod device;
pub mod plan;
pub mod source;

pub use plan::{RankSlices, ShardError, ShardPlan};
pub use source::ShardSource;

use super::config::ModelConfig;
use super::family::{load_weights, ModelWeights};
use super::tensors::TensorSource;
use super::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum ShardLoadError {
    #[error("shard plan: {0}")]
    Plan(#[from] ShardError),
    #[error("rank {rank}: {source}")]
    Model { rank: usize, source: ModelError },
}

/// One rank's weights: the model of the plan's local config, read slice by slice.
pub fn load_rank(full: &ModelConfig, src: &dyn TensorSource, plan: &ShardPlan, rank: usize) -> Result<(RankSlices, ModelWeights), ShardLoadError> {
    let slices = plan.slices(full, rank)?;
    let local = plan.local_config(full, &slices);
    let view = ShardSource::new(src, full, slices.clone());
    let weights = load_weights(local, &view).map_err(|source| ShardLoadError::Model { rank, source })?;
    Ok((slices, weights))
}

/// A checkpoint opened for sharded loading: config, tokenizer and the tensor
/// source, with no weights read yet (each rank then reads only its slices).
/// Quantization recorded in a config (`kairos quantize` output) is not
/// re-applied here; pre-packed MXFP4 tensors load as stored.
pub struct OpenCheckpoint {
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: super::TextTokenizer,
    pub source: Box<dyn TensorSource>,
}

/// Opens an HF folder or a `.gguf` file like `load_model`, without loading weights.
pub fn open_checkpoint(path: &std::path::Path) -> Result<OpenCheckpoint, ModelError> {
    use super::tensors::{GgufSource, SafetensorsSource};
    if !path.exists() {
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    if path.is_dir() {
        let (raw, config) = super::load::read_hf_config(path)?;
        let source = Box::new(SafetensorsSource::open_dir(path)?);
        let tokenizer = super::TextTokenizer::from_hf_dir(path, &raw)?;
        return Ok(OpenCheckpoint { name, config, tokenizer, source });
    }
    let file = super::gguf::GgufFile::open(path)?;
    let (_, config) = super::load::gguf_config(&file)?;
    let tokenizer = super::TextTokenizer::from_gguf(super::gguf_tokenizer::tokenizer_from_gguf(&file)?);
    let permuted = file.get_str("general.architecture") == Some("llama");
    let source = Box::new(GgufSource::new(path, file, config.num_heads, config.num_kv_heads, permuted));
    Ok(OpenCheckpoint { name, config, tokenizer, source })
}
