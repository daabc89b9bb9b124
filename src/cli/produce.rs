//! `kairos produce`: the built-in event generators into a Kafka topic (load
//! for demos, docker-compose and pipeline benchmarks).

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kairos_connectors::event::OutRecord;
use kairos_connectors::sink::SinkConfig;
use kairos_connectors::source::{Shutdown, SourceConfig};

#[derive(Args)]
pub struct ProduceArgs {
    /// fraud, market or agent
    #[arg(long, default_value = "fraud")]
    kind: String,
    /// Events per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long)]
    topic: String,
}

pub fn run(a: ProduceArgs) -> anyhow::Result<()> {
    let source: SourceConfig = serde_json::from_value(serde_json::json!({
        "type": "generator", "kind": a.kind, "rate": a.rate, "count": a.count, "seed": a.seed,
    }))
    .context("generator settings")?;
    let sink: SinkConfig = serde_json::from_value(serde_json::json!({
        "type": "kafka", "brokers": a.brokers, "output_topic": a.topic,
    }))
    .context("kafka settings")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let shutdown = Shutdown::new();
        let mut src = source.start(1024, shutdown.clone())?;
        let sink = sink.build().await?;
        let t = Instant::now();
        let mut n = 0u64;
        while let Some(ev) = src.events.recv().await {
            sink.send(OutRecord::output_for(&ev, ev.payload.clone())).await?;
            src.acker.ack(&ev.origin);
            n += 1;
        }
        sink.flush().await?;
        eprintln!("[kairos] produced {n} events in {:.1}s", t.elapsed().as_secs_f64());
        anyhow::Ok(())
    })
}
