//! A running pipeline: source -> validate -> prompt -> scheduler (engine
//! thread) -> verdict record -> sink -> ack. An input offset is acked only
//! after its verdict or DLQ record is acknowledged by the sink.

pub mod config;
pub mod observe;
pub mod prompt;
mod stats;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kairos_connectors::event::{Event, OutRecord};
use kairos_connectors::sink::Sink;
use kairos_connectors::source::{AckHandle, Shutdown};
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::engine::constrained::VerdictGrammar;
use crate::model::tokenizer::TextTokenizer;
use crate::scheduler::{JobResult, Outcome, Scheduler, SchedulerConfig, VerdictJob};
use config::{BudgetFrom, PipelineConfig};
use prompt::PromptBuilder;
pub use stats::{LiveStats, Summary};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
    #[error("verdict grammar: {0}")]
    Grammar(#[from] crate::engine::constrained::ConstraintError),
    #[error("engine: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("connector: {0}")]
    Connector(#[from] kairos_connectors::error::ConnectorError),
}

pub struct RunOptions {
    pub max_events: Option<u64>,
    pub duration: Option<Duration>,
    /// Print the one-line live summary to stderr every second.
    pub live_summary: bool,
}

/// What an in-flight event needs when its verdict comes back.
struct InFlight {
    event: Event,
    deadline: Instant,
    start: Instant,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Deadline of an event: the header, else event time or receipt + budget.
fn deadline_of(ev: &Event, cfg: &PipelineConfig) -> (Instant, Instant) {
    let budget = Duration::from_millis(cfg.budget.latency_ms);
    let now = Instant::now();
    let since = |ms: i64| Duration::from_millis((now_ms() - ms).max(0) as u64);
    let start = match (cfg.budget.from, ev.timestamp_ms) {
        (BudgetFrom::EventTime, Some(ts)) => now.checked_sub(since(ts)).unwrap_or(ev.received),
        _ => ev.received,
    };
    let deadline = match ev.deadline_ms() {
        Some(ms) => {
            let left = ms - now_ms();
            if left <= 0 { now } else { now + Duration::from_millis(left as u64) }
        }
        None => start + budget,
    };
    (start, deadline)
}

/// The fallback verdict as JSON, fields in schema order (the decision
/// first). Written by hand: a `serde_json::Map` sorts its keys, which put
/// e.g. trading's `confidence` before its `signal`.
fn fallback_json(cfg: &PipelineConfig) -> String {
    let fields: Vec<String> = cfg
        .verdict
        .fields
        .iter()
        .filter_map(|f| {
            let v = cfg.fallback.verdict.get(&f.name)?;
            Some(format!("{}:{v}", serde_json::Value::String(f.name.clone())))
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// The engine side: model, grammar and prompt prefix, ready to run on a thread.
pub struct EngineParts {
    pub backend: Box<dyn Backend>,
    pub tokenizer: Arc<TextTokenizer>,
    pub model_name: String,
}

pub async fn run(cfg: PipelineConfig, engine: EngineParts, opts: RunOptions) -> Result<Summary, PipelineError> {
    let cfg = Arc::new(cfg);
    let tok = engine.tokenizer.clone();
    let prompt = Arc::new(PromptBuilder::new(&tok, &cfg.prompt)?);
    let vocab = tok.token_bytes();
    let grammar = Arc::new(VerdictGrammar::compile(&cfg.verdict, &vocab, &tok.eos_ids)?);
    grammar.precompute();
    let sched_cfg = SchedulerConfig {
        max_batch: cfg.engine.max_batch,
        max_new_tokens: cfg.engine.max_new_tokens,
        temperature: cfg.engine.temperature,
        queue_capacity: cfg.engine.queue_capacity,
        prefill_budget: cfg.engine.prefill_budget,
    };
    let mut scheduler = Scheduler::new(engine.backend, grammar, &prompt.prefix_ids, sched_cfg)?;
    let cancel = scheduler.cancellation();

    let shutdown = Shutdown::new();
    let mut source = cfg.source.start(cfg.engine.queue_capacity.max(1), shutdown.clone())?;
    let sink: Arc<dyn Sink> = cfg.sink.build().await?;
    let acker: AckHandle = source.acker.clone();
    observe::set_ready(true);
    let stats = Arc::new(LiveStats::default());
    let inflight: Arc<Mutex<HashMap<u64, InFlight>>> = Arc::default();

    // Engine thread: jobs in (bounded: a full channel pauses intake), results out.
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<VerdictJob>(cfg.engine.queue_capacity.max(1));
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<JobResult>();
    let engine_thread = std::thread::Builder::new()
        .name("kairos-engine".into())
        .spawn(move || engine_loop(&mut scheduler, job_rx, res_tx))
        .map_err(|e| crate::backend::BackendError::Device(format!("cannot start the engine thread: {e}")))?;

    // Results: verdict record -> sink -> ack.
    let emitter = Arc::new(Emitter {
        sink: sink.clone(),
        acker: acker.clone(),
        stats: stats.clone(),
        model_name: engine.model_name.clone(),
        fallback: fallback_json(&cfg),
    });
    let results = {
        let (emitter, inflight) = (emitter.clone(), inflight.clone());
        tokio::spawn(async move {
            while let Some(r) = res_rx.recv().await {
                let Some(f) = inflight.lock().ok().and_then(|mut m| m.remove(&r.id)) else { continue };
                emitter.emit(f, r.outcome, r.queue_wait);
            }
        })
    };

    let summary_task = opts.live_summary.then(|| {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}", stats.line());
            }
        })
    });
    let started = Instant::now();
    let timer = {
        let shutdown = shutdown.clone();
        let duration = opts.duration;
        tokio::spawn(async move {
            let stop = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm() => {}
            }
            shutdown.trigger();
        })
    };

    // Intake: validate, build the prompt, hand to the engine.
    let mut next_id = 0u64;
    let mut taken = 0u64;
    while let Some(ev) = source.events.recv().await {
        taken += 1;
        match validate::validate(&ev.payload, &cfg.event) {
            Err(reason) => {
                let mut rec = OutRecord::dlq_for(&ev, &reason.to_string());
                rec.set_header("kairos-source", ev.origin.to_string());
                let (sink, acker, stats, origin) = (sink.clone(), acker.clone(), stats.clone(), ev.origin.clone());
                tokio::spawn(async move {
                    if sink.send(rec).await.is_ok() {
                        acker.ack(&origin);
                        stats.record_dlq();
                    }
                });
            }
            Ok(map) => {
                let (start, deadline) = deadline_of(&ev, &cfg);
                let tokens = prompt.event_ids(&tok, &map)?;
                let id = next_id;
                next_id += 1;
                if let Ok(mut m) = inflight.lock() {
                    m.insert(id, InFlight { event: ev, deadline, start });
                }
                // The watchdog answers with the fallback just before the deadline if the
                // engine has not: never silently late, whatever one step costs.
                {
                    let (emitter, inflight, cancel) = (emitter.clone(), inflight.clone(), cancel.clone());
                    let guard = Duration::from_millis((cfg.budget.latency_ms / 20).clamp(5, 50));
                    let at = deadline.checked_sub(guard).unwrap_or(deadline);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                        let taken = inflight.lock().ok().and_then(|mut m| m.remove(&id));
                        if let Some(f) = taken {
                            if let Ok(mut c) = cancel.lock() {
                                c.insert(id);
                            }
                            emitter.emit(f, Outcome::Fallback { why: "deadline watchdog".into() }, Duration::ZERO);
                        }
                    });
                }
                let job = VerdictJob { id, tokens, deadline };
                let tx = job_tx.clone();
                // A full engine queue blocks here, which stops intake and lets the source pause.
                if tokio::task::spawn_blocking(move || tx.send(job)).await.ok().and_then(Result::ok).is_none() {
                    break;
                }
            }
        }
        if opts.max_events.is_some_and(|n| taken >= n) {
            shutdown.trigger();
            break;
        }
    }
    drop(job_tx);
    // Drain: the engine answers what it holds, then the result task ends.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    let _ = results.await;
    // Wait for outstanding sink sends of the last records.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.answered() < taken && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = sink.flush().await;
    observe::set_ready(false);
    shutdown.trigger();
    timer.abort();
    if let Some(t) = summary_task {
        t.abort();
    }
    drop(source.events);
    let _ = source.join.await;
    Ok(stats.summary(started.elapsed()))
}

/// Turns an outcome into the verdict record, sends it, and acks the source once the sink acked.
struct Emitter {
    sink: Arc<dyn Sink>,
    acker: AckHandle,
    stats: Arc<LiveStats>,
    model_name: String,
    fallback: String,
}

impl Emitter {
    fn emit(self: &Arc<Self>, f: InFlight, outcome: Outcome, queue_wait: Duration) {
        let latency = f.start.elapsed();
        let met = Instant::now() <= f.deadline;
        let (payload, is_fallback, tokens) = match outcome {
            Outcome::Model { json, tokens, .. } => (json, false, tokens),
            Outcome::Fallback { why } => {
                tracing::debug!(why = %why, "fallback verdict");
                (self.fallback.clone(), true, 0)
            }
        };
        let mut rec = OutRecord::output_for(&f.event, payload.into_bytes());
        rec.set_header("kairos-source", f.event.origin.to_string());
        rec.set_header("kairos-model", self.model_name.clone());
        rec.set_header("kairos-latency-us", latency.as_micros().to_string());
        rec.set_header("kairos-deadline-met", met.to_string());
        rec.set_header("kairos-fallback", is_fallback.to_string());
        let me = self.clone();
        let origin = f.event.origin.clone();
        tokio::spawn(async move {
            match me.sink.send(rec).await {
                Ok(()) => {
                    me.acker.ack(&origin);
                    me.stats.record_verdict(latency, queue_wait, met, is_fallback, tokens);
                }
                Err(e) => tracing::error!(%origin, error = %e, "sink refused a verdict; the event will be redelivered"),
            }
        });
    }
}

async fn sigterm() {
    #[cfg(unix)]
    {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}

fn engine_loop(
    scheduler: &mut Scheduler,
    jobs: std::sync::mpsc::Receiver<VerdictJob>,
    results: mpsc::UnboundedSender<JobResult>,
) {
    let mut open = true;
    loop {
        // Take what is waiting (bounded by the queue), blocking only when idle.
        while open && scheduler.has_room() {
            let next = if scheduler.is_idle() {
                jobs.recv().map_err(|_| std::sync::mpsc::TryRecvError::Disconnected)
            } else {
                jobs.try_recv()
            };
            match next {
                Ok(job) => scheduler.submit(job),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        if !open && scheduler.is_idle() {
            return;
        }
        for r in scheduler.step() {
            if results.send(r).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_verdict_keeps_schema_order() {
        for name in ["trading", "fraud", "agent", "demo"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.toml"));
            let cfg = PipelineConfig::load(&path).expect("config");
            let json = fallback_json(&cfg);
            let parsed: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
            assert_eq!(parsed.as_object().map(|o| o.len()), Some(cfg.verdict.fields.len()), "{json}");
            // the keys appear in the schema's order, the decision first
            let mut at = 0;
            for f in &cfg.verdict.fields {
                let key = format!("\"{}\":", f.name);
                let pos = json[at..].find(&key).unwrap_or_else(|| panic!("{name}: `{}` out of order in {json}", f.name));
                at += pos + key.len();
            }
        }
    }
}
