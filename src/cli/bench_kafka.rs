//! `kairos bench pipeline --brokers HOST:PORT`: the pipeline Kafka to Kafka.
//!
//! Per offered rate: fresh input/output/DLQ topics, the pipeline consuming
//! the input topic and producing verdicts, a paced producer of generator
//! events, and a reader of the output topics. An event's latency is from
//! just before its input record is produced to when the reader receives its
//! verdict (or DLQ record): broker, consumer, queueing, engine, producer and
//! broker again, on one clock. A few warm-up events go first (the group join
//! and the first engine steps are not the steady state) and are not counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kairos::pipeline::config::PipelineConfig;
use kairos::pipeline::{EngineParts, RunOptions};
use kairos_connectors::source::{Shutdown, SourceConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

/// Input header: when the bench produced the record (epoch µs).
const SENT_US: &str = "kairos-bench-sent-us";
/// Input header: the event's sequence number (warm-up events come first).
const SEQ: &str = "kairos-bench-seq";

pub struct KafkaBench {
    pub brokers: String,
    /// Generator kind for the input events (`fraud`, `market`, `agent`).
    pub kind: String,
    pub partitions: i32,
    pub events: u64,
    pub warmup: u64,
}

/// One offered rate, measured.
#[derive(Debug, Serialize)]
pub struct KafkaRow {
    pub offered_rate: f64,
    /// Measured events (warm-up excluded) and how many were answered.
    pub events: u64,
    pub answered: u64,
    pub verdicts: u64,
    pub dlq: u64,
    pub fallbacks: u64,
    pub deadline_misses: u64,
    /// Output rate: (answered - 1) / (last answer - first answer).
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn pct(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

async fn create_topics(brokers: &str, names: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().context("Kafka admin client")?;
    let topics: Vec<NewTopic<'_>> = names.iter().map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1))).collect();
    let created = tokio::time::timeout(Duration::from_secs(20), admin.create_topics(&topics, &AdminOptions::new()))
        .await
        .context("creating the bench topics timed out (is the broker up?)")??;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// One received output record: which input it answers, when, and how.
struct Received {
    seq: u64,
    latency_us: i64,
    at_us: i64,
    dlq: bool,
    fallback: bool,
    missed: bool,
}

/// Reads the output and DLQ topics from the start until `stop`, stamping each record on receipt.
fn read_outputs(brokers: &str, topics: [(&str, i32); 2], stop: &AtomicBool) -> anyhow::Result<Vec<Received>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kairos-bench-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("isolation.level", "read_uncommitted")
        .create()
        .context("bench reader")?;
    let mut tpl = TopicPartitionList::new();
    for (t, parts) in topics {
        for p in 0..parts {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Some(Ok(m)) = c.poll(Duration::from_millis(20)) else { continue };
        let at_us = now_us();
        let header = |name: &str| -> Option<String> {
            m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let (Some(seq), Some(sent)) = (header(SEQ).and_then(|s| s.parse().ok()), header(SENT_US).and_then(|s| s.parse::<i64>().ok()))
        else {
            continue;
        };
        out.push(Received {
            seq,
            latency_us: at_us - sent,
            at_us,
            dlq: m.topic() == topics[1].0,
            fallback: header("kairos-fallback").as_deref() == Some("true"),
            missed: header("kairos-deadline-met").as_deref() == Some("false"),
        });
    }
    Ok(out)
}

/// Highest offsets summed over `topic`'s partitions (records in it).
fn records_in(brokers: &str, topic: &str, parts: i32) -> u64 {
    let Ok(c) = ClientConfig::new().set("bootstrap.servers", brokers).create::<BaseConsumer>() else { return 0 };
    (0..parts).filter_map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(5)).ok()).map(|(_, h)| h.max(0) as u64).sum()
}

/// Produces `count` generator events to `topic`: `from_seq..` at `rate` (0 = at once).
async fn produce(p: &FutureProducer, kind: &str, topic: &str, from_seq: u64, count: u64, rate: f64) -> anyhow::Result<()> {
    let gen: SourceConfig = serde_json::from_value(serde_json::json!({
        "type": "generator", "kind": kind, "count": count, "seed": from_seq + 1,
    }))?;
    let mut src = gen.start(1024, Shutdown::new())?;
    let start = Instant::now();
    let mut sends = Vec::new();
    let mut k = 0u64;
    while let Some(ev) = src.events.recv().await {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
        let seq = (from_seq + k).to_string();
        let sent = now_us().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: SEQ, value: Some(&seq) })
            .insert(Header { key: SENT_US, value: Some(&sent) });
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic).payload(&ev.payload[..]).headers(headers);
        if let Some(key) = &ev.key {
            rec = rec.key(&key[..]);
        }
        sends.push(p.send_result(rec).map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?);
        k += 1;
    }
    for s in sends {
        s.await.context("producer closed")?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

/// Run one offered rate Kafka to Kafka.
pub async fn run_rate(base: &PipelineConfig, engine: EngineParts, b: &KafkaBench, rate: f64) -> anyhow::Result<KafkaRow> {
    let tag = format!("{}-{}", rate.to_string().replace('.', "_"), now_us());
    let (tin, tout, tdlq) = (format!("kairos-bench-in-{tag}"), format!("kairos-bench-out-{tag}"), format!("kairos-bench-dlq-{tag}"));
    create_topics(&b.brokers, &[(&tin, b.partitions), (&tout, b.partitions), (&tdlq, 1)]).await?;
    let mut cfg = base.clone();
    cfg.source = serde_json::from_value(serde_json::json!({
        "type": "kafka", "brokers": b.brokers, "topics": [tin], "group_id": format!("kairos-bench-{tag}"),
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 500, "auto_commit_interval_ms": 200,
        "librdkafka": {"fetch.wait.max.ms": "5"},
    }))?;
    cfg.sink = serde_json::from_value(serde_json::json!({
        "type": "kafka", "brokers": b.brokers, "output_topic": tout, "dlq_topic": tdlq, "linger_ms": 1,
    }))?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &b.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .context("bench producer")?;

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (brokers, stop, tout, tdlq, parts) = (b.brokers.clone(), stop.clone(), tout.clone(), tdlq.clone(), b.partitions);
        std::thread::spawn(move || read_outputs(&brokers, [(&tout, parts), (&tdlq, 1)], &stop))
    };
    let feeder = {
        let (p, kind, tin, tout, brokers) = (producer.clone(), b.kind.clone(), tin.clone(), tout.clone(), b.brokers.clone());
        let (warmup, events, parts, dlq) = (b.warmup, b.events, b.partitions, tdlq.clone());
        tokio::spawn(async move {
            produce(&p, &kind, &tin, 0, warmup, 0.0).await?;
            // the measured events start once the warm-up is answered (group joined, engine warm)
            let until = Instant::now() + Duration::from_secs(120);
            while records_in(&brokers, &tout, parts) + records_in(&brokers, &dlq, 1) < warmup {
                anyhow::ensure!(Instant::now() < until, "the pipeline answered no warm-up event in 120 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            produce(&p, &kind, &tin, warmup, events, rate).await
        })
    };
    let opts = RunOptions { max_events: Some(b.warmup + b.events), duration: None, live_summary: false };
    let piped = kairos::pipeline::run(cfg, engine, opts).await;
    let fed = feeder.await.context("bench producer task")?;
    // let the last verdicts reach the reader
    let total = b.warmup + b.events;
    let until = Instant::now() + Duration::from_secs(10);
    while records_in(&b.brokers, &tout, b.partitions) + records_in(&b.brokers, &tdlq, 1) < total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let received = reader.join().map_err(|_| anyhow::anyhow!("bench reader panicked"))??;
    piped?;
    fed?;

    // first answer per measured event
    let mut first: BTreeMap<u64, Received> = BTreeMap::new();
    for r in received.into_iter().filter(|r| r.seq >= b.warmup) {
        first.entry(r.seq).or_insert(r);
    }
    let mut lat: Vec<i64> = first.values().map(|r| r.latency_us).collect();
    lat.sort_unstable();
    let first_at = first.values().map(|r| r.at_us).min().unwrap_or(0);
    let last_at = first.values().map(|r| r.at_us).max().unwrap_or(0);
    let answered = first.len() as u64;
    Ok(KafkaRow {
        offered_rate: rate,
        events: b.events,
        answered,
        verdicts: first.values().filter(|r| !r.dlq).count() as u64,
        dlq: first.values().filter(|r| r.dlq).count() as u64,
        fallbacks: first.values().filter(|r| r.fallback).count() as u64,
        deadline_misses: first.values().filter(|r| r.missed).count() as u64,
        // output rate: answers over the span from the first to the last answer
        events_per_s: answered.saturating_sub(1) as f64 / ((last_at - first_at).max(1) as f64 / 1e6),
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        p999_ms: pct(&lat, 0.999),
        max_ms: lat.last().map_or(0.0, |&m| m as f64 / 1000.0),
    })
}

/// The results as a Markdown table with the command that produced them.
pub fn markdown(rows: &[KafkaRow], command: &str, machine: &str, config: &str) -> String {
    let mut s = format!(
        "# kairos bench pipeline, Kafka to Kafka\n\nCommand: `{command}`\n\nMachine: {machine}\n\nPipeline: `{config}`. Latency: from just before the input \
         record is produced to when a reader receives its verdict (or DLQ record), warm-up events excluded.\n\n\
         | offered ev/s | events | answered | ev/s | p50 ms | p99 ms | p999 ms | max ms | fallbacks | deadline misses | DLQ |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |\n",
            r.offered_rate, r.events, r.answered, r.events_per_s, r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms, r.fallbacks, r.deadline_misses, r.dlq
        );
    }
    s
}
