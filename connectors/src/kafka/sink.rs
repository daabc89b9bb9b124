//! The Kafka sink: an idempotent producer for the output and DLQ topics.

use std::sync::RwLock;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

use super::config::KafkaSinkConfig;
use crate::error::{ConnectorError, Result};
use crate::event::{OutRecord, TopicKind};
use crate::sink::Sink;

/// Idempotent (`enable.idempotence=true`, `acks=all`) producer. Keys and
/// headers are written as given; `send` resolves once the broker acked.
/// A failed send is retried (`send_attempts`), on a new producer when the
/// old one hit a fatal error; a retried record may then be written twice
/// (at-least-once).
pub struct KafkaSink {
    producer: RwLock<FutureProducer>,
    /// To rebuild the producer after a fatal error (`None` for transactional ones).
    config: Option<ClientConfig>,
    send_attempts: u32,
    output_topic: String,
    dlq_topic: Option<String>,
}

impl KafkaSink {
    pub fn new(cfg: &KafkaSinkConfig) -> Result<Self> {
        let config = cfg.producer_config()?;
        let producer: FutureProducer = config.create().map_err(|e| ConnectorError::kafka("create producer", e))?;
        Ok(KafkaSink {
            producer: RwLock::new(producer),
            config: Some(config),
            send_attempts: cfg.send_attempts.max(1),
            output_topic: cfg.output_topic.clone(),
            dlq_topic: cfg.dlq_topic.clone(),
        })
    }

    /// Wrap a transactional producer: no retries here, a failure aborts the transaction.
    pub(crate) fn from_producer(producer: FutureProducer, cfg: &KafkaSinkConfig) -> Self {
        KafkaSink {
            producer: RwLock::new(producer),
            config: None,
            send_attempts: 1,
            output_topic: cfg.output_topic.clone(),
            dlq_topic: cfg.dlq_topic.clone(),
        }
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a fatal producer error (e.g. the broker lost the idempotent
    /// producer's sequence state), build a fresh producer: once per failed
    /// producer, however many sends saw the error (every queued send fails
    /// at once; rebuilding per send replaced producers that were just made).
    /// The old one is dropped on a thread of its own: destroying a librdkafka
    /// client waits for its threads and must not block a runtime worker.
    fn rebuild_if_fatal(&self, failed: FutureProducer) {
        let Some(config) = &self.config else { return };
        let Some((code, reason)) = failed.client().fatal_error() else { return };
        let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
        if current.client().native_ptr() == failed.client().native_ptr() {
            tracing::warn!(?code, %reason, "fatal producer error; creating a new producer");
            match config.create::<FutureProducer>() {
                Ok(p) => {
                    let old = std::mem::replace(&mut *current, p);
                    drop(current);
                    drop_off_runtime(old);
                }
                Err(e) => tracing::warn!(error = %e, "cannot recreate producer"),
            }
        } else {
            drop(current);
        }
        drop_off_runtime(failed);
    }

    pub(crate) fn output_topic(&self) -> &str {
        &self.output_topic
    }

    pub(crate) fn dlq_topic(&self) -> Result<&str> {
        self.dlq_topic
            .as_deref()
            .ok_or_else(|| ConnectorError::KafkaConfig("a DLQ record was produced but no `dlq_topic` is configured".into()))
    }

    fn topic(&self, kind: TopicKind) -> Result<&str> {
        match kind {
            TopicKind::Output => Ok(&self.output_topic),
            TopicKind::Dlq => self.dlq_topic(),
        }
    }

    /// Produce to an explicit topic; resolves to (partition, offset) once acked.
    pub async fn send_to(&self, topic: &str, record: &OutRecord) -> Result<(i32, i64)> {
        let mut attempt = 1;
        loop {
            let producer = self.producer();
            let mut fr = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(&record.payload[..])
                .headers(owned_headers(&record.headers));
            if let Some(k) = &record.key {
                fr = fr.key(&k[..]);
            }
            let sent = producer.send(fr, Timeout::Never).await;
            match sent {
                Ok(d) => return Ok((d.partition, d.offset)),
                Err((e, _)) if attempt < self.send_attempts => {
                    tracing::warn!(error = %e, attempt, "produce failed; retrying");
                    self.rebuild_if_fatal(producer);
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err((e, _)) => {
                    drop_off_runtime(producer);
                    return Err(ConnectorError::kafka(format!("produce to {topic}"), e));
                }
            }
        }
    }
}

/// Drop a producer handle on a short-lived thread: if it is the last handle,
/// librdkafka's destroy blocks until the client's threads end.
fn drop_off_runtime(p: FutureProducer) {
    if std::thread::Builder::new().name("kairos-producer-drop".into()).spawn(move || drop(p)).is_err() {
        tracing::warn!("cannot spawn a thread to drop a failed producer; it is leaked");
    }
}

pub(crate) fn owned_headers(headers: &[(String, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(OwnedHeaders::new_with_capacity(headers.len()), |h, (k, v)| {
        h.insert(Header { key: k, value: Some(&v[..]) })
    })
}

impl Sink for KafkaSink {
    fn send(&self, record: OutRecord) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let topic = self.topic(record.topic_kind)?;
            self.send_to(topic, &record).await.map(|_| ())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let p = self.producer();
            tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30)))
                .await
                .map_err(|e| ConnectorError::Task(e.to_string()))?
                .map_err(|e| ConnectorError::kafka("flush", e))
        })
    }
}
