//! The source abstraction: events flow through a bounded channel, and the
//! pipeline acknowledges each event's [`Origin`] once its verdict (or DLQ
//! record) is acknowledged by the sink.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::error::{ConnectorError, Result};
use crate::event::{Event, Origin};
use crate::file::{FileSourceConfig, StdinSourceConfig};
use crate::generator::GeneratorConfig;
use crate::kafka::KafkaSourceConfig;

/// Called by the pipeline with an event's origin once the record produced
/// for it is acknowledged by the sink. Acks may come in any order and from
/// any thread; acking an origin twice, or one the source no longer owns
/// (revoked partition), is harmless.
pub trait Acker: Send + Sync {
    fn ack(&self, origin: &Origin);
}

/// Shared handle to a source's acker.
pub type AckHandle = Arc<dyn Acker>;

/// An acker for sources without offsets (generator, file, stdin): it counts.
#[derive(Debug, Default)]
pub struct CountingAcker {
    acked: AtomicU64,
}

impl CountingAcker {
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

impl Acker for CountingAcker {
    fn ack(&self, _origin: &Origin) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// A cloneable stop signal shared by sources (async tasks and threads).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug, Default)]
struct ShutdownInner {
    flag: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask every holder to stop (drain and commit).
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }
    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }
    /// Resolves once [`Shutdown::trigger`] was called.
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

/// What a source reports when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Events handed to the channel.
    pub delivered: u64,
}

/// A running source. Read `events` until it returns `None` (source ended or
/// shut down and drained), ack every event's origin, then await `join`.
pub struct SourceHandle {
    pub events: mpsc::Receiver<Event>,
    pub acker: AckHandle,
    pub join: JoinHandle<Result<SourceStats>>,
}

/// Which source to run. TOML: `[source] type = "kafka" | "file" | "stdin" | "generator"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Built-in event generator (fraud, market, agent).
    Generator(GeneratorConfig),
    /// A JSONL file, one event per line.
    File(FileSourceConfig),
    /// JSONL on standard input, one event per line.
    Stdin(StdinSourceConfig),
    /// Kafka consumer group.
    Kafka(Box<KafkaSourceConfig>),
}

/// Default capacity of the event channel.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 1024;

impl SourceConfig {
    /// Start the source on the current tokio runtime. `capacity` bounds the
    /// event channel (backpressure). Kafka runs its poll loop on its own thread.
    pub fn start(&self, capacity: usize, shutdown: Shutdown) -> Result<SourceHandle> {
        if capacity == 0 {
            return Err(ConnectorError::Config("channel capacity must be > 0".into()));
        }
        match self {
            SourceConfig::Generator(c) => crate::generator::start(c.clone(), capacity, shutdown),
            SourceConfig::File(c) => crate::file::start_file(c.clone(), capacity, shutdown),
            SourceConfig::Stdin(c) => crate::file::start_stdin(c.clone(), capacity, shutdown),
            SourceConfig::Kafka(c) => crate::kafka::KafkaSource::start((**c).clone(), capacity, shutdown),
        }
    }
}
