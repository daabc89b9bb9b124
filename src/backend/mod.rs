//! Backends run the model forward over resident weights and KV caches.
//! `cpu` is the reference every other backend is tested against; `cuda`
//! (feature `cuda`) is the fast one. The engine sees only `Backend`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod collectives;
pub mod rope;
pub mod sharded;

/// A sequence's KV-cache slot inside a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub usize);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown sequence {0:?}")]
    UnknownSequence(SeqId),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence {seq:?} would reach {len} tokens, over the context limit of {limit}")]
    ContextFull { seq: SeqId, len: usize, limit: usize },
    #[error("device error: {0}")]
    Device(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only each chunk's last token (generation).
    Last,
    /// Every token of every chunk (evaluation, speculative verification).
    All,
}

/// New tokens for one sequence in a forward pass.
pub struct Chunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
}

pub trait Backend: Send {
    fn name(&self) -> String;
    fn vocab_size(&self) -> usize;
    /// Longest sequence a slot can hold.
    fn max_context(&self) -> usize;
    fn new_sequence(&mut self) -> SeqId;
    fn free_sequence(&mut self, seq: SeqId);
    /// Tokens currently cached for `seq`.
    fn seq_len(&self, seq: SeqId) -> Result<usize, BackendError>;
    /// Drops cached tokens beyond `len` (speculative rollback, prefix reuse).
    fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), BackendError>;
    /// Copies the first `len` cached tokens of `from` into `to` (shared prompt prefixes).
    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError>;
    /// Appends each chunk's tokens to its sequence and returns logits, row-major:
    /// one row per chunk (`Last`) or per token in chunk order (`All`).
    fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> Result<Vec<f32>, BackendError>;

    /// `forward` that also returns the hidden states leaving the decoder
    /// layers listed in `layers` (layer `i` = the output of decoder layer `i`,
    /// transformers' `hidden_states[i + 1]`), for every token of every chunk in
    /// chunk order: row-major `[tokens, layers.len() * hidden]`, each row the
    /// listed layers' states concatenated. DFlash drafters are conditioned on
    /// these. Backends that cannot capture say so.
    fn forward_capture(
        &mut self,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
        layers: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>), BackendError> {
        let _ = (chunks, which, layers);
        Err(BackendError::Unsupported(format!("backend `{}` cannot capture hidden states (DFlash needs the cpu backend)", self.name())))
    }

    /// `forward_capture` for greedy verification: instead of logits, the
    /// argmax token of every row (ties: the lowest id, as greedy sampling),
    /// so a backend that computes it on the device returns only ids.
    fn forward_capture_argmax(&mut self, chunks: &[Chunk<'_>], layers: &[usize]) -> Result<(Vec<u32>, Vec<f32>), BackendError> {
        let (logits, hidden) = self.forward_capture(chunks, LogitsFor::All, layers)?;
        let v = self.vocab_size().max(1);
        Ok((logits.chunks(v).map(first_argmax).collect(), hidden))
    }

    /// Whether this backend takes argmaxes where its logits are (a GPU), so that
    /// `forward_capture_argmax` / `forward_capture_masked_argmax` are cheaper than
    /// copying logits rows out. The default implementations compute every row's
    /// logits on the host, which costs a CPU far more than `forward(.., Last)`.
    fn argmax_on_device(&self) -> bool {
        false
    }

    /// `forward_capture_argmax` with each row's argmax over the tokens its bitset
    /// allows (`masks[r]`, one per row of the chunks in order, as
    /// [`first_argmax_allowed`] reads it; `None`: every token): greedy
    /// verification under a verdict grammar. A row with no allowed logit gets id 0.
    /// A backend that takes the argmax on the device returns only ids.
    fn forward_capture_masked_argmax(
        &mut self,
        chunks: &[Chunk<'_>],
        layers: &[usize],
        masks: &[Option<&[u64]>],
    ) -> Result<(Vec<u32>, Vec<f32>), BackendError> {
        check_masks(chunks, masks)?;
        let (logits, hidden) = self.forward_capture(chunks, LogitsFor::All, layers)?;
        Ok((masked_argmax_rows(&logits, self.vocab_size(), masks), hidden))
    }

    /// A decode step that chooses the next token on the device: each chunk appends
    /// its one token and gets a token drawn with `params[i] = (temperature, top_p, u)`
    /// (temperature 0: greedy; u uniform in [0, 1) from the caller's seeded RNG), so only
    /// ids leave the device. `Ok(None)`: this backend samples on the host — nothing was
    /// appended, the caller uses `forward` and its own sampler.
    fn decode_choose(&mut self, chunks: &[Chunk<'_>], params: &[(f32, f32, f32)]) -> Result<Option<Vec<u32>>, BackendError> {
        let _ = (chunks, params);
        Ok(None)
    }
}

/// Each logits row's argmax over the tokens its mask allows (`None`: all; a row
/// with no allowed logit: id 0), as `Backend::forward_capture_masked_argmax` returns.
pub fn masked_argmax_rows(logits: &[f32], vocab: usize, masks: &[Option<&[u64]>]) -> Vec<u32> {
    logits
        .chunks(vocab.max(1))
        .zip(masks)
        .map(|(row, m)| match m {
            Some(bits) => first_argmax_allowed(row, bits).unwrap_or(0),
            None => first_argmax(row),
        })
        .collect()
}

/// `masks` holds one entry per row of `chunks` (a caller error otherwise).
pub fn check_masks(chunks: &[Chunk<'_>], masks: &[Option<&[u64]>]) -> Result<(), BackendError> {
    let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
    if masks.len() != rows {
        return Err(BackendError::Unsupported(format!("{} token masks for {rows} rows", masks.len())));
    }
    Ok(())
}

/// Index of the first largest value (greedy sampling's tie rule, as torch.argmax
/// for rows without NaN; NaNs are never chosen over a number).
pub fn first_argmax(row: &[f32]) -> u32 {
    first_argmax_from(row, 0, f32::NEG_INFINITY).map_or(0, |(i, _)| i as u32)
}

/// The first largest value among the tokens a bitset allows (bit `i % 64` of word
/// `i / 64` allows token `i`; tokens past the bitset are not allowed), as
/// `first_argmax` of the row with every other value set to `-inf` would pick it,
/// read in place. `None` when no allowed value exceeds `-inf`. Words that allow
/// every token of a chunk of 64 are scanned by their maximum first, mostly-allowed
/// words by a branch-free masked maximum, words allowing none are skipped.
pub fn first_argmax_allowed(row: &[f32], bits: &[u64]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    let mut best_v = f32::NEG_INFINITY;
    for (w, chunk) in row.chunks(64).enumerate() {
        let word = bits.get(w).copied().unwrap_or(0);
        if word == 0 {
            continue;
        }
        if word == u64::MAX && chunk.len() == 64 {
            if let Some(found) = first_argmax_from(chunk, w * 64, best_v) {
                (best, best_v) = (Some(found), found.1);
            }
            continue;
        }
        if word.count_ones() > 8 {
            let m = chunk
                .iter()
                .enumerate()
                .fold(f32::NEG_INFINITY, |a, (k, &v)| a.max(if word >> k & 1 == 1 { v } else { f32::NEG_INFINITY }));
            // (never NaN: `max` skips NaNs)
            if m <= best_v {
                continue;
            }
        }
        let mut rest = word;
        while rest != 0 {
            let k = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            match chunk.get(k) {
                Some(&v) if v > best_v => (best, best_v) = (Some((w * 64 + k, v)), v),
                Some(_) => {}
                None => break,
            }
        }
    }
    best.map(|(i, _)| i as u32)
}

/// The first index `i` of `row` whose value is the row's largest and greater than
/// `above`, with that value; `None` when no value exceeds `above`. Indices are
/// returned offset by `base`. Chunks of 64 are scanned by their maximum first
/// (a vectorised pass), and only a chunk holding a new maximum is searched.
pub(crate) fn first_argmax_from(row: &[f32], base: usize, above: f32) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    let mut best_v = above;
    for (c, chunk) in row.chunks(64).enumerate() {
        let m = chunk.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if m > best_v {
            // the first position holding the chunk's maximum
            let k = chunk.iter().position(|&v| v == m).unwrap_or(0);
            best_v = m;
            best = Some((base + c * 64 + k, m));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::first_argmax;

    /// The row scan `first_argmax` replaced: the first index holding the largest value.
    fn scan(row: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        best as u32
    }

    #[test]
    fn first_argmax_is_the_first_largest() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let levels = [f32::NEG_INFINITY, -0.0, 0.0, 1.5, 3.0, f32::INFINITY];
        for len in [1, 2, 63, 64, 65, 127, 128, 1000, 49152] {
            for _ in 0..20 {
                let row: Vec<f32> = (0..len).map(|_| levels[next() % levels.len()]).collect();
                assert_eq!(first_argmax(&row), scan(&row), "{len}");
                let row: Vec<f32> = (0..len).map(|_| (next() % 1000) as f32 / 7.0 - 70.0).collect();
                assert_eq!(first_argmax(&row), scan(&row), "{len}");
            }
        }
        assert_eq!(first_argmax(&[f32::NEG_INFINITY; 130]), 0);
    }

    #[test]
    fn first_argmax_allowed_is_the_masked_argmax() {
        let mut seed = 11u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 11
        };
        let levels = [f32::NEG_INFINITY, 0.0, 1.5, 3.0];
        for len in [1usize, 63, 64, 65, 200, 1000] {
            for case in 0..200 {
                let row: Vec<f32> = (0..len).map(|_| levels[next() as usize % levels.len()]).collect();
                // sparse, dense, full and empty words, and bitsets shorter than the row
                let words = if case % 5 == 0 { len / 64 } else { len.div_ceil(64) };
                let bits: Vec<u64> = (0..words)
                    .map(|_| match next() % 4 {
                        0 => 0,
                        1 => u64::MAX,
                        2 => next() & next() & next(),
                        _ => next() | next(),
                    })
                    .collect();
                let allowed = |i: usize| bits.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
                let masked: Vec<f32> = row.iter().enumerate().map(|(i, &v)| if allowed(i) { v } else { f32::NEG_INFINITY }).collect();
                let want = masked.iter().any(|&v| v > f32::NEG_INFINITY).then(|| scan(&masked));
                assert_eq!(super::first_argmax_allowed(&row, &bits), want, "len {len} case {case}");
            }
        }
    }
}
