//! DFlash speculative decoding (arXiv 2602.06036): a block drafter proposes
//! B−1 tokens in one pass, the target verifies the whole block in one forward,
//! and the longest prefix the target agrees with is kept plus one token of the
//! target's own. Greedy output is identical to plain decoding and sampled
//! output has the target's distribution (see [`accept`]).
//!
//! Per sequence, `pending` is the last committed token, not yet in the
//! target's KV cache; a block is `[pending, d1, …]` at the position after the
//! cache. After verification the target cache is truncated to the committed
//! length and the hidden states of the committed block rows become the
//! drafter's new context. Several sequences are verified in one forward, each
//! keeping its own accepted length. With a verdict grammar the automaton
//! filters drafts (forced tokens are drafted as such, a draft stops at the
//! first disallowed token) and masks the target's logits at each block row.
//! Greedy runs without a grammar need only argmax ids from both models
//! (`Drafter::draft_argmax`, `Backend::forward_capture_argmax`), which the
//! CUDA target and the GPU drafter (`backend::cuda::model::dflash`, wired
//! in `cuda_drafter`) compute on the device, so no logits cross to the host.

pub mod accept;
pub mod block_size;
#[cfg(feature = "cuda")]
pub mod cuda_drafter;
pub mod dflash;
mod step;

use std::time::Instant;

use super::constrained::VerdictGrammar;
use super::generate::{GenerateOutput, GenerateRequest};
use crate::backend::{Backend, BackendError};
pub use block_size::{BlockSizeChooser, CostModel};

/// The new context and block of one sequence for one drafter pass.
pub struct DraftInput<'a> {
    /// The drafter's sequence slot.
    pub seq: usize,
    /// Target hidden states (at the drafter's layers, concatenated) of the
    /// tokens committed since the last pass, `[rows, layers * hidden]`.
    pub context: &'a [f32],
    /// Those tokens (drafters that re-read tokens use them; DFlash does not).
    pub context_tokens: &'a [u32],
    /// The last committed token: block position 0.
    pub first_token: u32,
    /// Absolute position of `first_token` (= context length after this pass).
    pub position: usize,
    /// Block length B; the drafter predicts positions 1..B.
    pub block: usize,
}

/// A block drafter with its own per-sequence state.
pub trait Drafter {
    /// Target layers whose hidden states condition the drafter.
    fn target_layers(&self) -> &[usize];
    /// The block size it was trained for.
    fn block_size(&self) -> usize;
    fn new_sequence(&mut self) -> usize;
    fn free_sequence(&mut self, seq: usize);
    /// Forget context beyond `len` tokens.
    fn truncate(&mut self, seq: usize, len: usize) -> Result<(), BackendError>;
    /// Appends each input's context, then returns per input the logits of
    /// block positions 1..B, row-major `[B−1, vocab]`.
    fn draft(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// Counters of the drafter's work so far (name, count), for benchmarks; none by default.
    fn counters(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }

    /// Whether `draft_argmax` is cheaper than `draft` (the argmax is taken where
    /// the logits are, e.g. on the GPU): then greedy drafting under a verdict
    /// grammar uses the ids and ends a block at the first one the grammar
    /// rejects, instead of masking copied logits rows.
    fn argmax_on_device(&self) -> bool {
        false
    }

    /// `draft` for greedy drafting without a grammar: per input the argmax
    /// token (ties: the lowest id) of block positions 1..B. Drafters that can
    /// take the argmax where the logits are (the GPU) return only the ids.
    fn draft_argmax(&mut self, inputs: &[DraftInput<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        let logits = self.draft(inputs)?;
        Ok(inputs
            .iter()
            .zip(logits)
            .map(|(i, l)| match i.block {
                0 | 1 => Vec::new(),
                b => l.chunks(l.len() / (b - 1)).map(crate::backend::first_argmax).collect(),
            })
            .collect())
    }
}

/// How blocks are sized.
#[derive(Debug, Clone)]
pub struct SpecOptions {
    /// Largest block (position 0 + drafts); 1 turns drafting off.
    pub block_size: usize,
    /// Choose B per step from acceptance statistics and step costs (≤ `block_size`).
    pub adaptive: Option<CostModel>,
}

/// Acceptance and timing over a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecStats {
    /// Verify forwards (each over every active sequence).
    pub steps: usize,
    /// Sequence-blocks verified (a step with 3 sequences counts 3).
    pub blocks: usize,
    /// Tokens committed by verification (accepted drafts + bonus), summed over blocks.
    pub committed: usize,
    /// Draft tokens offered and accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Block size used at each step.
    pub block_sizes: Vec<usize>,
    pub draft_s: f64,
    pub verify_s: f64,
}

impl SpecStats {
    /// τ: mean tokens committed per verified block (accepted drafts + the bonus).
    pub fn mean_accepted_len(&self) -> f64 {
        if self.blocks == 0 {
            0.0
        } else {
            self.committed as f64 / self.blocks as f64
        }
    }
}

pub struct SpecOutput {
    /// One output per request, in order.
    pub outputs: Vec<GenerateOutput>,
    pub stats: SpecStats,
}

/// Generates every request together with drafting and verification.
/// `grammar`: decode verdicts under the automaton (each sequence stops when
/// its verdict is complete). Sampling uses each request's parameters; request
/// `i` draws from its own seeded RNG.
pub fn generate_speculative(
    target: &mut dyn Backend,
    drafter: &mut dyn Drafter,
    reqs: &[GenerateRequest],
    grammar: Option<&VerdictGrammar>,
    opts: &SpecOptions,
) -> Result<SpecOutput, BackendError> {
    let max_b = opts.block_size.max(1);
    let mut chooser = opts.adaptive.map(|m| BlockSizeChooser::new(max_b, m));
    generate_with(target, drafter, reqs, grammar, max_b, chooser.as_mut())
}

/// [`generate_speculative`] with block sizes from `chooser`, whose acceptance and
/// cost statistics carry over from earlier calls and on to later ones. A chooser
/// made per call sees only that call's few verify steps (a fraud verdict takes ~4
/// at τ 7), too few to leave its prior: on the H100 that made `--adaptive` pick
/// short blocks and lose to a fixed B = 16 at batch 1 (1.73× vs 2.68×).
pub fn generate_speculative_adaptive(
    target: &mut dyn Backend,
    drafter: &mut dyn Drafter,
    reqs: &[GenerateRequest],
    grammar: Option<&VerdictGrammar>,
    chooser: &mut BlockSizeChooser,
) -> Result<SpecOutput, BackendError> {
    let max_b = chooser.max_block();
    generate_with(target, drafter, reqs, grammar, max_b, Some(chooser))
}

fn generate_with(
    target: &mut dyn Backend,
    drafter: &mut dyn Drafter,
    reqs: &[GenerateRequest],
    grammar: Option<&VerdictGrammar>,
    max_b: usize,
    chooser: Option<&mut BlockSizeChooser>,
) -> Result<SpecOutput, BackendError> {
    let mut run = step::Run::start(target, drafter, reqs, grammar)?;
    let result = drive(&mut run, max_b, chooser);
    run.release();
    result?;
    Ok(run.finish())
}

fn drive(run: &mut step::Run<'_>, max_b: usize, mut chooser: Option<&mut BlockSizeChooser>) -> Result<(), BackendError> {
    let mut first = true;
    while run.any_active() {
        let b = chooser.as_deref_mut().map_or(max_b, BlockSizeChooser::next_block);
        let t = Instant::now();
        let outcomes = run.step(b)?;
        if let Some(c) = chooser.as_deref_mut() {
            // the first step also hands the drafter every prompt's context, whatever B is
            if !std::mem::take(&mut first) {
                c.observe_cost(b, t.elapsed().as_secs_f64());
            }
            for (drafted, accepted) in outcomes {
                c.observe_acceptance(drafted, accepted);
            }
        }
    }
    Ok(())
}
