//! The engine thread: earliest-deadline-first admission, continuous batching
//! of constrained verdict decoding, a shared prompt prefix prefilled once,
//! finish-time estimates from measured step costs, and fallback verdicts
//! when a deadline cannot be met.

mod cost;

use std::collections::BinaryHeap;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::engine::constrained::{VerdictGrammar, VerdictState};
use crate::engine::sampling::{Sampler, SamplingParams};
pub use cost::StepCosts;

/// One event's verdict work.
pub struct VerdictJob {
    pub id: u64,
    /// The event's tokens, appended after the shared prefix.
    pub tokens: Vec<u32>,
    pub deadline: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The model's verdict; `closed_early` when the reason was cut at the deadline or token limit.
    Model { json: String, tokens: usize, closed_early: bool },
    /// The fallback policy answers (the model could not decide in time, or failed).
    Fallback { why: String },
}

pub struct JobResult {
    pub id: u64,
    pub outcome: Outcome,
    /// Time spent queued before admission.
    pub queue_wait: Duration,
}

pub struct SchedulerConfig {
    pub max_batch: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Most jobs held in the EDF queue (beyond it, the job channel fills and the source is paused).
    pub queue_capacity: usize,
    /// Most prompt tokens prefilled in one step, so one step never runs far past a deadline.
    pub prefill_budget: usize,
}

struct Queued {
    job: VerdictJob,
    arrived: Instant,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        self.job.deadline == o.job.deadline && self.job.id == o.job.id
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    /// Reversed so that `BinaryHeap` pops the earliest deadline first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.job.deadline.cmp(&self.job.deadline).then(o.job.id.cmp(&self.job.id))
    }
}

/// What one step returns per active sequence: its last row's logits, or the
/// masked argmax id the backend took where the logits are.
enum Choices {
    Logits(Vec<f32>),
    Ids(Vec<u32>),
}

struct Active {
    id: u64,
    seq: SeqId,
    state: VerdictState,
    /// Tokens to feed in the next step (prefill of the event, or sampled + forced).
    pending: Vec<u32>,
    generated: usize,
    deadline: Instant,
    queue_wait: Duration,
}

pub struct Scheduler {
    backend: Box<dyn Backend>,
    grammar: Arc<VerdictGrammar>,
    prefix_seq: SeqId,
    prefix_len: usize,
    cfg: SchedulerConfig,
    pub costs: StepCosts,
    sampler: Sampler,
    heap: BinaryHeap<Queued>,
    active: Vec<Active>,
    /// Jobs already answered elsewhere (the deadline watchdog): dropped at the next step.
    cancelled: Arc<Mutex<HashSet<u64>>>,
}

impl Scheduler {
    /// Prefills the shared prefix once; every admitted event copies its KV.
    pub fn new(
        mut backend: Box<dyn Backend>,
        grammar: Arc<VerdictGrammar>,
        prefix: &[u32],
        cfg: SchedulerConfig,
    ) -> Result<Self, BackendError> {
        let prefix_seq = backend.new_sequence();
        let t = Instant::now();
        backend.forward(&[Chunk { seq: prefix_seq, tokens: prefix }], LogitsFor::Last)?;
        let mut costs = StepCosts::default();
        costs.observe_prefill(prefix.len(), t.elapsed());
        let sampler = Sampler::new(SamplingParams { temperature: cfg.temperature, ..Default::default() });
        Ok(Self {
            backend,
            grammar,
            prefix_seq,
            prefix_len: prefix.len(),
            cfg,
            costs,
            sampler,
            heap: BinaryHeap::new(),
            active: Vec::new(),
            cancelled: Arc::default(),
        })
    }

    /// The set through which callers cancel jobs they answered themselves.
    pub fn cancellation(&self) -> Arc<Mutex<HashSet<u64>>> {
        self.cancelled.clone()
    }

    fn drop_cancelled(&mut self) {
        let Ok(mut c) = self.cancelled.lock() else { return };
        if c.is_empty() {
            return;
        }
        let backend = &mut self.backend;
        self.active.retain(|a| {
            let gone = c.remove(&a.id);
            if gone {
                backend.free_sequence(a.seq);
            }
            !gone
        });
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap.into_iter().filter(|q| !c.remove(&q.job.id)).collect();
    }

    pub fn is_idle(&self) -> bool {
        self.heap.is_empty() && self.active.is_empty()
    }

    pub fn has_room(&self) -> bool {
        self.heap.len() < self.cfg.queue_capacity
    }

    pub fn submit(&mut self, job: VerdictJob) {
        self.heap.push(Queued { job, arrived: Instant::now() });
    }

    /// Expected time to reach a decided verdict for `tokens` new prompt tokens.
    fn time_to_decision(&self, tokens: usize) -> Duration {
        let batch = (self.active.len() + 1).min(self.cfg.max_batch);
        self.costs.prefill(tokens) + self.costs.decode(batch) * 3
    }

    /// Answers queued jobs that can no longer finish in time with the fallback.
    fn shed_hopeless(&mut self, now: Instant, done: &mut Vec<JobResult>) {
        let mut keep = BinaryHeap::with_capacity(self.heap.len());
        while let Some(q) = self.heap.pop() {
            if now + self.time_to_decision(q.job.tokens.len()) > q.job.deadline {
                done.push(JobResult {
                    id: q.job.id,
                    outcome: Outcome::Fallback { why: "deadline: not admitted in time".into() },
                    queue_wait: now - q.arrived,
                });
            } else {
                keep.push(q);
            }
        }
        self.heap = keep;
    }

    fn admit(&mut self, now: Instant) -> Result<(), BackendError> {
        let mut budget = self.cfg.prefill_budget;
        while self.active.len() < self.cfg.max_batch {
            let Some(q) = self.heap.peek() else { break };
            if q.job.tokens.len() > budget && budget < self.cfg.prefill_budget {
                break;
            }
            budget = budget.saturating_sub(q.job.tokens.len());
            let Some(q) = self.heap.pop() else { break };
            let seq = self.backend.new_sequence();
            self.backend.copy_prefix(self.prefix_seq, seq, self.prefix_len)?;
            self.active.push(Active {
                id: q.job.id,
                seq,
                state: self.grammar.start(),
                pending: q.job.tokens,
                generated: 0,
                deadline: q.job.deadline,
                queue_wait: now - q.arrived,
            });
        }
        Ok(())
    }

    /// One engine step over every active sequence; returns finished jobs.
    pub fn step(&mut self) -> Vec<JobResult> {
        let mut done = Vec::new();
        self.drop_cancelled();
        let now = Instant::now();
        self.shed_hopeless(now, &mut done);
        if let Err(e) = self.admit(now) {
            self.fail_all(&format!("engine: {e}"), &mut done);
            return done;
        }
        if self.active.is_empty() {
            return done;
        }
        let prefill_tokens: usize =
            self.active.iter().map(|a| a.pending.len()).filter(|&n| n > 1).sum();
        let chunks: Vec<Chunk<'_>> =
            self.active.iter().map(|a| Chunk { seq: a.seq, tokens: &a.pending }).collect();
        // Greedy on a backend that takes argmaxes where its logits are (a GPU): each
        // sequence's allowed-token bitset goes down with its last row, only ids come back.
        let device_choice = self.sampler.params().temperature <= 0.0 && self.backend.argmax_on_device();
        let t = Instant::now();
        let result = if device_choice {
            let mut masks = Vec::with_capacity(chunks.iter().map(|c| c.tokens.len()).sum());
            for a in &self.active {
                masks.extend(std::iter::repeat_n(None, a.pending.len().saturating_sub(1)));
                masks.push(Some(a.state.allowed_bits(&self.grammar)));
            }
            self.backend.forward_capture_masked_argmax(&chunks, &[], &masks).map(|(ids, _)| {
                let mut last = Vec::with_capacity(chunks.len());
                let mut row = 0;
                for c in &chunks {
                    row += c.tokens.len();
                    last.push(ids[row - 1]);
                }
                Choices::Ids(last)
            })
        } else {
            self.backend.forward(&chunks, LogitsFor::Last).map(Choices::Logits)
        };
        let choices = match result {
            Ok(c) => c,
            Err(e) => {
                self.fail_all(&format!("engine: {e}"), &mut done);
                return done;
            }
        };
        let took = t.elapsed();
        if prefill_tokens > 0 {
            self.costs.observe_prefill(prefill_tokens, took);
        } else {
            self.costs.observe_decode(self.active.len(), took);
        }
        let vocab = self.backend.vocab_size();
        let step_est = self.costs.decode(self.active.len());
        let now = Instant::now();
        let mut still = Vec::with_capacity(self.active.len());
        for (i, mut a) in std::mem::take(&mut self.active).into_iter().enumerate() {
            let choice = match &choices {
                Choices::Logits(logits) => a.state.sample(&self.grammar, &logits[i * vocab..(i + 1) * vocab], &mut self.sampler),
                Choices::Ids(ids) => Some(ids[i]),
            };
            a.pending.clear();
            let mut outcome = None;
            let advanced = choice.filter(|&id| a.state.advance(&self.grammar, id).is_ok());
            if let Some(id) = advanced {
                a.generated += 1;
                if let Some(forced) = a.state.forced(&self.grammar) {
                    for f in forced {
                        if a.state.advance(&self.grammar, f).is_ok() {
                            a.pending.push(f);
                        }
                    }
                }
                a.pending.insert(0, id);
                let late = now + step_est > a.deadline;
                if a.state.is_complete() {
                    outcome = Some(Outcome::Model { json: a.state.text().to_owned(), tokens: a.generated, closed_early: false });
                } else if late || a.generated + a.pending.len() >= self.cfg.max_new_tokens {
                    outcome = Some(match a.state.closed_text(&self.grammar) {
                        Some(json) => Outcome::Model { json, tokens: a.generated, closed_early: true },
                        None if late => Outcome::Fallback { why: "deadline: no decision in time".into() },
                        None => Outcome::Fallback { why: "token limit before a decision".into() },
                    });
                }
            } else {
                outcome = Some(Outcome::Fallback { why: "engine: grammar rejected a token".into() });
            }
            match outcome {
                Some(o) => {
                    self.backend.free_sequence(a.seq);
                    done.push(JobResult { id: a.id, outcome: o, queue_wait: a.queue_wait });
                }
                None => still.push(a),
            }
        }
        self.active = still;
        done
    }

    fn fail_all(&mut self, why: &str, done: &mut Vec<JobResult>) {
        for a in std::mem::take(&mut self.active) {
            self.backend.free_sequence(a.seq);
            done.push(JobResult { id: a.id, outcome: Outcome::Fallback { why: why.into() }, queue_wait: a.queue_wait });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::engine::constrained::VerdictSchema;

    /// The CPU backend presented as one that takes argmaxes on the device: the
    /// scheduler then sends allowed-token masks and takes ids (the GPU path),
    /// answered here by the trait's host implementation.
    struct DeviceArgmax(CpuBackend);

    impl Backend for DeviceArgmax {
        fn name(&self) -> String {
            self.0.name()
        }
        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }
        fn max_context(&self) -> usize {
            self.0.max_context()
        }
        fn new_sequence(&mut self) -> SeqId {
            self.0.new_sequence()
        }
        fn free_sequence(&mut self, seq: SeqId) {
            self.0.free_sequence(seq)
        }
        fn seq_len(&self, seq: SeqId) -> Result<usize, BackendError> {
            self.0.seq_len(seq)
        }
        fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), BackendError> {
            self.0.truncate(seq, len)
        }
        fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError> {
            self.0.copy_prefix(from, to, len)
        }
        fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> Result<Vec<f32>, BackendError> {
            self.0.forward(chunks, which)
        }
        fn forward_capture(&mut self, chunks: &[Chunk<'_>], which: LogitsFor, layers: &[usize]) -> Result<(Vec<f32>, Vec<f32>), BackendError> {
            self.0.forward_capture(chunks, which, layers)
        }
        fn argmax_on_device(&self) -> bool {
            true
        }
    }

    fn outcomes(backend: Box<dyn Backend>, grammar: &Arc<VerdictGrammar>, prefix: &[u32], jobs: &[Vec<u32>]) -> Vec<(u64, Outcome)> {
        let cfg = SchedulerConfig { max_batch: 3, max_new_tokens: 40, temperature: 0.0, queue_capacity: 16, prefill_budget: 256 };
        let mut s = Scheduler::new(backend, Arc::clone(grammar), prefix, cfg).expect("scheduler");
        let deadline = Instant::now() + Duration::from_secs(3600);
        for (id, tokens) in jobs.iter().enumerate() {
            s.submit(VerdictJob { id: id as u64, tokens: tokens.clone(), deadline });
        }
        let mut out = Vec::new();
        for _ in 0..1000 {
            if s.is_idle() {
                break;
            }
            out.extend(s.step().into_iter().map(|r| (r.id, r.outcome)));
        }
        out.sort_by_key(|o| o.0);
        out
    }

    /// Greedy verdicts chosen from masked argmax ids (a GPU backend's path) are the
    /// verdicts chosen from logits rows on the host, batched, with prefills of
    /// several tokens and forced grammar tokens in the same steps.
    #[test]
    fn device_choice_path_gives_the_host_verdicts() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let m = crate::model::load_model(&dir).expect("fixture");
        let grammar = Arc::new(
            VerdictGrammar::compile(&VerdictSchema::fraud_default(), &m.tokenizer.token_bytes(), &m.tokenizer.eos_ids).expect("grammar"),
        );
        let prefix = m.tokenizer.encode("Decide on the card payment below.", true).expect("prefix");
        let jobs: Vec<Vec<u32>> = ["9000 EUR in Lagos at 3 am", "coffee", "two cards, one device, ten minutes", "refund 1 EUR", "x"]
            .iter()
            .map(|t| m.tokenizer.encode(t, false).expect("event"))
            .collect();
        let weights = Arc::new(m.weights);
        let host = outcomes(Box::new(CpuBackend::new(Arc::clone(&weights))), &grammar, &prefix, &jobs);
        let device = outcomes(Box::new(DeviceArgmax(CpuBackend::new(weights))), &grammar, &prefix, &jobs);
        assert_eq!(host.len(), jobs.len());
        assert!(host.iter().all(|(_, o)| matches!(o, Outcome::Model { .. })), "{host:?}");
        assert_eq!(device, host);
    }
}
