//! The sink abstraction and the JSON-lines sinks (stdout, file).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Deserialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::error::{ConnectorError, Result};
use crate::event::{OutRecord, TopicKind};
use crate::kafka::{KafkaSink, KafkaSinkConfig};

/// Where verdicts and DLQ records go. `send` resolves once the record is
/// durable as far as the sink can tell (Kafka: acknowledged by the broker;
/// file/stdout: written and flushed), so the caller may then ack the source.
pub trait Sink: Send + Sync {
    fn send(&self, record: OutRecord) -> BoxFuture<'_, Result<()>>;
    /// Flush and wait for outstanding records (called at shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
}

/// Which sink to run. TOML: `[sink] type = "stdout" | "file" | "kafka"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// JSON lines appended to a file.
    File(FileSinkConfig),
    /// Kafka output + DLQ topics through an idempotent producer.
    Kafka(Box<KafkaSinkConfig>),
}

impl SinkConfig {
    /// Build the sink (Kafka: creates the producer; needs a tokio runtime).
    pub async fn build(&self) -> Result<Arc<dyn Sink>> {
        Ok(match self {
            SinkConfig::Stdout(c) => Arc::new(JsonLinesSink::new(
                Box::new(tokio::io::stdout()),
                c.include_dlq,
                "stdout".into(),
            )),
            SinkConfig::File(c) => {
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(!c.truncate)
                    .write(true)
                    .truncate(c.truncate)
                    .open(&c.path)
                    .await
                    .map_err(|e| ConnectorError::Open { path: c.path.clone(), source: e })?;
                Arc::new(JsonLinesSink::new(Box::new(f), true, c.path.display().to_string()))
            }
            SinkConfig::Kafka(c) => Arc::new(KafkaSink::new(c)?),
        })
    }
}

/// Standard output: one JSON object per line:
/// `{"topic":"output"|"dlq","key":…,"headers":{…},"payload":…}` where
/// `payload` is the verdict JSON (or a string when not JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Also print DLQ records (default true).
    #[serde(default = "default_true")]
    pub include_dlq: bool,
}

/// A file of JSON lines, same line format as the stdout sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Output path.
    pub path: PathBuf,
    /// Truncate the file at start instead of appending (default false).
    #[serde(default)]
    pub truncate: bool,
}

fn default_true() -> bool {
    true
}

/// Writes [`OutRecord`]s as JSON lines to any async writer.
pub struct JsonLinesSink {
    out: Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    include_dlq: bool,
    what: String,
}

impl JsonLinesSink {
    pub fn new(out: Box<dyn AsyncWrite + Send + Unpin>, include_dlq: bool, what: String) -> Self {
        JsonLinesSink { out: Mutex::new(out), include_dlq, what }
    }
}

/// Render one record as a JSON line (with the trailing newline).
pub fn record_to_json_line(r: &OutRecord) -> Vec<u8> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let payload = serde_json::from_slice::<serde_json::Value>(&r.payload)
        .unwrap_or_else(|_| serde_json::Value::String(text(&r.payload)));
    let headers: serde_json::Map<String, serde_json::Value> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(text(v))))
        .collect();
    let obj = serde_json::json!({
        "topic": match r.topic_kind { TopicKind::Output => "output", TopicKind::Dlq => "dlq" },
        "key": r.key.as_deref().map(text),
        "headers": headers,
        "payload": payload,
    });
    let mut line = obj.to_string().into_bytes();
    line.push(b'\n');
    line
}

impl Sink for JsonLinesSink {
    fn send(&self, record: OutRecord) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if record.topic_kind == TopicKind::Dlq && !self.include_dlq {
                return Ok(());
            }
            let line = record_to_json_line(&record);
            let mut out = self.out.lock().await;
            out.write_all(&line).await.map_err(|e| ConnectorError::io(&self.what, e))?;
            out.flush().await.map_err(|e| ConnectorError::io(&self.what, e))
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut out = self.out.lock().await;
            out.flush().await.map_err(|e| ConnectorError::io(&self.what, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Origin};

    #[tokio::test]
    async fn file_sink_writes_json_lines() {
        let path = std::env::temp_dir().join(format!("kairos-sink-test-{}.jsonl", std::process::id()));
        let cfg: SinkConfig =
            serde_json::from_value(serde_json::json!({"type": "file", "path": path, "truncate": true})).expect("config");
        let sink = cfg.build().await.expect("build");
        let ev = Event {
            key: Some(b"card-1".to_vec()),
            payload: b"{\"amount\":3}".to_vec(),
            headers: vec![("traceparent".into(), b"00-x-y-01".to_vec())],
            origin: Origin { topic: "t".into(), partition: 0, offset: 4 },
            timestamp_ms: None,
            received: std::time::Instant::now(),
        };
        sink.send(OutRecord::output_for(&ev, b"{\"decision\":\"allow\"}".to_vec())).await.expect("send");
        sink.send(OutRecord::dlq_for(&ev, "bad")).await.expect("send");
        sink.flush().await.expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["topic"], "output");
        assert_eq!(lines[0]["key"], "card-1");
        assert_eq!(lines[0]["payload"]["decision"], "allow");
        assert_eq!(lines[0]["headers"]["traceparent"], "00-x-y-01");
        assert_eq!(lines[1]["topic"], "dlq");
        assert_eq!(lines[1]["headers"]["kairos-dlq-reason"], "bad");
        assert!(serde_json::from_str::<SinkConfig>(r#"{"type":"stdout","bogus":1}"#).is_err());
    }
}
