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

pub use super::load::{open_checkpoint, open_checkpoint_with, OpenCheckpoint};
