//! `kairos bench decode`: decode throughput of the CUDA backend on random
//! weights of real model shapes, against the HBM roofline measured in the
//! same run.
//!
//! For each shape, batch and starting context: `batch` sequences whose KV
//! length is set to the context (the cache holds whatever the slots held:
//! attention reads the same bytes), 3 warm-up steps (they capture the
//! bucket's CUDA graph), then `steps` greedy steps through
//! [`CudaBackend::decode_argmax`] (upload 4 small arrays, replay the graph,
//! read back the ids: one host sync per step, as the engine pays), and the
//! same graph replayed `steps` times back to back (GPU time alone).
//!
//! Bytes per step are the fewest a step must read: every dense weight once,
//! the router, the distinct experts a batch of B tokens is expected to touch,
//! E·(1−(1−k/E)^B) per layer, lm_head, the embedding rows, and the KV cache
//! (B · context · layers · 2 · kv_heads · head_dim bf16). The roofline
//! fraction divides bytes/step-time by the device-to-device copy bandwidth
//! measured first (read + write bytes of a 1 GiB copy), so a read-only stream
//! can exceed 100%.

use std::time::Instant;

use serde::Serialize;

use crate::backend::cuda::model::{CudaBackend, CudaBackendOptions};
use crate::backend::cuda::CudaContext;
use crate::backend::{Backend, Chunk, LogitsFor};
use crate::model::ModelConfig;

#[derive(Debug, Clone)]
pub struct DecodeBenchOptions {
    /// Shape names (see [`shape_config`]).
    pub shapes: Vec<String>,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    /// Timed steps per (shape, batch, context).
    pub steps: usize,
    pub ordinal: usize,
    pub seed: u64,
    /// Fused launches in the step (see `CudaBackendOptions::fused`).
    pub fused: bool,
    /// int8-activation MoE experts (see `CudaBackendOptions::moe_q8`).
    pub moe_q8: bool,
    /// A real checkpoint (HF folder or GGUF) benchmarked after the random shapes,
    /// under its file name.
    pub model: Option<std::path::PathBuf>,
    /// `model` upcycled into identical experts (an MoE with the dense model's logits).
    pub upcycle: Option<crate::model::upcycle::Upcycle>,
    /// GPUs of an NCCL world to spread the model over: 0 = no communicator, 1 = the
    /// NCCL path on one GPU (all-reduces in the graph), N > 1 = each shape sharded
    /// over GPUs 0..N, one rank per GPU (`decode_ranks.rs`).
    pub nccl_ranks: usize,
    /// Time a 512-token prefill per shape (off: only decode steps run, e.g. under a
    /// kernel profiler that should see the decode graph's kernels first).
    pub prefill: bool,
}

impl Default for DecodeBenchOptions {
    fn default() -> Self {
        Self {
            shapes: vec!["smollm2-135m".into(), "qwen3-30b-a3b".into()],
            batches: vec![1, 4, 16],
            contexts: vec![128, 2048],
            steps: 50,
            ordinal: 0,
            seed: 1,
            fused: true,
            moe_q8: true,
            model: None,
            upcycle: None,
            nccl_ranks: 0,
            prefill: true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub shape: String,
    pub batch: usize,
    pub context: usize,
    /// Host-visible step: upload, graph replay, ids back (ms).
    pub step_ms: f64,
    /// Graph replays back to back, no host round trip (ms per step).
    pub graph_step_ms: f64,
    pub tokens_per_s: f64,
    pub weight_bytes_per_step: f64,
    pub kv_bytes_per_step: f64,
    pub bytes_per_step: f64,
    /// bytes_per_step / step time (GB/s), host-visible step.
    pub achieved_gbps: f64,
    /// achieved_gbps / copy_gbps.
    pub roofline_frac: f64,
    /// Same with the graph-only step time.
    pub graph_roofline_frac: f64,
}

impl DecodeRow {
    /// A row from measured step times (s) and the bytes a step must read.
    #[allow(clippy::too_many_arguments)]
    pub fn measured(shape: &str, batch: usize, context: usize, step_s: f64, graph_s: f64, wb: f64, kvb: f64, copy_gbps: f64) -> Self {
        let bytes = wb + kvb;
        let gbps = bytes / step_s / 1e9;
        DecodeRow {
            shape: shape.to_string(),
            batch,
            context,
            step_ms: step_s * 1e3,
            graph_step_ms: graph_s * 1e3,
            tokens_per_s: batch as f64 / step_s,
            weight_bytes_per_step: wb,
            kv_bytes_per_step: kvb,
            bytes_per_step: bytes,
            achieved_gbps: gbps,
            roofline_frac: gbps / copy_gbps,
            graph_roofline_frac: bytes / graph_s / 1e9 / copy_gbps,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub device: String,
    /// Device-to-device copy, read + write bytes per second (GB/s).
    pub copy_gbps: f64,
    pub resident_weight_bytes: Vec<(String, usize)>,
    /// One sequence's prompt through `forward` (eager micro-batches of `max_step_tokens`
    /// rows; dense weights via cuBLAS when available): (shape, prompt tokens, tokens/s).
    pub prefill: Vec<(String, usize, f64)>,
    pub fused: bool,
    pub moe_q8: bool,
    pub rows: Vec<DecodeRow>,
}

/// Model configs of the benchmark shapes: `qwen3-30b-a3b` (48 layers, hidden 2048,
/// 32 q / 4 kv heads of 128, 128 experts top-8 of width 768 in MXFP4, vocab 151936)
/// and `smollm2-135m` (30 layers, hidden 576, 9 / 3 heads of 64, MLP 1536, vocab 49152, tied).
pub fn shape_config(name: &str) -> Result<ModelConfig, String> {
    // a path to an HF config.json (e.g. configs/models/kimi-k2-gqa.json) is a shape too
    if name.ends_with(".json") {
        let text = std::fs::read_to_string(name).map_err(|e| format!("bench shape {name}: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("bench shape {name}: {e}"))?;
        return ModelConfig::from_hf_json(&v).map_err(|e| format!("bench shape {name}: {e}"));
    }
    let v = match name {
        "qwen3-30b-a3b" => serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "vocab_size": 151936,
            "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8,
            "moe_intermediate_size": 768, "norm_topk_prob": true, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": false
        }),
        "smollm2-135m" => serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
            "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
            "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "tie_word_embeddings": true
        }),
        // gpt-oss-20b as published: 24 layers alternating sliding (128) / full attention,
        // sinks, q/k/v/o/router/expert biases, 32 experts top-4 of width 2880, YaRN.
        "gpt-oss-20b" => serde_json::json!({
            "model_type": "gpt_oss", "hidden_size": 2880, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "num_hidden_layers": 24, "vocab_size": 201088,
            "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
            "experts_per_token": 4, "sliding_window": 128, "attention_bias": true,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                "sliding_attention", "full_attention", "sliding_attention", "full_attention",
                "sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096},
            "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": false,
            "swiglu_limit": 7.0
        }),
        other => return Err(format!("unknown bench shape {other:?}: use qwen3-30b-a3b, gpt-oss-20b or smollm2-135m")),
    };
    ModelConfig::from_hf_json(&v).map_err(|e| format!("bench shape {name}: {e}"))
}

/// (weight bytes, KV bytes) a decode step of `batch` tokens at `context` must read.
pub fn bytes_per_step(c: &ModelConfig, batch: usize, context: usize) -> (f64, f64) {
    let (h, hd) = (c.hidden_size as f64, c.head_dim as f64);
    let (nq, nkv) = (c.num_heads as f64, c.num_kv_heads as f64);
    let mut w = c.vocab_size as f64 * h * 2.0 + batch as f64 * h * 2.0 + h * 2.0;
    for li in 0..c.num_layers {
        w += ((nq + 2.0 * nkv) * hd * h + h * nq * hd) * 2.0 + 4.0 * h;
        if c.qk_norm {
            w += 4.0 * hd;
        }
        match (&c.moe, c.is_moe_layer(li)) {
            (Some(m), true) => {
                let (e, k) = (m.num_experts as f64, m.top_k as f64);
                let distinct = e * (1.0 - (1.0 - k / e).powi(batch as i32));
                w += e * h * 2.0 + distinct * 3.0 * h * m.expert_intermediate as f64 * 17.0 / 32.0;
            }
            _ => w += 3.0 * h * c.intermediate_size as f64 * 2.0,
        }
    }
    // sliding-window layers read at most `window` positions
    let positions: f64 = (0..c.num_layers)
        .map(|li| match c.layer_attention.get(li) {
            Some(crate::model::config::AttentionKind::Sliding(w)) => context.min(*w) as f64,
            _ => context as f64,
        })
        .sum();
    let kv = batch as f64 * positions * 2.0 * nkv * hd * 2.0;
    (w, kv)
}

/// Device-to-device copy bandwidth (read + write bytes, GB/s) of a 1 GiB buffer.
pub fn copy_bandwidth(cx: &CudaContext) -> Result<f64, String> {
    let e = |e: cudarc::driver::DriverError| format!("copy bandwidth: {e:?}");
    let n = 1usize << 30;
    let a = cx.stream.alloc_zeros::<u8>(n).map_err(e)?;
    let mut b = cx.stream.alloc_zeros::<u8>(n).map_err(e)?;
    for _ in 0..3 {
        cx.stream.memcpy_dtod(&a, &mut b).map_err(e)?;
    }
    cx.stream.synchronize().map_err(e)?;
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        cx.stream.memcpy_dtod(&a, &mut b).map_err(e)?;
    }
    cx.stream.synchronize().map_err(e)?;
    Ok(2.0 * n as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9)
}

pub fn run(o: &DecodeBenchOptions) -> Result<DecodeReport, String> {
    let be = |e: crate::backend::BackendError| e.to_string();
    let mut report = DecodeReport { device: String::new(), copy_gbps: 0.0, resident_weight_bytes: Vec::new(), prefill: Vec::new(), fused: o.fused, moe_q8: o.moe_q8, rows: Vec::new() };
    if o.nccl_ranks > 1 {
        return super::decode_ranks::run(o);
    }
    let max_b = o.batches.iter().copied().max().unwrap_or(1);
    let max_ctx = o.contexts.iter().copied().max().unwrap_or(128);
    let mut runs: Vec<(String, Option<crate::model::family::ModelWeights>)> = Vec::new();
    for name in &o.shapes {
        runs.push((name.clone(), None));
    }
    if let Some(p) = &o.model {
        let m = crate::model::load_model_with(p, o.upcycle).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut name = p.file_name().map_or_else(|| p.display().to_string(), |f| f.to_string_lossy().into_owned());
        if let Some(u) = o.upcycle {
            name.push_str(&format!(" upcycled {u}"));
        }
        runs.push((name, Some(m.weights)));
    }
    for (name, real) in &runs {
        let cfg = match real {
            Some(w) => w.config.clone(),
            None => shape_config(name)?,
        };
        let opts = CudaBackendOptions {
            ordinal: o.ordinal,
            max_context: Some((max_ctx + o.steps + 16).max(PREFILL_TOKENS + 1)),
            initial_slots: max_b,
            max_step_tokens: max_b.next_power_of_two().max(8),
            graphs: true,
            fused: o.fused,
            moe_q8: o.moe_q8,
            pdl: None,
            ..CudaBackendOptions::default()
        };
        let mut bk = match real {
            Some(w) => CudaBackend::new(w, opts).map_err(be)?,
            None => CudaBackend::random(&cfg, opts, o.seed).map_err(be)?,
        };
        if o.nccl_ranks == 1 {
            use crate::backend::collectives::nccl::{new_id, NcclComm};
            let id = new_id().map_err(|e| e.to_string())?;
            let comm = NcclComm::join_on(bk.context().stream.clone(), 0, 1, id).map_err(|e| e.to_string())?;
            bk.attach_nccl(comm).map_err(be)?;
        }
        if report.device.is_empty() {
            report.device = bk.context().name.clone();
            report.copy_gbps = copy_bandwidth(bk.context())?;
        }
        report.resident_weight_bytes.push((name.clone(), bk.weight_bytes()));
        // prefill: a warm-up prompt, then the timed one, on sequences of their own
        let prompt: Vec<u32> = (0..PREFILL_TOKENS as u32).map(|i| 1 + (i * 7919) % (cfg.vocab_size as u32 - 1)).collect();
        if o.prefill {
            let mut prefill_s = 0.0;
            for timed in [false, true] {
                let s = bk.new_sequence();
                let t = Instant::now();
                bk.forward(&[Chunk { seq: s, tokens: &prompt }], LogitsFor::Last).map_err(be)?;
                if timed {
                    prefill_s = t.elapsed().as_secs_f64();
                }
                bk.free_sequence(s);
            }
            report.prefill.push((name.clone(), PREFILL_TOKENS, PREFILL_TOKENS as f64 / prefill_s));
        }
        let seqs: Vec<_> = (0..max_b).map(|_| bk.new_sequence()).collect();
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
                    step(&mut bk, &mut toks)?;
                }
                for &s in &seqs[..b] {
                    bk.bench_set_len(s, ctx).map_err(be)?;
                }
                let t = Instant::now();
                for _ in 0..o.steps {
                    step(&mut bk, &mut toks)?;
                }
                let step_s = t.elapsed().as_secs_f64() / o.steps as f64;
                let bucket = b.next_power_of_two();
                let t = Instant::now();
                bk.replay_decode_graph(bucket, o.steps).map_err(be)?;
                let graph_s = t.elapsed().as_secs_f64() / o.steps as f64;
                if let Some(prof) = bk.persistent_profile(bucket).map_err(be)? {
                    // KAIROS_CUDA_PK_PROFILE=1: the persistent step's time per kernel (stderr)
                    let total: f64 = prof.iter().map(|p| p.1).sum();
                    eprintln!("persistent step profile, {name} batch {b} context {ctx}: {:.1} us", total / 1e3);
                    for (k, ns, n) in &prof {
                        eprintln!("  {k:<28} {n:>4} x {:>7.2} us = {:>8.1} us ({:.1}%)", ns / 1e3 / *n as f64, ns / 1e3, 100.0 * ns / total);
                    }
                }
                let (wb, kvb) = bytes_per_step(&cfg, b, ctx + o.steps / 2);
                report.rows.push(DecodeRow::measured(name, b, ctx, step_s, graph_s, wb, kvb, report.copy_gbps));
            }
        }
    }
    Ok(report)
}

/// Prompt length of the prefill measurement.
const PREFILL_TOKENS: usize = 512;

/// The report as a Markdown table.
pub fn table(r: &DecodeReport) -> String {
    let mut s = format!("device: {}; copy bandwidth {:.0} GB/s (read + write); fused launches: {}; int8-activation experts: {}\n\n", r.device, r.copy_gbps, r.fused, r.moe_q8);
    s += "| shape | batch | context | step ms | graph-only ms | tokens/s | MB read/step (weights + KV) | GB/s | % of copy | % of copy (graph only) |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for x in &r.rows {
        s += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.0} | {:.1} ({:.1} + {:.1}) | {:.0} | {:.1}% | {:.1}% |\n",
            x.shape,
            x.batch,
            x.context,
            x.step_ms,
            x.graph_step_ms,
            x.tokens_per_s,
            x.bytes_per_step / 1e6,
            x.weight_bytes_per_step / 1e6,
            x.kv_bytes_per_step / 1e6,
            x.achieved_gbps,
            100.0 * x.roofline_frac,
            100.0 * x.graph_roofline_frac
        );
    }
    for (shape, n, tps) in &r.prefill {
        s += &format!("\nprefill {shape}: {n}-token prompt at {tps:.0} tokens/s");
    }
    s
}
