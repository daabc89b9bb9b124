//! kairos connectors: where events come from and where verdicts go.
//!
//! Sources (Kafka consumer group, JSONL file, stdin, built-in generators)
//! deliver [`Event`]s through a bounded channel ([`SourceHandle`]); the
//! pipeline acks each event's [`Origin`] through the source's [`Acker`] once
//! the record written for it ([`OutRecord`]: verdict or DLQ) is acknowledged
//! by a [`Sink`] (Kafka, stdout, file). The Kafka source stores an offset
//! only when every earlier record of its partition is acked
//! (at-least-once); [`kafka::run_exactly_once`] is the transactional option.
//!
//! This crate knows nothing of models. Each connector's config struct
//! documents its fields.

pub mod error;
pub mod event;
pub mod file;
pub mod generator;
pub mod kafka;
pub mod sink;
pub mod source;

pub use error::{ConnectorError, Result};
pub use event::{Event, Origin, OutRecord, TopicKind, HEADER_DEADLINE_MS, HEADER_DLQ_REASON, HEADER_TRACEPARENT};
pub use sink::{Sink, SinkConfig};
pub use source::{AckHandle, Acker, Shutdown, SourceConfig, SourceHandle, SourceStats, DEFAULT_CHANNEL_CAPACITY};
