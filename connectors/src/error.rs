//! Typed errors of the connectors.

use std::path::PathBuf;

/// Everything a source or sink can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka config: {0}")]
    KafkaConfig(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: line {line}: {msg}")]
    BadLine { what: String, line: u64, msg: String },
    #[error("config: {0}")]
    Config(String),
    #[error("the event channel was closed by the pipeline")]
    ChannelClosed,
    #[error("connector task failed: {0}")]
    Task(String),
}

impl ConnectorError {
    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        ConnectorError::Kafka { context: context.into(), source }
    }
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ConnectorError::Io { what: what.into(), source }
    }
}

pub type Result<T, E = ConnectorError> = std::result::Result<T, E>;
