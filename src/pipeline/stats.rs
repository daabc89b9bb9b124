//! Live counters for the stderr summary line and the Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latencies kept for percentiles (the most recent ones).
const WINDOW: usize = 20_000;

pub struct LiveStats {
    verdicts: AtomicU64,
    fallbacks: AtomicU64,
    misses: AtomicU64,
    dlq: AtomicU64,
    tokens: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    started: Instant,
}

impl Default for LiveStats {
    fn default() -> Self {
        Self {
            verdicts: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            dlq: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::new()),
            started: Instant::now(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub verdicts: u64,
    pub fallbacks: u64,
    pub deadline_misses: u64,
    pub dlq: u64,
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub tokens: u64,
    pub elapsed_s: f64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

impl LiveStats {
    pub fn record_verdict(&self, latency: Duration, queue_wait: Duration, met: bool, fallback: bool, tokens: usize) {
        self.verdicts.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        metrics::counter!("kairos_verdicts_total").increment(1);
        metrics::histogram!("kairos_event_latency_seconds").record(latency.as_secs_f64());
        metrics::histogram!("kairos_queue_wait_seconds").record(queue_wait.as_secs_f64());
        metrics::counter!("kairos_tokens_generated_total").increment(tokens as u64);
        if fallback {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("kairos_fallbacks_total").increment(1);
        }
        if !met {
            self.misses.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("kairos_deadline_misses_total").increment(1);
        }
        if let Ok(mut l) = self.latencies_us.lock() {
            if l.len() >= WINDOW {
                l.remove(0);
            }
            l.push(latency.as_micros() as u64);
        }
    }

    pub fn record_dlq(&self) {
        self.dlq.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("kairos_dlq_total").increment(1);
    }

    /// Events with a verdict or DLQ record acknowledged by the sink.
    pub fn answered(&self) -> u64 {
        self.verdicts.load(Ordering::Relaxed) + self.dlq.load(Ordering::Relaxed)
    }

    pub fn summary(&self, elapsed: Duration) -> Summary {
        let mut l = self.latencies_us.lock().map(|l| l.clone()).unwrap_or_default();
        l.sort_unstable();
        let answered = self.answered();
        Summary {
            verdicts: self.verdicts.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            deadline_misses: self.misses.load(Ordering::Relaxed),
            dlq: self.dlq.load(Ordering::Relaxed),
            events_per_s: answered as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_ms: pct(&l, 0.5),
            p99_ms: pct(&l, 0.99),
            p999_ms: pct(&l, 0.999),
            tokens: self.tokens.load(Ordering::Relaxed),
            elapsed_s: elapsed.as_secs_f64(),
        }
    }

    /// `events/s, p50/p99 latency, misses, fallbacks, DLQ` on one line.
    pub fn line(&self) -> String {
        let s = self.summary(self.started.elapsed());
        format!(
            "[kairos] {:.1} ev/s | verdicts {} | p50 {:.0} ms p99 {:.0} ms | misses {} | fallbacks {} | dlq {}",
            s.events_per_s, s.verdicts, s.p50_ms, s.p99_ms, s.deadline_misses, s.fallbacks, s.dlq
        )
    }
}
