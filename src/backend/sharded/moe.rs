//! Expert parallelism on one rank: route the rank's home tokens, dispatch
//! their rows to the ranks holding the chosen experts (all-to-all), run the
//! local experts, send the results back (all-to-all) and combine them in the
//! order the single-device block uses (experts ascending, `out += w·y`).
//!
//! Home tokens: rank `r` routes and combines tokens `[r·n/N, (r+1)·n/N)`; the
//! combined rows are all-gathered so every rank continues with the full batch.
//! An expert split over several ranks (width slices) sends the row to each of
//! them and sums their partial outputs in rank order.

use std::ops::Range;

use crate::backend::collectives::{Collectives, CommError};
use crate::backend::cpu::matmul::linear;
use crate::backend::cpu::moe::{gated_mlp, route};
use crate::model::config::{ModelConfig, MoeConfig};
use crate::model::family::Moe;
use crate::model::shard::{RankSlices, ShardPlan};

/// Rows `[r·n/N, (r+1)·n/N)` of `n`, for rank `r` of `world`.
pub fn home_rows(n: usize, world: usize, r: usize) -> Range<usize> {
    r * n / world..(r + 1) * n / world
}

/// Everything a rank needs to know about its place in the expert layout.
pub struct ExpertLayout<'a> {
    pub plan: &'a ShardPlan,
    pub slices: &'a RankSlices,
    /// The full model's MoE config (all experts).
    pub moe: &'a MoeConfig,
}

impl ExpertLayout<'_> {
    fn per_group(&self) -> usize {
        self.moe.num_experts / self.plan.ep
    }

    /// The ranks that hold (a width slice of) expert `e`.
    fn owners(&self, e: usize) -> Range<usize> {
        let split = self.plan.expert_split();
        let g = e / self.per_group();
        g * split..(g + 1) * split
    }
}

/// Router logits of all `n` tokens over all experts: each rank scores its own
/// experts, an all-gather assembles the rows (one representative per expert group).
fn router_logits<C: Collectives<Buf = [f32]>>(block: &Moe, lay: &ExpertLayout, comm: &C, x: &[f32], n: usize) -> Result<Vec<f32>, CommError> {
    let local = linear(&block.router, x, n);
    let (e, el, world) = (lay.moe.num_experts, lay.per_group(), comm.world());
    let mut all = vec![0f32; world * local.len()];
    comm.all_gather(&local, &mut all)?;
    let mut full = vec![0f32; n * e];
    for g in 0..lay.plan.ep {
        let src = &all[g * lay.plan.expert_split() * n * el..];
        for t in 0..n {
            full[t * e + g * el..t * e + (g + 1) * el].copy_from_slice(&src[t * el..(t + 1) * el]);
        }
    }
    Ok(full)
}

/// The MoE block of one rank: `x` is the full normed batch `[n, hidden]`
/// (identical on every rank); returns the block's output for the full batch.
pub fn expert_parallel<C: Collectives<Buf = [f32]>>(
    block: &Moe,
    local: &ModelConfig,
    lay: &ExpertLayout,
    comm: &C,
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>, CommError> {
    let h = local.hidden_size;
    let (world, me) = (comm.world(), comm.rank());
    let logits = router_logits(block, lay, comm, x, n)?;
    let e_all = lay.moe.num_experts;

    // Dispatch: one row [expert id, x...] per (home token, chosen expert, owner rank).
    let home = home_rows(n, world, me);
    let mut routes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(home.len());
    let mut outgoing: Vec<Vec<f32>> = vec![Vec::new(); world];
    for t in home.clone() {
        let mut chosen = route(&logits[t * e_all..(t + 1) * e_all], lay.moe.top_k, lay.moe.router);
        chosen.sort_by_key(|&(e, _)| e);
        for &(e, _) in &chosen {
            for d in lay.owners(e) {
                outgoing[d].push(e as f32);
                outgoing[d].extend_from_slice(&x[t * h..(t + 1) * h]);
            }
        }
        routes.push(chosen);
    }
    let send_counts: Vec<usize> = outgoing.iter().map(Vec::len).collect();
    let recv_counts = exchange_counts(comm, &send_counts)?;
    let send: Vec<f32> = outgoing.concat();
    let mut recv = vec![0f32; recv_counts.iter().sum()];
    comm.all_to_all(&send, &send_counts, &mut recv, &recv_counts)?;

    // Run the local experts on what arrived, each expert's rows in one batch.
    let items: Vec<(usize, &[f32])> = recv.chunks_exact(h + 1).map(|r| (r[0] as usize, &r[1..])).collect();
    let mut results = vec![0f32; items.len() * h];
    for (le, expert) in block.experts.iter().enumerate() {
        let e = lay.slices.experts.start + le;
        let mine: Vec<usize> = (0..items.len()).filter(|&i| items[i].0 == e).collect();
        if mine.is_empty() {
            continue;
        }
        let xs: Vec<f32> = mine.iter().flat_map(|&i| items[i].1.iter().copied()).collect();
        let y = gated_mlp(expert, local.activation, &xs, mine.len());
        for (j, &i) in mine.iter().enumerate() {
            results[i * h..(i + 1) * h].copy_from_slice(&y[j * h..(j + 1) * h]);
        }
    }

    // Combine: results go back to their home ranks in the order they came.
    let back_send: Vec<usize> = recv_counts.iter().map(|c| c / (h + 1) * h).collect();
    let back_recv: Vec<usize> = send_counts.iter().map(|c| c / (h + 1) * h).collect();
    let mut back = vec![0f32; back_recv.iter().sum()];
    comm.all_to_all(&results, &back_send, &mut back, &back_recv)?;
    let mut offsets: Vec<usize> = back_recv.iter().scan(0, |acc, c| { let o = *acc; *acc += c; Some(o) }).collect();
    let chunk = n.div_ceil(world);
    let mut mine = vec![0f32; chunk * h];
    let mut y = vec![0f32; h];
    for (j, chosen) in routes.iter().enumerate() {
        let out = &mut mine[j * h..(j + 1) * h];
        for &(e, w) in chosen {
            for (k, d) in lay.owners(e).enumerate() {
                let part = &back[offsets[d]..offsets[d] + h];
                if k == 0 {
                    y.copy_from_slice(part);
                } else {
                    for (a, b) in y.iter_mut().zip(part) {
                        *a += b;
                    }
                }
                offsets[d] += h;
            }
            for (o, v) in out.iter_mut().zip(&y) {
                *o += w * v;
            }
        }
    }

    // Every rank continues with the whole batch.
    let mut gathered = vec![0f32; world * chunk * h];
    comm.all_gather(&mine, &mut gathered)?;
    let mut full = vec![0f32; n * h];
    for r in 0..world {
        let rows = home_rows(n, world, r);
        full[rows.start * h..rows.end * h].copy_from_slice(&gathered[r * chunk * h..(r * chunk + rows.len()) * h]);
    }
    Ok(full)
}

/// How many values each rank will receive from each other rank.
fn exchange_counts<C: Collectives<Buf = [f32]>>(comm: &C, send_counts: &[usize]) -> Result<Vec<usize>, CommError> {
    let world = comm.world();
    // Counts travel as f32 (exact below 2^24 values per peer and step).
    let mine: Vec<f32> = send_counts.iter().map(|&c| c as f32).collect();
    let mut all = vec![0f32; world * world];
    comm.all_gather(&mine, &mut all)?;
    Ok((0..world).map(|s| all[s * world + comm.rank()] as usize).collect())
}

#[cfg(test)]
mod tests {
    use super::home_rows;

    #[test]
    fn home_rows_partition_the_batch() {
        for (n, w) in [(1, 4), (5, 4), (8, 8), (3, 2)] {
            let all: Vec<usize> = (0..w).flat_map(|r| home_rows(n, w, r)).collect();
            assert_eq!(all, (0..n).collect::<Vec<_>>());
        }
    }
}
