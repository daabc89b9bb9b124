//! Causal grouped-query attention over a sequence's KV cache, with optional
//! sliding window and per-head sinks. Parallel over (query token, head).

use rayon::prelude::*;

use super::matmul::dot;
use crate::model::config::AttentionKind;

/// One query token: where its keys live and how far back it may look.
pub struct QueryRow<'a> {
    /// Keys/values of its sequence, `[len, kv_heads * head_dim]`, already holding this token.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    /// Absolute position of the query (it may see keys `0..=pos`).
    pub pos: usize,
}

pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kind: AttentionKind,
}

/// `q` is `[rows, heads*head_dim]`; returns the attention output of the same shape.
pub fn attend(rows: &[QueryRow<'_>], q: &[f32], shape: &AttentionShape, sinks: Option<&[f32]>) -> Vec<f32> {
    let (h, hd) = (shape.heads, shape.head_dim);
    let group = h / shape.kv_heads;
    let kvd = shape.kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; rows.len() * h * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
        let (t, head) = (i / h, i % h);
        let row = &rows[t];
        let kvh = head / group;
        let qv = &q[t * h * hd + head * hd..t * h * hd + (head + 1) * hd];
        let start = match shape.kind {
            AttentionKind::Full => 0,
            AttentionKind::Sliding(w) => (row.pos + 1).saturating_sub(w),
        };
        let mut scores: Vec<f32> = (start..=row.pos)
            .map(|p| dot(qv, &row.keys[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd]) * scale)
            .collect();
        let sink = sinks.map(|s| s[head]);
        let m = scores.iter().copied().chain(sink).fold(f32::NEG_INFINITY, f32::max);
        let mut denom = sink.map(|s| (s - m).exp()).unwrap_or(0.0);
        for s in scores.iter_mut() {
            *s = (*s - m).exp();
            denom += *s;
        }
        o.fill(0.0);
        for (j, p) in (start..=row.pos).enumerate() {
            let w = scores[j] / denom;
            let v = &row.values[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
            for (a, b) in o.iter_mut().zip(v) {
                *a += w * b;
            }
        }
    });
    out
}
