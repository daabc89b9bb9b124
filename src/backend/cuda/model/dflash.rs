//! The DFlash drafter on the GPU: the computation of the CPU
//! `engine::speculative::dflash::DFlashDrafter`, with the CUDA backend's kernels.
//!
//! One pass over several sequences is one set of launches over two kinds of
//! rows, block rows first:
//! - block rows (`Σ B_i`): block position 0 = the last committed token, the
//!   rest the mask token, at positions `position_i + j`;
//! - context rows (`Σ m_i`): the target hidden states committed since the
//!   sequence's last pass, projected N·H→H by `fc` and RMS-normed once.
//!
//! In every draft layer both kinds go through one q|k|v GEMV (context rows'
//! queries are computed and unused), q/k-norm + RoPE and one KV-cache write:
//! context rows land at their own positions for good, block rows at
//! `position_i..position_i + B_i` for this pass only (the next pass overwrites
//! them). Attention runs for the block rows only, each over the whole context
//! and the whole block — non-causal inside the block — which is the decode
//! attention kernel with every block row's length `position_i + B_i`. Then
//! o-proj, MLP, and after the last layer the drafter's norm and the target's
//! lm_head. Activations are f32 (GEMVs read f32 inputs), weights and the KV
//! cache bf16.
//!
//! Passes of at most `DRAFT_GRAPH_ROWS` block rows and as many context rows
//! (every pass after the first one of a sequence: the block and the tokens
//! accepted since) are padded to power-of-two row counts and replayed from a
//! CUDA graph per (block rows, context rows) bucket, captured on first use:
//! one launch instead of ~40, no per-pass cuBLAS set-up on the host. Padding
//! rows have slot −1 and length 0 (they write no cache and attend to nothing;
//! their outputs are never read). Eager passes of the same size use the same
//! padding and attention splits, so a graph pass equals an eager one bit for
//! bit. Bigger passes (a prompt's whole context) run eagerly, unpadded. A
//! graph bakes the buffers' addresses in: growing the buffers or the KV cache
//! drops the graphs.
//!
//! The drafter has its own driver stream (the same device's primary context as
//! the target) and its own copies of the target's embedding and lm_head, made
//! device-to-device from the target backend's tensors once; the engine calls
//! drafter and target one after the other from one thread, and each returns to
//! the host, so the two streams never race.

use std::collections::{HashMap, HashSet};

use cudarc::driver::CudaSlice;

use super::upload::{bf16_bits, fuse_rows, rope_tables, weight_bits};
use super::{capture_graph, dense, dev, dptr, drv, lc, CudaBackend, Res, SendGraph, MAX_SPLITS};
use crate::backend::cuda::gemm::BlasGemm;
use crate::backend::cuda::kernels::{AttnWorkspace, KvShape, ARGMAX_MAX_ROWS};
use crate::backend::cuda::CudaContext;
use crate::backend::BackendError;
use crate::model::config::Activation;
use crate::model::dflash::{DFlashConfig, DFlashWeights};

/// Largest block-row and context-row count of a pass replayed from a CUDA graph.
pub const DRAFT_GRAPH_ROWS: usize = 256;

/// The rows a pass of `nb` block and `nc` context rows computes: padded to powers
/// of two (0 context rows stay 0) when both fit a graph, else as they are; the
/// bool says whether they were padded (and may replay a graph).
pub fn pass_rows(nb: usize, nc: usize) -> (usize, usize, bool) {
    if nb <= DRAFT_GRAPH_ROWS && nc <= DRAFT_GRAPH_ROWS {
        (nb.next_power_of_two(), if nc == 0 { 0 } else { nc.next_power_of_two() }, true)
    } else {
        (nb, nc, false)
    }
}

/// One sequence's input to a drafter pass (the engine's `DraftInput` without the tokens).
pub struct DraftBlock<'a> {
    /// The drafter's sequence slot.
    pub seq: usize,
    /// Target hidden states of the tokens committed since the last pass, `[m, layers * hidden]`.
    pub context: &'a [f32],
    /// Block position 0.
    pub first_token: u32,
    /// Absolute position of `first_token` (= the context length after this pass).
    pub position: usize,
    /// Block length B; logits are returned for positions 1..B.
    pub block: usize,
}

struct Layer {
    ln1: CudaSlice<u16>,
    ln2: CudaSlice<u16>,
    wqkv: CudaSlice<u16>,
    wo: CudaSlice<u16>,
    q_norm: CudaSlice<u16>,
    k_norm: CudaSlice<u16>,
    gu: CudaSlice<u16>,
    down: CudaSlice<u16>,
    inter: usize,
}

struct Weights {
    fc: CudaSlice<u16>,
    hidden_norm: CudaSlice<u16>,
    norm: CudaSlice<u16>,
    layers: Vec<Layer>,
    /// copies of the target's
    embed: CudaSlice<u16>,
    lm_head: Option<CudaSlice<u16>>,
    inv_freq: CudaSlice<f32>,
    mscale: f32,
}

/// Pass buffers: `blk` block rows, `all` rows of block + context.
struct Bufs {
    blk: usize,
    all: usize,
    ids: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    ctx_in: CudaSlice<f32>,
    ctxh: CudaSlice<f32>,
    ctxn: CudaSlice<f32>,
    inp: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    x: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    hn: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    act: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    /// argmax id of each block row
    am: CudaSlice<i32>,
    ws: AttnWorkspace,
}

/// Row layout of one pass, built on the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowPlan {
    /// block rows: token ids and attention lengths
    pub ids: Vec<i32>,
    pub lens: Vec<i32>,
    /// block rows, then context rows: positions and cache slots
    pub pos: Vec<i32>,
    pub slots: Vec<i32>,
    /// first block row of each sequence
    pub block_start: Vec<usize>,
    pub n_block: usize,
    pub n_ctx: usize,
}

/// One sequence's share of a pass: (slot, cached context length, new context rows,
/// first token, block position, block length).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSpec {
    pub slot: usize,
    pub ctx_start: usize,
    pub ctx_rows: usize,
    pub first_token: u32,
    pub position: usize,
    pub block: usize,
}

pub(crate) fn plan_rows(specs: &[RowSpec], mask_token: u32) -> RowPlan {
    let n_block: usize = specs.iter().map(|s| s.block).sum();
    let n_ctx: usize = specs.iter().map(|s| s.ctx_rows).sum();
    let mut p = RowPlan {
        ids: Vec::with_capacity(n_block),
        lens: Vec::with_capacity(n_block),
        pos: Vec::with_capacity(n_block + n_ctx),
        slots: Vec::with_capacity(n_block + n_ctx),
        block_start: Vec::with_capacity(specs.len()),
        n_block,
        n_ctx,
    };
    for s in specs {
        p.block_start.push(p.ids.len());
        for j in 0..s.block {
            p.ids.push(if j == 0 { s.first_token } else { mask_token } as i32);
            // every block row sees the whole context and the whole block
            p.lens.push((s.position + s.block) as i32);
            p.pos.push((s.position + j) as i32);
            p.slots.push(s.slot as i32);
        }
    }
    for s in specs {
        for r in 0..s.ctx_rows {
            p.pos.push((s.ctx_start + r) as i32);
            p.slots.push(s.slot as i32);
        }
    }
    p
}

/// The uploaded rows of a pass of `nb` block and `nc` context rows (`plan` padded):
/// padding block rows are mask tokens of length 0, padding rows of both kinds
/// have slot −1 and position 0.
pub(crate) fn pad_rows(plan: &RowPlan, nb: usize, nc: usize, mask_token: u32) -> RowPlan {
    let (b, c) = (plan.n_block, plan.n_ctx);
    let mut p = RowPlan {
        ids: plan.ids.clone(),
        lens: plan.lens.clone(),
        pos: Vec::with_capacity(nb + nc),
        slots: Vec::with_capacity(nb + nc),
        block_start: plan.block_start.clone(),
        n_block: nb,
        n_ctx: nc,
    };
    p.ids.resize(nb, mask_token as i32);
    p.lens.resize(nb, 0);
    for (from, to, real) in [(0, nb, b), (b, nc, c)] {
        p.pos.extend_from_slice(&plan.pos[from..from + real]);
        p.pos.resize(p.pos.len() + to - real, 0);
        p.slots.extend_from_slice(&plan.slots[from..from + real]);
        p.slots.resize(p.slots.len() + to - real, -1);
    }
    p
}

pub struct CudaDFlash {
    cx: CudaContext,
    cfg: DFlashConfig,
    vocab: usize,
    ctx_width: usize,
    w: Weights,
    b: Option<Bufs>,
    k_cache: CudaSlice<u16>,
    v_cache: CudaSlice<u16>,
    kv: KvShape,
    lens: Vec<Option<usize>>,
    scale: f32,
    /// cuBLAS for passes of 9+ rows (a block of 16, the context rows); None: GEMVs
    gemm: Option<BlasGemm>,
    /// replay padded passes from CUDA graphs (the target's `graphs` option;
    /// `KAIROS_CUDA_DRAFT_GRAPHS=0` turns it off)
    use_graphs: bool,
    /// by (block rows, context rows) after padding; (0, rows): context-only passes
    graphs: HashMap<(usize, usize), SendGraph>,
    profile: DraftProfile,
}

/// What the drafter's passes did since it was made (`kairos bench dflash` prints it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DraftProfile {
    /// drafter passes (each returns one block per sequence)
    pub passes: usize,
    /// passes run as eager launches (too big for a graph, or graphs off)
    pub eager: usize,
    /// graph replays (block passes and context chunks) and graph captures
    pub graph_launches: usize,
    pub captures: usize,
    /// times every graph was dropped (buffers, KV cache or GEMM staging moved)
    pub graph_drops: usize,
    /// context-only chunks of a prompt's context
    pub context_chunks: usize,
}

fn copy_device(cx: &CudaContext, src: &CudaSlice<u16>) -> Res<CudaSlice<u16>> {
    let mut dst = cx.stream.alloc_zeros::<u16>(src.len())?;
    cx.stream.memcpy_dtod(src, &mut dst)?;
    Ok(dst)
}

impl CudaDFlash {
    /// Uploads `draft` to the target's GPU and copies the target's embedding and lm_head.
    pub fn new(target: &CudaBackend, draft: &DFlashWeights) -> Result<Self, BackendError> {
        let cfg = draft.config.clone();
        let c = &cfg.decoder;
        let (h, hd) = (c.hidden_size, c.head_dim);
        if h != target.cfg.hidden_size {
            return Err(BackendError::Unsupported(format!("drafter hidden size {h} differs from the target's {}", target.cfg.hidden_size)));
        }
        if !hd.is_multiple_of(2) || hd > 256 || c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(BackendError::Unsupported(format!(
                "GPU drafter: head_dim {hd} (even, at most 256) with {} heads over {} KV heads",
                c.num_heads, c.num_kv_heads
            )));
        }
        let biased = draft.fc.bias.is_some()
            || draft.layers.iter().any(|l| [&l.q, &l.k, &l.v, &l.o, &l.mlp.gate, &l.mlp.up, &l.mlp.down].iter().any(|x| x.bias.is_some()));
        if biased {
            return Err(BackendError::Unsupported("GPU drafter: projections with biases are not supported".into()));
        }
        let cx = CudaContext::new(target.ordinal).map_err(dev)?;
        // the target's weights were uploaded on its own stream
        target.cx.stream.synchronize().map_err(drv)?;
        let interleave = matches!(c.activation, Activation::GptOssGlu { .. });
        let up = |v: Vec<u16>| cx.up(&v).map_err(dev);
        let mut layers = Vec::with_capacity(draft.layers.len());
        for l in &draft.layers {
            layers.push(Layer {
                ln1: up(bf16_bits(&l.input_norm))?,
                ln2: up(bf16_bits(&l.post_attention_norm))?,
                wqkv: up([weight_bits(&l.q.weight), weight_bits(&l.k.weight), weight_bits(&l.v.weight)].concat())?,
                wo: up(weight_bits(&l.o.weight))?,
                q_norm: up(bf16_bits(&l.q_norm))?,
                k_norm: up(bf16_bits(&l.k_norm))?,
                gu: up(fuse_rows(&weight_bits(&l.mlp.gate.weight), &weight_bits(&l.mlp.up.weight), h, interleave))?,
                down: up(weight_bits(&l.mlp.down.weight))?,
                inter: l.mlp.gate.out_features(),
            });
        }
        let (inv_freq, mscale) = rope_tables(&cx, c)?;
        let w = Weights {
            fc: up(weight_bits(&draft.fc.weight))?,
            hidden_norm: up(bf16_bits(&draft.hidden_norm))?,
            norm: up(bf16_bits(&draft.norm))?,
            layers,
            embed: copy_device(&cx, &target.w.embed).map_err(dev)?,
            lm_head: match &target.w.lm_head {
                Some(x) => Some(copy_device(&cx, x).map_err(dev)?),
                None => None,
            },
            inv_freq,
            mscale,
        };
        let kv =
            KvShape { n_slots: 4, n_layers: draft.layers.len(), n_kv_heads: c.num_kv_heads, max_pos: target.max_context, head_dim: hd };
        let k_cache = cx.stream.alloc_zeros::<u16>(kv.len()).map_err(drv)?;
        let v_cache = cx.stream.alloc_zeros::<u16>(kv.len()).map_err(drv)?;
        cx.stream.synchronize().map_err(drv)?;
        // staging for the largest graphed pass's GEMMs, so no capture grows it
        let widest = draft.fc.in_features().max(h).max(draft.layers.iter().map(|l| l.mlp.gate.out_features()).max().unwrap_or(0));
        let gemm = if target.gemm.is_some() { BlasGemm::new(&cx.stream, 2 * DRAFT_GRAPH_ROWS, widest).ok() } else { None };
        let use_graphs = target.use_graphs && std::env::var("KAIROS_CUDA_DRAFT_GRAPHS").map_or(true, |v| v != "0");
        let mut d = Self {
            gemm,
            use_graphs,
            graphs: HashMap::new(),
            profile: DraftProfile::default(),
            cx,
            vocab: target.cfg.vocab_size,
            ctx_width: draft.fc.in_features(),
            w,
            b: None,
            k_cache,
            v_cache,
            kv,
            lens: Vec::new(),
            scale: 1.0 / (hd as f32).sqrt(),
            cfg,
        };
        // room for a block of 16 beside a full context chunk from the start, so the
        // first prompt's chunks do not grow the buffers (and drop the graphs) mid-run
        d.ensure_bufs(16, 2 * DRAFT_GRAPH_ROWS)?;
        Ok(d)
    }

    pub fn config(&self) -> &DFlashConfig {
        &self.cfg
    }

    /// Replay padded passes from CUDA graphs (on by default with the target's graphs).
    pub fn set_graphs(&mut self, on: bool) {
        self.use_graphs = on;
        self.graphs.clear();
    }

    /// What the passes did so far.
    pub fn profile(&self) -> &DraftProfile {
        &self.profile
    }

    fn drop_graphs(&mut self) {
        if !self.graphs.is_empty() {
            self.profile.graph_drops += 1;
        }
        self.graphs.clear();
    }

    /// Row buckets (block rows, context rows) whose graphs have been captured (tests).
    pub fn graph_buckets(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<_> = self.graphs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn new_sequence(&mut self) -> usize {
        match self.lens.iter().position(Option::is_none) {
            Some(i) => {
                self.lens[i] = Some(0);
                i
            }
            None => {
                self.lens.push(Some(0));
                self.lens.len() - 1
            }
        }
    }

    pub fn free_sequence(&mut self, seq: usize) {
        if let Some(s) = self.lens.get_mut(seq) {
            *s = None;
        }
    }

    /// Context rows cached for `seq`.
    pub fn seq_len(&self, seq: usize) -> Result<usize, BackendError> {
        self.lens.get(seq).copied().flatten().ok_or_else(|| BackendError::Device(format!("drafter: unknown sequence {seq}")))
    }

    /// Forget context beyond `len` rows.
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<(), BackendError> {
        let cur = self.seq_len(seq)?;
        self.lens[seq] = Some(cur.min(len));
        Ok(())
    }

    /// Appends each block's context and returns per block the logits of block
    /// positions 1..B, row-major `[B−1, vocab]` (as `DFlashDrafter::draft`).
    pub fn draft(&mut self, blocks: &[DraftBlock<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let (specs, plan) = self.run_pass(blocks)?;
        let b = self.b.as_ref().expect("allocated by run_pass");
        let v = self.vocab;
        let mut out = Vec::with_capacity(blocks.len());
        for (s, &start) in specs.iter().zip(&plan.block_start) {
            let mut rows = vec![0f32; (s.block - 1) * v];
            if s.block > 1 {
                self.cx.stream.memcpy_dtoh(&b.logits.slice((start + 1) * v..(start + s.block) * v), &mut rows).map_err(drv)?;
            }
            out.push(rows);
        }
        self.finish_pass(&specs)?;
        Ok(out)
    }

    /// `draft` for greedy drafting: the argmax id (ties: lowest) of block
    /// positions 1..B, computed on the device; only the ids cross to the host.
    pub fn draft_argmax(&mut self, blocks: &[DraftBlock<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let (specs, plan) = self.run_pass(blocks)?;
        let nb = plan.n_block;
        let b = self.b.as_mut().expect("allocated by run_pass");
        let mut am = vec![0i32; nb];
        if nb <= ARGMAX_MAX_ROWS {
            self.cx.argmax(&b.logits, &mut b.am, nb, self.vocab).map_err(dev)?;
            self.cx.stream.memcpy_dtoh(&b.am.slice(0..nb), &mut am).map_err(drv)?;
        } else {
            // more rows than one argmax launch takes: on the host
            let v = self.vocab;
            let mut logits = vec![0f32; nb * v];
            self.cx.stream.memcpy_dtoh(&b.logits.slice(0..nb * v), &mut logits).map_err(drv)?;
            self.cx.stream.synchronize().map_err(drv)?;
            for (a, row) in am.iter_mut().zip(logits.chunks(v)) {
                *a = crate::backend::first_argmax(row) as i32;
            }
        }
        self.finish_pass(&specs)?;
        Ok(specs.iter().zip(&plan.block_start).map(|(s, &st)| am[st + 1..st + s.block].iter().map(|&x| x as u32).collect()).collect())
    }

    /// Waits for the pass and records the appended context rows.
    fn finish_pass(&mut self, specs: &[RowSpec]) -> Result<(), BackendError> {
        self.cx.stream.synchronize().map_err(drv)?;
        for s in specs {
            self.lens[s.slot] = Some(s.ctx_start + s.ctx_rows);
        }
        Ok(())
    }

    /// Checks the blocks, uploads the pass's rows and context, and launches it.
    fn run_pass(&mut self, blocks: &[DraftBlock<'_>]) -> Result<(Vec<RowSpec>, RowPlan), BackendError> {
        let mut specs = Vec::with_capacity(blocks.len());
        let mut seen = HashSet::new();
        for bl in blocks {
            let ctx_start = self.seq_len(bl.seq)?;
            if !seen.insert(bl.seq) {
                return Err(BackendError::Device(format!("drafter: sequence {} twice in one pass", bl.seq)));
            }
            if bl.context.len() % self.ctx_width != 0 {
                return Err(BackendError::Device(format!(
                    "drafter: context of {} floats is not whole rows of {}",
                    bl.context.len(),
                    self.ctx_width
                )));
            }
            let m = bl.context.len() / self.ctx_width;
            if ctx_start + m != bl.position {
                return Err(BackendError::Device(format!(
                    "drafter: context ends at {} but the block starts at {}",
                    ctx_start + m,
                    bl.position
                )));
            }
            if bl.block == 0 || bl.position + bl.block > self.kv.max_pos {
                return Err(BackendError::ContextFull {
                    seq: crate::backend::SeqId(bl.seq),
                    len: bl.position + bl.block,
                    limit: self.kv.max_pos,
                });
            }
            if bl.first_token as usize >= self.vocab {
                return Err(BackendError::TokenOutOfRange { id: bl.first_token, vocab: self.vocab });
            }
            specs.push(RowSpec {
                slot: bl.seq,
                ctx_start,
                ctx_rows: m,
                first_token: bl.first_token,
                position: bl.position,
                block: bl.block,
            });
        }
        let max_slot = specs.iter().map(|s| s.slot).max().unwrap_or(0);
        self.ensure_slots(max_slot + 1)?;
        let mut plan = plan_rows(&specs, self.cfg.mask_token_id);
        if plan.n_ctx > DRAFT_GRAPH_ROWS {
            // A prompt's whole context: its rows in graphed context-only chunks, then the
            // blocks as a small pass (one eager pass of every row took ~2 ms on the H100).
            let ctx: Vec<f32> = blocks.iter().flat_map(|bl| bl.context.iter().copied()).collect();
            self.ingest_context(&ctx, &plan.pos[plan.n_block..], &plan.slots[plan.n_block..])?;
            let blocks_only: Vec<RowSpec> = specs.iter().map(|s| RowSpec { ctx_rows: 0, ..*s }).collect();
            plan = plan_rows(&blocks_only, self.cfg.mask_token_id);
        }
        let (nb, nc, padded) = pass_rows(plan.n_block, plan.n_ctx);
        self.ensure_bufs(nb, nb + nc)?;
        let rows = pad_rows(&plan, nb, nc, self.cfg.mask_token_id);
        let b = self.b.as_mut().expect("allocated above");
        let st = &self.cx.stream;
        st.memcpy_htod(&rows.ids, &mut b.ids.slice_mut(0..nb)).map_err(drv)?;
        st.memcpy_htod(&rows.lens, &mut b.lens.slice_mut(0..nb)).map_err(drv)?;
        st.memcpy_htod(&rows.pos, &mut b.pos.slice_mut(0..nb + nc)).map_err(drv)?;
        st.memcpy_htod(&rows.slots, &mut b.slots.slice_mut(0..nb + nc)).map_err(drv)?;
        if plan.n_ctx > 0 {
            let ctx: Vec<f32> = blocks.iter().flat_map(|bl| bl.context.iter().copied()).collect();
            st.memcpy_htod(&ctx, &mut b.ctx_in.slice_mut(0..ctx.len())).map_err(drv)?;
        }
        self.profile.passes += 1;
        let c = &self.cfg.decoder;
        // padded passes split attention for the longest context, as their graphs must
        let max_len = if padded { self.kv.max_pos } else { plan.lens.iter().copied().max().unwrap_or(1).max(1) as usize };
        let splits = self.cx.attention_splits(nb, c.num_heads, c.num_kv_heads, c.head_dim, false, max_len, MAX_SPLITS);
        if padded && self.use_graphs {
            self.launch_graph(nb, nc, splits)?;
        } else {
            self.profile.eager += 1;
            let staging = self.gemm.as_ref().map(BlasGemm::staging_len);
            self.encode(nb, nc, splits).map_err(dev)?;
            // a big eager pass moved the GEMMs' staging buffer that the graphs read
            if self.gemm.as_ref().map(BlasGemm::staging_len) != staging {
                self.drop_graphs();
            }
        }
        Ok((specs, plan))
    }

    /// Replays the pass of `nb` block and `nc` context rows from its graph (captured now if new);
    /// `nb` = 0 is a context-only pass ([`Self::encode_context`]).
    fn launch_graph(&mut self, nb: usize, nc: usize, splits: usize) -> Result<(), BackendError> {
        if !self.graphs.contains_key(&(nb, nc)) {
            let st = self.cx.stream.clone();
            let g = capture_graph(&st, || if nb == 0 { self.encode_context(nc) } else { self.encode(nb, nc, splits) })?;
            self.graphs.insert((nb, nc), SendGraph(g, None));
            self.profile.captures += 1;
        }
        self.profile.graph_launches += 1;
        self.graphs[&(nb, nc)].0.launch().map_err(drv)
    }

    /// Writes context rows (`ctx`: `[rows, ctx_width]`, at `pos` in cache `slots`) into
    /// the KV cache in passes of at most `DRAFT_GRAPH_ROWS` rows, padded like block
    /// passes and replayed from graphs. Context rows are independent of each other
    /// (each is projected, normed and turned into K/V per layer), so any cut is exact.
    fn ingest_context(&mut self, ctx: &[f32], pos: &[i32], slots: &[i32]) -> Result<(), BackendError> {
        let width = self.ctx_width;
        for (k, rows) in pos.chunks(DRAFT_GRAPH_ROWS).enumerate() {
            let (r0, n) = (k * DRAFT_GRAPH_ROWS, rows.len());
            let nc = n.next_power_of_two();
            self.ensure_bufs(1, nc)?;
            let (mut p, mut sl) = (rows.to_vec(), slots[r0..r0 + n].to_vec());
            p.resize(nc, 0);
            sl.resize(nc, -1);
            let b = self.b.as_mut().expect("allocated above");
            let st = &self.cx.stream;
            st.memcpy_htod(&p, &mut b.pos.slice_mut(0..nc)).map_err(drv)?;
            st.memcpy_htod(&sl, &mut b.slots.slice_mut(0..nc)).map_err(drv)?;
            st.memcpy_htod(&ctx[r0 * width..(r0 + n) * width], &mut b.ctx_in.slice_mut(0..n * width)).map_err(drv)?;
            self.profile.context_chunks += 1;
            if self.use_graphs {
                self.launch_graph(0, nc, 0)?;
            } else {
                self.encode_context(nc).map_err(dev)?;
            }
        }
        Ok(())
    }

    /// The launches of a context-only pass of `nc` rows (uploaded to `ctx_in`, `pos`,
    /// `slots` from row 0): what [`Self::encode`] does to its context rows.
    fn encode_context(&mut self, nc: usize) -> Res<()> {
        let Self { cx, cfg, w, b, k_cache, v_cache, kv, ctx_width, gemm, .. } = self;
        let b = b.as_mut().expect("buffers allocated before encode");
        let st = cx.stream.clone();
        let c = &cfg.decoder;
        let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let qkvd = (nq + 2 * nkv) * hd;
        let eps = c.rms_norm_eps;
        dense(cx, gemm, &w.fc, dptr(&b.ctx_in, &st), false, dptr(&b.ctxh, &st), h, *ctx_width, nc, None)?;
        cx.rmsnorm_residual::<f32>(&mut b.ctxh, None, &w.hidden_norm, &mut b.ctxn, nc, h, eps)?;
        for (li, l) in w.layers.iter().enumerate() {
            dense(cx, gemm, &l.wqkv, dptr(&b.ctxn, &st), false, dptr(&b.qkv, &st), qkvd, h, nc, None)?;
            cx.rope_qk(&mut b.qkv, &b.pos, &w.inv_freq, Some(&l.q_norm), Some(&l.k_norm), nc, nq, nkv, hd, eps, w.mscale)?;
            cx.kv_cache_write(&b.qkv, k_cache, v_cache, &b.slots, &b.pos, nc, nq, li, kv)?;
        }
        Ok(())
    }

    /// Grows the KV cache to at least `n` slots (contents kept).
    fn ensure_slots(&mut self, n: usize) -> Result<(), BackendError> {
        if n <= self.kv.n_slots {
            return Ok(());
        }
        let slots = n.next_power_of_two().max(2 * self.kv.n_slots);
        let (k, v, kv) = super::ops::grow_kv(&self.cx, &self.k_cache, &self.v_cache, self.kv, slots).map_err(drv)?;
        (self.k_cache, self.v_cache, self.kv) = (k, v, kv);
        // the graphs address the old cache
        self.drop_graphs();
        Ok(())
    }

    /// Pass buffers for `blk` block rows and `all` rows in total (grown, never shrunk).
    fn ensure_bufs(&mut self, blk: usize, all: usize) -> Result<(), BackendError> {
        if self.b.as_ref().is_some_and(|b| b.blk >= blk && b.all >= all) {
            return Ok(());
        }
        let (old_blk, old_all) = self.b.as_ref().map_or((0, 0), |b| (b.blk, b.all));
        let blk = blk.next_power_of_two().max(old_blk).max(16);
        let all = all.next_power_of_two().max(old_all).max(blk);
        // free the old buffers (and the graphs that address them) first
        self.drop_graphs();
        self.b = None;
        let c = &self.cfg.decoder;
        let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let inter = self.w.layers.iter().map(|l| l.inter).max().unwrap_or(1);
        let qkvd = (nq + 2 * nkv) * hd;
        let (cx, width, vocab) = (&self.cx, self.ctx_width, self.vocab);
        let st = &cx.stream;
        let f = |n: usize| st.alloc_zeros::<f32>(n.max(1));
        let i = |n: usize| st.alloc_zeros::<i32>(n.max(1));
        let b = (|| -> Res<Bufs> {
            Ok(Bufs {
                blk,
                all,
                ids: i(blk)?,
                lens: i(blk)?,
                pos: i(all)?,
                slots: i(all)?,
                ctx_in: f(all * width)?,
                ctxh: f(all * h)?,
                ctxn: f(all * h)?,
                inp: f(all * h)?,
                qkv: f(all * qkvd)?,
                x: f(blk * h)?,
                delta: f(blk * h)?,
                hn: f(blk * h)?,
                attn: f(blk * nq * hd)?,
                gu: f(blk * 2 * inter)?,
                act: f(blk * inter)?,
                logits: f(blk * vocab)?,
                am: i(blk)?,
                ws: AttnWorkspace::new(cx, blk, nq, MAX_SPLITS, hd)?,
            })
        })()
        .map_err(dev)?;
        self.b = Some(b);
        Ok(())
    }

    /// All launches of one pass: `nb` block rows, `nc` context rows (inputs uploaded),
    /// attention in `splits` splits.
    fn encode(&mut self, nb: usize, nc: usize, splits: usize) -> Res<()> {
        let Self { cx, cfg, w, b, k_cache, v_cache, kv, scale, vocab, ctx_width, gemm, .. } = self;
        let b = b.as_mut().expect("buffers allocated before encode");
        let st = cx.stream.clone();
        let c = &cfg.decoder;
        let (h, hd, nq, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let qkvd = (nq + 2 * nkv) * hd;
        let eps = c.rms_norm_eps;
        let all = nb + nc;
        // Context features → H, normed, into rows nb.. of the layers' input.
        if nc > 0 {
            dense(cx, gemm, &w.fc, dptr(&b.ctx_in, &st), false, dptr(&b.ctxh, &st), h, *ctx_width, nc, None)?;
            cx.rmsnorm_residual::<f32>(&mut b.ctxh, None, &w.hidden_norm, &mut b.ctxn, nc, h, eps)?;
            st.memcpy_dtod(&b.ctxn.slice(0..nc * h), &mut b.inp.slice_mut(nb * h..all * h))?;
        }
        cx.embedding_gather::<f32>(&w.embed, &b.ids, &mut b.x, nb, h)?;
        for (li, l) in w.layers.iter().enumerate() {
            // x += the previous layer's MLP output; block rows' normed input → rows 0..nb
            let delta = if li > 0 { Some(&b.delta) } else { None };
            cx.rmsnorm_residual::<f32>(&mut b.x, delta, &l.ln1, &mut b.inp, nb, h, eps)?;
            dense(cx, gemm, &l.wqkv, dptr(&b.inp, &st), false, dptr(&b.qkv, &st), qkvd, h, all, None)?;
            cx.rope_qk(&mut b.qkv, &b.pos, &w.inv_freq, Some(&l.q_norm), Some(&l.k_norm), all, nq, nkv, hd, eps, w.mscale)?;
            cx.kv_cache_write(&b.qkv, k_cache, v_cache, &b.slots, &b.pos, all, nq, li, kv)?;
            if matches!(hd, 64 | 128 | 256) {
                cx.attention_decode(
                    &b.qkv,
                    k_cache,
                    v_cache,
                    &b.slots,
                    &b.lens,
                    None,
                    &mut b.attn,
                    &mut b.ws,
                    nb,
                    nq,
                    qkvd,
                    li,
                    kv,
                    *scale,
                    0,
                    splits,
                )?;
            } else {
                let a = [nq as i32, nkv as i32, hd as i32, li as i32, kv.n_layers as i32, kv.max_pos as i32];
                let (win, qs, null) = (0i32, qkvd as i64, 0u64);
                let mut lb = cx.launch("attention_generic");
                lb.arg(&b.qkv).arg(&*k_cache).arg(&*v_cache).arg(&b.slots).arg(&b.lens).arg(&null).arg(&mut b.attn);
                for x in a.iter() {
                    lb.arg(x);
                }
                lb.arg(&*scale).arg(&win).arg(&qs);
                unsafe { lb.launch(lc(nq, nb, 1, 128)) }?;
            }
            dense(cx, gemm, &l.wo, dptr(&b.attn, &st), false, dptr(&b.delta, &st), h, nq * hd, nb, None)?;
            cx.rmsnorm_residual::<f32>(&mut b.x, Some(&b.delta), &l.ln2, &mut b.hn, nb, h, eps)?;
            dense(cx, gemm, &l.gu, dptr(&b.hn, &st), false, dptr(&b.gu, &st), 2 * l.inter, h, nb, None)?;
            match c.activation {
                Activation::SiluGlu => cx.swiglu::<f32>(&b.gu, &mut b.act, nb, l.inter)?,
                Activation::GptOssGlu { alpha, limit } => cx.swiglu_oai::<f32>(&b.gu, &mut b.act, nb, l.inter, alpha, limit)?,
            }
            dense(cx, gemm, &l.down, dptr(&b.act, &st), false, dptr(&b.delta, &st), h, l.inter, nb, None)?;
        }
        let delta = if w.layers.is_empty() { None } else { Some(&b.delta) };
        cx.rmsnorm_residual::<f32>(&mut b.x, delta, &w.norm, &mut b.hn, nb, h, eps)?;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        dense(cx, gemm, head, dptr(&b.hn, &st), false, dptr(&b.logits, &st), *vocab, h, nb, None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{pad_rows, pass_rows, plan_rows, RowSpec};

    /// Slot 2 with 2 new context rows and a block of 3; slot 0 with 1 and 2.
    fn two_sequences() -> [RowSpec; 2] {
        [
            RowSpec { slot: 2, ctx_start: 5, ctx_rows: 2, first_token: 11, position: 7, block: 3 },
            RowSpec { slot: 0, ctx_start: 0, ctx_rows: 1, first_token: 12, position: 1, block: 2 },
        ]
    }

    #[test]
    fn block_rows_come_first_and_see_context_plus_block() {
        let p = plan_rows(&two_sequences(), 99);
        assert_eq!((p.n_block, p.n_ctx), (5, 3));
        assert_eq!(p.ids, vec![11, 99, 99, 12, 99]);
        assert_eq!(p.lens, vec![10, 10, 10, 3, 3]);
        assert_eq!(p.block_start, vec![0, 3]);
        // block rows at position.., then context rows at ctx_start..
        assert_eq!(p.pos, vec![7, 8, 9, 1, 2, 5, 6, 0]);
        assert_eq!(p.slots, vec![2, 2, 2, 0, 0, 2, 2, 0]);
    }

    #[test]
    fn padded_rows_keep_real_rows_in_place_and_pad_with_inert_rows() {
        let p = plan_rows(&two_sequences(), 99);
        let (nb, nc, padded) = pass_rows(p.n_block, p.n_ctx);
        assert_eq!((nb, nc, padded), (8, 4, true));
        let q = pad_rows(&p, nb, nc, 99);
        assert_eq!(q.ids, vec![11, 99, 99, 12, 99, 99, 99, 99]);
        assert_eq!(q.lens, vec![10, 10, 10, 3, 3, 0, 0, 0]);
        // block rows (5 real + 3 padding), then context rows (3 real + 1 padding)
        assert_eq!(q.pos, vec![7, 8, 9, 1, 2, 0, 0, 0, 5, 6, 0, 0]);
        assert_eq!(q.slots, vec![2, 2, 2, 0, 0, -1, -1, -1, 2, 2, 0, -1]);
        assert_eq!(q.block_start, p.block_start);
        // no context rows stay none; passes too big for a graph are not padded
        assert_eq!(pass_rows(16, 0), (16, 0, true));
        assert_eq!(pass_rows(16, 300), (16, 300, false));
        assert_eq!(pass_rows(65, 3), (128, 4, true));
        assert_eq!(pass_rows(257, 3), (257, 3, false));
        let same = pad_rows(&p, p.n_block, p.n_ctx, 99);
        assert_eq!((same.ids, same.pos, same.slots), (p.ids, p.pos, p.slots));
    }
}
