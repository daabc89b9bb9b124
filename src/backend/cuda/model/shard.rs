//! One rank of a model sharded over several GPUs: the plan (`model::shard`)
//! says which heads, MLP rows, experts and vocabulary rows the rank holds; the
//! layout rules for a GPU are in `model::shard::device`. No GPU holds the
//! whole model: the rank's weights are `load_rank`'s slices (or random weights
//! of the rank's local config) plus the full router of each MoE layer.
//!
//! What the step (`encode_step`) does differently on a rank:
//! - embedding: the rank's vocabulary rows, zeros for other ids
//!   (`embedding_vocab_range`), then an all-reduce;
//! - attention on the rank's heads and the dense MLP on its rows, each followed
//!   by an all-reduce when `tp > 1` (with `tp == 1` every rank holds them whole);
//! - MoE: the full router and top-k on every rank; the chosen ids are mapped to
//!   the rank's local experts or −1 (`moe_local_ids`), the expert kernels write
//!   zeros for −1, the combine runs locally and an all-reduce sums the ranks'
//!   partial outputs (experts on other ranks, and other width slices of this
//!   rank's experts). A decode step moves one `[n, hidden]` all-reduce per
//!   layer, no all-to-all; every rank reads only its own experts' weights.
//! - lm_head: the rank's vocabulary rows, an all-gather, then `vocab_assemble`
//!   puts the logits in vocabulary order; argmax runs on the full logits, so
//!   every rank returns the same logits and ids.
//!
//! A backend holding the whole model (`shard == None`) launches none of this.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::ops::{dptr, lc};
use super::{dev, drv, CudaBackend, CudaBackendOptions, DMlp, Res};
use crate::backend::collectives::CommError;
use crate::backend::cuda::comm::DeviceComm;
use crate::backend::cuda::{CudaContext, CudaError};
use crate::backend::BackendError;
use crate::model::config::ModelConfig;
use crate::model::family::ModelWeights;
use crate::model::shard::device::check_cuda_plan;
use crate::model::shard::{RankSlices, ShardPlan};
use crate::model::weights::Linear;

/// A rank's place in the plan and the buffers of its extra launches.
pub(super) struct ShardState {
    plan: ShardPlan,
    slices: RankSlices,
    /// The whole model's vocabulary, and the all-gather part per row and rank.
    vocab: usize,
    chunk: usize,
    /// Experts held here (the expert kernels' bound on their weights).
    experts_local: usize,
    /// Chosen experts as local indices or −1, `[max_step_tokens · top_k]`.
    tid_local: CudaSlice<i32>,
    /// This rank's logits, `[max_step_tokens · chunk]` (rows packed at its range's width).
    head_out: CudaSlice<f32>,
    /// Every rank's `head_out`, `[ranks · max_step_tokens · chunk]`.
    gathered: CudaSlice<f32>,
}

pub(super) fn comm_err(e: CommError) -> CudaError {
    CudaError::Shape(format!("collective: {e}"))
}

fn plan_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unsupported(format!("shard plan: {e}"))
}

impl ShardState {
    /// Attention and dense MLP outputs are partial sums only when they are split.
    pub(super) fn tp_reduces(&self) -> bool {
        self.plan.tp > 1
    }

    pub(super) fn experts_local(&self) -> usize {
        self.experts_local
    }

    /// A rank of a world of more than one cannot step without its collectives.
    pub(super) fn check_comm(&self, comm: Option<&dyn DeviceComm>) -> Res<()> {
        if comm.is_none() && self.plan.ranks > 1 {
            return Err(CudaError::Shape(format!(
                "rank {} of {} has no collectives attached (CudaBackend::attach_comm)",
                self.slices.rank, self.plan.ranks
            )));
        }
        Ok(())
    }

    /// `x [n, h]` = the embedding rows of ids in this rank's range, zeros elsewhere.
    pub(super) fn embed(&self, cx: &CudaContext, table: &CudaSlice<u16>, ids: &CudaSlice<i32>, x: &mut CudaSlice<f32>, n: usize, h: usize) -> Res<()> {
        let a = [h as i32, self.slices.vocab.start as i32, self.slices.vocab.len() as i32];
        let mut lb = cx.launch("embedding_vocab_range");
        lb.arg(table).arg(ids).arg(x).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { lb.launch(lc(n, 1, 1, 256)) }?;
        Ok(())
    }

    /// The first `count` chosen experts of `tid` as local indices (−1: another rank's).
    pub(super) fn local_ids(&mut self, cx: &CudaContext, tid: &CudaSlice<i32>, count: usize) -> Res<&CudaSlice<i32>> {
        let a = [count as i32, self.slices.experts.start as i32, self.slices.experts.len() as i32];
        let mut lb = cx.launch("moe_local_ids");
        lb.arg(tid).arg(&mut self.tid_local).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { lb.launch(lc(count.div_ceil(256), 1, 1, 256)) }?;
        Ok(&self.tid_local)
    }

    /// `logits [n, vocab]` from the final normed rows `hf [n, h]`: this rank's
    /// vocabulary rows, all-gathered and put in vocabulary order.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lm_head(
        &mut self,
        cx: &CudaContext,
        comm: Option<&dyn DeviceComm>,
        head: &CudaSlice<u16>,
        hf: &CudaSlice<f32>,
        logits: &mut CudaSlice<f32>,
        n: usize,
        h: usize,
    ) -> Res<()> {
        let st = cx.stream.clone();
        cx.gemv_ext(head, dptr(hf, &st), false, dptr(&self.head_out, &st), self.slices.vocab.len(), h, n, None)?;
        let parts = match comm {
            Some(c) => {
                c.all_gather(&st, &self.head_out, n * self.chunk, &mut self.gathered).map_err(comm_err)?;
                &self.gathered
            }
            // a world of one: its part is the whole vocabulary
            None => &self.head_out,
        };
        let a = [n as i32, self.vocab as i32, self.chunk as i32];
        let blocks = (n * self.vocab).div_ceil(256).clamp(1, cx.sm_count as usize * 8);
        let mut lb = cx.launch("vocab_assemble");
        lb.arg(parts).arg(logits).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { lb.launch(lc(blocks, 1, 1, 256)) }?;
        Ok(())
    }
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

impl CudaBackend {
    /// Rank `slices.rank` of `plan` on GPU `opts.ordinal`: `weights` are the rank's
    /// slices (`model::shard::load_rank`), `routers` every layer's full router
    /// (`model::shard::device::load_routers`), `full` the whole model's config.
    /// Attach the rank's collectives ([`attach_comm`](Self::attach_comm)) before a step.
    pub fn new_rank(
        weights: &ModelWeights,
        routers: &[Option<Linear>],
        full: &ModelConfig,
        plan: ShardPlan,
        slices: RankSlices,
        opts: CudaBackendOptions,
    ) -> Result<Self, BackendError> {
        check_cuda_plan(&plan, full).map_err(plan_err)?;
        let local = plan.local_config(full, &slices);
        let (got, want) = (&weights.config, &local);
        let experts = |c: &ModelConfig| c.moe.as_ref().map(|m| (m.num_experts, m.expert_intermediate));
        if (got.num_heads, got.num_kv_heads, got.vocab_size, experts(got)) != (want.num_heads, want.num_kv_heads, want.vocab_size, experts(want)) {
            return Err(BackendError::Unsupported(format!(
                "rank {}: the weights are not this rank's slices of the plan (load them with model::shard::load_rank)",
                slices.rank
            )));
        }
        let mut bk = Self::new(weights, opts)?;
        let h = full.hidden_size;
        let mut extra = 0usize;
        for (li, l) in bk.w.layers.iter_mut().enumerate() {
            let DMlp::Moe { router, router_bias, .. } = &mut l.mlp else { continue };
            let r = routers.get(li).and_then(Option::as_ref);
            let e = full.moe.as_ref().map_or(0, |m| m.num_experts);
            let Some(r) = r.filter(|r| (r.weight.rows(), r.weight.cols()) == (e, h)) else {
                return Err(BackendError::Unsupported(format!("layer {li}: a full router of {e} x {h} is needed on every rank")));
            };
            let bits = bf16_bits(&r.weight.to_f32());
            extra += 2 * bits.len().saturating_sub(router.len());
            *router = bk.cx.up(&bits).map_err(dev)?;
            *router_bias = match &r.bias {
                Some(b) => Some(bk.cx.up(b).map_err(dev)?),
                None => None,
            };
        }
        bk.w.bytes += extra;
        bk.into_rank(full, plan, slices)
    }

    /// Random weights of rank `rank`'s slices of `full` (benchmarks); the full
    /// routers are the same on every rank (seeded by layer). Expert down biases are
    /// not zeroed on the ranks that do not own them: the numbers are meaningless,
    /// the bytes read and the launches are those of the real rank.
    pub fn random_rank(full: &ModelConfig, plan: ShardPlan, rank: usize, opts: CudaBackendOptions, seed: u64) -> Result<Self, BackendError> {
        check_cuda_plan(&plan, full).map_err(plan_err)?;
        let slices = plan.slices(full, rank).map_err(plan_err)?;
        let local = plan.local_config(full, &slices);
        let mut bk = Self::random(&local, opts, seed.wrapping_add(0x1_0000 * rank as u64))?;
        let h = full.hidden_size;
        let mut extra = 0usize;
        if let Some(m) = &full.moe {
            let e = m.num_experts;
            for (li, l) in bk.w.layers.iter_mut().enumerate() {
                let DMlp::Moe { router, router_bias, .. } = &mut l.mlp else { continue };
                extra += 2 * (e * h).saturating_sub(router.len());
                *router = bk.cx.fill_bf16(e * h, seed ^ (0x5eed_0000 + li as u64), 0.02, 0.0).map_err(dev)?;
                if router_bias.is_some() {
                    let bias: Vec<f32> = (0..e).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.01).collect();
                    *router_bias = Some(bk.cx.up(&bias).map_err(dev)?);
                }
            }
        }
        bk.w.bytes += extra;
        bk.into_rank(full, plan, slices)
    }

    /// Turns a backend built from a rank's local config into that rank: router and
    /// logits buffers of the full expert count and vocabulary, and the rank's buffers.
    fn into_rank(mut self, full: &ModelConfig, plan: ShardPlan, slices: RankSlices) -> Result<Self, BackendError> {
        let t = self.max_tok;
        let vocab = full.vocab_size;
        let chunk = plan.vocab_chunk(vocab);
        let k = full.moe.as_ref().map_or(1, |m| m.top_k);
        let experts_local = self.cfg.moe.as_ref().map_or(0, |m| m.num_experts);
        let st = self.cx.stream.clone();
        self.b.logits = st.alloc_zeros::<f32>(t * vocab).map_err(drv)?;
        if let Some(m) = &full.moe {
            self.b.rlogits = st.alloc_zeros::<f32>(t * m.num_experts).map_err(drv)?;
        }
        let shard = ShardState {
            plan,
            slices,
            vocab,
            chunk,
            experts_local,
            tid_local: st.alloc_zeros::<i32>(t * k).map_err(drv)?,
            head_out: st.alloc_zeros::<f32>(t * chunk).map_err(drv)?,
            gathered: st.alloc_zeros::<f32>(plan.ranks * t * chunk).map_err(drv)?,
        };
        st.synchronize().map_err(drv)?;
        // The step sizes the router, top-k and logits by the config: the whole model's
        // expert count and vocabulary (heads, widths and KV heads stay the rank's).
        self.cfg.vocab_size = vocab;
        if let (Some(m), Some(fm)) = (self.cfg.moe.as_mut(), full.moe.as_ref()) {
            m.num_experts = fm.num_experts;
        }
        self.shard = Some(shard);
        self.graphs.clear();
        Ok(self)
    }

    /// Attaches the collectives of this backend's world: a world of one for a
    /// backend holding the whole model, the plan's world (as this rank) for a
    /// rank. A communicator that cannot be captured (host-staged) turns the
    /// decode graphs off.
    pub fn attach_comm(&mut self, comm: Box<dyn DeviceComm>) -> Result<(), BackendError> {
        let (ranks, rank) = self.shard.as_ref().map_or((1, 0), |s| (s.plan.ranks, s.slices.rank));
        if comm.world() != ranks || comm.rank() != rank {
            return Err(BackendError::Unsupported(format!(
                "a communicator for rank {} of {} does not fit this backend (rank {rank} of {ranks}; a backend holding the whole model takes a world of 1, a rank of a sharded model its plan's world)",
                comm.rank(),
                comm.world()
            )));
        }
        if !comm.capturable() {
            self.use_graphs = false;
        }
        self.comm = Some(comm);
        self.graphs.clear();
        Ok(())
    }

    /// The plan and slices of a rank of a sharded model (`None`: the whole model).
    pub fn shard(&self) -> Option<(ShardPlan, &RankSlices)> {
        self.shard.as_ref().map(|s| (s.plan, &s.slices))
    }
}
