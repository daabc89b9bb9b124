//! Hidden-state capture for DFlash (`Backend::forward_capture`) and the one
//! forward loop that `forward` and `forward_capture` share.
//!
//! Capture: the residual stream leaving decoder layer `l` is what `b.x` holds
//! right after the next layer's pre-norm (or the final norm) has folded the
//! pending residual (MLP delta or MoE combine) in; at that point `encode_step`
//! copies the step's rows into a device buffer laid out
//! `[captured layer][max_step_tokens][hidden]` (one copy per captured layer,
//! so it is part of the captured CUDA graphs too). The copy is a kernel,
//! `moe_combine` with one weight of 1.0 per row (an exact copy), rather than a
//! memcpy node, so the step stays a chain of kernels for programmatic
//! dependent launch. The host then reads `[rows, layers * hidden]` out of it. Graphs bake the buffer's
//! address in, so changing the captured layers reallocates it and drops the
//! graphs.
//!
//! Forward: a forward of at most `max_step_tokens` rows — any mix of chunks,
//! e.g. one sequence's verify block of B+1 tokens or several sequences'
//! blocks — is one step replayed from the CUDA graph of its row bucket; longer
//! forwards (prefill) run eagerly in micro-batches of `max_step_tokens` rows.
//! Each row carries its (token, slot, position) and attends to positions
//! `0..=pos` of its slot, so a multi-token chunk inside one step is causal.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::{drv, dptr, lc, CudaBackend, CudaContext, Res};
use crate::backend::{BackendError, Chunk, LogitsFor};

/// The masked argmax's inputs and outputs: compact per masked row.
pub(super) struct MaskBufs {
    /// allowed-token bitsets as u32 words, `[rows, vocab / 32]`
    words: CudaSlice<u32>,
    /// the step row of each masked row
    rows: CudaSlice<i32>,
    ids: CudaSlice<i32>,
}

/// The device buffer the captured layers are copied into.
pub(super) struct Capture {
    layers: Vec<usize>,
    buf: CudaSlice<f32>,
    /// Rows per layer block (`max_step_tokens`).
    rows: usize,
    /// `rows` weights of 1.0: the copy's combine weights
    ones: CudaSlice<f32>,
}

/// What a step needs to issue the copies: plain data, taken before `encode_step`
/// borrows the backend's fields.
pub(super) struct CapturePlan {
    base: u64,
    ones: u64,
    layers: Vec<usize>,
    /// floats per layer block
    stride: usize,
}

impl Capture {
    pub(super) fn plan(&self, st: &Arc<CudaStream>, hidden: usize) -> CapturePlan {
        CapturePlan { base: dptr(&self.buf, st), ones: dptr(&self.ones, st), layers: self.layers.clone(), stride: self.rows * hidden }
    }
}

/// Copies rows `0..n` of the residual stream `x` into every capture block of
/// `layer` (asynchronous, graph-capturable).
pub(super) fn after_layer(cx: &CudaContext, plan: Option<&CapturePlan>, x: u64, layer: usize, n: usize, hidden: usize) -> Res<()> {
    let Some(p) = plan else { return Ok(()) };
    let (k1, hh) = (1i32, hidden as i32);
    for (k, _) in p.layers.iter().enumerate().filter(|(_, &l)| l == layer) {
        let dst = p.base + (k * p.stride * 4) as u64;
        // out[t] = ones[t] * x[t] for rows t < n: x and every capture block hold
        // max_step_tokens >= n rows, `ones` as many weights.
        let mut lb = cx.launch("moe_combine");
        lb.arg(&x).arg(&p.ones).arg(&dst).arg(&k1).arg(&hh);
        unsafe { lb.launch(lc(n, 1, 1, 256)) }?;
    }
    Ok(())
}

/// Per-layer blocks `[layers][rows][hidden]` → rows `[rows][layers * hidden]`, appended to `out`.
pub(super) fn interleave_layers(blocks: &[Vec<f32>], rows: usize, hidden: usize, out: &mut Vec<f32>) {
    out.reserve(rows * blocks.len() * hidden);
    for r in 0..rows {
        for b in blocks {
            out.extend_from_slice(&b[r * hidden..(r + 1) * hidden]);
        }
    }
}

impl CudaBackend {
    /// Captures `layers` from now on (a no-op when they are already captured).
    pub(super) fn set_capture(&mut self, layers: &[usize]) -> std::result::Result<(), BackendError> {
        if let Some(&bad) = layers.iter().find(|&&l| l >= self.cfg.num_layers) {
            return Err(BackendError::Unsupported(format!(
                "cannot capture layer {bad}: the model has {} layers",
                self.cfg.num_layers
            )));
        }
        if self.cap.as_ref().is_some_and(|c| c.layers == layers) {
            return Ok(());
        }
        let n = layers.len() * self.max_tok * self.cfg.hidden_size;
        let buf = self.cx.stream.alloc_zeros::<f32>(n.max(1)).map_err(drv)?;
        let ones = self.cx.stream.memcpy_stod(&vec![1f32; self.max_tok]).map_err(drv)?;
        self.cap = Some(Capture { layers: layers.to_vec(), buf, rows: self.max_tok, ones });
        // the graphs copy into the old buffer (or none)
        self.graphs.clear();
        Ok(())
    }

    /// The plan `encode_step` copies captured layers with (none when nothing is captured).
    pub(super) fn capture_plan(&self) -> Option<CapturePlan> {
        self.cap.as_ref().map(|c| c.plan(&self.cx.stream, self.cfg.hidden_size))
    }

    /// Row buckets whose CUDA graphs have been captured (tests: which path a forward took).
    pub fn graph_buckets(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.graphs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Reads the wanted logits rows of the last step (rows `0..want.len()`).
    fn read_logits(&self, want: &[bool], out: &mut Vec<f32>) -> std::result::Result<(), BackendError> {
        let v = self.cfg.vocab_size;
        let st = &self.cx.stream;
        if want.iter().all(|w| *w) {
            let at = out.len();
            out.resize(at + want.len() * v, 0f32);
            st.memcpy_dtoh(&self.b.logits.slice(0..want.len() * v), &mut out[at..]).map_err(drv)?;
        } else {
            for (i, _) in want.iter().enumerate().filter(|(_, w)| **w) {
                let at = out.len();
                out.resize(at + v, 0f32);
                st.memcpy_dtoh(&self.b.logits.slice(i * v..(i + 1) * v), &mut out[at..]).map_err(drv)?;
            }
        }
        Ok(())
    }

    /// Reads rows `0..n` of every capture block of the last step.
    fn read_capture(&self, n: usize) -> std::result::Result<Vec<Vec<f32>>, BackendError> {
        let Some(c) = &self.cap else { return Ok(Vec::new()) };
        let (h, st) = (self.cfg.hidden_size, &self.cx.stream);
        let mut blocks = Vec::with_capacity(c.layers.len());
        for k in 0..c.layers.len() {
            let mut b = vec![0f32; n * h];
            let at = k * c.rows * h;
            st.memcpy_dtoh(&c.buf.slice(at..at + n * h), &mut b).map_err(drv)?;
            blocks.push(b);
        }
        Ok(blocks)
    }

    /// Reads the device argmax ids of the last step's rows `0..n`.
    fn read_ids(&self, n: usize, ids: &mut Vec<u32>) -> std::result::Result<(), BackendError> {
        let mut v = vec![0i32; n];
        self.cx.stream.memcpy_dtoh(&self.b.am.slice(0..n), &mut v).map_err(drv)?;
        ids.extend(v.into_iter().map(|x| x as u32));
        Ok(())
    }

    /// The forward of `forward` and `forward_capture`: logits as `which` asks and,
    /// with `capture`, the captured layers' hidden states of every row.
    pub(super) fn run_forward(
        &mut self,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
        capture: bool,
    ) -> std::result::Result<(Vec<f32>, Vec<f32>), BackendError> {
        self.run_rows(chunks, Some(which), capture, None).map(|(logits, _, hidden)| (logits, hidden))
    }

    /// `forward_capture_argmax`: every row's argmax id (computed on the device by
    /// each step; with `masks`, over each row's allowed tokens only) and the
    /// captured hidden states; no logits cross to the host.
    pub(super) fn run_forward_ids(
        &mut self,
        chunks: &[Chunk<'_>],
        capture: bool,
        masks: Option<&[Option<&[u64]>]>,
    ) -> std::result::Result<(Vec<u32>, Vec<f32>), BackendError> {
        self.run_rows(chunks, None, capture, masks).map(|(_, ids, hidden)| (ids, hidden))
    }

    /// The argmax over its allowed tokens of every last-step row that `masks` masks
    /// (`Backend::forward_capture_masked_argmax`), as (row, id): only those rows'
    /// bitsets go up (as u32 words), the logits stay where they are, and unmasked
    /// rows keep the step's own argmax.
    fn masked_ids(&mut self, masks: &[Option<&[u64]>]) -> std::result::Result<Vec<(usize, u32)>, BackendError> {
        let masked: Vec<(usize, &[u64])> = masks.iter().enumerate().filter_map(|(r, m)| m.map(|b| (r, b))).collect();
        if masked.is_empty() {
            return Ok(Vec::new());
        }
        let (v, m) = (self.cfg.vocab_size, masked.len());
        let words = v.div_ceil(64) * 2;
        let mut host = vec![0u32; m * words];
        for (row, (_, bits)) in host.chunks_mut(words).zip(&masked) {
            for (pair, &w) in row.chunks_mut(2).zip(bits.iter()) {
                pair[0] = w as u32;
                pair[1] = (w >> 32) as u32;
            }
        }
        let rows: Vec<i32> = masked.iter().map(|&(r, _)| r as i32).collect();
        if self.masked.as_ref().is_none_or(|b| b.rows.len() < m || b.words.len() < host.len()) {
            let st = &self.cx.stream;
            self.masked = Some(MaskBufs {
                words: st.alloc_zeros::<u32>(host.len()).map_err(drv)?,
                rows: st.alloc_zeros::<i32>(m).map_err(drv)?,
                ids: st.alloc_zeros::<i32>(m).map_err(drv)?,
            });
        }
        let Some(mb) = self.masked.as_mut() else { unreachable!("allocated above") };
        let st = &self.cx.stream;
        st.memcpy_htod(&host, &mut mb.words.slice_mut(0..host.len())).map_err(drv)?;
        st.memcpy_htod(&rows, &mut mb.rows.slice_mut(0..m)).map_err(drv)?;
        self.cx.argmax_masked(&self.b.logits, masks.len(), &mb.rows, &mb.words, words, &mut mb.ids, m, v).map_err(super::dev)?;
        let mut ids = vec![0i32; m];
        st.memcpy_dtoh(&mb.ids.slice(0..m), &mut ids).map_err(drv)?;
        Ok(masked.iter().zip(ids).map(|(&(r, _), id)| (r, id as u32)).collect())
    }

    /// Logits as `which` asks, or (`None`) every row's argmax id (over the tokens
    /// `masks` allows, one entry per row, when given); and the hidden states.
    #[allow(clippy::type_complexity)]
    fn run_rows(
        &mut self,
        chunks: &[Chunk<'_>],
        which: Option<LogitsFor>,
        capture: bool,
        masks: Option<&[Option<&[u64]>]>,
    ) -> std::result::Result<(Vec<f32>, Vec<u32>, Vec<f32>), BackendError> {
        let starts = self.check_chunks(chunks)?;
        if chunks.iter().any(|c| c.seq.0 >= self.kv.n_slots) {
            return Err(BackendError::Device("KV slot beyond the cache (slot growth failed)".into()));
        }
        // rows: (token, slot, pos), and whether each row's logits are wanted
        let mut rows = Vec::new();
        let mut want = Vec::new();
        for (ch, &s) in chunks.iter().zip(&starts) {
            for (j, &t) in ch.tokens.iter().enumerate() {
                rows.push((t, ch.seq.0, s + j));
                want.push(which != Some(LogitsFor::Last) || j + 1 == ch.tokens.len());
            }
        }
        let capture = capture && self.cap.is_some();
        let h = self.cfg.hidden_size;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        if which.is_some() {
            out.reserve(want.iter().filter(|w| **w).count() * self.cfg.vocab_size);
        }
        let mut blocks: Vec<(Vec<Vec<f32>>, usize)> = Vec::new();
        if !rows.is_empty() && rows.len() <= self.max_tok {
            // one step: replayed from the graph of its row bucket
            self.decode_launch(&rows)?;
            match which {
                Some(_) => self.read_logits(&want, &mut out)?,
                None => {
                    self.read_ids(rows.len(), &mut ids)?;
                    for (r, id) in self.masked_ids(masks.unwrap_or_default())? {
                        ids[r] = id;
                    }
                }
            }
            if capture {
                blocks.push((self.read_capture(rows.len())?, rows.len()));
            }
        } else {
            for (k, (mb, wmb)) in rows.chunks(self.max_tok).zip(want.chunks(self.max_tok)).enumerate() {
                let n = mb.len();
                self.upload(mb, n)?;
                let max_len = mb.iter().map(|r| r.2 + 1).max().unwrap_or(1);
                let splits = self.splits_for(n, max_len);
                self.encode_step(n, splits).map_err(super::dev)?;
                match which {
                    Some(_) => self.read_logits(wmb, &mut out)?,
                    None => {
                        let at = ids.len();
                        self.read_ids(n, &mut ids)?;
                        let mb_masks = masks.map_or(&[][..], |m| &m[k * self.max_tok..k * self.max_tok + n]);
                        for (r, id) in self.masked_ids(mb_masks)? {
                            ids[at + r] = id;
                        }
                    }
                }
                if capture {
                    blocks.push((self.read_capture(n)?, n));
                }
            }
        }
        self.cx.stream.synchronize().map_err(drv)?;
        for ch in chunks {
            *self.lens[ch.seq.0].as_mut().expect("checked") += ch.tokens.len();
        }
        let mut hidden = Vec::new();
        for (b, n) in &blocks {
            interleave_layers(b, *n, h, &mut hidden);
        }
        Ok((out, ids, hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::interleave_layers;

    #[test]
    fn layer_blocks_become_concatenated_rows() {
        // 2 layers, 3 rows, hidden 2: block k row r = [100k + 10r, 100k + 10r + 1]
        let blocks: Vec<Vec<f32>> =
            (0..2).map(|k| (0..3).flat_map(|r| [(100 * k + 10 * r) as f32, (100 * k + 10 * r + 1) as f32]).collect()).collect();
        let mut out = vec![-1.0];
        interleave_layers(&blocks, 3, 2, &mut out);
        assert_eq!(out, vec![-1.0, 0.0, 1.0, 100.0, 101.0, 10.0, 11.0, 110.0, 111.0, 20.0, 21.0, 120.0, 121.0]);
    }
}
