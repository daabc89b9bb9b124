//! `kairos bench decode --nccl-ranks N` for N > 1: the decode benchmark of
//! [`super::decode`] with each shape sharded over GPUs 0..N: one `CudaBackend`
//! per GPU holding random weights of its rank's slices only
//! ([`CudaBackend::random_rank`]), one NCCL communicator per GPU on the backend's
//! stream, one thread per rank replaying its own decode graph (the all-reduces
//! and the logits all-gather are inside the graphs). The plan is
//! [`bench_plan`]: tp = N when the heads allow it, ep = N when the experts do.
//!
//! Times are the slowest rank's. Bytes per step are what ONE GPU must read: its
//! slices of the dense weights, the full router, its experts that a batch of B
//! touches (E_rank·(1−(1−k/E)^B)), its vocabulary rows and its KV heads; the
//! roofline fraction divides by rank 0's copy bandwidth. `--model` (a real
//! checkpoint) is not sharded here yet.

use std::sync::Barrier;
use std::time::Instant;

use super::decode::{bytes_per_step, copy_bandwidth, shape_config, DecodeBenchOptions, DecodeReport, DecodeRow};
use crate::backend::cuda::model::{CudaBackend, CudaBackendOptions};
use crate::backend::cuda::sharded::join_nccl;
use crate::backend::{Backend, Chunk};
use crate::model::shard::device::bench_plan;
use crate::model::ModelConfig;

/// (weight bytes, KV bytes) one rank reads per decode step: `bytes_per_step` of the
/// rank's local config, with its MoE part corrected to the full router and to
/// local experts chosen among all E.
fn rank_bytes_per_step(full: &ModelConfig, local: &ModelConfig, batch: usize, context: usize) -> (f64, f64) {
    let (mut w, kv) = bytes_per_step(local, batch, context);
    if let (Some(fm), Some(lm)) = (&full.moe, &local.moe) {
        let h = full.hidden_size as f64;
        let (e, el, k) = (fm.num_experts as f64, lm.num_experts as f64, fm.top_k as f64);
        let expert = 3.0 * h * lm.expert_intermediate as f64 * 17.0 / 32.0;
        let counted = el * h * 2.0 + el * (1.0 - (1.0 - k / el).powi(batch as i32)) * expert;
        let actual = e * h * 2.0 + el * (1.0 - (1.0 - k / e).powi(batch as i32)) * expert;
        let moe_layers = (0..full.num_layers).filter(|&l| full.is_moe_layer(l)).count() as f64;
        w += moe_layers * (actual - counted);
    }
    (w, kv)
}

/// One rank's benchmark loop (the same steps on every rank): per (batch, context),
/// (host-visible step seconds, graph-only step seconds).
fn rank_loop(bk: &mut CudaBackend, o: &DecodeBenchOptions, max_b: usize, barrier: &Barrier) -> Result<Vec<(f64, f64)>, String> {
    let be = |e: crate::backend::BackendError| e.to_string();
    bk.context().ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
    let seqs: Vec<_> = (0..max_b).map(|_| bk.new_sequence()).collect();
    let mut out = Vec::new();
    for &b in &o.batches {
        for &ctx in &o.contexts {
            let mut toks: Vec<u32> = (0..b as u32).map(|i| 1 + i).collect();
            let step = |bk: &mut CudaBackend, toks: &mut Vec<u32>| -> Result<(), String> {
                let ch: Vec<Chunk> = (0..b).map(|i| Chunk { seq: seqs[i], tokens: std::slice::from_ref(&toks[i]) }).collect();
                *toks = bk.decode_argmax(&ch).map_err(be)?;
                Ok(())
            };
            for &s in &seqs[..b] {
                bk.bench_set_len(s, ctx).map_err(be)?;
            }
            for _ in 0..3 {
                step(bk, &mut toks)?;
            }
            for &s in &seqs[..b] {
                bk.bench_set_len(s, ctx).map_err(be)?;
            }
            barrier.wait();
            let t = Instant::now();
            for _ in 0..o.steps {
                step(bk, &mut toks)?;
            }
            let step_s = t.elapsed().as_secs_f64() / o.steps as f64;
            barrier.wait();
            let t = Instant::now();
            bk.replay_decode_graph(b.next_power_of_two(), o.steps).map_err(be)?;
            out.push((step_s, t.elapsed().as_secs_f64() / o.steps as f64));
        }
    }
    Ok(out)
}

pub fn run(o: &DecodeBenchOptions) -> Result<DecodeReport, String> {
    let be = |e: crate::backend::BackendError| e.to_string();
    let n = o.nccl_ranks;
    let visible = crate::backend::cuda::device_count();
    if visible < n {
        return Err(format!("--nccl-ranks {n}: one GPU per rank is needed and {visible} are visible"));
    }
    if o.model.is_some() {
        return Err(format!("--nccl-ranks {n} with --model: a real checkpoint is not sharded by the benchmark yet (random weights of each rank's slices only)"));
    }
    let mut report = DecodeReport { device: String::new(), copy_gbps: 0.0, resident_weight_bytes: Vec::new(), prefill: Vec::new(), fused: o.fused, moe_q8: o.moe_q8, rows: Vec::new() };
    let max_b = o.batches.iter().copied().max().unwrap_or(1);
    let max_ctx = o.contexts.iter().copied().max().unwrap_or(128);
    for name in &o.shapes {
        let cfg = shape_config(name)?;
        let plan = bench_plan(&cfg, n).map_err(|e| format!("{name} over {n} GPUs: {e}"))?;
        let opts = |ordinal: usize| CudaBackendOptions {
            ordinal,
            max_context: Some(max_ctx + o.steps + 16),
            initial_slots: max_b,
            max_step_tokens: max_b.next_power_of_two().max(8),
            graphs: true,
            fused: o.fused,
            moe_q8: o.moe_q8,
            pdl: None,
            ..CudaBackendOptions::default()
        };
        let mut ranks = (0..n).map(|r| CudaBackend::random_rank(&cfg, plan, r, opts(r), o.seed)).collect::<Result<Vec<_>, _>>().map_err(be)?;
        join_nccl(&mut ranks).map_err(be)?;
        if report.device.is_empty() {
            ranks[0].context().ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
            report.device = format!("{} x{n}", ranks[0].context().name);
            report.copy_gbps = copy_bandwidth(ranks[0].context())?;
        }
        let label = format!("{name} [{n} GPUs, tp {} ep {}, per GPU]", plan.tp, plan.ep);
        report.resident_weight_bytes.push((label.clone(), ranks[0].weight_bytes()));
        let barrier = Barrier::new(n);
        let per_rank: Vec<Result<Vec<(f64, f64)>, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter_mut().map(|bk| {
                let barrier = &barrier;
                s.spawn(move || rank_loop(bk, o, max_b, barrier))
            }).collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank thread panicked".into()))).collect()
        });
        let per_rank = per_rank.into_iter().collect::<Result<Vec<_>, _>>()?;
        let slices = plan.slices(&cfg, 0).map_err(|e| e.to_string())?;
        let local = plan.local_config(&cfg, &slices);
        let mut i = 0;
        for &b in &o.batches {
            for &ctx in &o.contexts {
                let step_s = per_rank.iter().map(|r| r[i].0).fold(0f64, f64::max);
                let graph_s = per_rank.iter().map(|r| r[i].1).fold(0f64, f64::max);
                i += 1;
                let (wb, kvb) = rank_bytes_per_step(&cfg, &local, b, ctx + o.steps / 2);
                report.rows.push(DecodeRow::measured(&label, b, ctx, step_s, graph_s, wb, kvb, report.copy_gbps));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shard::ShardPlan;

    #[test]
    fn one_rank_reads_what_the_whole_model_reads() {
        let c = shape_config("qwen3-30b-a3b").unwrap();
        let plan = ShardPlan::single();
        let local = plan.local_config(&c, &plan.slices(&c, 0).unwrap());
        for b in [1, 4, 16] {
            let (w, kv) = rank_bytes_per_step(&c, &local, b, 128);
            let (fw, fkv) = bytes_per_step(&c, b, 128);
            assert!((w - fw).abs() <= 1e-9 * fw && kv == fkv, "batch {b}");
        }
    }

    #[test]
    fn expert_parallel_ranks_split_the_expert_bytes() {
        // 8 ranks, whole experts: each rank reads the full router and 1/8 of the
        // expected distinct experts; attention, KV heads and vocabulary split 8 ways.
        let c = shape_config("qwen3-30b-a3b").unwrap();
        let plan = bench_plan(&c, 8).unwrap();
        assert_eq!((plan.tp, plan.ep), (8, 8));
        let local = plan.local_config(&c, &plan.slices(&c, 0).unwrap());
        let (w, _) = rank_bytes_per_step(&c, &local, 1, 128);
        let (h, l) = (2048f64, 48f64);
        let router = 128.0 * h * 2.0;
        let experts = 128.0 / 8.0 * (1.0 - (1.0 - 8.0 / 128.0f64)) * 3.0 * h * 768.0 * 17.0 / 32.0;
        let attention = ((4.0 + 2.0 * 1.0) * 128.0 * h + h * 4.0 * 128.0) * 2.0 + 4.0 * h + 4.0 * 128.0;
        let want = l * (router + experts + attention) + 151936.0 / 8.0 * h * 2.0 + h * 2.0 + h * 2.0;
        assert!((w - want).abs() <= 1e-9 * want, "{w} vs {want}");
    }
}
