//! `CudaBackend`: the model forward on one GPU, implementing [`Backend`].
//!
//! Weights live on the device: attention, router, embeddings, norms and
//! lm_head in bf16; dense MLPs in bf16; MoE experts in MXFP4 (kept packed when
//! the checkpoint is MXFP4, quantized at upload otherwise). q|k|v and gate|up
//! are fused into one matrix each. The KV cache is resident, bf16,
//! `[slot][layer][kv_head][pos][head_dim]`, with a fixed number of positions
//! per slot (`max_context`); slots grow by doubling when all are taken.
//!
//! One *step* runs up to `max_step_tokens` rows (tokens) through every layer.
//! Each row carries its own (token, slot, position), so a step can mix
//! sequences and prefill several tokens of one sequence (causality holds
//! because each layer writes the step's K/V before attending, and each row
//! attends to positions `0..=pos` of its slot). The forward order is the CPU
//! reference's (`backend/cpu/mod.rs`):
//! embed → per layer [rmsnorm → qkv (+bias) → q/k-norm + RoPE → KV write →
//! attention (sinks, window) → o (+bias) → residual, rmsnorm → MLP or MoE
//! (router → top-k → expert GEMVs → combine) → residual] → final norm → lm_head.
//! Activations feeding a GEMV are bf16 (normed hidden, MLP activation) or
//! f32 (attention output, final norm); the residual stream is f32.
//!
//! Steps of at most `max_step_tokens` rows (decode: every chunk one token; a
//! DFlash verify: one or several sequences' blocks) are replayed from a CUDA graph
//! captured once per row bucket (1, 2, 4, …, `max_step_tokens`); padding rows
//! have slot −1 and length 0 and write no cache and attend to nothing (in MoE
//! layers they still route, so a padded bucket may read a few more experts).
//! With `fused` (default) RoPE and the KV write are one launch and the MoE
//! combine is folded into the next rmsnorm. A step uploads four small
//! i32 arrays, launches the graph and reads back logits (or argmax ids):
//! no allocation, no host sync inside the step. Longer chunks (prefill) run
//! the same launches eagerly in micro-batches of `max_step_tokens` rows.
//! Dense weights of steps of `GEMM_MIN_ROWS`+ rows go through cuBLAS GEMMs,
//! smaller steps through GEMVs of up to 8 rows. The launches of one step are
//! in `step.rs`; hidden-state capture and the logits/ids read-back in `capture.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use half::bf16;

use super::kernels::{AttnWorkspace, KvShape};
use super::gemm::{BlasGemm, GEMM_MIN_ROWS};
use super::{persistent, CudaContext, CudaError};
use crate::backend::rope::RopeTable;
use crate::backend::{Backend, BackendError, Chunk, LogitsFor, SeqId};
use crate::model::config::{Activation, AttentionKind, ModelConfig};
use crate::model::family::{GatedMlp, Mlp, ModelWeights};
use crate::model::weights::{Linear, Weight};
use crate::quant::{Mxfp4Matrix, ScaleRule};

type Res<T> = std::result::Result<T, CudaError>;

mod capture;
pub mod dflash;
mod ops;
mod shard;
mod step;
mod upload;

use ops::{activation, dense, dptr, grow_kv, lc, pre_norm, Pend};

fn dev(e: CudaError) -> BackendError {
    BackendError::Device(e.to_string())
}
fn drv(e: cudarc::driver::DriverError) -> BackendError {
    BackendError::Device(format!("CUDA driver error: {e:?}"))
}

/// How the backend sizes itself.
#[derive(Debug, Clone)]
pub struct CudaBackendOptions {
    pub ordinal: usize,
    /// Positions per KV slot; `None` = the model's `max_position_embeddings` capped at 8192.
    pub max_context: Option<usize>,
    /// KV slots allocated up front (more are added by doubling).
    pub initial_slots: usize,
    /// Rows per step (a power of two); also the largest decode batch one graph takes.
    pub max_step_tokens: usize,
    /// Replay decode steps from CUDA graphs (else launch eagerly).
    pub graphs: bool,
    /// Fused launches (RoPE + KV write; MoE combine + next rmsnorm); off = one launch per op.
    pub fused: bool,
    /// MoE experts read int8 activations (`kernels/moe_q8.cu`: dp4a, activation fused into
    /// gate/up); off = bf16 activations with f32 math (`kernels/mxfp4.cu`). Used only when
    /// hidden and expert width are multiples of 32.
    pub moe_q8: bool,
    /// Programmatic dependent launch between the step's kernels: each GEMV fetches its
    /// weights before it waits on its predecessor (`PdlFlavor`: dense models ask L2, MoE
    /// models load registers and let at most one kernel wait ahead). `None` = on for dense
    /// models (SmolLM2 b1 17% faster on the H100), and for MoE models on steps of one row
    /// only (Qwen3-30B-A3B b1 7.6% faster, gpt-oss-20b 4.4%; at 4 rows PDL made them 2-9%
    /// slower). bench/results/cuda_decode_h100.md. `KAIROS_CUDA_PDL` overrides.
    pub pdl: Option<bool>,
    /// Dense weights of steps of more than 8 rows (prefill, decode batches of 16+) go
    /// through cuBLAS GEMMs on tensor cores (`gemm.rs`); off = the GEMVs only.
    /// `KAIROS_CUDA_CUBLAS=0` turns it off.
    pub cublas: bool,
    /// `Some(m)`: MoE steps of more than 8 rows with at least m expert assignments per
    /// expert on average read each expert once for all of its assignments (`moe_group` +
    /// grouped int8 expert GEMVs) instead of once per assignment; `None`: never. Default
    /// 8: on the H100 grouping made gpt-oss-20b batch 64 15% faster (8 per expert) but
    /// Qwen3-30B-A3B batch 64 2% slower (4 per expert, narrow experts).
    /// `KAIROS_CUDA_GROUPED=0` turns it off, `KAIROS_CUDA_GROUPED_MIN=m` sets m.
    pub grouped: Option<usize>,
    /// Decode steps of up to 8 rows run as ONE persistent kernel (`persistent.rs`:
    /// the step's kernels as a program, grid barriers instead of kernel boundaries),
    /// where the step's kernels all have a persistent form; else the ordinary graph.
    /// Off by default: measured 1.5x slower than the graph on the H100 (see persistent.rs).
    /// `KAIROS_CUDA_PERSISTENT=0|1` overrides; `KAIROS_CUDA_PK_BLOCKS=1|2` blocks per SM.
    pub persistent: bool,
    /// One-row GEMVs on matrices with few rows split each row over 2–8 warps
    /// (`CudaContext::gemv_split_warps`). `KAIROS_CUDA_GEMV_SPLIT=0` turns it off.
    pub gemv_split: bool,
    /// Decode steps of one row fold small kernels into their neighbours: the
    /// o-projection adds into the residual, and a MoE block's post-attention norm, router
    /// and top-k ride in the router and expert GEMVs (`router_norm_q8`,
    /// `moe_gate_up_q8_topk`): two launches fewer per MoE layer.
    /// `KAIROS_CUDA_LAYER_FUSION=0` turns it off.
    pub layer_fusion: bool,
}

impl Default for CudaBackendOptions {
    fn default() -> Self {
        Self {
            ordinal: 0,
            max_context: None,
            initial_slots: 4,
            max_step_tokens: 64,
            graphs: true,
            fused: true,
            moe_q8: true,
            pdl: None,
            cublas: true,
            grouped: Some(8),
            persistent: false,
            gemv_split: true,
            layer_fusion: true,
        }
    }
}

/// A CUDA graph used from one thread at a time (the backend is `Send`, not `Sync`),
/// with the persistent program it launches, if any (dropped after the graph).
struct SendGraph(CudaGraph, Option<persistent::Program>);
// SAFETY: the graph is only touched through `&mut CudaBackend` (or `&mut CudaDFlash`),
// so never concurrently; cudarc binds the context to the calling thread on launch.
unsafe impl Send for SendGraph {}

/// Records what `encode` launches on `st` as a CUDA graph (nothing runs now).
fn capture_graph(st: &Arc<CudaStream>, encode: impl FnOnce() -> Res<()>) -> std::result::Result<CudaGraph, BackendError> {
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(drv)?;
    let r = encode();
    // end the capture even when encoding failed, so the stream is usable again
    let g = st.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    r.map_err(dev)?;
    g.map_err(drv)?.ok_or_else(|| BackendError::Device("empty CUDA graph".into()))
}

struct Mx {
    blocks: CudaSlice<u8>,
    scales: CudaSlice<u8>,
}

// one per layer, matched in place: the size difference costs nothing
#[allow(clippy::large_enum_variant)]
enum DMlp {
    Dense { gu: CudaSlice<u16>, down: CudaSlice<u16>, inter: usize },
    Moe {
        router: CudaSlice<u16>,
        router_bias: Option<CudaSlice<f32>>,
        gu: Mx,
        down: Mx,
        inter: usize,
        /// per-expert biases (gpt-oss): [E, 2*inter] (rows as fused in `gu`), [E, hidden]
        gu_bias: Option<CudaSlice<f32>>,
        down_bias: Option<CudaSlice<f32>>,
    },
}

struct DLayer {
    ln1: CudaSlice<u16>,
    ln2: CudaSlice<u16>,
    wqkv: CudaSlice<u16>,
    bqkv: Option<CudaSlice<f32>>,
    wo: CudaSlice<u16>,
    bo: Option<CudaSlice<f32>>,
    q_norm: Option<CudaSlice<u16>>,
    k_norm: Option<CudaSlice<u16>>,
    sinks: Option<CudaSlice<f32>>,
    window: usize,
    mlp: DMlp,
}

struct DWeights {
    embed: CudaSlice<u16>,
    lm_head: Option<CudaSlice<u16>>,
    final_norm: CudaSlice<u16>,
    layers: Vec<DLayer>,
    inv_freq: CudaSlice<f32>,
    mscale: f32,
    /// bytes of weights resident on the device
    bytes: usize,
}

/// Step buffers, sized for `max_step_tokens` rows.
struct Bufs {
    ids: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    pos: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    x: CudaSlice<f32>,
    h: CudaSlice<u16>,
    hf: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    act: CudaSlice<u16>,
    rlogits: CudaSlice<f32>,
    tid: CudaSlice<i32>,
    tw: CudaSlice<f32>,
    ye: CudaSlice<f32>,
    /// each expert's assignments for the grouped expert GEMVs: off [E + 1], list [n*k]
    goff: CudaSlice<i32>,
    glist: CudaSlice<i32>,
    /// int8 blocks of `h` [n, hidden] and of the expert activation [n*k, inter] (moe_q8)
    hq: CudaSlice<i8>,
    hd: CudaSlice<f32>,
    aq: CudaSlice<i8>,
    ad: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    am: CudaSlice<i32>,
    /// per-row sampling inputs of `decode_sample`: temperature, top-p, uniform draw
    samp: CudaSlice<f32>,
    ws: AttnWorkspace,
}

/// Most attention splits a step uses (bounds the workspace).
const MAX_SPLITS: usize = 64;

pub struct CudaBackend {
    cx: CudaContext,
    cfg: ModelConfig,
    w: DWeights,
    b: Bufs,
    k_cache: CudaSlice<u16>,
    v_cache: CudaSlice<u16>,
    kv: KvShape,
    lens: Vec<Option<usize>>,
    max_context: usize,
    max_tok: usize,
    use_graphs: bool,
    graphs: HashMap<usize, SendGraph>,
    /// blocks per SM of the persistent decode step (0: off; see `CudaBackendOptions::persistent`)
    pk_blocks: u32,
    scale: f32,
    ordinal: usize,
    fused: bool,
    /// see `CudaBackendOptions::layer_fusion`
    layer_fusion: bool,
    /// PDL for steps of one row / of more rows (see `CudaBackendOptions::pdl`)
    pdl_rows: (bool, bool),
    moe_q8: bool,
    /// grouped expert GEMVs from this many assignments per expert (`usize::MAX`: never;
    /// see `CudaBackendOptions::grouped`)
    group_min: usize,
    /// cuBLAS for the dense weights of steps of `GEMM_MIN_ROWS`+ rows (None: GEMVs only)
    gemm: Option<BlasGemm>,
    /// Reduction of the attention and MLP outputs (see `attach_comm`).
    comm: Option<Box<dyn super::comm::DeviceComm>>,
    /// This backend is one rank of a sharded model (see `shard.rs`).
    shard: Option<shard::ShardState>,
    /// Hidden states copied out of each step for DFlash (see `capture.rs`).
    cap: Option<capture::Capture>,
    /// Buffers of the masked argmax (see `capture.rs`), grown on demand.
    masked: Option<capture::MaskBufs>,
}


/// The PDL hand-over a model's kernels are compiled for (see `PdlFlavor`).
pub(crate) fn pdl_flavor(c: &ModelConfig) -> super::PdlFlavor {
    if c.moe.is_some() {
        super::PdlFlavor::Late
    } else {
        super::PdlFlavor::Early
    }
}

/// Which folds of one-row steps a model's decode takes by default: (norm fold, RoPE fold)
/// (`CudaContext::norm_fold`, `rope_fold`). Chosen by measurement (H100, bench/results
/// cuda_decode_h100.md, sessions 11, 17 and 18), graph-only step times at batch 1 against neither fold:
/// - SmolLM2-135M (dense, head_dim 64): either fold -6%, both -6% (ctx 128), -4.5% (ctx 2048);
/// - gpt-oss-20b (MoE, head_dim 64): RoPE fold -1.3% / -0.4%, norm fold +2.6% (+2.3%, session 17);
/// - Qwen3-30B-A3B (MoE, head_dim 128, q/k norms): norm fold +6.5% (+4%, session 17). The RoPE
///   fold lost (+4%) while attention blocks held 8 query heads; with one head a block it won at
///   ctx 128 but lost 7.5% at ctx 2048, where its grid ran a second wave (session 17). With the
///   grid capped at one wave (`attention_splits`) it is -2.1% at ctx 128 and -1.0% at ctx 2048
///   (session 18: 2.626 -> 2.571 ms, 2.918 -> 2.889 ms).
///
/// So: the norm fold for dense models, the RoPE fold for every model.
pub(crate) fn step_folds(c: &ModelConfig) -> (bool, bool) {
    (c.moe.is_none(), true)
}

impl CudaBackend {
    fn assemble(mut cx: CudaContext, c: ModelConfig, w: DWeights, opts: CudaBackendOptions) -> std::result::Result<Self, BackendError> {
        let pdl_rows = (opts.pdl.unwrap_or(true), opts.pdl.unwrap_or(c.moe.is_none()));
        cx.set_pdl(pdl_rows.0);
        let (norm_fold, rope_fold) = step_folds(&c);
        cx.norm_fold = super::env_flag("KAIROS_CUDA_NORM_FOLD").unwrap_or(norm_fold);
        cx.rope_fold = super::env_flag("KAIROS_CUDA_ROPE_FOLD").unwrap_or(rope_fold);
        cx.gemv_split &= opts.gemv_split;
        let t = opts.max_step_tokens.max(1).next_power_of_two();
        let max_context = opts.max_context.unwrap_or(c.max_position_embeddings.min(8192)).max(1);
        let (h, hd, nq, nkv, v) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size);
        let qkvd = (nq + 2 * nkv) * hd;
        let (mut gu_w, mut act_w, mut e, mut k) = (2 * c.intermediate_size, c.intermediate_size, 1, 1);
        if let Some(m) = &c.moe {
            gu_w = gu_w.max(m.top_k * 2 * m.expert_intermediate);
            act_w = act_w.max(m.top_k * m.expert_intermediate);
            e = m.num_experts;
            k = m.top_k;
        }
        let st = &cx.stream;
        let z32 = |n: usize| st.alloc_zeros::<f32>(n.max(1));
        let zi = |n: usize| st.alloc_zeros::<i32>(n.max(1));
        let z16 = |n: usize| st.alloc_zeros::<u16>(n.max(1));
        let z8 = |n: usize| st.alloc_zeros::<i8>(n.max(1));
        let b = (|| -> std::result::Result<Bufs, cudarc::driver::DriverError> {
            Ok(Bufs {
                ids: zi(t)?,
                slots: zi(t)?,
                pos: zi(t)?,
                lens: zi(t)?,
                x: z32(t * h)?,
                h: z16(t * h)?,
                hf: z32(t * h)?,
                qkv: z32(t * qkvd)?,
                attn: z32(t * nq * hd)?,
                delta: z32(t * h)?,
                gu: z32(t * gu_w)?,
                act: z16(t * act_w)?,
                rlogits: z32(t * e)?,
                tid: zi(t * k)?,
                goff: zi(e + 1)?,
                glist: zi(t * k)?,
                tw: z32(t * k)?,
                ye: z32(t * k * h)?,
                hq: z8(t * h)?,
                hd: z32(t * h / 32)?,
                aq: z8(t * act_w)?,
                ad: z32(t * act_w / 32)?,
                logits: z32(t * v)?,
                am: zi(t)?,
                samp: z32(3 * t)?,
                ws: AttnWorkspace {
                    acc: z32(t * nq * MAX_SPLITS * hd)?,
                    ml: z32(t * nq * MAX_SPLITS * 2)?,
                    cnt: st.alloc_zeros::<u32>(t * nq)?,
                    max_seqs: t,
                    n_q_heads: nq,
                    max_splits: MAX_SPLITS,
                    head_dim: hd,
                },
            })
        })()
        .map_err(drv)?;
        let slots = opts.initial_slots.max(1);
        let kv = KvShape { n_slots: slots, n_layers: c.num_layers, n_kv_heads: nkv, max_pos: max_context, head_dim: hd };
        let k_cache = z16(kv.len()).map_err(drv)?;
        let v_cache = z16(kv.len()).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        let cublas = opts.cublas && std::env::var("KAIROS_CUDA_CUBLAS").map_or(true, |v| v != "0");
        let gemm = if cublas && t >= GEMM_MIN_ROWS {
            match BlasGemm::new(&cx.stream, t, (nq * hd).max(h)) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!("CUDA backend: no cuBLAS ({e}); steps of {GEMM_MIN_ROWS}+ rows use the GEMVs");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            gemm,
            scale: 1.0 / (hd as f32).sqrt(),
            cx,
            w,
            b,
            k_cache,
            v_cache,
            kv,
            lens: Vec::new(),
            max_context,
            max_tok: t,
            use_graphs: opts.graphs,
            graphs: HashMap::new(),
            pk_blocks: if std::env::var("KAIROS_CUDA_PERSISTENT").map_or(opts.persistent, |v| v != "0") {
                std::env::var("KAIROS_CUDA_PK_BLOCKS").ok().and_then(|v| v.parse().ok()).unwrap_or(2u32).clamp(1, 2)
            } else {
                0
            },
            ordinal: opts.ordinal,
            fused: opts.fused,
            layer_fusion: std::env::var("KAIROS_CUDA_LAYER_FUSION").map_or(opts.layer_fusion, |v| v != "0"),
            pdl_rows,
            group_min: match opts.grouped {
                Some(m) if std::env::var("KAIROS_CUDA_GROUPED").map_or(true, |v| v != "0") => {
                    std::env::var("KAIROS_CUDA_GROUPED_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(m).max(1)
                }
                _ => usize::MAX,
            },
            moe_q8: opts.moe_q8
                && h.is_multiple_of(32)
                && c.moe.as_ref().is_some_and(|m| m.expert_intermediate.is_multiple_of(32)),
            cfg: c,
            comm: None,
            cap: None,
            masked: None,
            shard: None,
        })
    }

    /// Routes the step through an NCCL communicator created on this backend's stream
    /// (`NcclComm::join_on(backend.context().stream.clone(), …)`): the attention
    /// output and the MLP / MoE output of every layer are all-reduced across the
    /// world before the residual add, inside the captured decode graphs (the MoE
    /// combine then runs unfused, before the reduction). A backend holding the
    /// whole model takes a world of 1; a rank of a sharded model (`new_rank`,
    /// `random_rank`) its plan's world (see `attach_comm`).
    pub fn attach_nccl(&mut self, comm: crate::backend::collectives::nccl::NcclComm) -> std::result::Result<(), BackendError> {
        self.attach_comm(Box::new(super::comm::NcclStepComm::new(comm)))
    }

    pub fn context(&self) -> &CudaContext {
        &self.cx
    }
    /// The context's kernel choices (`topk_rank`, `gemv_split_target`, ...) for A/B tests;
    /// graphs captured afterwards take them.
    pub fn context_mut(&mut self) -> &mut CudaContext {
        &mut self.cx
    }
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    /// Bytes of weights resident on the device.
    pub fn weight_bytes(&self) -> usize {
        self.w.bytes
    }
    /// Rows one step (and the largest graph bucket) takes.
    pub fn max_step_tokens(&self) -> usize {
        self.max_tok
    }

    fn splits_for(&self, n: usize, max_len: usize) -> usize {
        // a step of one row may take the RoPE fold (step.rs)
        let rope = n == 1 && self.cx.rope_fold;
        self.cx.attention_splits(n, self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim, rope, max_len, MAX_SPLITS)
    }

    /// Uploads step inputs for `rows` (token, slot, position), padded to `n_pad` rows.
    fn upload(&mut self, rows: &[(u32, usize, usize)], n_pad: usize) -> std::result::Result<(), BackendError> {
        let mut ids = vec![0i32; n_pad];
        let mut slots = vec![-1i32; n_pad];
        let mut pos = vec![-1i32; n_pad];
        let mut lens = vec![0i32; n_pad];
        for (i, &(t, s, p)) in rows.iter().enumerate() {
            ids[i] = t as i32;
            slots[i] = s as i32;
            pos[i] = p as i32;
            lens[i] = p as i32 + 1;
        }
        let st = &self.cx.stream;
        st.memcpy_htod(&ids, &mut self.b.ids.slice_mut(0..n_pad)).map_err(drv)?;
        st.memcpy_htod(&slots, &mut self.b.slots.slice_mut(0..n_pad)).map_err(drv)?;
        st.memcpy_htod(&pos, &mut self.b.pos.slice_mut(0..n_pad)).map_err(drv)?;
        st.memcpy_htod(&lens, &mut self.b.lens.slice_mut(0..n_pad)).map_err(drv)?;
        Ok(())
    }

    /// Runs one decode step (one row per entry, at most `max_step_tokens`) from the
    /// bucket's CUDA graph (captured on first use), or eagerly when graphs are off.
    /// Returns the number of rows computed (the bucket).
    fn decode_launch(&mut self, rows: &[(u32, usize, usize)]) -> std::result::Result<usize, BackendError> {
        let n = rows.len();
        let bucket = n.next_power_of_two().min(self.max_tok);
        self.upload(rows, bucket)?;
        if !self.use_graphs {
            let max_len = rows.iter().map(|r| r.2 + 1).max().unwrap_or(1);
            let splits = self.splits_for(bucket, max_len);
            self.encode_step(bucket, splits).map_err(dev)?;
            return Ok(bucket);
        }
        if !self.graphs.contains_key(&bucket) {
            let splits = self.splits_for(bucket, self.max_context);
            let mut prog = self.persistent_program(bucket, splits)?;
            let st = self.cx.stream.clone();
            let g = capture_graph(&st, || match prog.as_mut() {
                Some(p) => p.launch(&self.cx).map_err(CudaError::from),
                None => self.encode_step(bucket, splits),
            })?;
            self.graphs.insert(bucket, SendGraph(g, prog));
        }
        self.graphs[&bucket].0.launch().map_err(drv)?;
        Ok(bucket)
    }

    /// The step of `bucket` rows as a persistent program, when that is on and every
    /// launch of the step has a persistent form (else None: the ordinary graph).
    fn persistent_program(&mut self, bucket: usize, splits: usize) -> std::result::Result<Option<persistent::Program>, BackendError> {
        let eligible = self.pk_blocks > 0
            && bucket < GEMM_MIN_ROWS
            && self.comm.is_none()
            && self.shard.is_none()
            && self.cap.is_none();
        if !eligible {
            return Ok(None);
        }
        self.cx.start_recording();
        let r = self.encode_step(bucket, splits);
        let recs = self.cx.take_recording();
        r.map_err(dev)?;
        match persistent::translate(&recs, self.cfg.head_dim) {
            Ok(words) => {
                let p = persistent::Program::new(&mut self.cx, &recs, &words, self.cfg.head_dim, self.pk_blocks, bucket).map_err(dev)?;
                tracing::debug!("bucket {bucket}: persistent step of {} instructions on {} blocks", recs.len(), p.grid());
                Ok(Some(p))
            }
            Err(why) => {
                tracing::info!("bucket {bucket}: no persistent step ({why}); using the CUDA graph");
                Ok(None)
            }
        }
    }

    /// `KAIROS_CUDA_PK_PROFILE=1`: where the last persistent step of `bucket` rows spent
    /// its time, per kernel name (ns, instructions), else None.
    pub fn persistent_profile(&self, bucket: usize) -> std::result::Result<Option<persistent::Profile>, BackendError> {
        match self.graphs.get(&bucket).and_then(|g| g.1.as_ref()) {
            Some(p) => p.profile(&self.cx).map_err(drv),
            None => Ok(None),
        }
    }

    /// Whether the decode graph of `bucket` rows runs the persistent step (tests).
    pub fn bucket_is_persistent(&self, bucket: usize) -> bool {
        self.graphs.get(&bucket).is_some_and(|g| g.1.is_some())
    }

    /// Replays the decode graph of `bucket` rows `times` times with the inputs of
    /// the last step (benchmarks: GPU time per step without host round trips).
    pub fn replay_decode_graph(&mut self, bucket: usize, times: usize) -> std::result::Result<(), BackendError> {
        let g = self.graphs.get(&bucket).ok_or_else(|| BackendError::Device(format!("no graph for bucket {bucket}")))?;
        for _ in 0..times {
            g.0.launch().map_err(drv)?;
        }
        self.cx.stream.synchronize().map_err(drv)
    }

    fn check_chunks(&self, chunks: &[Chunk<'_>]) -> std::result::Result<Vec<usize>, BackendError> {
        let mut starts = Vec::with_capacity(chunks.len());
        let mut extra: HashMap<usize, usize> = HashMap::new();
        for ch in chunks {
            let len = self.seq_len(ch.seq)? + extra.get(&ch.seq.0).copied().unwrap_or(0);
            if len + ch.tokens.len() > self.max_context {
                return Err(BackendError::ContextFull { seq: ch.seq, len: len + ch.tokens.len(), limit: self.max_context });
            }
            if let Some(&id) = ch.tokens.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(BackendError::TokenOutOfRange { id, vocab: self.cfg.vocab_size });
            }
            starts.push(len);
            *extra.entry(ch.seq.0).or_default() += ch.tokens.len();
        }
        Ok(starts)
    }

    /// One greedy decode step on the device: appends each chunk's single token and
    /// returns the argmax id of each (only the ids cross to the host).
    pub fn decode_argmax(&mut self, chunks: &[Chunk<'_>]) -> std::result::Result<Vec<u32>, BackendError> {
        if chunks.iter().any(|c| c.tokens.len() != 1) || chunks.len() > self.max_tok {
            return Err(BackendError::Unsupported("decode_argmax takes one token per chunk, at most max_step_tokens chunks".into()));
        }
        let starts = self.check_chunks(chunks)?;
        let rows: Vec<(u32, usize, usize)> = chunks.iter().zip(&starts).map(|(c, &s)| (c.tokens[0], c.seq.0, s)).collect();
        self.decode_launch(&rows)?;
        let mut out = vec![0i32; rows.len()];
        self.cx.stream.memcpy_dtoh(&self.b.am.slice(0..rows.len()), &mut out).map_err(drv)?;
        self.cx.stream.synchronize().map_err(drv)?;
        for ch in chunks {
            *self.lens[ch.seq.0].as_mut().expect("checked") += 1;
        }
        Ok(out.into_iter().map(|v| v as u32).collect())
    }

    /// One sampled decode step on the device: appends each chunk's single token and
    /// returns a token per chunk drawn by temperature + top-p sampling on the GPU
    /// (`kernels/sample.cu`) from `(temperature, top_p, u)` per chunk, u uniform in
    /// [0, 1) from the caller's seeded RNG; temperature 0 = greedy. Only ids cross
    /// to the host.
    pub fn decode_sample(&mut self, chunks: &[Chunk<'_>], params: &[(f32, f32, f32)]) -> std::result::Result<Vec<u32>, BackendError> {
        if chunks.iter().any(|c| c.tokens.len() != 1) || chunks.len() > self.max_tok || params.len() != chunks.len() {
            return Err(BackendError::Unsupported(
                "decode_sample takes one token and one (temperature, top_p, u) per chunk, at most max_step_tokens chunks".into(),
            ));
        }
        let starts = self.check_chunks(chunks)?;
        let rows: Vec<(u32, usize, usize)> = chunks.iter().zip(&starts).map(|(c, &s)| (c.tokens[0], c.seq.0, s)).collect();
        self.decode_launch(&rows)?;
        let n = rows.len();
        let t = self.max_tok;
        let mut host = vec![0f32; 3 * t];
        for (i, &(temp, top_p, u)) in params.iter().enumerate() {
            (host[i], host[t + i], host[2 * t + i]) = (temp, top_p, u);
        }
        let st = self.cx.stream.clone();
        st.memcpy_htod(&host, &mut self.b.samp).map_err(drv)?;
        let base = dptr(&self.b.samp, &st);
        let (temp, top_p, u) = (base, base + 4 * t as u64, base + 8 * t as u64);
        let v = self.cfg.vocab_size as i32;
        let mut lb = self.cx.launch("sample_top_p");
        lb.arg(&self.b.logits).arg(&v).arg(&temp).arg(&top_p).arg(&u).arg(&mut self.b.am);
        unsafe { lb.launch(lc(n, 1, 1, 1024)) }.map_err(drv)?;
        let mut out = vec![0i32; n];
        st.memcpy_dtoh(&self.b.am.slice(0..n), &mut out).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        for ch in chunks {
            *self.lens[ch.seq.0].as_mut().expect("checked") += 1;
        }
        Ok(out.into_iter().map(|v| v as u32).collect())
    }

    /// Sets a sequence's cached length without computing it (benchmarks: the cache
    /// contents are whatever the slot held; attention cost is the same).
    pub fn bench_set_len(&mut self, seq: SeqId, len: usize) -> std::result::Result<(), BackendError> {
        if len > self.max_context {
            return Err(BackendError::ContextFull { seq, len, limit: self.max_context });
        }
        *self.lens.get_mut(seq.0).and_then(Option::as_mut).ok_or(BackendError::UnknownSequence(seq))? = len;
        Ok(())
    }

    fn grow_slots(&mut self) -> std::result::Result<(), BackendError> {
        let (k, v, kv) = grow_kv(&self.cx, &self.k_cache, &self.v_cache, self.kv, self.kv.n_slots * 2).map_err(drv)?;
        (self.k_cache, self.v_cache, self.kv) = (k, v, kv);
        // graphs hold the old cache pointers
        self.graphs.clear();
        Ok(())
    }
}


impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.cx.name)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn new_sequence(&mut self) -> SeqId {
        if let Some(i) = self.lens.iter().position(Option::is_none) {
            self.lens[i] = Some(0);
            return SeqId(i);
        }
        if self.lens.len() >= self.kv.n_slots {
            // The trait gives no error path here; a failed growth surfaces on the
            // first forward of the new sequence (its slot is past the cache).
            let _ = self.grow_slots();
        }
        self.lens.push(Some(0));
        SeqId(self.lens.len() - 1)
    }

    fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.lens.get_mut(seq.0) {
            *s = None;
        }
    }

    fn seq_len(&self, seq: SeqId) -> std::result::Result<usize, BackendError> {
        self.lens.get(seq.0).copied().flatten().ok_or(BackendError::UnknownSequence(seq))
    }

    fn truncate(&mut self, seq: SeqId, len: usize) -> std::result::Result<(), BackendError> {
        let l = self.lens.get_mut(seq.0).and_then(Option::as_mut).ok_or(BackendError::UnknownSequence(seq))?;
        *l = (*l).min(len);
        Ok(())
    }

    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> std::result::Result<(), BackendError> {
        let len = len.min(self.seq_len(from)?);
        self.seq_len(to)?;
        if from.0 >= self.kv.n_slots || to.0 >= self.kv.n_slots {
            return Err(BackendError::Device("KV slot beyond the cache (slot growth failed)".into()));
        }
        let kv = self.kv;
        let st = self.cx.stream.clone();
        let block = kv.max_pos * kv.head_dim;
        let bytes = len * kv.head_dim * 2;
        if bytes > 0 && from != to {
            for cache in [&self.k_cache, &self.v_cache] {
                let base = dptr(cache, &st);
                for li in 0..kv.n_layers {
                    for hh in 0..kv.n_kv_heads {
                        let off = |slot: usize| (((slot * kv.n_layers + li) * kv.n_kv_heads + hh) * block * 2) as u64;
                        unsafe {
                            cudarc::driver::result::memcpy_dtod_async(base + off(to.0), base + off(from.0), bytes, st.cu_stream())
                        }
                        .map_err(drv)?;
                    }
                }
            }
        }
        self.lens[to.0] = Some(len);
        Ok(())
    }

    fn forward(&mut self, chunks: &[Chunk<'_>], which: LogitsFor) -> std::result::Result<Vec<f32>, BackendError> {
        self.run_forward(chunks, which, false).map(|(logits, _)| logits)
    }

    fn forward_capture(
        &mut self,
        chunks: &[Chunk<'_>],
        which: LogitsFor,
        layers: &[usize],
    ) -> std::result::Result<(Vec<f32>, Vec<f32>), BackendError> {
        if layers.is_empty() {
            return self.run_forward(chunks, which, false);
        }
        self.set_capture(layers)?;
        self.run_forward(chunks, which, true)
    }

    fn decode_choose(&mut self, chunks: &[Chunk<'_>], params: &[(f32, f32, f32)]) -> std::result::Result<Option<Vec<u32>>, BackendError> {
        self.decode_sample(chunks, params).map(Some)
    }

    fn forward_capture_argmax(&mut self, chunks: &[Chunk<'_>], layers: &[usize]) -> std::result::Result<(Vec<u32>, Vec<f32>), BackendError> {
        if !layers.is_empty() {
            self.set_capture(layers)?;
        }
        self.run_forward_ids(chunks, !layers.is_empty(), None)
    }

    fn argmax_on_device(&self) -> bool {
        // a rank of a sharded model masks on the host (see below)
        self.shard.is_none()
    }

    fn forward_capture_masked_argmax(
        &mut self,
        chunks: &[Chunk<'_>],
        layers: &[usize],
        masks: &[Option<&[u64]>],
    ) -> std::result::Result<(Vec<u32>, Vec<f32>), BackendError> {
        crate::backend::check_masks(chunks, masks)?;
        if !layers.is_empty() {
            self.set_capture(layers)?;
        }
        if self.shard.is_some() {
            // a rank's logits buffer is not the assembled vocabulary: mask on the host
            let (logits, hidden) = self.run_forward(chunks, LogitsFor::All, !layers.is_empty())?;
            return Ok((crate::backend::masked_argmax_rows(&logits, self.cfg.vocab_size, masks), hidden));
        }
        self.run_forward_ids(chunks, !layers.is_empty(), Some(masks))
    }
}
