//! One simulated rank: a `CpuBackend` over the rank's slice of the weights
//! (its heads, KV heads and KV cache, MLP rows, experts, vocabulary rows),
//! driven layer by layer with the collectives between the slices.

use std::sync::Arc;

use super::moe::{expert_parallel, ExpertLayout};
use crate::backend::collectives::{Collectives, CommError};
use crate::backend::cpu::matmul::matmul;
use crate::backend::cpu::moe::gated_mlp;
use crate::backend::cpu::{ops, CpuBackend};
use crate::backend::{BackendError, Chunk, LogitsFor};
use crate::model::config::ModelConfig;
use crate::model::family::{Mlp, ModelWeights};
use crate::model::shard::{RankSlices, ShardPlan};

pub struct Rank {
    pub slices: RankSlices,
    pub cpu: CpuBackend,
}

fn comm_err(e: CommError) -> BackendError {
    BackendError::Device(format!("collective: {e}"))
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl Rank {
    pub fn new(slices: RankSlices, weights: ModelWeights) -> Self {
        Self { slices, cpu: CpuBackend::new(Arc::new(weights)) }
    }

    pub fn weights(&self) -> &Arc<ModelWeights> {
        self.cpu.weights()
    }

    /// One forward step of this rank; every rank returns the same full logits.
    pub fn forward<C: Collectives<Buf = [f32]>>(
        &mut self,
        comm: &C,
        plan: &ShardPlan,
        full: &ModelConfig,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
    ) -> Result<Vec<f32>, BackendError> {
        let starts = self.cpu.step_starts(chunks)?;
        let w = Arc::clone(self.cpu.weights());
        let c = &w.config;
        let hdim = c.hidden_size;
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        // Embedding: each rank fills the rows of its vocabulary range, the sum completes them.
        let mut x = vec![0f32; n * hdim];
        for (row, &id) in x.chunks_mut(hdim).zip(chunks.iter().flat_map(|ch| ch.tokens.iter())) {
            let id = id as usize;
            if self.slices.vocab.contains(&id) {
                w.embed.row_into(id - self.slices.vocab.start, row);
            }
        }
        if plan.ranks > 1 {
            comm.all_reduce_sum(&mut x).map_err(comm_err)?;
        }
        let mut h = vec![0f32; x.len()];
        for (li, layer) in w.layers.iter().enumerate() {
            ops::rmsnorm(&x, &layer.input_norm, c.rms_norm_eps, &mut h);
            let mut o = self.cpu.attention(li, &h, chunks, &starts);
            if plan.tp > 1 {
                comm.all_reduce_sum(&mut o).map_err(comm_err)?;
            }
            add(&mut x, &o);
            ops::rmsnorm(&x, &layer.post_attention_norm, c.rms_norm_eps, &mut h);
            let m = match &layer.mlp {
                Mlp::Dense(mlp) => {
                    let mut m = gated_mlp(mlp, c.activation, &h, n);
                    if plan.tp > 1 {
                        comm.all_reduce_sum(&mut m).map_err(comm_err)?;
                    }
                    m
                }
                Mlp::Moe(block) => {
                    let moe = full.moe.as_ref().ok_or_else(|| BackendError::Unsupported("MoE layer without an MoE config".into()))?;
                    let lay = ExpertLayout { plan, slices: &self.slices, moe };
                    expert_parallel(block, c, &lay, comm, &h, n).map_err(comm_err)?
                }
            };
            add(&mut x, &m);
        }
        self.cpu.commit_step(chunks)?;
        let picked = pick_rows(x, chunks, which, hdim);
        let rows = picked.len() / hdim;
        let mut normed = vec![0f32; picked.len()];
        ops::rmsnorm(&picked, &w.final_norm, c.rms_norm_eps, &mut normed);
        self.gather_logits(comm, plan, full.vocab_size, &normed, rows)
    }

    /// This rank's vocabulary columns of the logits, all-gathered into full rows.
    fn gather_logits<C: Collectives<Buf = [f32]>>(
        &self,
        comm: &C,
        plan: &ShardPlan,
        vocab: usize,
        normed: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let w = self.cpu.weights();
        let vl = self.slices.vocab.len();
        let mut local = vec![0f32; rows * vl];
        matmul(w.lm_head(), normed, rows, &mut local);
        let chunk = plan.vocab_chunk(vocab);
        let mut padded = vec![0f32; rows * chunk];
        for r in 0..rows {
            padded[r * chunk..r * chunk + vl].copy_from_slice(&local[r * vl..(r + 1) * vl]);
        }
        let mut all = vec![0f32; plan.ranks * rows * chunk];
        comm.all_gather(&padded, &mut all).map_err(comm_err)?;
        let mut logits = vec![0f32; rows * vocab];
        for src in 0..plan.ranks {
            let range = plan.vocab_range(vocab, src);
            for r in 0..rows {
                let from = src * rows * chunk + r * chunk;
                logits[r * vocab + range.start..r * vocab + range.end].copy_from_slice(&all[from..from + range.len()]);
            }
        }
        Ok(logits)
    }
}

/// The hidden rows the caller wants logits for (as `CpuBackend::forward` picks them).
fn pick_rows(x: Vec<f32>, chunks: &[Chunk<'_>], which: LogitsFor, hdim: usize) -> Vec<f32> {
    match which {
        LogitsFor::All => x,
        LogitsFor::Last => {
            let mut out = Vec::with_capacity(chunks.len() * hdim);
            let mut end = 0;
            for ch in chunks {
                end += ch.tokens.len();
                if !ch.tokens.is_empty() {
                    out.extend_from_slice(&x[(end - 1) * hdim..end * hdim]);
                }
            }
            out
        }
    }
}
