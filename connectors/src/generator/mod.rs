//! Built-in event generators: card transactions with fraud patterns, market
//! ticks with price jumps, and AI-agent activity with anomalies.
//!
//! Every generator is deterministic for a given `seed` (payload, key and the
//! ground-truth header): event time inside the payload comes from a simulated
//! clock starting at `start_time_ms`, not from the wall clock. The ground truth
//! is never in the payload (it would leak the answer into the prompt); it is
//! in the `kairos-gen-pattern` header (`none` for normal events).

mod agent;
mod fraud;
mod market;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Deserialize;
use tokio::sync::mpsc;

pub use agent::AgentGenerator;
pub use fraud::FraudGenerator;
pub use market::MarketGenerator;

use crate::error::{ConnectorError, Result};
use crate::event::{Event, Origin};
use crate::source::{CountingAcker, Shutdown, SourceHandle, SourceStats};

/// Header naming the generated pattern (ground truth for evaluation).
pub const HEADER_GEN_PATTERN: &str = "kairos-gen-pattern";

/// Which kind of events to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorKind {
    /// Card transactions. Key = `card_id`. Fields: `txn_id`, `card_id`,
    /// `ts_ms`, `amount`, `currency`, `merchant`, `mcc`, `merchant_category`,
    /// `channel`, `country`, `city`, `local_hour`, `card_home_country`,
    /// `card_avg_amount_30d`, `card_txns_last_10min`, `prev_txn_country`,
    /// `prev_txn_minutes_ago`. Patterns: `card_testing` (bursts of tiny
    /// amounts at many merchants), `geo_impossible` (two countries minutes
    /// apart), `night_high_risk` (high-risk category at night), `large_amount`
    /// (10–40× the card's usual).
    Fraud,
    /// Market ticks. Key = `symbol`. Fields: `symbol`, `ts_ms`, `price`,
    /// `prev_price`, `change_pct`, `volume`, `bid`, `ask`, `vwap_5m`.
    /// Pattern: `price_jump` (a 3–12 % move in one tick).
    Market,
    /// Agent activity. Key = `agent_id`. Fields: `agent_id`, `session_id`,
    /// `seq`, `ts_ms`, `type` (`user_message`, `tool_call`, `tool_result`,
    /// `error`), and per type `text`, `tool`, `args`, `ok`, `error`.
    /// Patterns: `prompt_injection`, `dangerous_tool_call`, `error_loop`.
    Agent,
}

/// Generate synthetic events (`type = "generator"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// `fraud`, `market` or `agent`.
    pub kind: GeneratorKind,
    /// Events per second; 0 = as fast as the pipeline takes them. Default 0.
    #[serde(default)]
    pub rate: f64,
    /// Number of events, then the source ends. Unset = unbounded.
    #[serde(default)]
    pub count: Option<u64>,
    /// RNG seed (rand `StdRng`); same seed, same events. Default 42.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Fraction of events that belong to an anomaly pattern (0..=1).
    /// Default 0.05.
    #[serde(default = "default_anomaly_rate")]
    pub anomaly_rate: f64,
    /// Number of distinct entities (cards, symbols, agents). Default 1000
    /// for fraud, 20 for market, 50 for agents.
    #[serde(default)]
    pub entities: Option<usize>,
    /// Start of the simulated clock, epoch ms. Default 2026-01-01T00:00Z.
    #[serde(default = "default_start")]
    pub start_time_ms: i64,
}

fn default_seed() -> u64 {
    42
}
fn default_anomaly_rate() -> f64 {
    0.05
}
fn default_start() -> i64 {
    1_767_225_600_000
}

/// One generated event before it becomes an [`Event`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub key: String,
    pub payload: serde_json::Value,
    /// Ground truth: `none` or the pattern's name.
    pub pattern: &'static str,
}

/// Any generator: an infinite, seeded stream of [`Generated`].
pub trait EventGenerator: Send {
    fn next_event(&mut self) -> Generated;
}

/// Build the generator for a config.
pub fn build(cfg: &GeneratorConfig) -> Result<Box<dyn EventGenerator>> {
    if !(0.0..=1.0).contains(&cfg.anomaly_rate) {
        return Err(ConnectorError::Config(format!(
            "generator anomaly_rate must be in 0..=1, got {}",
            cfg.anomaly_rate
        )));
    }
    if !(cfg.rate >= 0.0 && cfg.rate.is_finite()) {
        return Err(ConnectorError::Config(format!("generator rate must be >= 0, got {}", cfg.rate)));
    }
    let rng = StdRng::seed_from_u64(cfg.seed);
    let r = cfg.anomaly_rate;
    let t0 = cfg.start_time_ms;
    Ok(match cfg.kind {
        GeneratorKind::Fraud => Box::new(FraudGenerator::new(rng, cfg.entities.unwrap_or(1000).max(1), r, t0)),
        GeneratorKind::Market => Box::new(MarketGenerator::new(rng, cfg.entities.unwrap_or(20).max(1), r, t0)),
        GeneratorKind::Agent => Box::new(AgentGenerator::new(rng, cfg.entities.unwrap_or(50).max(1), r, t0)),
    })
}

fn kind_name(k: GeneratorKind) -> &'static str {
    match k {
        GeneratorKind::Fraud => "fraud",
        GeneratorKind::Market => "market",
        GeneratorKind::Agent => "agent",
    }
}

/// Convert a generated event into an [`Event`] with sequence number `seq`.
pub fn to_event(g: Generated, topic: &str, seq: i64) -> Event {
    Event {
        key: Some(g.key.into_bytes()),
        payload: g.payload.to_string().into_bytes(),
        headers: vec![(HEADER_GEN_PATTERN.to_string(), g.pattern.as_bytes().to_vec())],
        origin: Origin { topic: topic.to_string(), partition: 0, offset: seq },
        timestamp_ms: None,
        received: Instant::now(),
    }
}

pub(crate) fn start(cfg: GeneratorConfig, capacity: usize, shutdown: Shutdown) -> Result<SourceHandle> {
    let mut gen = build(&cfg)?;
    let topic = format!("generator:{}", kind_name(cfg.kind));
    let (tx, rx) = mpsc::channel(capacity);
    let join = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut seq: u64 = 0;
        while cfg.count.is_none_or(|c| seq < c) {
            if cfg.rate > 0.0 {
                let at = started + Duration::from_secs_f64(seq as f64 / cfg.rate);
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep_until(at) => {}
                }
            }
            let ev = to_event(gen.next_event(), &topic, seq as i64);
            tokio::select! {
                _ = shutdown.wait() => break,
                r = tx.send(ev) => if r.is_err() { break },
            }
            seq += 1;
        }
        Ok(SourceStats { delivered: seq })
    });
    Ok(SourceHandle { events: rx, acker: Arc::new(CountingAcker::default()), join })
}

/// Probability of starting a pattern so that, with patterns of mean length
/// `mean_len` events and normal events of length 1, a fraction `rate` of all
/// events belongs to a pattern.
pub(crate) fn start_probability(rate: f64, mean_len: f64) -> f64 {
    if rate <= 0.0 {
        return 0.0;
    }
    (rate / (mean_len - rate * mean_len + rate)).min(1.0)
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests;
