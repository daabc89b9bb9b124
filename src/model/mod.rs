//! Models: configuration, checkpoint loaders (safetensors, GGUF), the weight
//! layout of each family, tokenizer and chat template.

pub mod accounting;
pub mod config;
pub mod dflash;
pub mod family;
pub mod gguf;
pub mod gguf_quants;
pub mod gguf_tokenizer;
mod gpt_oss;
pub mod load;
pub mod quantize;
pub mod shard;
pub mod tensors;
pub mod tokenizer;
pub mod upcycle;
pub mod weights;

use std::path::Path;

pub use config::{Arch, ModelConfig};
pub use family::ModelWeights;
pub use load::{load_model, load_model_with, LoadedModel};
pub use tokenizer::TextTokenizer;

/// Why a model could not be loaded. Each message says what, where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("bad checkpoint: {0}")]
    Format(String),
    #[error("bad model config: {0}")]
    Config(String),
    #[error("unknown architecture: {0}")]
    UnknownArchitecture(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("wrong shape: {0}")]
    Shape(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("GGUF: {0}")]
    Gguf(#[from] gguf::GgufError),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.display().to_string(), source }
    }
}
