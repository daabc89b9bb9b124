//! The CPU reference backend: f32 math over any weight precision, KV cache
//! per sequence, all chunks of a step batched through every matmul.

pub mod attention;
pub mod matmul;
pub mod moe;
pub mod ops;

use std::sync::Arc;

use super::rope::RopeTable;
use super::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::model::family::{Layer, Mlp, ModelWeights};
use attention::{attend, AttentionShape, QueryRow};
use matmul::{linear, matmul};

/// Keys and values of one sequence, `[len, kv_dim]` per layer.
#[derive(Clone, Default)]
struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

pub struct CpuBackend {
    weights: Arc<ModelWeights>,
    rope: RopeTable,
    slots: Vec<Option<KvCache>>,
    max_context: usize,
    tap: Option<Box<dyn MlpTap>>,
}

/// Where a dense MLP's input is observed by an [`MlpTap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpSite {
    /// The normed hidden state entering `gate_proj` and `up_proj` (`[n, hidden]`).
    GateUpInput,
    /// The gated activation entering `down_proj` (`[n, intermediate]`).
    DownInput,
}

/// Observer of the inputs of every dense MLP's linears during `forward` (calibration,
/// e.g. GPTQ Hessians). MoE expert inputs are not reported.
pub trait MlpTap: Send {
    fn record(&mut self, layer: usize, site: MlpSite, x: &[f32], n: usize);
}

impl CpuBackend {
    pub fn new(weights: Arc<ModelWeights>) -> Self {
        let c = &weights.config;
        let rope = RopeTable::new(&c.rope, c.head_dim);
        let max_context = c.max_position_embeddings;
        Self { weights, rope, slots: Vec::new(), max_context, tap: None }
    }

    /// Installs (or with `None` removes) the MLP input observer; returns the previous one.
    pub fn set_mlp_tap(&mut self, tap: Option<Box<dyn MlpTap>>) -> Option<Box<dyn MlpTap>> {
        std::mem::replace(&mut self.tap, tap)
    }

    pub fn weights(&self) -> &Arc<ModelWeights> {
        &self.weights
    }

    fn cache(&self, seq: SeqId) -> Result<&KvCache, BackendError> {
        self.slots.get(seq.0).and_then(Option::as_ref).ok_or(BackendError::UnknownSequence(seq))
    }

    fn cache_mut(&mut self, seq: SeqId) -> Result<&mut KvCache, BackendError> {
        self.slots.get_mut(seq.0).and_then(Option::as_mut).ok_or(BackendError::UnknownSequence(seq))
    }

    fn layer_forward(&mut self, li: usize, x: &mut [f32], chunks: &[Chunk<'_>], starts: &[usize]) {
        let weights = Arc::clone(&self.weights);
        let c = &weights.config;
        let layer: &Layer = &weights.layers[li];
        let n = x.len() / c.hidden_size;
        let mut h = vec![0f32; x.len()];
        ops::rmsnorm(x, &layer.input_norm, c.rms_norm_eps, &mut h);
        let o = self.attention(li, &h, chunks, starts);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
        ops::rmsnorm(x, &layer.post_attention_norm, c.rms_norm_eps, &mut h);
        let m = match &layer.mlp {
            Mlp::Dense(mlp) => match self.tap.as_mut() {
                None => moe::gated_mlp(mlp, c.activation, &h, n),
                Some(tap) => {
                    tap.record(li, MlpSite::GateUpInput, &h, n);
                    moe::gated_mlp_observed(mlp, c.activation, &h, n, &mut |g| tap.record(li, MlpSite::DownInput, g, n))
                }
            },
            Mlp::Moe(block) => moe::moe_forward(block, c, &h, n),
        };
        for (xv, mv) in x.iter_mut().zip(&m) {
            *xv += mv;
        }
    }

    /// Self-attention of layer `li` on the normed input `h` (one row per token of
    /// `chunks`, each chunk starting at `starts`): appends K/V to the caches and
    /// returns the output projection (before the residual add). Sharded ranks
    /// call it with their slice of heads and sum the results over ranks.
    pub fn attention(&mut self, li: usize, h: &[f32], chunks: &[Chunk<'_>], starts: &[usize]) -> Vec<f32> {
        let weights = Arc::clone(&self.weights);
        let c = &weights.config;
        let n = h.len() / c.hidden_size;
        let (hd, kvd) = (c.head_dim, c.kv_dim());
        let a = &weights.layers[li].attention;
        let mut q = linear(&a.q, h, n);
        let mut k = linear(&a.k, h, n);
        let v = linear(&a.v, h, n);
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            ops::rmsnorm_in_place(&mut q, qn, c.rms_norm_eps);
            ops::rmsnorm_in_place(&mut k, kn, c.rms_norm_eps);
        }
        // RoPE at each token's absolute position.
        let (mut cos, mut sin) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        let mut t = 0;
        for (chunk, &start) in chunks.iter().zip(starts) {
            for j in 0..chunk.tokens.len() {
                self.rope.cos_sin(start + j, &mut cos, &mut sin);
                for head in q[t * c.q_dim()..(t + 1) * c.q_dim()].chunks_mut(hd) {
                    ops::rope_rotate(head, &cos, &sin);
                }
                for head in k[t * kvd..(t + 1) * kvd].chunks_mut(hd) {
                    ops::rope_rotate(head, &cos, &sin);
                }
                t += 1;
            }
        }
        // Append to each sequence's cache, then attend.
        let mut t = 0;
        for chunk in chunks {
            let len = chunk.tokens.len();
            if let Some(Some(cache)) = self.slots.get_mut(chunk.seq.0) {
                cache.keys[li].extend_from_slice(&k[t * kvd..(t + len) * kvd]);
                cache.values[li].extend_from_slice(&v[t * kvd..(t + len) * kvd]);
            }
            t += len;
        }
        let mut rows = Vec::with_capacity(n);
        for (chunk, &start) in chunks.iter().zip(starts) {
            if let Some(Some(cache)) = self.slots.get(chunk.seq.0) {
                for j in 0..chunk.tokens.len() {
                    rows.push(QueryRow { keys: &cache.keys[li], values: &cache.values[li], pos: start + j });
                }
            }
        }
        let shape = AttentionShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: hd, kind: a.kind };
        let attn = attend(&rows, &q, &shape, a.sinks.as_deref());
        linear(&a.o, &attn, n)
    }

    /// Where each chunk starts in its sequence, after checking that the
    /// sequences exist and have room (token ids are the caller's to check).
    pub fn step_starts(&self, chunks: &[Chunk<'_>]) -> Result<Vec<usize>, BackendError> {
        let mut starts = Vec::with_capacity(chunks.len());
        for ch in chunks {
            let len = self.cache(ch.seq)?.len;
            if len + ch.tokens.len() > self.max_context {
                return Err(BackendError::ContextFull { seq: ch.seq, len: len + ch.tokens.len(), limit: self.max_context });
            }
            starts.push(len);
        }
        Ok(starts)
    }

    /// Counts the chunks' tokens as cached once every layer has appended them.
    pub fn commit_step(&mut self, chunks: &[Chunk<'_>]) -> Result<(), BackendError> {
        for ch in chunks {
            self.cache_mut(ch.seq)?.len += ch.tokens.len();
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn vocab_size(&self) -> usize {
        self.weights.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self) -> SeqId {
        let layers = self.weights.config.num_layers;
        let cache = KvCache { keys: vec![Vec::new(); layers], values: vec![Vec::new(); layers], len: 0 };
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            self.slots[i] = Some(cache);
            SeqId(i)
        } else {
            self.slots.push(Some(cache));
            SeqId(self.slots.len() - 1)
        }
    }

    fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.slots.get_mut(seq.0) {
            *s = None;
        }
    }

    fn seq_len(&self, seq: SeqId) -> Result<usize, BackendError> {
        Ok(self.cache(seq)?.len)
    }

    fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), BackendError> {
        let kvd = self.weights.config.kv_dim();
        let cache = self.cache_mut(seq)?;
        if len < cache.len {
            for (k, v) in cache.keys.iter_mut().zip(cache.values.iter_mut()) {
                k.truncate(len * kvd);
                v.truncate(len * kvd);
            }
            cache.len = len;
        }
        Ok(())
    }

    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<(), BackendError> {
        let kvd = self.weights.config.kv_dim();
        let src = self.cache(from)?;
        let len = len.min(src.len);
        let copy = KvCache {
            keys: src.keys.iter().map(|k| k[..len * kvd].to_vec()).collect(),
            values: src.values.iter().map(|v| v[..len * kvd].to_vec()).collect(),
            len,
        };
        *self.cache_mut(to)? = copy;
        Ok(())
    }

    fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> Result<Vec<f32>, BackendError> {
        Ok(self.run_forward(chunks, which, &[])?.0)
    }

    fn forward_capture(
        &mut self,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
        layers: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>), BackendError> {
        self.run_forward(chunks, which, layers)
    }
}

impl CpuBackend {
    /// The forward pass; the hidden states after each layer in `capture` are
    /// copied out per token (`[tokens, capture.len() * hidden]`).
    fn run_forward(
        &mut self,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
        capture: &[usize],
    ) -> Result<(Vec<f32>, Vec<f32>), BackendError> {
        let weights = Arc::clone(&self.weights);
        let c = &weights.config;
        let hdim = c.hidden_size;
        let mut starts = Vec::with_capacity(chunks.len());
        for ch in chunks {
            let len = self.cache(ch.seq)?.len;
            if len + ch.tokens.len() > self.max_context {
                return Err(BackendError::ContextFull { seq: ch.seq, len: len + ch.tokens.len(), limit: self.max_context });
            }
            if let Some(&id) = ch.tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(BackendError::TokenOutOfRange { id, vocab: c.vocab_size });
            }
            starts.push(len);
        }
        let n: usize = chunks.iter().map(|ch| ch.tokens.len()).sum();
        let mut x = vec![0f32; n * hdim];
        for (row, &id) in x.chunks_mut(hdim).zip(chunks.iter().flat_map(|ch| ch.tokens.iter())) {
            weights.embed.row_into(id as usize, row);
        }
        if let Some(&bad) = capture.iter().find(|&&l| l >= c.num_layers) {
            return Err(BackendError::Unsupported(format!(
                "cannot capture layer {bad}: the model has {} layers",
                c.num_layers
            )));
        }
        let width = capture.len() * hdim;
        let mut hidden = vec![0f32; n * width];
        for li in 0..c.num_layers {
            self.layer_forward(li, &mut x, chunks, &starts);
            for (slot, _) in capture.iter().enumerate().filter(|(_, &l)| l == li) {
                for (dst, src) in hidden.chunks_mut(width).zip(x.chunks(hdim)) {
                    dst[slot * hdim..(slot + 1) * hdim].copy_from_slice(src);
                }
            }
        }
        for ch in chunks {
            self.cache_mut(ch.seq)?.len += ch.tokens.len();
        }
        // Final norm and lm_head only on the rows asked for.
        let picked: Vec<f32> = match which {
            LogitsFor::All => x,
            LogitsFor::Last => {
                let mut out = Vec::with_capacity(chunks.len() * hdim);
                let mut end = 0;
                for ch in chunks {
                    end += ch.tokens.len();
                    if !ch.tokens.is_empty() {
                        out.extend_from_slice(&x[(end - 1) * hdim..end * hdim]);
                    }
                }
                out
            }
        };
        let rows = picked.len() / hdim;
        let mut normed = vec![0f32; picked.len()];
        ops::rmsnorm(&picked, &weights.final_norm, c.rms_norm_eps, &mut normed);
        let mut logits = vec![0f32; rows * c.vocab_size];
        matmul(weights.lm_head(), &normed, rows, &mut logits);
        Ok((logits, hidden))
    }
}
