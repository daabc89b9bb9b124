//! The event and output-record types shared by every source and sink.

use std::time::Instant;

/// Header carrying an absolute deadline in epoch milliseconds.
pub const HEADER_DEADLINE_MS: &str = "kairos-deadline-ms";
/// W3C trace-context header, passed through untouched.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header set on every DLQ record: why the event was rejected.
pub const HEADER_DLQ_REASON: &str = "kairos-dlq-reason";

/// Where an event came from. For Kafka this is the record's coordinates; for
/// files and stdin `topic` is `file:<path>` / `stdin`, `partition` is 0 and
/// `offset` is the 0-based line number; for generators `topic` is
/// `generator:<kind>` and `offset` the event's sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for Origin {
    /// `topic/partition/offset`, the format of the `kairos-source` header.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// One input event: a JSON object (unvalidated bytes) plus its metadata.
#[derive(Debug, Clone)]
pub struct Event {
    /// Entity id (card, account, symbol, agent); `None` when the record had no key.
    pub key: Option<Vec<u8>>,
    /// The raw payload; supposed to be a UTF-8 JSON object, but untrusted.
    pub payload: Vec<u8>,
    /// Record headers in order; values are raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Coordinates used to acknowledge the event.
    pub origin: Origin,
    /// Event time (epoch ms) when the source knows it (Kafka record timestamp).
    pub timestamp_ms: Option<i64>,
    /// When the connector received the event.
    pub received: Instant,
}

impl Event {
    /// First header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// The `kairos-deadline-ms` header parsed as absolute epoch milliseconds.
    /// `None` when absent or not a decimal integer.
    pub fn deadline_ms(&self) -> Option<i64> {
        let raw = self.header(HEADER_DEADLINE_MS)?;
        std::str::from_utf8(raw).ok()?.trim().parse().ok()
    }

    /// The `traceparent` header as a string, when present and UTF-8.
    pub fn traceparent(&self) -> Option<&str> {
        std::str::from_utf8(self.header(HEADER_TRACEPARENT)?).ok()
    }

    /// The key as UTF-8 text (lossy), for logs and prompts.
    pub fn key_str(&self) -> Option<String> {
        self.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

/// Which configured topic an [`OutRecord`] goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// The pipeline's output (verdict) topic.
    Output,
    /// The dead-letter topic; the record should carry `kairos-dlq-reason`.
    Dlq,
}

/// One record for a sink: a verdict or a DLQ record.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic_kind: TopicKind,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// A verdict record for `event`: same key, the event's headers passed through.
    pub fn output_for(event: &Event, payload: Vec<u8>) -> Self {
        OutRecord {
            topic_kind: TopicKind::Output,
            key: event.key.clone(),
            payload,
            headers: event.headers.clone(),
        }
    }

    /// A DLQ record for `event`: original key, payload and headers plus
    /// `kairos-dlq-reason`.
    pub fn dlq_for(event: &Event, reason: &str) -> Self {
        let mut headers = event.headers.clone();
        headers.push((HEADER_DLQ_REASON.to_string(), reason.as_bytes().to_vec()));
        OutRecord {
            topic_kind: TopicKind::Dlq,
            key: event.key.clone(),
            payload: event.payload.clone(),
            headers,
        }
    }

    /// Append (or replace) a header.
    pub fn set_header(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.to_string(), value.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(headers: Vec<(String, Vec<u8>)>) -> Event {
        Event {
            key: Some(b"card-1".to_vec()),
            payload: b"{}".to_vec(),
            headers,
            origin: Origin { topic: "t".into(), partition: 2, offset: 7 },
            timestamp_ms: None,
            received: Instant::now(),
        }
    }

    #[test]
    fn headers_parse() {
        let e = ev(vec![
            (HEADER_DEADLINE_MS.into(), b"1700000000123".to_vec()),
            (HEADER_TRACEPARENT.into(), b"00-abc-def-01".to_vec()),
        ]);
        assert_eq!(e.deadline_ms(), Some(1_700_000_000_123));
        assert_eq!(e.traceparent(), Some("00-abc-def-01"));
        assert_eq!(e.origin.to_string(), "t/2/7");
        let bad = ev(vec![(HEADER_DEADLINE_MS.into(), b"soon".to_vec())]);
        assert_eq!(bad.deadline_ms(), None);
        let d = OutRecord::dlq_for(&e, "not json");
        assert_eq!(d.topic_kind, TopicKind::Dlq);
        assert_eq!(d.headers.last().unwrap().0, HEADER_DLQ_REASON);
    }
}
