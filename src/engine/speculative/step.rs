//! One speculative run over a batch of sequences: prefill with hidden-state
//! capture, then draft → verify → commit → roll back, step after step.

use std::time::Instant;

use super::accept::{accept_point_mass, residual_without};
use super::{DraftInput, Drafter, SpecOutput, SpecStats};
use crate::backend::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::engine::constrained::{VerdictGrammar, VerdictState};
use crate::engine::generate::{GenerateOutput, GenerateRequest};
use crate::engine::sampling::{argmax, Sampler};

struct SeqRun {
    seq: SeqId,
    dseq: usize,
    out: Vec<u32>,
    /// Last committed token; not yet in the target cache.
    pending: u32,
    /// Hidden states and tokens committed since the drafter last saw them.
    ctx: Vec<f32>,
    ctx_tokens: Vec<u32>,
    /// Tokens in the target cache.
    cached: usize,
    sampler: Sampler,
    state: Option<VerdictState>,
    active: bool,
    decode_s: f64,
}

pub(super) struct Run<'a> {
    target: &'a mut dyn Backend,
    drafter: &'a mut dyn Drafter,
    grammar: Option<&'a VerdictGrammar>,
    reqs: &'a [GenerateRequest],
    layers: Vec<usize>,
    seqs: Vec<SeqRun>,
    stats: SpecStats,
    prefill_s: f64,
    decode_start: Instant,
}

/// The token the target picks at one row, as plain decoding would: a forced
/// grammar token, else a draw (argmax at temperature 0) from the masked logits.
fn target_choice(row: &[f32], st: Option<&VerdictState>, g: Option<&VerdictGrammar>, sampler: &mut Sampler) -> u32 {
    if let (Some(st), Some(g)) = (st, g) {
        if let Some(f) = st.forced(g) {
            return f[0];
        }
        return st.sample(g, row, sampler).unwrap_or(0);
    }
    sampler.sample(row)
}

/// Verifies `drafts` against the target rows (`drafts.len() + 1` rows of
/// `vocab`); returns the committed tokens: accepted drafts, then one token of
/// the target's.
fn verify_block(
    rows: &[f32],
    vocab: usize,
    drafts: &[u32],
    state: Option<&VerdictState>,
    g: Option<&VerdictGrammar>,
    sampler: &mut Sampler,
) -> Vec<u32> {
    let mut sim = state.cloned();
    let mut out = Vec::with_capacity(drafts.len() + 1);
    for (j, row) in rows.chunks(vocab).enumerate() {
        let Some(&d) = drafts.get(j) else {
            out.push(target_choice(row, sim.as_ref(), g, sampler));
            break;
        };
        let forced = match (sim.as_ref(), g) {
            (Some(st), Some(g)) => st.forced(g).map(|f| f[0]),
            _ => None,
        };
        let keep = match forced {
            Some(f) => {
                if d != f {
                    out.push(f);
                    break;
                }
                true
            }
            None if sampler.params().temperature <= 0.0 => {
                let t = match (sim.as_ref(), g) {
                    (Some(st), Some(g)) => st.masked_argmax(g, row).unwrap_or(0),
                    _ => argmax(row),
                };
                if t != d {
                    out.push(t);
                    break;
                }
                true
            }
            None => {
                let mut l = row.to_vec();
                if let (Some(st), Some(g)) = (sim.as_ref(), g) {
                    st.apply_allowed(g, &mut l);
                }
                let dist = sampler.distribution(&l);
                let u = sampler.uniform();
                if !accept_point_mass(&dist, d, u) {
                    let r = residual_without(&dist, d);
                    out.push(sampler.draw(&r));
                    break;
                }
                true
            }
        };
        if keep {
            out.push(d);
            if let (Some(st), Some(g)) = (sim.as_mut(), g) {
                if st.advance(g, d).is_err() {
                    break;
                }
            }
        }
    }
    out
}

/// Greedy verification from the target's ids (`drafts.len() + 1` of them, each
/// the argmax of its row under the tokens the grammar allows there, see
/// [`row_masks`]): the accepted drafts, then the target's token at the first
/// mismatch (or the bonus row); a forced grammar token is the target's choice
/// whatever its row says — `verify_block` at temperature 0.
fn verify_greedy(target: &[u32], drafts: &[u32], state: Option<&VerdictState>, g: Option<&VerdictGrammar>) -> Vec<u32> {
    let mut sim = state.cloned();
    let mut out = Vec::with_capacity(target.len());
    for (j, &t) in target.iter().enumerate() {
        let choice = match (sim.as_ref(), g) {
            (Some(st), Some(g)) => st.forced(g).map_or(t, |f| f[0]),
            _ => t,
        };
        out.push(choice);
        if drafts.get(j) != Some(&choice) {
            break;
        }
        if let (Some(st), Some(g)) = (sim.as_mut(), g) {
            if st.advance(g, choice).is_err() {
                break;
            }
        }
    }
    out
}

/// The allowed-token bitset of each row of a verify block: row `j` is decided in
/// the grammar state reached after the block's first `j` drafts. Past a draft
/// the grammar rejects, rows keep the last state's set (verification stops there).
fn row_masks<'g>(drafts: &[u32], state: &VerdictState, g: &'g VerdictGrammar, out: &mut Vec<Option<&'g [u64]>>) {
    let mut sim = state.clone();
    for j in 0..=drafts.len() {
        out.push(Some(sim.allowed_bits(g)));
        if let Some(&d) = drafts.get(j) {
            // a rejected token leaves the state as it was
            let _ = sim.advance(g, d);
        }
    }
}

/// Greedy drafts under the grammar from the drafter's unmasked argmax ids (a
/// drafter that takes the argmax where its logits are): forced tokens replace
/// predictions, and the block ends at the first id the automaton rejects, at
/// EOS or once the verdict is complete. Shorter blocks than masking the
/// drafter's rows would give only where its best token is not allowed.
fn grammar_drafts(ids: &[u32], state: &VerdictState, g: &VerdictGrammar, eos: &[u32]) -> Vec<u32> {
    let mut sim = state.clone();
    let mut drafts = Vec::new();
    for &id in ids {
        if sim.is_complete() {
            break;
        }
        let d = sim.forced(g).map_or(id, |f| f[0]);
        if sim.advance(g, d).is_err() {
            break;
        }
        drafts.push(d);
        if eos.contains(&d) {
            break;
        }
    }
    drafts
}

/// Greedy drafts from the drafter's argmax ids, cut after the first EOS
/// (`make_drafts` without a grammar).
fn greedy_drafts(mut ids: Vec<u32>, eos: &[u32]) -> Vec<u32> {
    if let Some(k) = ids.iter().position(|d| eos.contains(d)) {
        ids.truncate(k + 1);
    }
    ids
}

/// Greedy drafts from the drafter's rows, filtered by the grammar: forced
/// tokens replace predictions, masked argmax elsewhere, cut at the first token
/// the automaton rejects, at EOS or once the verdict is complete.
fn make_drafts(logits: &[f32], vocab: usize, state: Option<&VerdictState>, g: Option<&VerdictGrammar>, eos: &[u32]) -> Vec<u32> {
    let mut sim = state.cloned();
    let mut drafts = Vec::new();
    for row in logits.chunks(vocab) {
        let d = match (sim.as_mut(), g) {
            (Some(st), Some(g)) => {
                if st.is_complete() {
                    break;
                }
                let d = match st.forced(g) {
                    Some(f) => f[0],
                    None => match st.masked_argmax(g, row) {
                        Some(d) => d,
                        None => break,
                    },
                };
                if st.advance(g, d).is_err() {
                    break;
                }
                d
            }
            _ => argmax(row),
        };
        drafts.push(d);
        if eos.contains(&d) {
            break;
        }
    }
    drafts
}

impl<'a> Run<'a> {
    pub(super) fn start(
        target: &'a mut dyn Backend,
        drafter: &'a mut dyn Drafter,
        reqs: &'a [GenerateRequest],
        grammar: Option<&'a VerdictGrammar>,
    ) -> Result<Self, BackendError> {
        let layers = drafter.target_layers().to_vec();
        let mut seqs = Vec::with_capacity(reqs.len());
        for r in reqs {
            if r.prompt_ids.is_empty() {
                return Err(BackendError::Unsupported("speculative decoding needs a non-empty prompt".into()));
            }
            seqs.push(SeqRun {
                seq: target.new_sequence(),
                dseq: drafter.new_sequence(),
                out: Vec::new(),
                pending: 0,
                ctx: Vec::new(),
                ctx_tokens: Vec::new(),
                cached: 0,
                sampler: Sampler::new(r.sampling),
                state: grammar.map(VerdictGrammar::start),
                active: true,
                decode_s: 0.0,
            });
        }
        let mut run = Run {
            target,
            drafter,
            grammar,
            reqs,
            layers,
            seqs,
            stats: SpecStats::default(),
            prefill_s: 0.0,
            decode_start: Instant::now(),
        };
        if let Err(e) = run.prefill() {
            run.release();
            return Err(e);
        }
        Ok(run)
    }

    fn prefill(&mut self) -> Result<(), BackendError> {
        let t0 = Instant::now();
        let chunks: Vec<Chunk<'_>> =
            self.seqs.iter().zip(self.reqs).map(|(s, r)| Chunk { seq: s.seq, tokens: &r.prompt_ids }).collect();
        let (logits, hidden) = self.target.forward_capture(&chunks, LogitsFor::Last, &self.layers)?;
        let vocab = self.target.vocab_size();
        let width = hidden.len() / self.reqs.iter().map(|r| r.prompt_ids.len()).sum::<usize>();
        let mut row0 = 0;
        for (i, r) in self.reqs.iter().enumerate() {
            let n = r.prompt_ids.len();
            let s = &mut self.seqs[i];
            s.ctx = hidden[row0 * width..(row0 + n) * width].to_vec();
            s.ctx_tokens = r.prompt_ids.clone();
            s.cached = n;
            row0 += n;
            let tok = target_choice(&logits[i * vocab..(i + 1) * vocab], s.state.as_ref(), self.grammar, &mut s.sampler);
            commit(s, tok, r, self.grammar)?;
            s.pending = tok;
        }
        self.prefill_s = t0.elapsed().as_secs_f64();
        self.decode_start = Instant::now();
        Ok(())
    }

    pub(super) fn any_active(&self) -> bool {
        self.seqs.iter().any(|s| s.active)
    }

    /// One draft + verify step at block size `b`; returns (drafted, accepted) per block.
    pub(super) fn step(&mut self, b: usize) -> Result<Vec<(usize, usize)>, BackendError> {
        let active: Vec<usize> = (0..self.seqs.len()).filter(|&i| self.seqs[i].active).collect();
        let max_ctx = self.target.max_context();
        let sizes: Vec<usize> = active
            .iter()
            .map(|&i| {
                let s = &self.seqs[i];
                let left = self.reqs[i].max_new_tokens.saturating_sub(s.out.len());
                b.min(left).min(max_ctx.saturating_sub(s.cached)).max(1)
            })
            .collect();
        // Draft every sequence whose block has room for drafts, in one drafter call.
        let t = Instant::now();
        let drafting: Vec<(usize, usize)> =
            active.iter().zip(&sizes).filter(|(_, &bi)| bi > 1).map(|(&i, &bi)| (i, bi)).collect();
        // Greedy decoding needs only argmax ids from drafter and target, which a GPU
        // computes where the logits are; a grammar becomes per-row token masks there.
        let greedy = active.iter().all(|&i| self.seqs[i].sampler.params().temperature <= 0.0);
        let vocab = self.target.vocab_size();
        let drafted: Vec<Vec<u32>> = {
            let inputs: Vec<DraftInput<'_>> = drafting
                .iter()
                .map(|&(i, bi)| {
                    let s = &self.seqs[i];
                    DraftInput {
                        seq: s.dseq,
                        context: &s.ctx,
                        context_tokens: &s.ctx_tokens,
                        first_token: s.pending,
                        position: s.cached,
                        block: bi,
                    }
                })
                .collect();
            if inputs.is_empty() {
                Vec::new()
            } else if greedy && self.grammar.is_none() {
                let ids = self.drafter.draft_argmax(&inputs)?;
                ids.into_iter().zip(&drafting).map(|(d, &(i, _))| greedy_drafts(d, &self.reqs[i].eos_ids)).collect()
            } else if let (true, true, Some(g)) = (greedy, self.drafter.argmax_on_device(), self.grammar) {
                let ids = self.drafter.draft_argmax(&inputs)?;
                ids.iter()
                    .zip(&drafting)
                    .map(|(d, &(i, _))| match self.seqs[i].state.as_ref() {
                        Some(st) => grammar_drafts(d, st, g, &self.reqs[i].eos_ids),
                        None => greedy_drafts(d.clone(), &self.reqs[i].eos_ids),
                    })
                    .collect()
            } else {
                let logits = self.drafter.draft(&inputs)?;
                logits
                    .iter()
                    .zip(&drafting)
                    .map(|(l, &(i, _))| make_drafts(l, vocab, self.seqs[i].state.as_ref(), self.grammar, &self.reqs[i].eos_ids))
                    .collect()
            }
        };
        let mut blocks: Vec<Vec<u32>> = active.iter().map(|&i| vec![self.seqs[i].pending]).collect();
        for (&(i, _), drafts) in drafting.iter().zip(drafted) {
            let s = &mut self.seqs[i];
            s.ctx.clear();
            s.ctx_tokens.clear();
            let k = active.iter().position(|&a| a == i).unwrap_or(0);
            blocks[k].extend(drafts);
        }
        self.stats.draft_s += t.elapsed().as_secs_f64();
        // Verify all blocks in one target forward.
        let t = Instant::now();
        let chunks: Vec<Chunk<'_>> =
            active.iter().zip(&blocks).map(|(&i, bl)| Chunk { seq: self.seqs[i].seq, tokens: bl }).collect();
        let (logits, ids, hidden) = if greedy {
            let (ids, hidden) = match self.grammar {
                None => self.target.forward_capture_argmax(&chunks, &self.layers)?,
                Some(g) => {
                    let mut masks = Vec::with_capacity(chunks.iter().map(|c| c.tokens.len()).sum());
                    for (&i, bl) in active.iter().zip(&blocks) {
                        match self.seqs[i].state.as_ref() {
                            Some(st) => row_masks(&bl[1..], st, g, &mut masks),
                            None => masks.extend(bl.iter().map(|_| None)),
                        }
                    }
                    self.target.forward_capture_masked_argmax(&chunks, &self.layers, &masks)?
                }
            };
            (Vec::new(), ids, hidden)
        } else {
            let (logits, hidden) = self.target.forward_capture(&chunks, LogitsFor::All, &self.layers)?;
            (logits, Vec::new(), hidden)
        };
        self.stats.verify_s += t.elapsed().as_secs_f64();
        self.stats.steps += 1;
        self.stats.block_sizes.push(b);
        let width = hidden.len() / blocks.iter().map(Vec::len).sum::<usize>().max(1);
        let mut row0 = 0;
        let mut outcomes = Vec::with_capacity(active.len());
        for (&i, block) in active.iter().zip(&blocks) {
            let n = block.len();
            let s = &mut self.seqs[i];
            let drafts = &block[1..];
            let tokens = if greedy {
                verify_greedy(&ids[row0..row0 + n], drafts, s.state.as_ref(), self.grammar)
            } else {
                let rows = &logits[row0 * vocab..(row0 + n) * vocab];
                verify_block(rows, vocab, drafts, s.state.as_ref(), self.grammar, &mut s.sampler)
            };
            let accepted = tokens.len() - 1;
            // KAIROS_LOG=kairos::engine::speculative=trace: every block, for acceptance studies
            tracing::trace!(seq = i, position = s.cached, ?block, target = ?tokens, accepted, "verified block");
            // The block's first `accepted + 1` tokens are now committed context.
            self.target.truncate(s.seq, s.cached + accepted + 1)?;
            s.ctx.extend_from_slice(&hidden[row0 * width..(row0 + accepted + 1) * width]);
            s.ctx_tokens.extend_from_slice(&block[..accepted + 1]);
            s.cached += accepted + 1;
            row0 += n;
            let mut committed = 0;
            for &tok in &tokens {
                commit(s, tok, &self.reqs[i], self.grammar)?;
                committed += 1;
                if !s.active {
                    s.decode_s = self.decode_start.elapsed().as_secs_f64();
                    break;
                }
            }
            s.pending = *tokens.last().unwrap_or(&s.pending);
            self.stats.blocks += 1;
            self.stats.committed += committed;
            self.stats.drafted += drafts.len();
            self.stats.accepted += accepted;
            outcomes.push((drafts.len(), accepted));
        }
        Ok(outcomes)
    }

    /// Frees every backend and drafter slot of the run.
    pub(super) fn release(&mut self) {
        for s in &self.seqs {
            self.target.free_sequence(s.seq);
            self.drafter.free_sequence(s.dseq);
        }
    }

    pub(super) fn finish(self) -> SpecOutput {
        let prefill_s = self.prefill_s;
        let outputs = self
            .seqs
            .into_iter()
            .map(|s| {
                let steps = s.out.len().saturating_sub(1);
                let tokens_per_s = if s.decode_s > 0.0 && steps > 0 { steps as f64 / s.decode_s } else { 0.0 };
                GenerateOutput { output_ids: s.out, top_logits: Vec::new(), prefill_s, decode_s: s.decode_s, tokens_per_s }
            })
            .collect();
        SpecOutput { outputs, stats: self.stats }
    }
}

/// Appends `tok` to the output; the sequence stops at EOS, a complete verdict or the token limit.
fn commit(s: &mut SeqRun, tok: u32, req: &GenerateRequest, g: Option<&VerdictGrammar>) -> Result<(), BackendError> {
    s.out.push(tok);
    if let (Some(st), Some(g)) = (s.state.as_mut(), g) {
        st.advance(g, tok).map_err(|e| BackendError::Unsupported(format!("verdict grammar: {e}")))?;
        if st.is_complete() {
            s.active = false;
        }
    }
    if req.eos_ids.contains(&tok) || s.out.len() >= req.max_new_tokens {
        s.active = false;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::first_argmax;
    use crate::engine::sampling::SamplingParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The ids-only greedy path commits what the logits path commits.
    #[test]
    fn greedy_ids_path_equals_the_logits_path() {
        let mut rng = StdRng::seed_from_u64(3);
        let vocab = 6;
        let eos = [5u32];
        for _ in 0..2000 {
            let n = rng.gen_range(1..6);
            // few distinct values, so ties happen and the lowest-id rule matters
            let rows: Vec<f32> = (0..n * vocab).map(|_| rng.gen_range(0..4) as f32).collect();
            let target: Vec<u32> = rows.chunks(vocab).map(argmax).collect();
            // drafts: mostly the target's own choice, sometimes not
            let drafts: Vec<u32> =
                target[..n - 1].iter().map(|&t| if rng.gen_bool(0.8) { t } else { rng.gen_range(0..vocab as u32) }).collect();
            let mut sampler = Sampler::new(SamplingParams::default());
            assert_eq!(verify_greedy(&target, &drafts, None, None), verify_block(&rows, vocab, &drafts, None, None, &mut sampler));
            assert_eq!(greedy_drafts(target.clone(), &eos), make_drafts(&rows, vocab, None, None, &eos));
        }
    }

    /// Under a verdict grammar, ids from per-row masked argmaxes (what a backend
    /// computes with `forward_capture_masked_argmax`) commit what masking the
    /// logits rows commits; drafts from unmasked argmax ids are a prefix of the
    /// drafts from masked rows.
    #[test]
    fn greedy_ids_path_equals_the_logits_path_under_a_grammar() {
        use crate::backend::first_argmax_allowed;
        use crate::engine::constrained::VerdictSchema;
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for f in ["block", "allow", "review", "\",\"score\":", "0.", "0.9", "12", ",\"reason\":\"", " card", "\"}", "ok"] {
            vocab.push(f.as_bytes().to_vec());
        }
        vocab.push(b"</s>".to_vec());
        let n_vocab = vocab.len();
        let eos = [n_vocab as u32 - 1];
        let g = VerdictGrammar::compile(&VerdictSchema::fraud_default(), &vocab, &eos).expect("grammar");
        let mut rng = StdRng::seed_from_u64(5);
        let greedy = SamplingParams::default();
        let (mut checked, mut accepted) = (0, 0);
        for _ in 0..3000 {
            // a state somewhere along a verdict (mostly in the decision and the score,
            // where the allowed set changes token by token): a random allowed walk
            let mut st = g.start();
            let walk = if rng.gen_bool(0.7) { rng.gen_range(0..8) } else { rng.gen_range(0..40) };
            for _ in 0..walk {
                if st.is_complete() {
                    break;
                }
                let row: Vec<f32> = (0..n_vocab).map(|_| rng.gen_range(0.0..1.0)).collect();
                let t = st.forced(&g).map_or_else(|| st.masked_argmax(&g, &row).expect("a token"), |f| f[0]);
                st.advance(&g, t).expect("allowed");
            }
            let n = rng.gen_range(1..7);
            // few distinct values, so ties happen and the lowest-id rule matters
            let rows: Vec<f32> = (0..n * n_vocab).map(|_| rng.gen_range(0..4) as f32).collect();
            let drafts_masked = make_drafts(&rows[..(n - 1) * n_vocab], n_vocab, Some(&st), Some(&g), &eos);
            let ids: Vec<u32> = rows.chunks(n_vocab).map(first_argmax).collect();
            let drafts_ids = grammar_drafts(&ids[..n - 1], &st, &g, &eos);
            assert_eq!(drafts_ids[..], drafts_masked[..drafts_ids.len()], "ids drafts are a prefix of masked drafts");
            // mostly the grammar's drafts, now and then a wrong token
            let drafts: Vec<u32> = drafts_masked
                .iter()
                .map(|&d| if rng.gen_bool(0.85) { d } else { rng.gen_range(0..n_vocab as u32) })
                .collect();
            let rows = &rows[..(drafts.len() + 1) * n_vocab];
            let mut masks = Vec::new();
            row_masks(&drafts, &st, &g, &mut masks);
            assert_eq!(masks.len(), drafts.len() + 1);
            let target: Vec<u32> = rows
                .chunks(n_vocab)
                .zip(&masks)
                .map(|(r, m)| first_argmax_allowed(r, m.expect("masked")).unwrap_or(0))
                .collect();
            let want = verify_block(rows, n_vocab, &drafts, Some(&st), Some(&g), &mut Sampler::new(greedy));
            assert_eq!(verify_greedy(&target, &drafts, Some(&st), Some(&g)), want, "drafts {drafts:?}");
            checked += 1;
            accepted += want.len() - 1;
        }
        assert!(checked == 3000 && accepted > 1000, "accepted {accepted} drafts");
    }
}
