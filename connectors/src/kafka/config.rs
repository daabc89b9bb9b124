//! Kafka connection and source/sink settings.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::error::{ConnectorError, Result};

/// Declares a config struct with the connection fields shared by every
/// Kafka connector (brokers, TLS/SASL, librdkafka passthrough) appended.
macro_rules! kafka_config {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fm])* pub $f: $t,)*
            /// Bootstrap brokers, `host:port[,host:port…]`.
            pub brokers: String,
            /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
            #[serde(default)]
            pub security_protocol: Option<String>,
            /// SASL mechanism: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER`.
            #[serde(default)]
            pub sasl_mechanism: Option<String>,
            /// SASL user name.
            #[serde(default)]
            pub sasl_username: Option<String>,
            /// SASL password. Prefer the `librdkafka` map fed from the environment by
            /// the caller over a password in a file under version control.
            #[serde(default)]
            pub sasl_password: Option<String>,
            /// CA bundle (PEM) to verify the brokers' certificates.
            #[serde(default)]
            pub ssl_ca_location: Option<PathBuf>,
            /// Client certificate (PEM) for mutual TLS.
            #[serde(default)]
            pub ssl_certificate_location: Option<PathBuf>,
            /// Client private key (PEM) for mutual TLS.
            #[serde(default)]
            pub ssl_key_location: Option<PathBuf>,
            /// Password of the client private key.
            #[serde(default)]
            pub ssl_key_password: Option<String>,
            /// Any other librdkafka property, applied last (e.g.
            /// `"statistics.interval.ms" = "5000"`). Properties that kairos'
            /// delivery guarantees depend on are refused here.
            #[serde(default)]
            pub librdkafka: BTreeMap<String, String>,
        }

        impl $name {
            pub(crate) fn connection(&self) -> Connection<'_> {
                Connection {
                    brokers: &self.brokers,
                    security_protocol: self.security_protocol.as_deref(),
                    sasl_mechanism: self.sasl_mechanism.as_deref(),
                    sasl_username: self.sasl_username.as_deref(),
                    sasl_password: self.sasl_password.as_deref(),
                    ssl_ca_location: self.ssl_ca_location.as_ref(),
                    ssl_certificate_location: self.ssl_certificate_location.as_ref(),
                    ssl_key_location: self.ssl_key_location.as_ref(),
                    ssl_key_password: self.ssl_key_password.as_deref(),
                    librdkafka: &self.librdkafka,
                }
            }
        }
    };
}

kafka_config! {
    /// Consume events from Kafka topics as a consumer group (`type = "kafka"`).
    ///
    /// Delivery is at-least-once: the offset of a record is stored (and then
    /// auto-committed) only when it and every earlier record of its partition
    /// has been acked. When the pipeline falls behind, partitions are paused,
    /// never the poll loop, so the consumer stays in its group.
    pub struct KafkaSourceConfig {
        /// Topics to subscribe to.
        pub topics: Vec<String>,
        /// Consumer group id.
        pub group_id: String,
        /// Where a group without a committed offset starts: `earliest` (default) or `latest`.
        #[serde(default = "default_reset")]
        pub auto_offset_reset: String,
        /// Group session timeout (ms). Default 10000.
        #[serde(default = "default_session")]
        pub session_timeout_ms: u64,
        /// Heartbeat interval (ms). Default 3000.
        #[serde(default = "default_heartbeat")]
        pub heartbeat_interval_ms: u64,
        /// How often stored offsets are committed (ms). Default 1000.
        #[serde(default = "default_commit_interval")]
        pub auto_commit_interval_ms: u64,
        /// On partition revoke, how long to wait for in-flight events of the
        /// revoked partitions to be acked before committing and letting go
        /// (ms). Default: 60 % of `session_timeout_ms`; must be below it.
        #[serde(default)]
        pub revoke_drain_ms: Option<u64>,
        /// Events read ahead of the (full) event channel before the assigned
        /// partitions are paused; they are resumed when half of these have
        /// been handed on. Bounds memory together with the channel capacity.
        /// Default 1024.
        #[serde(default = "default_read_ahead")]
        pub read_ahead_events: usize,
        /// On shutdown, how long to wait for in-flight events (ms). Default 10000.
        #[serde(default = "default_shutdown_drain")]
        pub shutdown_drain_ms: u64,
        /// `read_committed` (default; skips aborted transactional records) or `read_uncommitted`.
        #[serde(default = "default_isolation")]
        pub isolation_level: String,
    }
}

kafka_config! {
    /// Produce verdicts and DLQ records to Kafka (`type = "kafka"`), through an
    /// idempotent producer (`enable.idempotence=true`, `acks=all`). A send
    /// completes when the broker acknowledged the record.
    pub struct KafkaSinkConfig {
        /// Topic for verdicts.
        pub output_topic: String,
        /// Topic for rejected events (with a `kairos-dlq-reason` header).
        /// Without it, a DLQ record is an error.
        #[serde(default)]
        pub dlq_topic: Option<String>,
        /// Give up on a record after this long (ms), including retries. Default 30000.
        #[serde(default = "default_message_timeout")]
        pub message_timeout_ms: u64,
        /// Attempts per record before `send` fails (each attempt already
        /// includes librdkafka's own retries within `message_timeout_ms`). Default 3.
        #[serde(default = "default_send_attempts")]
        pub send_attempts: u32,
        /// Batching delay (ms). Default 2.
        #[serde(default = "default_linger")]
        pub linger_ms: u64,
        /// `none` (default), `gzip`, `snappy`, `lz4` or `zstd`.
        #[serde(default)]
        pub compression: Option<String>,
    }
}

fn default_reset() -> String {
    "earliest".into()
}
fn default_session() -> u64 {
    10_000
}
fn default_heartbeat() -> u64 {
    3_000
}
fn default_commit_interval() -> u64 {
    1_000
}
fn default_read_ahead() -> usize {
    1024
}
fn default_shutdown_drain() -> u64 {
    10_000
}
fn default_isolation() -> String {
    "read_committed".into()
}
fn default_message_timeout() -> u64 {
    30_000
}
fn default_send_attempts() -> u32 {
    3
}
fn default_linger() -> u64 {
    2
}

/// Properties the connectors set themselves; the passthrough may not change them.
const PROTECTED: &[&str] = &[
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "group.id",
    "bootstrap.servers",
    "transactional.id",
];

/// The connection part of a Kafka config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection<'a> {
    pub brokers: &'a str,
    pub security_protocol: Option<&'a str>,
    pub sasl_mechanism: Option<&'a str>,
    pub sasl_username: Option<&'a str>,
    pub sasl_password: Option<&'a str>,
    pub ssl_ca_location: Option<&'a PathBuf>,
    pub ssl_certificate_location: Option<&'a PathBuf>,
    pub ssl_key_location: Option<&'a PathBuf>,
    pub ssl_key_password: Option<&'a str>,
    pub librdkafka: &'a BTreeMap<String, String>,
}

impl Connection<'_> {
    /// Base client config. `extra` is applied after the connection settings
    /// and before the passthrough.
    pub(crate) fn client_config(&self, extra: &[(&str, String)]) -> Result<ClientConfig> {
        if self.brokers.trim().is_empty() {
            return Err(ConnectorError::KafkaConfig("`brokers` is empty".into()));
        }
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers);
        let path = |p: &PathBuf| p.display().to_string();
        let opts: [(&str, Option<String>); 8] = [
            ("security.protocol", self.security_protocol.map(str::to_string)),
            ("sasl.mechanism", self.sasl_mechanism.map(str::to_string)),
            ("sasl.username", self.sasl_username.map(str::to_string)),
            ("sasl.password", self.sasl_password.map(str::to_string)),
            ("ssl.ca.location", self.ssl_ca_location.map(path)),
            ("ssl.certificate.location", self.ssl_certificate_location.map(path)),
            ("ssl.key.location", self.ssl_key_location.map(path)),
            ("ssl.key.password", self.ssl_key_password.map(str::to_string)),
        ];
        for (k, v) in opts {
            if let Some(v) = v {
                c.set(k, v);
            }
        }
        for (k, v) in extra {
            c.set(*k, v.as_str());
        }
        for (k, v) in self.librdkafka {
            if PROTECTED.contains(&k.as_str()) {
                return Err(ConnectorError::KafkaConfig(format!(
                    "librdkafka property `{k}` is managed by kairos and cannot be overridden"
                )));
            }
            c.set(k.as_str(), v.as_str());
        }
        Ok(c)
    }
}

impl KafkaSourceConfig {
    pub(crate) fn revoke_drain(&self) -> u64 {
        self.revoke_drain_ms.unwrap_or(self.session_timeout_ms * 6 / 10)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.topics.is_empty() {
            return Err(ConnectorError::KafkaConfig("`topics` is empty".into()));
        }
        if self.group_id.is_empty() {
            return Err(ConnectorError::KafkaConfig("`group_id` is empty".into()));
        }
        if self.revoke_drain() >= self.session_timeout_ms {
            return Err(ConnectorError::KafkaConfig(format!(
                "revoke_drain_ms ({}) must be below session_timeout_ms ({})",
                self.revoke_drain(),
                self.session_timeout_ms
            )));
        }
        Ok(())
    }

    /// The librdkafka consumer configuration.
    pub fn consumer_config(&self) -> Result<ClientConfig> {
        self.validate()?;
        self.connection().client_config(&[
            ("group.id", self.group_id.clone()),
            ("enable.auto.commit", "true".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.commit.interval.ms", self.auto_commit_interval_ms.to_string()),
            ("auto.offset.reset", self.auto_offset_reset.clone()),
            ("session.timeout.ms", self.session_timeout_ms.to_string()),
            ("heartbeat.interval.ms", self.heartbeat_interval_ms.to_string()),
            ("isolation.level", self.isolation_level.clone()),
            ("partition.assignment.strategy", "range,roundrobin".into()),
            ("enable.partition.eof", "false".into()),
        ])
    }
}

impl KafkaSinkConfig {
    /// The librdkafka producer configuration (idempotent, acks=all).
    pub fn producer_config(&self) -> Result<ClientConfig> {
        if self.output_topic.is_empty() {
            return Err(ConnectorError::KafkaConfig("`output_topic` is empty".into()));
        }
        self.connection().client_config(&[
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("message.timeout.ms", self.message_timeout_ms.to_string()),
            ("linger.ms", self.linger_ms.to_string()),
            ("compression.type", self.compression.clone().unwrap_or_else(|| "none".into())),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_protects() {
        let c: KafkaSourceConfig = serde_json::from_str(
            r#"{"brokers":"b:9092","topics":["in"],"group_id":"g","security_protocol":"sasl_ssl",
                "librdkafka":{"fetch.min.bytes":"1"}}"#,
        )
        .expect("parse");
        let cc = c.consumer_config().expect("config");
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("fetch.min.bytes"), Some("1"));
        let bad: KafkaSourceConfig = serde_json::from_str(
            r#"{"brokers":"b","topics":["in"],"group_id":"g","librdkafka":{"enable.auto.offset.store":"true"}}"#,
        )
        .expect("parse");
        assert!(bad.consumer_config().is_err());
        assert!(serde_json::from_str::<KafkaSinkConfig>(r#"{"brokers":"b","output_topic":"o","typo":1}"#).is_err());
    }
}
