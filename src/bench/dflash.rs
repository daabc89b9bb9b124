//! `kairos bench dflash`: mean accepted length τ and tokens/s with and
//! without a DFlash drafter, on verdict prompts (the pipelines' own event
//! generators, prompt templates and verdict grammars) and on general chat
//! prompts. The same prompt sets, as text, are the training prompts of
//! tools/train_dflash.py (`--export-prompts`).
//!
//! "Without" is the same loop at block size 1: one target forward per token,
//! with the grammar where the set has one; greedy outputs of both runs are
//! compared token for token.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use crate::backend::{Backend, BackendError};
use crate::engine::constrained::VerdictGrammar;
use crate::engine::generate::GenerateRequest;
use crate::engine::sampling::SamplingParams;
use crate::engine::speculative::{generate_speculative, generate_speculative_adaptive, BlockSizeChooser, CostModel, Drafter, SpecOptions};
use crate::model::tokenizer::{ChatMessage, TextTokenizer};
use crate::model::ModelError;
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::prompt::PromptBuilder;

/// Prompts of one kind, tokenized, with the grammar they are decoded under.
pub struct PromptSet {
    pub name: String,
    pub prompts: Vec<Vec<u32>>,
    /// The prompts as the model reads them (chat template applied).
    pub texts: Vec<String>,
    pub grammar: Option<Arc<VerdictGrammar>>,
    /// What the grammar forces first (`{"decision":"`), for training data.
    pub forced_prefix: String,
    /// The verdict schema (training data follows it field by field).
    pub schema: Option<crate::engine::constrained::VerdictSchema>,
}

#[derive(Debug, thiserror::Error)]
pub enum DflashBenchError {
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Setup(String),
}

/// Verdict prompts from a pipeline config: events of its generator source, or
/// of the generator `kind` (`fraud`, `market`, `agent`) for other sources.
pub fn verdict_set(
    cfg: &PipelineConfig,
    kind: Option<&str>,
    tok: &TextTokenizer,
    n: usize,
    seed: u64,
) -> Result<PromptSet, DflashBenchError> {
    let mut g = match (&cfg.source, kind) {
        (_, Some(k)) => serde_json::from_value::<kairos_connectors::generator::GeneratorConfig>(
            serde_json::json!({"kind": k, "anomaly_rate": 0.3}),
        )
        .map_err(|e| DflashBenchError::Setup(format!("generator kind `{k}`: {e}")))?,
        (kairos_connectors::source::SourceConfig::Generator(g), None) => g.clone(),
        _ => {
            return Err(DflashBenchError::Setup(format!(
                "pipeline `{}`: the source is not a generator; name one as PATH=fraud|market|agent",
                cfg.name
            )))
        }
    };
    g.seed = seed;
    let mut gen = kairos_connectors::generator::build(&g).map_err(|e| DflashBenchError::Setup(e.to_string()))?;
    let builder = PromptBuilder::new(tok, &cfg.prompt)?;
    let grammar = VerdictGrammar::compile(&cfg.verdict, &tok.token_bytes(), &tok.eos_ids)
        .map_err(|e| DflashBenchError::Setup(format!("verdict grammar: {e}")))?;
    grammar.precompute();
    let (mut prompts, mut texts) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let ev = gen.next_event();
        let map: Map<String, Value> = match ev.payload {
            Value::Object(m) => m,
            other => Map::from_iter([("event".to_string(), other)]),
        };
        let mut ids = builder.prefix_ids.clone();
        ids.extend(builder.event_ids(tok, &map)?);
        prompts.push(ids);
        texts.push(builder.render(tok, &map)?);
    }
    let field = cfg.verdict.decision_field().unwrap_or("decision");
    Ok(PromptSet {
        name: cfg.name.clone(),
        prompts,
        texts,
        grammar: Some(Arc::new(grammar)),
        forced_prefix: format!("{{\"{field}\":\""),
        schema: Some(cfg.verdict.clone()),
    })
}

const CHAT_TASKS: &[&str] = &[
    "Explain {} in simple terms.",
    "Write a short poem about {}.",
    "Give three facts about {}.",
    "What are the pros and cons of {}?",
    "Summarize the history of {} in a paragraph.",
    "Write a friendly email inviting a colleague to talk about {}.",
    "List five questions a student might ask about {}.",
    "Describe {} to a ten-year-old.",
    "Write a haiku about {}.",
    "How would you teach {} to a beginner?",
    "What is a common misconception about {}?",
    "Write a two-sentence story involving {}.",
];

const CHAT_TOPICS: &[&str] = &[
    "the ocean", "photosynthesis", "the moon", "credit cards", "stock markets", "volcanoes", "honeybees",
    "the internet", "coffee", "chess", "rainbows", "electric cars", "recycling", "the Roman empire",
    "machine learning", "sleep", "bread baking", "mountains", "fraud prevention", "saving money", "gardening",
    "the human heart", "music", "friendship", "time zones", "airplanes", "libraries", "exercise", "clouds",
    "prime numbers", "solar power", "cats",
];

/// General chat prompts: every task applied to every topic (`n` of them, in a fixed order).
pub fn chat_set(tok: &TextTokenizer, n: usize) -> Result<PromptSet, DflashBenchError> {
    let mut prompts = Vec::with_capacity(n);
    let mut texts = Vec::with_capacity(n);
    let total = CHAT_TASKS.len() * CHAT_TOPICS.len();
    for i in 0..n.min(total) {
        // Step through topics fastest so a short set still mixes tasks.
        let task = CHAT_TASKS[(i / CHAT_TOPICS.len() + i) % CHAT_TASKS.len()];
        let user = task.replace("{}", CHAT_TOPICS[i % CHAT_TOPICS.len()]);
        let text = tok.render_chat(&[ChatMessage { role: "user".into(), content: user }], true)?;
        prompts.push(tok.encode(&text, false)?);
        texts.push(text);
    }
    Ok(PromptSet { name: "chat".into(), prompts, texts, grammar: None, forced_prefix: String::new(), schema: None })
}

/// The prompt sets as JSONL for tools/train_dflash.py.
pub fn export_jsonl(sets: &[PromptSet]) -> String {
    let mut out = String::new();
    for s in sets {
        let kind = if s.grammar.is_some() { "verdict" } else { "chat" };
        for t in &s.texts {
            let mut v = serde_json::json!({"kind": kind, "source": s.name, "text": t});
            if !s.forced_prefix.is_empty() {
                v["prefix"] = Value::String(s.forced_prefix.clone());
            }
            if let Some(schema) = &s.schema {
                v["fields"] = serde_json::to_value(&schema.fields).unwrap_or(Value::Null);
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
    }
    out
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub set: String,
    pub batch: usize,
    /// "plain" (block 1) or "dflash".
    pub mode: String,
    pub block_size: usize,
    pub sequences: usize,
    /// Generated tokens after each sequence's first (which the prefill makes).
    pub tokens: usize,
    pub decode_s: f64,
    pub tokens_per_s: f64,
    /// Mean tokens committed per verified block (1.0 for plain decoding).
    pub tau: f64,
    /// Mean accepted drafts / offered drafts.
    pub acceptance: f64,
    /// Seconds in drafter passes and in target verify forwards (both inside `decode_s`).
    pub draft_s: f64,
    pub verify_s: f64,
    /// The drafter's own counters over the row (`Drafter::counters`; the GPU
    /// drafter's eager passes, graph replays, captures, context chunks).
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub drafter: Map<String, Value>,
    /// Verify steps per block size (fixed B: one entry; `--adaptive`: the chooser's picks).
    pub block_sizes: std::collections::BTreeMap<usize, usize>,
    /// DFlash rows: sequences whose greedy output equals plain decoding's (on a
    /// GPU a verify step sums in another order, so near-ties may part).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identical_outputs: Option<usize>,
}

pub struct BenchOptions {
    pub batches: Vec<usize>,
    pub max_new_tokens: usize,
    pub block_size: usize,
    pub adaptive: Option<CostModel>,
}

/// Runs every set at every batch size, plain and with the drafter.
/// Returns the rows and whether greedy outputs were identical everywhere.
pub fn run(
    target: &mut dyn Backend,
    drafter: &mut dyn Drafter,
    sets: &[PromptSet],
    eos: &[u32],
    o: &BenchOptions,
) -> Result<(Vec<BenchRow>, bool), DflashBenchError> {
    let mut rows = Vec::new();
    let mut identical = true;
    for set in sets {
        for &batch in &o.batches {
            let mut outs: [Vec<Vec<u32>>; 2] = [Vec::new(), Vec::new()];
            for (k, (mode, b)) in [("plain", 1), ("dflash", o.block_size)].into_iter().enumerate() {
                let opts = SpecOptions { block_size: b, adaptive: None };
                // adaptive: one chooser for the whole row, learning across its calls
                let mut chooser = o.adaptive.filter(|_| b > 1).map(|m| BlockSizeChooser::new(b, m));
                let mut row = BenchRow {
                    set: set.name.clone(),
                    batch,
                    mode: mode.into(),
                    block_size: b,
                    sequences: 0,
                    tokens: 0,
                    decode_s: 0.0,
                    tokens_per_s: 0.0,
                    tau: 0.0,
                    acceptance: 0.0,
                    draft_s: 0.0,
                    verify_s: 0.0,
                    drafter: Map::new(),
                    identical_outputs: None,
                    block_sizes: Default::default(),
                };
                let before = drafter.counters();
                let (mut committed, mut blocks, mut drafted, mut accepted) = (0, 0, 0, 0);
                for group in set.prompts.chunks(batch.max(1)) {
                    let reqs: Vec<GenerateRequest> = group
                        .iter()
                        .map(|p| GenerateRequest {
                            prompt_ids: p.clone(),
                            max_new_tokens: o.max_new_tokens,
                            sampling: SamplingParams::default(),
                            eos_ids: eos.to_vec(),
                            top_logits: 0,
                        })
                        .collect();
                    let t = Instant::now();
                    let out = match chooser.as_mut() {
                        Some(c) => generate_speculative_adaptive(target, drafter, &reqs, set.grammar.as_deref(), c)?,
                        None => generate_speculative(target, drafter, &reqs, set.grammar.as_deref(), &opts)?,
                    };
                    let wall = t.elapsed().as_secs_f64();
                    let prefill = out.outputs.first().map_or(0.0, |x| x.prefill_s);
                    row.decode_s += (wall - prefill).max(0.0);
                    row.sequences += reqs.len();
                    row.tokens += out.outputs.iter().map(|x| x.output_ids.len().saturating_sub(1)).sum::<usize>();
                    committed += out.stats.committed;
                    blocks += out.stats.blocks;
                    drafted += out.stats.drafted;
                    accepted += out.stats.accepted;
                    row.draft_s += out.stats.draft_s;
                    row.verify_s += out.stats.verify_s;
                    for &bs in &out.stats.block_sizes {
                        *row.block_sizes.entry(bs).or_default() += 1;
                    }
                    outs[k].extend(out.outputs.into_iter().map(|x| x.output_ids));
                }
                row.tokens_per_s = if row.decode_s > 0.0 { row.tokens as f64 / row.decode_s } else { 0.0 };
                row.tau = if blocks > 0 { committed as f64 / blocks as f64 } else { 0.0 };
                row.acceptance = if drafted > 0 { accepted as f64 / drafted as f64 } else { 0.0 };
                for ((name, after), (_, was)) in drafter.counters().into_iter().zip(before) {
                    row.drafter.insert(name.into(), Value::from(after.saturating_sub(was)));
                }
                rows.push(row);
            }
            identical &= outs[0] == outs[1];
            if let Some(r) = rows.last_mut() {
                r.identical_outputs = Some(outs[0].iter().zip(&outs[1]).filter(|(a, b)| a == b).count());
            }
        }
    }
    Ok((rows, identical))
}

pub fn table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<12} {:>5} {:>7} {:>5} {:>7} {:>9} {:>6} {:>6} {:>8} {:>8} {:>9}\n",
        "set", "batch", "mode", "B", "tokens", "tok/s", "tau", "acc", "draft s", "verify s", "same out"
    );
    for r in rows {
        let same = r.identical_outputs.map_or(String::new(), |n| format!("{n}/{}", r.sequences));
        s.push_str(&format!(
            "{:<12} {:>5} {:>7} {:>5} {:>7} {:>9.2} {:>6.2} {:>6.2} {:>8.4} {:>8.4} {:>9}\n",
            r.set, r.batch, r.mode, r.block_size, r.tokens, r.tokens_per_s, r.tau, r.acceptance, r.draft_s, r.verify_s, same
        ));
    }
    s
}
