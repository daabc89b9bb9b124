//! Kafka source (consumer group, at-least-once), sink (idempotent producer)
//! and the exactly-once loop (transactions).

mod config;
mod eos;
mod sink;
mod source;
mod tracker;

pub use config::{KafkaSinkConfig, KafkaSourceConfig};
pub use eos::{run_exactly_once, EosStats, ExactlyOnceConfig};
pub use sink::KafkaSink;
pub use source::{KafkaSource, KafkaSourceStats};
