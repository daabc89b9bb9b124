//! `ShardedCudaBackend`: one model over N ranks, each a [`CudaBackend`] holding
//! only its slices ([`CudaBackend::new_rank`]), driven together: every call runs
//! on all ranks, each step from one thread per rank (a collective waits until
//! every rank has joined it). The ranks are joined either by
//! - [`load_one_gpu`](ShardedCudaBackend::load_one_gpu): N ranks on one GPU with
//!   host-staged collectives (tests: NCCL refuses two ranks on one device; the
//!   decode steps run eagerly, not from graphs), or
//! - [`load_nccl`](ShardedCudaBackend::load_nccl): rank r on GPU r over NCCL,
//!   with the collectives inside each rank's decode graphs.
//!
//! Every rank returns the full logits (all-gathered); `forward` checks that all
//! ranks agree bit for bit and returns rank 0's. A call that one rank rejects
//! is rejected by all before any collective (the checks are the same on every
//! rank), so no rank is left waiting.

use std::sync::Arc;

use super::comm::HostStagedComm;
use super::model::{CudaBackend, CudaBackendOptions};
use crate::backend::collectives::nccl::{new_id, NcclComm};
use crate::backend::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::model::config::ModelConfig;
use crate::model::shard::device::{check_cuda_plan, load_routers};
use crate::model::shard::{load_rank, ShardPlan};
use crate::model::tensors::TensorSource;

pub struct ShardedCudaBackend {
    plan: ShardPlan,
    /// The whole model's config (each rank holds its local one).
    config: ModelConfig,
    ranks: Vec<CudaBackend>,
}

fn device_err(what: &str) -> impl Fn(String) -> BackendError + '_ {
    move |e| BackendError::Device(format!("{what}: {e}"))
}

/// Each rank's slices, read from `src` one rank at a time and uploaded to the GPU
/// `opts_for(rank)` names, so the host holds one rank's weights at a time.
fn load_ranks(
    full: &ModelConfig,
    src: &dyn TensorSource,
    plan: ShardPlan,
    opts_for: impl Fn(usize) -> CudaBackendOptions,
) -> Result<Vec<CudaBackend>, BackendError> {
    check_cuda_plan(&plan, full).map_err(|e| BackendError::Unsupported(format!("shard plan: {e}")))?;
    let routers = load_routers(full, src).map_err(|e| device_err("loading the routers")(e.to_string()))?;
    (0..plan.ranks)
        .map(|r| {
            let (slices, weights) = load_rank(full, src, &plan, r).map_err(|e| device_err("loading a rank")(e.to_string()))?;
            CudaBackend::new_rank(&weights, &routers, full, plan, slices, opts_for(r))
        })
        .collect()
}

/// The calling thread works on `bk`'s GPU from here on.
fn bind(bk: &CudaBackend) -> Result<(), BackendError> {
    bk.context().ctx.bind_to_thread().map_err(|e| BackendError::Device(format!("CUDA driver error: {e:?}")))
}

impl ShardedCudaBackend {
    /// `plan.ranks` ranks on GPU `opts.ordinal`, joined by host-staged collectives.
    pub fn load_one_gpu(full: &ModelConfig, src: &dyn TensorSource, plan: ShardPlan, opts: CudaBackendOptions) -> Result<Self, BackendError> {
        let ranks = load_ranks(full, src, plan, |_| opts.clone())?;
        let mut me = Self { plan, config: full.clone(), ranks };
        for (bk, comm) in me.ranks.iter_mut().zip(HostStagedComm::world(plan.ranks)) {
            bk.attach_comm(Box::new(comm))?;
        }
        Ok(me)
    }

    /// Rank r on GPU r (`opts.ordinal` is ignored), joined by NCCL.
    pub fn load_nccl(full: &ModelConfig, src: &dyn TensorSource, plan: ShardPlan, opts: CudaBackendOptions) -> Result<Self, BackendError> {
        let visible = crate::backend::cuda::device_count();
        if visible < plan.ranks {
            return Err(BackendError::Device(format!("{} ranks over NCCL need {} GPUs, {visible} visible", plan.ranks, plan.ranks)));
        }
        let ranks = load_ranks(full, src, plan, |r| CudaBackendOptions { ordinal: r, ..opts.clone() })?;
        let mut me = Self { plan, config: full.clone(), ranks };
        join_nccl(&mut me.ranks)?;
        Ok(me)
    }

    pub fn plan(&self) -> ShardPlan {
        self.plan
    }

    pub fn rank(&self, r: usize) -> &CudaBackend {
        &self.ranks[r]
    }

    /// `f` on every rank at once, one thread per rank; results in rank order.
    fn on_all_ranks<T: Send>(&mut self, f: impl Fn(&mut CudaBackend) -> Result<T, BackendError> + Sync) -> Result<Vec<T>, BackendError> {
        let results: Vec<Result<T, BackendError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|bk| {
                    let f = &f;
                    s.spawn(move || {
                        bind(bk)?;
                        f(bk)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(BackendError::Device("a rank thread panicked".into())))).collect()
        });
        results.into_iter().collect()
    }

    /// `f` on each rank in turn (calls without collectives).
    fn each_rank(&mut self, mut f: impl FnMut(&mut CudaBackend) -> Result<(), BackendError>) -> Result<(), BackendError> {
        for bk in &mut self.ranks {
            bind(bk)?;
            f(bk)?;
        }
        Ok(())
    }
}

/// Joins one NCCL communicator per rank on the rank's stream (all at once, one
/// thread each, as `ncclCommInitRank` requires) and attaches it.
pub fn join_nccl(ranks: &mut [CudaBackend]) -> Result<(), BackendError> {
    let id = new_id().map_err(|e| BackendError::Device(e.to_string()))?;
    let world = ranks.len();
    let results: Vec<Result<(), BackendError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .enumerate()
            .map(|(r, bk)| {
                s.spawn(move || {
                    bind(bk)?;
                    let stream = Arc::clone(&bk.context().stream);
                    let comm = NcclComm::join_on(stream, r, world, id).map_err(|e| BackendError::Device(e.to_string()))?;
                    bk.attach_nccl(comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(BackendError::Device("a rank thread panicked".into())))).collect()
    });
    results.into_iter().collect()
}

impl Backend for ShardedCudaBackend {
    fn name(&self) -> String {
        let p = self.plan;
        format!("cuda-sharded(ranks={},tp={},ep={}) {}", p.ranks, p.tp, p.ep, self.ranks[0].name())
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.ranks[0].max_context()
    }

    fn new_sequence(&mut self) -> SeqId {
        let ids: Vec<SeqId> = self
            .ranks
            .iter_mut()
            .map(|bk| {
                // a failed bind surfaces on the sequence's first forward
                let _ = bind(bk);
                bk.new_sequence()
            })
            .collect();
        debug_assert!(ids.iter().all(|&s| s == ids[0]), "ranks gave different sequence ids");
        ids[0]
    }

    fn free_sequence(&mut self, seq: SeqId) {
        for bk in &mut self.ranks {
            bk.free_sequence(seq);
        }
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize, BackendError> {
        self.ranks[0].seq_len(seq)
    }

    fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), BackendError> {
        self.each_rank(|bk| bk.truncate(seq, len))
    }

    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError> {
        self.each_rank(|bk| bk.copy_prefix(from, to, len))
    }

    fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> Result<Vec<f32>, BackendError> {
        let mut all = self.on_all_ranks(|bk| bk.forward(chunks, which))?;
        if let Some(r) = all.iter().position(|l| l != &all[0]) {
            return Err(BackendError::Device(format!("rank {r}'s logits differ from rank 0's (the all-gather must give every rank the same)")));
        }
        Ok(all.swap_remove(0))
    }
}
