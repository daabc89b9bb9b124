//! What a rank on a GPU needs beyond its slices (`backend/cuda/model/shard.rs`),
//! kept free of CUDA so it is tested everywhere:
//!
//! - The router runs in full on every rank (experts × hidden, small): each rank
//!   picks every token's top-k itself, so no collective is spent on router logits.
//!   [`load_routers`] reads those full routers next to the rank's slices.
//! - Expert parallel decode: each chosen expert id becomes the rank's local index or
//!   −1 ([`local_expert_id`], mirrored by `moe_local_ids` in kernels/shard.cu); the
//!   expert kernels write zeros for −1, the combine runs locally and an all-reduce
//!   sums the ranks' partial MoE outputs.
//! - Vocabulary-split lm_head: each rank computes its range's logits, packed with
//!   its own row stride; an all-gather of `rows · chunk` values per rank and
//!   [`vocab_source_index`] (mirrored by `vocab_assemble`) put them in vocabulary order.
//! - [`check_cuda_plan`]: the limits of the CUDA kernels on top of [`ShardPlan::validate`].

use std::ops::Range;

use super::plan::{ShardError, ShardPlan};
use crate::model::config::{Arch, ModelConfig};
use crate::model::family::Loader;
use crate::model::tensors::TensorSource;
use crate::model::weights::Linear;
use crate::model::ModelError;

/// The top-k kernel's limit (one warp, up to 16 logits per lane).
pub const MAX_ROUTED_EXPERTS: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceShardError {
    #[error(transparent)]
    Plan(#[from] ShardError),
    #[error("each rank's expert slice is {width} wide: the CUDA backend stores experts as MXFP4 blocks of 32 along the expert width, so expert_intermediate / (ranks / ep) must be a multiple of 32")]
    ExpertBlocks { width: usize },
    #[error("{experts} experts: the CUDA router takes at most {MAX_ROUTED_EXPERTS}")]
    TooManyExperts { experts: usize },
    #[error("rank {rank} would hold no vocabulary rows (vocab {vocab} over {ranks} ranks in chunks of {chunk})")]
    EmptyVocab { rank: usize, vocab: usize, ranks: usize, chunk: usize },
}

/// [`ShardPlan::validate`] plus what the CUDA kernels need of each rank's slices.
pub fn check_cuda_plan(plan: &ShardPlan, c: &ModelConfig) -> Result<(), DeviceShardError> {
    plan.validate(c)?;
    if let Some(m) = &c.moe {
        if m.num_experts > MAX_ROUTED_EXPERTS {
            return Err(DeviceShardError::TooManyExperts { experts: m.num_experts });
        }
        let width = m.expert_intermediate / plan.expert_split();
        if !width.is_multiple_of(32) {
            return Err(DeviceShardError::ExpertBlocks { width });
        }
    }
    for rank in 0..plan.ranks {
        if plan.vocab_range(c.vocab_size, rank).is_empty() {
            let chunk = plan.vocab_chunk(c.vocab_size);
            return Err(DeviceShardError::EmptyVocab { rank, vocab: c.vocab_size, ranks: plan.ranks, chunk });
        }
    }
    Ok(())
}

/// The plan of `kairos bench decode --nccl-ranks n`: attention split over all `n`
/// ranks when the heads allow it (else replicated), whole experts per rank when
/// the expert count allows it (else every expert split by width over the ranks);
/// the first of those that the CUDA backend can run.
pub fn bench_plan(c: &ModelConfig, n: usize) -> Result<ShardPlan, DeviceShardError> {
    let eps: &[usize] = if c.moe.is_some() { &[n, 1] } else { &[1] };
    let mut first_err = None;
    for tp in [n, 1] {
        for &ep in eps {
            let plan = ShardPlan::new(tp, ep, Some(n))?;
            match check_cuda_plan(&plan, c) {
                Ok(()) => return Ok(plan),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    Err(first_err.unwrap_or(DeviceShardError::Plan(ShardError::Zero { ranks: n, tp: n, ep: 1 })))
}

/// Index of global expert `id` among a rank's `experts`, or −1 when another rank holds it.
pub fn local_expert_id(id: i32, experts: &Range<usize>) -> i32 {
    let e = id as i64 - experts.start as i64;
    if e >= 0 && e < experts.len() as i64 {
        e as i32
    } else {
        -1
    }
}

/// Where logit (`row`, `col`) of the full vocabulary sits in the all-gather of every
/// rank's lm_head output: rank `s = col / chunk` sent `rows` rows of its range's
/// width (row stride = that width) in a part of `rows · chunk` values.
pub fn vocab_source_index(row: usize, col: usize, rows: usize, vocab: usize, chunk: usize) -> usize {
    let s = col / chunk;
    let width = chunk.min(vocab - s * chunk);
    s * rows * chunk + row * width + (col - s * chunk)
}

/// Every layer's full router (`None` for dense layers), read from the whole
/// checkpoint (`full` is the whole model's config). The names are those of
/// `family.rs` / `gpt_oss.rs` (a test checks both load the same router).
pub fn load_routers(full: &ModelConfig, src: &dyn TensorSource) -> Result<Vec<Option<Linear>>, ModelError> {
    let ld = Loader { src };
    let h = full.hidden_size;
    (0..full.num_layers)
        .map(|i| {
            let Some(m) = full.moe.as_ref().filter(|_| full.is_moe_layer(i)) else { return Ok(None) };
            let (p, e) = (format!("model.layers.{i}"), m.num_experts);
            let mixtral_gate = format!("{p}.block_sparse_moe.gate");
            let router = match full.arch {
                Arch::GptOss => ld.linear(&format!("{p}.mlp.router"), e, h, true)?,
                Arch::Mixtral if src.contains(&format!("{mixtral_gate}.weight")) => ld.linear(&mixtral_gate, e, h, false)?,
                _ => ld.linear(&format!("{p}.mlp.gate"), e, h, false)?,
            };
            Ok(Some(router))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::family::Mlp;
    use crate::model::load::read_hf_config;
    use crate::model::tensors::SafetensorsSource;

    #[test]
    fn expert_ids_map_to_local_or_minus_one() {
        let mine = 4..8;
        let got: Vec<i32> = (0..10).map(|id| local_expert_id(id, &mine)).collect();
        assert_eq!(got, vec![-1, -1, -1, -1, 0, 1, 2, 3, -1, -1]);
        assert_eq!(local_expert_id(-1, &(0..4)), -1);
        assert_eq!(local_expert_id(0, &(0..0)), -1);
    }

    /// Each rank's packed logits, all-gathered in parts of `rows · chunk`, come back
    /// in vocabulary order (uneven last range included).
    #[test]
    fn gathered_vocab_parts_reassemble_in_order() {
        for (vocab, ranks, rows) in [(100, 3, 2), (512, 4, 5), (10, 4, 1), (7, 1, 3)] {
            let plan = ShardPlan { ranks, tp: 1, ep: 1 };
            let chunk = plan.vocab_chunk(vocab);
            let value = |r: usize, col: usize| (r * 1000 + col) as f32;
            let mut gathered = vec![f32::NAN; ranks * rows * chunk];
            for s in 0..ranks {
                let range = plan.vocab_range(vocab, s);
                for r in 0..rows {
                    for (j, col) in range.clone().enumerate() {
                        gathered[s * rows * chunk + r * range.len() + j] = value(r, col);
                    }
                }
            }
            for r in 0..rows {
                for col in 0..vocab {
                    assert_eq!(gathered[vocab_source_index(r, col, rows, vocab, chunk)], value(r, col), "vocab {vocab} ranks {ranks}");
                }
            }
        }
    }

    fn fixture_config(name: &str) -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        read_hf_config(&dir).expect("config").1
    }

    #[test]
    fn cuda_limits_are_named() {
        let c = fixture_config("qwen3_moe"); // 4 experts of width 64
        assert!(check_cuda_plan(&ShardPlan::new(2, 1, None).unwrap(), &c).is_ok());
        assert!(check_cuda_plan(&ShardPlan::new(4, 2, None).unwrap(), &c).is_ok());
        let e = check_cuda_plan(&ShardPlan::new(4, 1, None).unwrap(), &c).unwrap_err();
        assert_eq!(e, DeviceShardError::ExpertBlocks { width: 16 });
        assert!(e.to_string().contains("multiple of 32"), "{e}");
        let e = check_cuda_plan(&ShardPlan::new(1, 3, Some(3)).unwrap(), &c).unwrap_err();
        assert!(matches!(e, DeviceShardError::Plan(ShardError::Experts { .. })), "{e}");
        let mut small = fixture_config("llama");
        small.vocab_size = 9; // chunks of 3 over 4 ranks leave rank 3 nothing
        let e = check_cuda_plan(&ShardPlan::new(4, 1, None).unwrap(), &small).unwrap_err();
        assert!(matches!(e, DeviceShardError::EmptyVocab { rank: 3, .. }), "{e}");
    }

    #[test]
    fn bench_plans_split_what_the_model_allows() {
        let moe = fixture_config("qwen3_moe"); // 4 heads, 4 experts of width 64
        assert_eq!(bench_plan(&moe, 2).unwrap(), ShardPlan { ranks: 2, tp: 2, ep: 2 });
        assert_eq!(bench_plan(&moe, 4).unwrap(), ShardPlan { ranks: 4, tp: 4, ep: 4 });
        // 8 ranks: 4 heads and 4 experts cannot be split 8 ways, 64 / 8 is not a block of 32
        assert!(matches!(bench_plan(&moe, 8), Err(DeviceShardError::Plan(ShardError::Heads { heads: 4, tp: 8 }))));
        let dense = fixture_config("llama");
        assert_eq!(bench_plan(&dense, 3).unwrap(), ShardPlan { ranks: 3, tp: 1, ep: 1 });
        assert_eq!(bench_plan(&dense, 2).unwrap(), ShardPlan { ranks: 2, tp: 2, ep: 1 });
    }

    #[test]
    fn full_routers_equal_the_family_loaders() {
        for name in ["qwen3_moe", "mixtral", "gpt_oss", "gpt_oss_mxfp4"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
            let m = crate::model::load_model(&dir).expect("load");
            let src = SafetensorsSource::open_dir(&dir).expect("open");
            let routers = load_routers(&m.weights.config, &src).expect("routers");
            assert_eq!(routers.len(), m.weights.layers.len());
            for (li, (l, r)) in m.weights.layers.iter().zip(&routers).enumerate() {
                match (&l.mlp, r) {
                    (Mlp::Moe(block), Some(r)) => {
                        assert_eq!(r.weight.to_f32(), block.router.weight.to_f32(), "{name} layer {li}");
                        assert_eq!(r.bias, block.router.bias, "{name} layer {li}");
                    }
                    (Mlp::Dense(_), None) => {}
                    _ => panic!("{name} layer {li}: router presence differs"),
                }
            }
        }
    }
}
