//! Exactly-once processing: one Kafka transaction per batch. The batch's
//! output records and its input offsets (`send_offsets_to_transaction` with
//! the consumer's group metadata) commit or abort together; downstream
//! consumers read with `isolation.level=read_committed`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

use super::config::{KafkaSinkConfig, KafkaSourceConfig};
use super::sink::KafkaSink;
use crate::error::{ConnectorError, Result};
use crate::event::{Event, Origin, OutRecord, TopicKind};
use crate::source::Shutdown;

/// Exactly-once settings (used with a Kafka source and a Kafka sink).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactlyOnceConfig {
    /// `transactional.id` of the producer; unique per running instance and
    /// stable across its restarts (fences zombies).
    pub transactional_id: String,
    /// Most events per transaction. Default 500.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Longest wait to fill a batch (ms). Default 100.
    #[serde(default = "default_batch_ms")]
    pub max_batch_ms: u64,
    /// Timeout of transactional calls (ms). Default 30000.
    #[serde(default = "default_txn_timeout")]
    pub transaction_timeout_ms: u64,
}

fn default_batch() -> usize {
    500
}
fn default_batch_ms() -> u64 {
    100
}
fn default_txn_timeout() -> u64 {
    30_000
}

/// Counters returned by [`run_exactly_once`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EosStats {
    pub events: u64,
    pub committed_transactions: u64,
    pub aborted_transactions: u64,
}

fn blocking_err(e: tokio::task::JoinError) -> ConnectorError {
    ConnectorError::Task(e.to_string())
}

/// Consume `source`, call `process` on each batch (it returns the records
/// to write: at least one per event, verdict or DLQ), and write them plus
/// the batch's offsets in one transaction. Runs until `shutdown`; a failed
/// transaction is aborted and its batch re-read from the last commit.
pub async fn run_exactly_once<F, Fut>(
    source: &KafkaSourceConfig,
    sink: &KafkaSinkConfig,
    eos: &ExactlyOnceConfig,
    shutdown: Shutdown,
    mut process: F,
) -> Result<EosStats>
where
    F: FnMut(Vec<Event>) -> Fut,
    Fut: Future<Output = Vec<OutRecord>>,
{
    let mut cc = source.consumer_config()?;
    cc.set("enable.auto.commit", "false");
    cc.set("isolation.level", "read_committed");
    let consumer: Arc<BaseConsumer> =
        Arc::new(cc.create().map_err(|e| ConnectorError::kafka("create consumer", e))?);
    let topics: Vec<&str> = source.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| ConnectorError::kafka("subscribe", e))?;

    let mut pc = sink.producer_config()?;
    pc.set("transactional.id", &eos.transactional_id);
    let producer: FutureProducer = pc.create().map_err(|e| ConnectorError::kafka("create producer", e))?;
    let out = KafkaSink::from_producer(producer.clone(), sink);
    let txn_timeout = Duration::from_millis(eos.transaction_timeout_ms);
    {
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(txn_timeout))
            .await
            .map_err(blocking_err)?
            .map_err(|e| ConnectorError::kafka("init transactions", e))?;
    }

    let mut stats = EosStats::default();
    while !shutdown.is_triggered() {
        let batch = {
            let c = consumer.clone();
            let (max, ms) = (eos.max_batch.max(1), eos.max_batch_ms);
            tokio::task::spawn_blocking(move || poll_batch(&c, max, Duration::from_millis(ms)))
                .await
                .map_err(blocking_err)?
        };
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        let origins: Vec<Origin> = batch.iter().map(|e| e.origin.clone()).collect();
        producer.begin_transaction().map_err(|e| ConnectorError::kafka("begin transaction", e))?;
        let records = process(batch).await;
        let result = commit_batch(&out, &producer, &consumer, &origins, records, txn_timeout).await;
        match result {
            Ok(()) => {
                stats.events += n;
                stats.committed_transactions += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "transaction failed; aborting and re-reading the batch");
                stats.aborted_transactions += 1;
                let p = producer.clone();
                tokio::task::spawn_blocking(move || p.abort_transaction(txn_timeout))
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| ConnectorError::kafka("abort transaction", e))?;
                rewind(&consumer, &origins)?;
            }
        }
    }
    Ok(stats)
}

fn poll_batch(c: &BaseConsumer, max: usize, wait: Duration) -> Vec<Event> {
    let until = Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < max {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() && !out.is_empty() {
            break;
        }
        match c.poll(left.max(Duration::from_millis(1))) {
            Some(Ok(m)) => out.push(super::source::message_to_event(&m)),
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
            None if Instant::now() >= until => break,
            None => {}
        }
    }
    out
}

/// One past the highest offset of each partition in the batch.
fn next_offsets(origins: &[Origin]) -> TopicPartitionList {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for o in origins {
        let e = next.entry((&o.topic, o.partition)).or_insert(o.offset + 1);
        *e = (*e).max(o.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), off) in next {
        let _ = tpl.add_partition_offset(t, p, Offset::Offset(off));
    }
    tpl
}

async fn commit_batch(
    out: &KafkaSink,
    producer: &FutureProducer,
    consumer: &Arc<BaseConsumer>,
    origins: &[Origin],
    records: Vec<OutRecord>,
    timeout: Duration,
) -> Result<()> {
    let sends = records.iter().map(|r| async move {
        let topic = match r.topic_kind {
            TopicKind::Output => out.output_topic(),
            TopicKind::Dlq => out.dlq_topic()?,
        };
        out.send_to(topic, r).await
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    let offsets = next_offsets(origins);
    let meta = consumer
        .group_metadata()
        .ok_or_else(|| ConnectorError::KafkaConfig("consumer has no group metadata".into()))?;
    let p = producer.clone();
    tokio::task::spawn_blocking(move || {
        p.send_offsets_to_transaction(&offsets, &meta, timeout)?;
        p.commit_transaction(timeout)
    })
    .await
    .map_err(blocking_err)?
    .map_err(|e| ConnectorError::kafka("commit transaction", e))
}

/// Seek every partition of an aborted batch back to its first offset.
fn rewind(consumer: &BaseConsumer, origins: &[Origin]) -> Result<()> {
    let mut first: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for o in origins {
        let e = first.entry((&o.topic, o.partition)).or_insert(o.offset);
        *e = (*e).min(o.offset);
    }
    for ((t, p), off) in first {
        consumer
            .seek(t, p, Offset::Offset(off), Duration::from_secs(10))
            .map_err(|e| ConnectorError::kafka(format!("seek {t}/{p} to {off}"), e))?;
    }
    Ok(())
}
