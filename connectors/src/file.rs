//! JSONL sources: a file or standard input, one event (a JSON object) per line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::error::{ConnectorError, Result};
use crate::event::{Event, Origin};
use crate::source::{CountingAcker, Shutdown, SourceHandle, SourceStats};

/// Read events from a JSONL file. Each non-empty line becomes one event
/// whose payload is the line's bytes (validation is the pipeline's job, so
/// a bad line still flows and can go to the DLQ).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Path of the JSONL file.
    pub path: PathBuf,
    /// Top-level field of each JSON object used as the event key (string or
    /// number). No key when unset, missing, or the line is not JSON.
    #[serde(default)]
    pub key_field: Option<String>,
    /// Top-level field holding the event time in epoch milliseconds (number).
    #[serde(default)]
    pub timestamp_field: Option<String>,
    /// Lines longer than this many bytes are still delivered (and can be
    /// rejected downstream); this only caps memory. Default 1 MiB.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
}

/// Read events from standard input, one JSON object per line.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinSourceConfig {
    /// Top-level field used as the event key (string or number).
    #[serde(default)]
    pub key_field: Option<String>,
    /// Top-level field holding the event time in epoch milliseconds.
    #[serde(default)]
    pub timestamp_field: Option<String>,
}

fn default_max_line() -> usize {
    1 << 20
}

pub(crate) fn start_file(cfg: FileSourceConfig, capacity: usize, shutdown: Shutdown) -> Result<SourceHandle> {
    let topic = format!("file:{}", cfg.path.display());
    let file = std::fs::File::open(&cfg.path)
        .map_err(|e| ConnectorError::Open { path: cfg.path.clone(), source: e })?;
    let reader = BufReader::new(tokio::fs::File::from_std(file));
    Ok(spawn_lines(reader, topic, cfg.key_field, cfg.timestamp_field, cfg.max_line_bytes, capacity, shutdown))
}

pub(crate) fn start_stdin(cfg: StdinSourceConfig, capacity: usize, shutdown: Shutdown) -> Result<SourceHandle> {
    let reader = BufReader::new(tokio::io::stdin());
    Ok(spawn_lines(reader, "stdin".into(), cfg.key_field, cfg.timestamp_field, default_max_line(), capacity, shutdown))
}

/// Run a JSONL reader as a source (public for tests and embedding).
pub fn spawn_lines<R: AsyncBufRead + Unpin + Send + 'static>(
    mut reader: R,
    topic: String,
    key_field: Option<String>,
    timestamp_field: Option<String>,
    max_line_bytes: usize,
    capacity: usize,
    shutdown: Shutdown,
) -> SourceHandle {
    let (tx, rx) = mpsc::channel(capacity);
    let join = tokio::spawn(async move {
        let mut stats = SourceStats::default();
        let mut line_no: i64 = -1;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = tokio::select! {
                _ = shutdown.wait() => break,
                r = reader.read_until(b'\n', &mut buf) => r.map_err(|e| ConnectorError::io(&topic, e))?,
            };
            if n == 0 {
                break;
            }
            line_no += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            buf.truncate(max_line_bytes.max(1));
            let (key, ts) = extract(&buf, key_field.as_deref(), timestamp_field.as_deref());
            let ev = Event {
                key,
                payload: buf.clone(),
                headers: Vec::new(),
                origin: Origin { topic: topic.clone(), partition: 0, offset: line_no },
                timestamp_ms: ts,
                received: Instant::now(),
            };
            tokio::select! {
                _ = shutdown.wait() => break,
                r = tx.send(ev) => if r.is_err() { break },
            }
            stats.delivered += 1;
        }
        Ok(stats)
    });
    SourceHandle { events: rx, acker: Arc::new(CountingAcker::default()), join }
}

/// Key and timestamp of a JSON line, when configured and present.
pub fn extract(line: &[u8], key_field: Option<&str>, ts_field: Option<&str>) -> (Option<Vec<u8>>, Option<i64>) {
    if key_field.is_none() && ts_field.is_none() {
        return (None, None);
    }
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(line) else {
        return (None, None);
    };
    let key = key_field.and_then(|f| match obj.get(f)? {
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        serde_json::Value::Number(n) => Some(n.to_string().into_bytes()),
        _ => None,
    });
    let ts = ts_field.and_then(|f| obj.get(f)?.as_i64());
    (key, ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_lines_with_keys() {
        let data = b"{\"card\":\"c1\",\"ts\":5}\n\nnot json\n{\"card\":7}\n".to_vec();
        let mut h = spawn_lines(
            BufReader::new(std::io::Cursor::new(data)),
            "mem".into(),
            Some("card".into()),
            Some("ts".into()),
            1024,
            2,
            Shutdown::new(),
        );
        let mut got = Vec::new();
        while let Some(e) = h.events.recv().await {
            got.push(e);
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].key.as_deref(), Some(&b"c1"[..]));
        assert_eq!(got[0].timestamp_ms, Some(5));
        assert_eq!(got[1].key, None);
        assert_eq!(got[1].origin.offset, 2);
        assert_eq!(got[2].key.as_deref(), Some(&b"7"[..]));
        assert_eq!(h.join.await.unwrap().unwrap().delivered, 3);
    }
}
