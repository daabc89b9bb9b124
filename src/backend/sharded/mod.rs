//! `ShardedCpuBackend`: one model sharded over N simulated ranks (threads of
//! this process), each holding only its slice of the weights and KV cache,
//! joined by the CPU collectives. It must give the logits of the single-rank
//! `CpuBackend` (to float tolerance: sums over ranks change the order of
//! additions); the same layout runs over NCCL on N GPUs.
//!
//! Per layer: attention on the rank's heads → all-reduce (tp > 1) → dense MLP
//! on the rank's rows → all-reduce (tp > 1), or MoE by all-to-all dispatch and
//! combine ([`moe`]); logits: the rank's vocabulary rows → all-gather.

pub mod moe;
pub mod rank;

use super::collectives::cpu::CpuComm;
use super::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::model::config::ModelConfig;
use crate::model::family::ModelWeights;
use crate::model::shard::{load_rank, ShardLoadError, ShardPlan};
use crate::model::tensors::TensorSource;
use rank::Rank;

pub struct ShardedCpuBackend {
    plan: ShardPlan,
    /// The whole model's config (ranks hold local configs).
    config: ModelConfig,
    ranks: Vec<Rank>,
    comms: Vec<CpuComm>,
}

impl ShardedCpuBackend {
    /// Loads each rank's slices from `src` in turn (never the whole model).
    pub fn load(config: &ModelConfig, src: &dyn TensorSource, plan: ShardPlan) -> Result<Self, ShardLoadError> {
        plan.validate(config)?;
        let mut ranks = Vec::with_capacity(plan.ranks);
        for r in 0..plan.ranks {
            let (slices, weights) = load_rank(config, src, &plan, r)?;
            ranks.push(Rank::new(slices, weights));
        }
        Ok(Self { plan, config: config.clone(), ranks, comms: CpuComm::world(plan.ranks) })
    }

    pub fn plan(&self) -> ShardPlan {
        self.plan
    }

    /// Rank `r`'s weights (its local config and slices).
    pub fn rank_weights(&self, r: usize) -> &ModelWeights {
        self.ranks[r].weights()
    }

    fn each_rank(&mut self, mut f: impl FnMut(&mut Rank) -> Result<(), BackendError>) -> Result<(), BackendError> {
        for r in &mut self.ranks {
            f(r)?;
        }
        Ok(())
    }
}

impl Backend for ShardedCpuBackend {
    fn name(&self) -> String {
        format!("cpu-sharded(ranks={},tp={},ep={})", self.plan.ranks, self.plan.tp, self.plan.ep)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.ranks[0].cpu.max_context()
    }

    fn new_sequence(&mut self) -> SeqId {
        // Every rank allocates slots the same way, so the ids agree.
        let ids: Vec<SeqId> = self.ranks.iter_mut().map(|r| r.cpu.new_sequence()).collect();
        debug_assert!(ids.iter().all(|&s| s == ids[0]));
        ids[0]
    }

    fn free_sequence(&mut self, seq: SeqId) {
        for r in &mut self.ranks {
            r.cpu.free_sequence(seq);
        }
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize, BackendError> {
        self.ranks[0].cpu.seq_len(seq)
    }

    fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), BackendError> {
        self.each_rank(|r| r.cpu.truncate(seq, len))
    }

    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError> {
        self.each_rank(|r| r.cpu.copy_prefix(from, to, len))
    }

    fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> Result<Vec<f32>, BackendError> {
        // Check everything a rank could reject before any rank starts, so no rank
        // waits at a collective for one that returned early.
        let vocab = self.config.vocab_size;
        for ch in chunks {
            if let Some(&id) = ch.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(BackendError::TokenOutOfRange { id, vocab });
            }
        }
        self.ranks[0].cpu.step_starts(chunks)?;
        let (plan, config) = (&self.plan, &self.config);
        let results: Vec<Result<Vec<f32>, BackendError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .zip(&self.comms)
                .map(|(rank, comm)| s.spawn(move || rank.forward(comm, plan, config, chunks, which)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(BackendError::Device("a rank thread panicked".into()))))
                .collect()
        });
        let mut first = None;
        for r in results {
            match r {
                Ok(l) if first.is_none() => first = Some(l),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(first.unwrap_or_default())
    }
}
