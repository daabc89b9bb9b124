//! The Kafka sink: an idempotent producer for the output and DLQ topics.

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::config::KafkaSinkConfig;
use crate::error::{ConnectorError, Result};
use crate::event::{OutRecord, TopicKind};
use crate::sink::Sink;

/// Idempotent (`enable.idempotence=true`, `acks=all`) producer. Keys and
/// headers are written as given; `send` resolves once the broker acked.
pub struct KafkaSink {
    producer: FutureProducer,
    output_topic: String,
    dlq_topic: Option<String>,
}

impl KafkaSink {
    pub fn new(cfg: &KafkaSinkConfig) -> Result<Self> {
        let producer: FutureProducer = cfg
            .producer_config()?
            .create()
            .map_err(|e| ConnectorError::kafka("create producer", e))?;
        Ok(KafkaSink { producer, output_topic: cfg.output_topic.clone(), dlq_topic: cfg.dlq_topic.clone() })
    }

    pub(crate) fn from_producer(producer: FutureProducer, cfg: &KafkaSinkConfig) -> Self {
        KafkaSink { producer, output_topic: cfg.output_topic.clone(), dlq_topic: cfg.dlq_topic.clone() }
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
        let headers = owned_headers(&record.headers);
        let mut fr = FutureRecord::<[u8], [u8]>::to(topic).payload(&record.payload[..]).headers(headers);
        if let Some(k) = &record.key {
            fr = fr.key(&k[..]);
        }
        match self.producer.send(fr, Timeout::Never).await {
            Ok(d) => Ok((d.partition, d.offset)),
            Err((e, _)) => Err(ConnectorError::kafka(format!("produce to {topic}"), e)),
        }
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
            let p = self.producer.clone();
            tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(30)))
                .await
                .map_err(|e| ConnectorError::Task(e.to_string()))?
                .map_err(|e| ConnectorError::kafka("flush", e))
        })
    }
}
