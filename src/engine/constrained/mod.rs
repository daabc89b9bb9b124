//! Constrained decoding of verdict JSON.
//!
//! A [`VerdictSchema`] (from the pipeline config) is compiled into a
//! byte-level DFA accepting exactly the canonical verdict objects
//! (`{"decision":"block","score":0.93,"reason":"..."}`, decision first, no
//! whitespace), then lifted to tokens with a [`TokenTrie`] of the vocabulary:
//! the allowed tokens of a state are those whose whole byte string the DFA
//! accepts from that state. Allowed sets are computed by walking the trie and
//! the DFA together (skipping rejected subtrees) and cached per state (string
//! states with enough room left share one cache entry).
//!
//! Usage per sequence:
//! ```text
//! let g = VerdictGrammar::compile(&schema, &vocab_bytes, &[eos])?;
//! let mut st = g.start();
//! while !st.is_complete() {
//!     if let Some(toks) = st.forced(&g) { for t in toks { st.advance(&g, t)?; } continue; }
//!     st.apply_allowed(&g, &mut logits);            // or allowed() + apply_mask()
//!     let t = sample(&logits);
//!     st.advance(&g, t)?;
//!     if deadline_hit && st.decision_done() { let json = st.closed_text(&g); break; }
//! }
//! ```

mod dfa;
mod number;
pub mod schema;
pub mod trie;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_timing;

use std::sync::OnceLock;

pub use schema::{FieldKind, FieldSpec, VerdictSchema};
pub use trie::TokenTrie;

use dfa::{Dfa, DEAD};

/// Errors of schema validation, grammar compilation and constrained stepping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    #[error("verdict schema has no fields")]
    EmptySchema,
    #[error("first verdict field `{field}` must be the decision enum")]
    DecisionNotEnum { field: String },
    #[error("verdict field name `{field}` is empty or has characters other than printable ASCII without '\"' and '\\'")]
    InvalidFieldName { field: String },
    #[error("verdict field `{field}` appears twice")]
    DuplicateField { field: String },
    #[error("enum field `{field}` has no values")]
    EmptyEnum { field: String },
    #[error("enum field `{field}`: invalid or duplicate value {value:?}")]
    InvalidEnumValue { field: String, value: String },
    #[error("field `{field}`: {detail}")]
    InvalidRange { field: String, detail: String },
    #[error("token {token} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("token {token} is not allowed after {text:?}")]
    TokenNotAllowed { token: u32, text: String },
    #[error("internal grammar error: {0}")]
    Internal(String),
}

/// A verdict schema compiled against one vocabulary. Immutable after
/// compilation apart from internal lazily-filled caches; `Sync`, share it
/// behind an `Arc` across sequences.
pub struct VerdictGrammar {
    dfa: Dfa,
    trie: TokenTrie,
    /// Concatenated token bytes; token `i` is `tok_bytes[tok_off[i]..tok_off[i + 1]]`.
    tok_bytes: Vec<u8>,
    tok_off: Vec<usize>,
    is_eos: Vec<bool>,
    /// the allowed-token bitset of a complete verdict: EOS only
    eos_bits: Box<[u64]>,
    eos_ids: Vec<u32>,
    n_tokens: usize,
    words: usize,
    masks: Vec<OnceLock<Box<[u64]>>>,
    by_content_chars: Vec<Vec<u32>>,
    forced: Vec<OnceLock<Option<Vec<u32>>>>,
}

impl VerdictGrammar {
    /// Compile `schema` for a vocabulary given as the byte string of every
    /// token id (index = id). Empty byte strings (special tokens decoded to
    /// nothing) are never allowed; `eos_ids` are allowed only once the verdict
    /// is complete. The mask length is `max(vocab.len(), max eos id + 1)`.
    pub fn compile(
        schema: &VerdictSchema,
        vocab: &[Vec<u8>],
        eos_ids: &[u32],
    ) -> Result<Self, ConstraintError> {
        schema.validate()?;
        let n_tokens = eos_ids
            .iter()
            .map(|&e| e as usize + 1)
            .max()
            .unwrap_or(0)
            .max(vocab.len());
        let mut is_eos = vec![false; n_tokens];
        for &e in eos_ids {
            is_eos[e as usize] = true;
        }
        let trie = TokenTrie::new(vocab, |id| is_eos[id as usize]);
        let dfa = Dfa::build(schema, trie.max_len)?;
        let n = dfa.num_states();
        // Tokens by number of string-content characters (UTF-8 lead bytes
        // before the first '"'), to derive masks near `max_chars`.
        let mut by_content_chars = vec![Vec::new(); trie.max_len + 1];
        for (id, tok) in vocab.iter().enumerate() {
            let content = tok.split(|&b| b == b'"').next().unwrap_or(&[]);
            let chars = content.iter().filter(|&&b| b & 0xc0 != 0x80).count();
            if let Some(v) = by_content_chars.get_mut(chars) {
                v.push(id as u32);
            }
        }
        let g = VerdictGrammar {
            by_content_chars,
            trie,
            tok_bytes: vocab.concat(),
            tok_off: std::iter::once(0)
                .chain(vocab.iter().scan(0, |acc, t| {
                    *acc += t.len();
                    Some(*acc)
                }))
                .collect(),
            eos_ids: eos_ids.to_vec(),
            eos_bits: {
                let mut bits = vec![0u64; n_tokens.div_ceil(64)];
                for &e in eos_ids {
                    bits[e as usize / 64] |= 1 << (e % 64);
                }
                bits.into_boxed_slice()
            },
            is_eos,
            n_tokens,
            words: n_tokens.div_ceil(64),
            masks: (0..n).map(|_| OnceLock::new()).collect(),
            forced: (0..n).map(|_| OnceLock::new()).collect(),
            dfa,
        };
        // The shared mask of string content with room left is the expensive
        // one (nearly the whole trie is walked): compute it up front so that
        // every typical state is a cache hit.
        for &s in &g.dfa.string_tops {
            g.mask_bits(s);
        }
        Ok(g)
    }

    /// Initial state of a new sequence.
    pub fn start(&self) -> VerdictState {
        let s = self.dfa.start;
        VerdictState {
            state: s,
            bytes: Vec::new(),
            boundary_state: s,
            boundary_len: 0,
            eos: false,
            complete: false,
            decision_done: false,
        }
    }

    /// Mask length (number of token ids).
    pub fn vocab_len(&self) -> usize {
        self.n_tokens
    }

    /// Byte string of a token (empty for ids outside the vocabulary).
    pub fn token_bytes(&self, token: u32) -> &[u8] {
        let t = token as usize;
        match (self.tok_off.get(t), self.tok_off.get(t + 1)) {
            (Some(&a), Some(&b)) => &self.tok_bytes[a..b],
            _ => &[],
        }
    }

    /// Number of DFA states (for diagnostics).
    pub fn num_states(&self) -> usize {
        self.dfa.num_states()
    }

    /// Compute every mask now (optional; otherwise filled lazily on first use,
    /// except the shared string-content mask, which `compile` computes).
    pub fn precompute(&self) {
        for s in 0..self.dfa.num_states() as u32 {
            if s != self.dfa.accept {
                self.mask_bits(s);
            }
        }
    }

    /// Allowed-token bitset (bit i = token i) of a non-accepting state.
    fn mask_bits(&self, s: u32) -> &[u64] {
        let rep = self.dfa.mask_rep[s as usize];
        self.masks[rep as usize].get_or_init(|| {
            if let Some((prev, chars)) = self.dfa.derive[rep as usize] {
                let mut bits = self.mask_bits(prev).to_vec();
                for &t in self
                    .by_content_chars
                    .get(chars as usize)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    bits[t as usize / 64] &= !(1u64 << (t % 64));
                }
                return bits.into_boxed_slice();
            }
            let mut bits = vec![0u64; self.words];
            self.trie.fill_allowed(&self.dfa, rep, &mut bits);
            bits.into_boxed_slice()
        })
    }

    fn forced_tokens(&self, s: u32) -> Option<Vec<u32>> {
        self.forced[s as usize]
            .get_or_init(|| {
                let mut bytes = Vec::new();
                let mut cur = s;
                while cur != self.dfa.accept {
                    let Some(b) = self.dfa.single[cur as usize] else {
                        break;
                    };
                    bytes.push(b);
                    cur = self.dfa.step(cur, b);
                }
                let mut toks = Vec::new();
                let mut pos = 0;
                while pos < bytes.len() {
                    let Some((id, len)) = self.trie.longest_prefix(&bytes[pos..]) else {
                        break;
                    };
                    toks.push(id);
                    pos += len;
                }
                (!toks.is_empty()).then_some(toks)
            })
            .clone()
    }
}

/// Per-sequence decoding state; cheap to clone.
#[derive(Debug, Clone)]
pub struct VerdictState {
    state: u32,
    bytes: Vec<u8>,
    /// DFA state and length at the last UTF-8 character boundary.
    boundary_state: u32,
    boundary_len: usize,
    eos: bool,
    complete: bool,
    decision_done: bool,
}

impl VerdictState {
    /// Fill `mask` (resized to the vocabulary length) with the allowed tokens:
    /// tokens whose bytes keep the verdict valid; EOS only when complete.
    pub fn allowed(&self, g: &VerdictGrammar, mask: &mut Vec<bool>) {
        mask.clear();
        mask.resize(g.n_tokens, false);
        if self.is_complete() {
            for &e in &g.eos_ids {
                mask[e as usize] = true;
            }
            return;
        }
        let bits = g.mask_bits(self.state);
        for (chunk, &word) in mask.chunks_mut(64).zip(bits) {
            if word == 0 {
                continue;
            }
            for (k, m) in chunk.iter_mut().enumerate() {
                *m = word >> k & 1 == 1;
            }
        }
    }

    /// Set the logits of disallowed tokens to `-inf` directly (no `Vec<bool>`).
    /// Logits beyond the vocabulary length are disallowed too.
    pub fn apply_allowed(&self, g: &VerdictGrammar, logits: &mut [f32]) {
        if self.is_complete() {
            for (i, l) in logits.iter_mut().enumerate() {
                if !g.is_eos.get(i).copied().unwrap_or(false) {
                    *l = f32::NEG_INFINITY;
                }
            }
            return;
        }
        let bits = g.mask_bits(self.state);
        for (w, chunk) in logits.chunks_mut(64).enumerate() {
            let word = bits.get(w).copied().unwrap_or(0);
            if word == u64::MAX {
                continue;
            }
            if word == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (k, l) in chunk.iter_mut().enumerate() {
                *l = if word >> k & 1 == 1 {
                    *l
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }

    /// The allowed tokens as a bitset (bit `i % 64` of word `i / 64` = token `i`),
    /// `ceil(vocab / 64)` words: what `allowed` and `apply_allowed` apply; only
    /// EOS once the verdict is complete. Borrowed from the grammar's caches, so a
    /// backend can take the masked argmax where the logits are.
    pub fn allowed_bits<'g>(&self, g: &'g VerdictGrammar) -> &'g [u64] {
        if self.is_complete() {
            &g.eos_bits
        } else {
            g.mask_bits(self.state)
        }
    }

    /// The greedy choice under the grammar, read in place: the first largest
    /// logit among the allowed tokens — what `apply_allowed` then `argmax` pick,
    /// without copying or writing the row (the per-row cost of greedy
    /// constrained decoding and of DFlash verification under a verdict grammar).
    /// `None` when no allowed token has a logit above `-inf`; then any choice is rejected.
    pub fn masked_argmax(&self, g: &VerdictGrammar, logits: &[f32]) -> Option<u32> {
        crate::backend::first_argmax_allowed(logits, self.allowed_bits(g))
    }

    /// The sampler's choice from `logits` under the grammar: the masked argmax in
    /// place when greedy, else a draw from a masked copy. `None` when no allowed
    /// token has a finite logit.
    pub fn sample(&self, g: &VerdictGrammar, logits: &[f32], sampler: &mut crate::engine::sampling::Sampler) -> Option<u32> {
        if sampler.params().temperature <= 0.0 {
            return self.masked_argmax(g, logits);
        }
        let mut l = logits.to_vec();
        self.apply_allowed(g, &mut l);
        l.iter().any(|v| v.is_finite()).then(|| sampler.sample(&l))
    }

    /// When exactly one byte continuation is possible (e.g. `{"decision":"` at
    /// the start, `","score":` after the decision), the tokens to append
    /// without sampling (greedy longest-token tokenization of the forced
    /// bytes). `None` when there is a choice, or once complete (then only EOS
    /// remains).
    pub fn forced(&self, g: &VerdictGrammar) -> Option<Vec<u32>> {
        if self.is_complete() {
            return None;
        }
        g.forced_tokens(self.state)
    }

    /// Append `token`; errors (leaving the state unchanged) if it is not allowed.
    pub fn advance(&mut self, g: &VerdictGrammar, token: u32) -> Result<(), ConstraintError> {
        let t = token as usize;
        if t >= g.n_tokens {
            return Err(ConstraintError::TokenOutOfRange {
                token,
                vocab: g.n_tokens,
            });
        }
        let not_allowed = || ConstraintError::TokenNotAllowed {
            token,
            text: String::from_utf8_lossy(&self.bytes).into_owned(),
        };
        if g.is_eos[t] {
            if self.is_complete() {
                self.eos = true;
                return Ok(());
            }
            return Err(not_allowed());
        }
        let bytes = g.token_bytes(token);
        if bytes.is_empty() || self.complete {
            return Err(not_allowed());
        }
        let (mut s, mut bs, mut bl) = (self.state, self.boundary_state, self.boundary_len);
        for (i, &b) in bytes.iter().enumerate() {
            s = g.dfa.step(s, b);
            if s == DEAD {
                return Err(not_allowed());
            }
            if !g.dfa.mid_char[s as usize] {
                bs = s;
                bl = self.bytes.len() + i + 1;
            }
        }
        self.state = s;
        self.boundary_state = bs;
        self.boundary_len = bl;
        self.bytes.extend_from_slice(bytes);
        self.complete = s == g.dfa.accept;
        self.decision_done = g.dfa.seg[s as usize] >= g.dfa.decision_done_seg;
        Ok(())
    }

    /// The verdict object is closed (only EOS may follow).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The decision value (first field) has been fully emitted, including its
    /// closing quote; from here on [`close_early`](Self::close_early) works.
    pub fn decision_done(&self) -> bool {
        self.decision_done
    }

    /// Text to append to [`text`](Self::text) to obtain a valid verdict now
    /// (anytime verdict): closes the current string (the reason is truncated),
    /// fills the remaining fields with minimal valid values and closes the
    /// object. `None` before the decision is decoded; `Some("")` if complete.
    pub fn close_early(&self, g: &VerdictGrammar) -> Option<String> {
        if !self.decision_done() {
            return None;
        }
        if self.is_complete() {
            return Some(String::new());
        }
        let path = g.dfa.close_path(self.boundary_state)?;
        String::from_utf8(path).ok()
    }

    /// `text() + close_early()`: the complete verdict JSON, if the decision is done.
    pub fn closed_text(&self, g: &VerdictGrammar) -> Option<String> {
        self.close_early(g)
            .map(|tail| format!("{}{}", self.text(), tail))
    }

    /// Text emitted so far, up to the last complete UTF-8 character (a token
    /// may end in the middle of a multi-byte character; see [`bytes`](Self::bytes)).
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.boundary_len]).unwrap_or("")
    }

    /// An EOS token has been accepted after the complete verdict.
    pub fn eos_emitted(&self) -> bool {
        self.eos
    }

    /// All bytes emitted so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Set the logits of disallowed tokens to `-inf` (`mask[i] == false`, or `i`
/// beyond the mask).
pub fn apply_mask(logits: &mut [f32], mask: &[bool]) {
    for (i, l) in logits.iter_mut().enumerate() {
        if !mask.get(i).copied().unwrap_or(false) {
            *l = f32::NEG_INFINITY;
        }
    }
}
