//! The Kafka source: a consumer-group poll loop on its own thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::config::KafkaSourceConfig;
use super::tracker::{Tp, Tracker};
use crate::error::{ConnectorError, Result};
use crate::event::{Event, Origin};
use crate::source::{Acker, Shutdown, SourceHandle, SourceStats};

/// Live counters of a Kafka source (for tests and metrics).
#[derive(Debug, Default)]
pub struct KafkaSourceStats {
    /// Events handed to the channel.
    pub delivered: AtomicU64,
    /// Events acked by the pipeline.
    pub acked: AtomicU64,
    /// Times the partitions were paused for backpressure.
    pub pauses: AtomicU64,
    /// Rebalance assignments / revocations seen.
    pub assignments: AtomicU64,
    pub revocations: AtomicU64,
    /// Synchronous commits that failed.
    pub commit_errors: AtomicU64,
    /// Events read from Kafka and waiting for room in the channel.
    pub read_ahead: AtomicU64,
    /// Whether the partitions are paused right now.
    pub paused: AtomicBool,
}

impl KafkaSourceStats {
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// State shared by the poll thread, the rebalance callback and the acker.
struct Shared {
    tracker: Mutex<Tracker>,
    acked: Condvar,
    stats: Arc<KafkaSourceStats>,
    revoke_drain: Duration,
    /// Set after the shutdown drain: the final revoke must not wait again.
    closing: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tracker> {
        // a panic while holding the lock cannot leave the tracker inconsistent
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until `tps` (all when `None`) have nothing in flight, or `budget` passes.
    fn wait_drained(&self, tps: Option<&[Tp]>, budget: Duration) -> usize {
        let until = Instant::now() + budget;
        let mut t = self.lock();
        loop {
            let left = t.inflight(tps);
            let now = Instant::now();
            if left == 0 || now >= until {
                return left;
            }
            t = self.acked.wait_timeout(t, until - now).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// The acker handed to the pipeline.
struct KafkaAcker(Arc<Shared>);

impl Acker for KafkaAcker {
    fn ack(&self, origin: &Origin) {
        let tp = (origin.topic.clone(), origin.partition);
        self.0.lock().ack(&tp, origin.offset);
        self.0.stats.acked.fetch_add(1, Ordering::Relaxed);
        self.0.acked.notify_all();
    }
}

/// Rebalance handling: on revoke, drain (bounded), commit synchronously, let go.
struct SourceContext(Arc<Shared>);

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        self.0.stats.revocations.fetch_add(1, Ordering::Relaxed);
        let tps: Vec<Tp> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        tracing::info!(partitions = ?tps, lost = consumer.assignment_lost(), "partitions revoked");
        if !consumer.assignment_lost() {
            let budget = if self.0.closing.load(Ordering::SeqCst) { Duration::ZERO } else { self.0.revoke_drain };
            let left = self.0.wait_drained(Some(&tps), budget);
            if left > 0 {
                tracing::warn!(left, "revoke: in-flight events not acked in time; they will be redelivered");
            }
            let marks = self.0.lock().watermarks(&tps);
            tracing::debug!(?marks, left, "revoke: committing");
            commit_sync(consumer, &marks, &self.0.stats);
        }
        let mut t = self.0.lock();
        for tp in &tps {
            t.revoke(tp);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.0.stats.assignments.fetch_add(1, Ordering::Relaxed);
            tracing::info!(partitions = ?tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect::<Vec<_>>(), "partitions assigned");
            tracing::debug!(assignment = ?tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition(), e.offset())).collect::<Vec<_>>(), "assigned");
            // A new assignment starts unpaused. librdkafka keeps a partition's
            // pause flag when the same partition comes back (a lost assignment
            // after a broker restart, re-assigned while backpressure had it
            // paused): resume explicitly, or it stays paused while our flag
            // says it runs and nothing ever resumes it.
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "resume after assignment failed");
            }
            self.0.stats.paused.store(false, Ordering::SeqCst);
            let mut t = self.0.lock();
            for e in tpl.elements() {
                t.assign((e.topic().to_string(), e.partition()));
            }
        }
    }
}

fn tpl_of(marks: &[(Tp, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), off) in marks {
        // cannot fail for a new partition entry with a concrete offset
        let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*off));
    }
    tpl
}

fn commit_sync(consumer: &BaseConsumer<SourceContext>, marks: &[(Tp, i64)], stats: &KafkaSourceStats) {
    if marks.is_empty() {
        return;
    }
    let tpl = tpl_of(marks);
    // store first: the auto-commit on unassign/close commits the stored
    // offsets and must not move the group back behind this commit
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "offset store before commit failed");
    }
    tracing::debug!(?marks, "commit");
    if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
        stats.commit_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "synchronous offset commit failed");
    }
}

fn store(consumer: &BaseConsumer<SourceContext>, shared: &Shared) {
    let marks = shared.lock().take_storable();
    if marks.is_empty() {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl_of(&marks)) {
        tracing::debug!(error = %e, "offset store failed (partition moved?)");
    }
}

pub(crate) fn message_to_event(m: &BorrowedMessage<'_>) -> Event {
    let headers = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect())
        .unwrap_or_default();
    Event {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        headers,
        origin: Origin { topic: m.topic().to_string(), partition: m.partition(), offset: m.offset() },
        timestamp_ms: m.timestamp().to_millis(),
        received: Instant::now(),
    }
}

/// Kafka consumer-group source. See [`KafkaSourceConfig`].
pub struct KafkaSource;

impl KafkaSource {
    /// Start the poll thread; see [`KafkaSource::start_with_stats`].
    pub fn start(cfg: KafkaSourceConfig, capacity: usize, shutdown: Shutdown) -> Result<SourceHandle> {
        Self::start_with_stats(cfg, capacity, shutdown).map(|(h, _)| h)
    }

    /// Subscribe and start the poll loop on a dedicated thread. Events go to
    /// a channel of `capacity`; when it is full, up to `read_ahead_events`
    /// more are held, then the assigned partitions are paused (polling goes
    /// on, so the consumer stays in its group) and resumed once half of the
    /// read-ahead has been handed on. On
    /// `shutdown` the loop stops taking events, waits up to
    /// `shutdown_drain_ms` for in-flight acks, commits and leaves the group;
    /// the channel closes after that.
    pub fn start_with_stats(
        cfg: KafkaSourceConfig,
        capacity: usize,
        shutdown: Shutdown,
    ) -> Result<(SourceHandle, Arc<KafkaSourceStats>)> {
        let stats = Arc::new(KafkaSourceStats::default());
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker::default()),
            acked: Condvar::new(),
            stats: stats.clone(),
            revoke_drain: Duration::from_millis(cfg.revoke_drain()),
            closing: AtomicBool::new(false),
        });
        let consumer: BaseConsumer<SourceContext> = cfg
            .consumer_config()?
            .create_with_context(SourceContext(shared.clone()))
            .map_err(|e| ConnectorError::kafka("create consumer", e))?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| ConnectorError::kafka("subscribe", e))?;
        let (tx, rx) = mpsc::channel(capacity);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let drain = Duration::from_millis(cfg.shutdown_drain_ms);
        let read_ahead = cfg.read_ahead_events.max(1);
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("kairos-kafka-source".into())
            .spawn(move || {
                let r = poll_loop(&consumer, &sh, tx, &shutdown, drain, read_ahead);
                drop(consumer); // leaves the group (revoke callback commits)
                let _ = done_tx.send(r);
            })
            .map_err(|e| ConnectorError::Task(format!("spawn kafka thread: {e}")))?;
        let join = tokio::spawn(async move {
            done_rx.await.map_err(|_| ConnectorError::Task("kafka source thread panicked".into()))?
        });
        Ok((SourceHandle { events: rx, acker: Arc::new(KafkaAcker(shared)), join }, stats))
    }
}

fn set_paused(consumer: &BaseConsumer<SourceContext>, shared: &Shared, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    let r = if pause { consumer.pause(&assignment) } else { consumer.resume(&assignment) };
    match r {
        Ok(()) => {
            shared.stats.paused.store(pause, Ordering::SeqCst);
            if pause {
                shared.stats.pauses.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => tracing::warn!(error = %e, pause, "pause/resume failed"),
    }
}

fn poll_loop(
    consumer: &BaseConsumer<SourceContext>,
    shared: &Shared,
    tx: mpsc::Sender<Event>,
    shutdown: &Shutdown,
    drain: Duration,
    read_ahead: usize,
) -> Result<SourceStats> {
    let mut backlog: VecDeque<(u64, Event)> = VecDeque::new();
    let mut delivered = 0u64;
    let mut closed = false;
    while !shutdown.is_triggered() && !closed {
        // hand the backlog to the pipeline while there is room
        while let Some((epoch, ev)) = backlog.pop_front() {
            let tp = (ev.origin.topic.clone(), ev.origin.partition);
            let mut t = shared.lock();
            if t.epoch(&tp) != Some(epoch) {
                tracing::debug!(?tp, offset = ev.origin.offset, "dropping stale read-ahead");
                // revoked (and maybe re-assigned) since it was read: whoever
                // owns the partition now reads it again from the commit
                continue;
            }
            let offset = ev.origin.offset;
            match tx.try_send(ev) {
                Ok(()) => {
                    t.deliver(&tp, offset);
                    delivered += 1;
                    shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(ev)) => {
                    backlog.push_front((epoch, ev));
                    break;
                }
                Err(TrySendError::Closed(_)) => {
                    closed = true;
                    break;
                }
            }
        }
        // hysteresis: pausing purges librdkafka's prefetch and resuming
        // takes a fetch round, so do neither too often
        shared.stats.read_ahead.store(backlog.len() as u64, Ordering::Relaxed);
        let paused = shared.stats.paused.load(Ordering::SeqCst);
        if backlog.len() >= read_ahead && !paused {
            set_paused(consumer, shared, true);
        } else if backlog.len() <= read_ahead / 2 && paused {
            set_paused(consumer, shared, false);
        }
        store(consumer, shared);
        let wait = if backlog.is_empty() { 100 } else { 5 };
        match consumer.poll(Duration::from_millis(wait)) {
            None => {}
            Some(Ok(m)) => {
                let tp = (m.topic().to_string(), m.partition());
                let mut t = shared.lock();
                if let Some(epoch) = t.epoch(&tp) {
                    if !t.is_duplicate(&tp, m.offset()) {
                        backlog.push_back((epoch, message_to_event(&m)));
                    } else {
                        tracing::debug!(?tp, offset = m.offset(), "dropping duplicate");
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
        }
    }
    // graceful shutdown: stop taking work, drain in-flight, commit, leave
    backlog.clear();
    set_paused(consumer, shared, true);
    let until = Instant::now() + drain;
    while shared.lock().inflight(None) > 0 && Instant::now() < until {
        store(consumer, shared);
        let _ = consumer.poll(Duration::from_millis(0));
        shared.wait_drained(None, Duration::from_millis(50));
    }
    let left = shared.lock().inflight(None);
    if left > 0 {
        tracing::warn!(left, "shutdown: in-flight events not acked in time; they will be redelivered");
    }
    shared.closing.store(true, Ordering::SeqCst);
    let tps = shared.lock().partitions();
    let marks = shared.lock().watermarks(&tps);
    commit_sync(consumer, &marks, &shared.stats);
    drop(tx);
    Ok(SourceStats { delivered })
}
