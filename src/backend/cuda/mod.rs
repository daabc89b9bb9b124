//! CUDA backend: device context, NVRTC compilation of `kernels/*.cu` (`nvrtc.rs`, with an
//! on-disk PTX cache) and typed kernel launches (see `kernels.rs`).
//!
//! Conventions: bf16 tensors are `CudaSlice<u16>` (raw bf16 bits, e.g.
//! `half::bf16::to_bits`), activations are f32 unless a wrapper says bf16,
//! token ids / positions / slots are i32. All launches go on `ctx.stream`
//! and never synchronize the host (graph-capturable); call
//! `ctx.stream.synchronize()` or copy back to wait.

pub mod comm;
pub mod gemm;
pub mod gemv_bulk;
pub mod kernels;
pub mod kernels_attention;
pub mod kernels_q8;
pub mod launch;
pub mod model;
mod nvrtc;
pub mod persistent;
pub mod sharded;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use launch::{Launch, RawFunction, RawModule, Recorded, Recorder};
use nvrtc::{compile_cached, driver_version, entry_names, nvrtc_version, persistent_opts, persistent_source};
pub use nvrtc::ptx_cache_dir;

/// Helpers prepended to every kernel source.
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (module name, source, entry points)
const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "embedding",
        include_str!("../../../kernels/embedding.cu"),
        &["embedding_gather_f32", "embedding_gather_bf16"],
    ),
    (
        "rmsnorm",
        include_str!("../../../kernels/rmsnorm.cu"),
        &["rmsnorm_residual", "rmsnorm_residual_f32out", "rmsnorm_residual_q8"],
    ),
    (
        "rope",
        include_str!("../../../kernels/rope.cu"),
        &["rope_qk", "kv_cache_write"],
    ),
    (
        "attention",
        include_str!("../../../kernels/attention.cu"),
        &[
            "attention_split_d64",
            "attention_split_d128",
            "attention_split_d256",
            "attention_rope_d64",
            "attention_rope_d128",
            "attention_rope_d256",
            "attention_split_d64_h1",
            "attention_split_d128_h1",
            "attention_split_d256_h1",
            "attention_rope_d64_h1",
            "attention_rope_d128_h1",
            "attention_rope_d256_h1",
            "attention_split_d64_h2",
            "attention_split_d128_h2",
            "attention_split_d256_h2",
            "attention_rope_d64_h2",
            "attention_rope_d128_h2",
            "attention_rope_d256_h2",
            "attention_split_d64_h4",
            "attention_split_d128_h4",
            "attention_split_d256_h4",
            "attention_rope_d64_h4",
            "attention_rope_d128_h4",
            "attention_rope_d256_h4",
            "attention_tile_d64",
            "attention_tile_d128",
        ],
    ),
    // entries ending in "_n" are loaded as _n1 ..= _n8
    (
        "mxfp4",
        include_str!("../../../kernels/mxfp4.cu"),
        &["mxfp4_gemv_bf16x_n", "mxfp4_gemv_f32x_n"],
    ),
    (
        "moe_q8",
        include_str!("../../../kernels/moe_q8.cu"),
        &[
            "mxfp4_q8_l32",
            "mxfp4_q8_l8",
            "moe_gate_up_q8",
            "moe_group",
            "mxfp4_q8_grouped_l32",
            "mxfp4_q8_grouped_l8",
            "moe_gate_up_q8_grouped",
            "router_norm_q8",
            "moe_gate_up_q8_topk",
            "mxfp4_q8_rank_l32",
            "mxfp4_q8_rank_l8",
            "mxfp4_q8_combine_l32",
            "mxfp4_q8_combine_l8",
        ],
    ),
    (
        "gemv",
        include_str!("../../../kernels/gemv.cu"),
        &[
            "bf16_gemv_bf16x_n",
            "bf16_gemv_f32x_n",
            "bf16_gemv_k2_bf16x",
            "bf16_gemv_k2_f32x",
            "bf16_gemv_k4_bf16x",
            "bf16_gemv_k4_f32x",
            "bf16_gemv_k8_bf16x",
            "bf16_gemv_k8_f32x",
            "bf16_gemv_f32x_acc_n",
            "bf16_gemv_k2_f32x_acc",
            "bf16_gemv_k4_f32x_acc",
            "bf16_gemv_k8_f32x_acc",
            "bf16_gemv_bf16x_acc_n",
            "bf16_gemv_k2_bf16x_acc",
            "bf16_gemv_k4_bf16x_acc",
            "bf16_gemv_k8_bf16x_acc",
            "bf16_gemv_norm_n1",
            "bf16_gemv_norm_k2",
            "bf16_gemv_norm_k4",
            "bf16_gemv_norm_k8",
        ],
    ),
    ("gemv_bulk", include_str!("../../../kernels/gemv_bulk.cu"), gemv_bulk::ENTRIES),
    (
        "swiglu",
        include_str!("../../../kernels/swiglu.cu"),
        &[
            "swiglu_f32",
            "swiglu_bf16",
            "swiglu_oai_f32",
            "swiglu_oai_bf16",
        ],
    ),
    (
        "moe",
        include_str!("../../../kernels/moe.cu"),
        &["moe_router_topk", "moe_router_topk_512", "moe_router_topk_rank", "moe_combine"],
    ),
    (
        "shard",
        include_str!("../../../kernels/shard.cu"),
        &["embedding_vocab_range", "moe_local_ids", "vocab_assemble"],
    ),
    (
        "sample",
        include_str!("../../../kernels/sample.cu"),
        &["sample_top_p"],
    ),
    (
        "argmax",
        include_str!("../../../kernels/argmax.cu"),
        &["argmax_partial", "argmax_partial_masked", "argmax_final"],
    ),
    (
        "model",
        include_str!("../../../kernels/model.cu"),
        &[
            "attention_generic",
            "fill_random_bf16",
            "fill_random_u8",
            "rope_qk_kv",
            "f32_to_bf16",
            "add_bias_f32",
            "rmsnorm_moe_bf16",
            "rmsnorm_moe_f32",
            "add_expert_bias",
        ],
    ),
];

/// Errors of the CUDA backend.
#[derive(Debug)]
pub enum CudaError {
    Driver(DriverError),
    Compile { module: String, log: String },
    Shape(String),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e:?}"),
            CudaError::Compile { module, log } => {
                write!(f, "NVRTC failed to compile kernels/{module}.cu: {log}")
            }
            CudaError::Shape(s) => write!(f, "CUDA kernel shape error: {s}"),
        }
    }
}
impl std::error::Error for CudaError {}
impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e)
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// One GPU: its driver context, one stream, and every kernel loaded.
pub struct CudaContext {
    pub ctx: Arc<cudarc::driver::CudaContext>,
    pub stream: Arc<CudaStream>,
    /// e.g. "sm_90"
    pub arch: String,
    pub name: String,
    pub sm_count: u32,
    /// dynamic shared memory a block may opt into (bytes; 227 KB on Hopper)
    pub smem_optin: usize,
    /// how many modules came from the on-disk cache (the rest were compiled)
    pub ptx_cache_hits: usize,
    funcs: HashMap<String, RawFunction>,
    modules: Vec<RawModule>,
    /// launches carry the PDL attribute (see `launch.rs`); only honoured on sm_90+
    pub pdl: bool,
    /// the device supports PDL (sm_90+)
    pub pdl_supported: bool,
    /// one-row GEMVs on matrices with few rows split each row over 2–8 warps
    /// (`gemv_split_warps`); `KAIROS_CUDA_GEMV_SPLIT=0` turns it off
    pub gemv_split: bool,
    /// one-row GEMVs over weights of at least this many bytes (not recorded for the persistent
    /// step) stream them through shared memory by bulk copies (`gemv_bulk.rs`): a large LM
    /// head. 128 MiB (H200, graph step: gpt-oss-20b's 1.2 GB head -4.9%, Qwen3-30B-A3B's 622 MB
    /// -1.7%, SmolLM2's 57 MB +0.8%); `KAIROS_CUDA_GEMV_BULK_MIN_MB=N` (0: every one-row GEMV),
    /// `KAIROS_CUDA_GEMV_BULK=0`: none
    pub gemv_bulk_min_bytes: usize,
    /// bulk GEMV blocks per SM (1; `KAIROS_CUDA_GEMV_BULK_BPS` for A/B: several smaller
    /// blocks can share an SM with the kernel before them)
    pub gemv_bulk_bps: usize,
    /// most bytes of a bulk GEMV block's chunk ring (0: what fits;
    /// `KAIROS_CUDA_GEMV_BULK_RING_KB` for A/B)
    pub gemv_bulk_ring: usize,
    /// `gemv_split_warps` splits rows while the matrix has fewer than this many warps'
    /// worth of rows (16384; `KAIROS_CUDA_GEMV_SPLIT_TARGET` for A/B)
    pub gemv_split_target: usize,
    /// `moe_router_topk` with up to 256 experts ranks the logits in a block per token
    /// (`moe_router_topk_rank`); `KAIROS_CUDA_TOPK_RANK=0`: a warp per token, k arg-max rounds
    pub topk_rank: bool,
    /// under PDL, the folded MoE block's expert down GEMV ranks the router logits itself
    /// (`Experts::Rank`) and loads its first weights before it waits on the gate/up kernel;
    /// `KAIROS_CUDA_DOWN_RANK=0`: it reads the ids the gate/up kernel stored
    pub down_rank: bool,
    /// steps of one row fold each pre-attention rmsnorm into the q|k|v GEMV after it
    /// (`bf16_gemv_norm_*`) and the MoE combine into the expert down GEMV
    /// (`mxfp4_q8_combine_*`), or a dense MLP's down projection adds itself to the residual:
    /// one launch fewer per layer. A model's backend sets it (`model::step_folds`);
    /// `KAIROS_CUDA_NORM_FOLD=0|1` wins
    pub norm_fold: bool,
    /// threads per block of the normalising GEMVs (256 or 512; each block normalises the
    /// input row itself, so fewer, larger blocks read it fewer times).
    /// `KAIROS_CUDA_NORM_THREADS` for A/B
    pub norm_gemv_threads: usize,
    /// with `norm_fold`, the q|k|v GEMV normalises (else a plain rmsnorm launch does, and only
    /// the combine / accumulating down projection is folded); `KAIROS_CUDA_QKV_NORM=0`: A/B
    pub qkv_norm: bool,
    /// blocks per SM of the normalising GEMVs' grid (2; `KAIROS_CUDA_NORM_BLOCKS` for A/B)
    pub norm_gemv_blocks_per_sm: usize,
    /// steps of one row fold RoPE, the q/k norms and the KV-cache write into the attention
    /// kernel (`attention_rope_d*`): one launch fewer per layer. A model's backend sets it
    /// (`model::step_folds`); `KAIROS_CUDA_ROPE_FOLD=0|1` wins
    pub rope_fold: bool,
    /// Profiling by ablation (`KAIROS_CUDA_SKIP`): kernels never enqueued, and the names
    /// already reported (`KAIROS_CUDA_LAUNCH_LOG`). See `LaunchProbe`.
    probe: launch::LaunchProbe,
    /// query heads per decode-attention block (1–8) for every step, instead of
    /// `attention_heads_per_block`'s rule; `KAIROS_CUDA_ATT_HEADS` for A/B
    pub attention_heads: Option<usize>,
    /// steps of up to this many rows run one query head per attention block (the `_h1`
    /// kernels), longer ones 8. Default 4: on the H100 (session 13, same call) Qwen3-30B-A3B
    /// b1 −6.4% at ctx 128 and −5.1% at ctx 2048, b4 −14% at ctx 2048; gpt-oss-20b b1 −2.4% /
    /// −3.8%; SmolLM2 b1 −4% at ctx 128 but +6.2% at ctx 2048. `KAIROS_CUDA_ATT_ONE_HEAD_ROWS`
    /// (0: off) for A/B.
    pub attention_one_head_rows: usize,
    /// the decode attention's split count aims at this many blocks per SM; 0: as many as fit
    /// at once (one wave, by the kernel's occupancy). More splits: shorter position loops, but
    /// more blocks re-reading the kv head's rows from L2, more partials to combine and, past
    /// the occupancy, a second wave. Default 2: on the H100 (session 13, same call) against 8,
    /// Qwen3-30B-A3B b1 ctx 2048 −6.2%, b4 −3%, b16/b64 −1 to −2%; gpt-oss-20b b4/b16 −1 to −2%
    /// (b64 ctx 2048 +2.3%); SmolLM2 b1 ctx 2048 −10.7% (b1 ctx 128 +3.8%, b16 ctx 2048 +6.5%).
    /// 1 and 0 measured slower. `KAIROS_CUDA_ATT_BLOCKS_PER_SM` for A/B.
    pub attention_blocks_per_sm: usize,
    /// Decode attention from shared-memory tiles (`attention_tile_d{64,128}`, kernels/attention.cu)
    /// for steps of at least this many rows (0: never): one block per (kv head, split) with all
    /// its query heads, each sub-tile of K/V rows copied in one round trip. It reads each K/V
    /// byte once where the split kernel re-reads it per query head, but a block does all its heads'
    /// work, so short steps are faster with the split kernel. Default 16: on the H100 (session 16,
    /// same call) b16 / b64 at ctx 2048 −12% / −9.5% per Qwen3-30B-A3B step, −6.5% / −11% gpt-oss-20b,
    /// −12% / −3% SmolLM2 (SmolLM2 b64 ctx 128 +7%); at b1 Qwen3 +5% / +9% (ctx 128 / 2048), at b4
    /// Qwen3 ctx 128 +2%. `KAIROS_CUDA_ATT_TILE_ROWS`.
    pub attention_tile_rows: usize,
    /// the tile kernel's split count aims at this many blocks per SM (`KAIROS_CUDA_ATT_TILE_BPS`, 1)
    pub attention_tile_bps: usize,
    /// scratch for `argmax` (u64 keys, ARGMAX_MAX_ROWS x ARGMAX_PARTS)
    pub(crate) argmax_scratch: CudaSlice<u64>,
    /// launches go here instead of the stream while a step is recorded (persistent.rs)
    recorder: Recorder,
    /// NVRTC options of every module (the persistent step's adds its defines)
    opts_list: Vec<String>,
    /// persistent step kernels by (head_dim, blocks per SM, rows per step), compiled on first use
    persistent: HashMap<(usize, u32, usize), RawFunction>,
}


/// How the kernels hand over to each other under programmatic dependent launch; compiled
/// into the modules (kernels/common.cuh), so a context has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdlFlavor {
    /// A kernel lets its dependent be scheduled as it starts, and the GEMVs ask L2 for their
    /// weights before they wait (dense models: SmolLM2-135M b1 measured equal to `Late`,
    /// b4 7% faster on the H100).
    Early,
    /// A kernel lets its dependent go only after its own wait, so one grid at most waits
    /// ahead of the running one, and the GEMVs load their first weight chunks into registers
    /// before they wait (`-DPDL_LATE -DGEMV_PRELOAD`). MoE models: at batch 1 on the H100,
    /// Qwen3-30B-A3B 7.6% and gpt-oss-20b 4.4% faster than without PDL, where `Early`
    /// was 1-3% slower (bench/results/cuda_decode_h100.md, session 10).
    Late,
}

impl PdlFlavor {
    fn defines(self) -> &'static [&'static str] {
        match self {
            PdlFlavor::Early => &[],
            PdlFlavor::Late => &["-DPDL_LATE", "-DGEMV_PRELOAD"],
        }
    }
}

/// The bulk GEMVs may take all the shared memory a block can opt into, the tile attention
/// what its two K/V buffers need.
fn set_function_attributes(funcs: &HashMap<String, RawFunction>, smem_optin: usize) -> Result<()> {
    use cudarc::driver::sys::{cuFuncSetAttribute, CUfunction_attribute as A};
    for (name, bytes) in kernels_attention::TILE_SMEM {
        if let Some(f) = funcs.get(*name) {
            // SAFETY: as below.
            unsafe { cuFuncSetAttribute(f.0, A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, *bytes as std::ffi::c_int) }.result()?;
        }
    }
    for name in gemv_bulk::ENTRIES {
        if let Some(f) = funcs.get(*name) {
            let bytes = smem_optin.saturating_sub(gemv_bulk::STATIC_SMEM) as std::ffi::c_int;
            // SAFETY: `f` belongs to a module loaded on the current context, kept until `Drop`.
            unsafe { cuFuncSetAttribute(f.0, A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes) }.result()?;
        }
    }
    Ok(())
}

/// `KAIROS_CUDA_PDL=0|1`, when set.
fn pdl_env() -> Option<bool> {
    env_flag("KAIROS_CUDA_PDL")
}

/// An on/off switch from the environment: "0" off, anything else on, unset None.
pub(crate) fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().map(|v| v != "0")
}

/// Whether a CUDA driver library can be loaded and reports at least one device
/// (false on machines without a GPU, where opening a context would panic in
/// cudarc's dynamic loader).
pub fn device_available() -> bool {
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    present
        && cudarc::driver::CudaContext::device_count()
            .map(|n| n > 0)
            .unwrap_or(false)
}

/// GPUs visible to the driver (0 without a driver).
pub fn device_count() -> usize {
    if !device_available() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

impl CudaContext {
    /// Opens device `ordinal`, creates a stream, and compiles (or loads from
    /// the PTX cache) every kernel for the device's architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_pdl_flavor(ordinal, PdlFlavor::Early)
    }

    /// As `new`, with the kernels compiled for `flavor`'s PDL hand-over.
    pub fn with_pdl_flavor(ordinal: usize, flavor: PdlFlavor) -> Result<Self> {
        let ctx = cudarc::driver::CudaContext::new(ordinal)?;
        // One stream per context: no cross-stream event tracking (it would
        // also get in the way of graph capture).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let (maj, min) = ctx.compute_capability()?;
        let arch = format!("sm_{maj}{min}");
        let name = ctx.name()?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_or(48 * 1024, |v| v.max(0) as usize);
        let mut opts_list: Vec<String> =
            vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
        opts_list.extend(flavor.defines().iter().map(|d| d.to_string()));
        // A/B switch for the GEMVs' L2 prefetch before the PDL wait (kernels/common.cuh)
        if std::env::var("KAIROS_CUDA_PREFETCH").is_ok_and(|v| v == "0") {
            opts_list.push("-DKAIROS_NO_PREFETCH".into());
        }
        // tuning experiments: `KAIROS_NVRTC_DEFINES="GEMV_SPLIT_UNROLL=8 ..."` (part of the PTX cache key)
        if let Ok(defs) = std::env::var("KAIROS_NVRTC_DEFINES") {
            opts_list.extend(defs.split_whitespace().map(|d| format!("-D{d}")));
        }
        let drv = driver_version();
        let nvrtc = nvrtc_version();
        let cache = ptx_cache_dir();
        // Compile (or read from the cache) every module in parallel: NVRTC is
        // thread-safe and a cold compile of all modules takes seconds.
        let ptxs: Vec<Result<(Ptx, bool)>> = std::thread::scope(|sc| {
            let handles: Vec<_> = SOURCES
                .iter()
                .map(|(module, src, _)| {
                    let opts_list = &opts_list;
                    let cache = &cache;
                    let arch = &arch;
                    sc.spawn(move || {
                        compile_cached(module, src, opts_list, cache.as_deref(), arch, drv, nvrtc)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("NVRTC thread panicked"))
                .collect()
        });
        // Modules are loaded through the driver directly (not cudarc's module
        // type) so that launches can use cuLaunchKernelEx: see `launch.rs`.
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        let mut hits = 0;
        ctx.bind_to_thread()?;
        let cstr = |s: &str| std::ffi::CString::new(s).map_err(|_| CudaError::Shape(format!("NUL byte in {s:?}")));
        for ((module, _, entries), ptx) in SOURCES.iter().zip(ptxs) {
            let (ptx, hit) = ptx?;
            hits += hit as usize;
            let src = cstr(&ptx.to_src()).map_err(|_| CudaError::Shape(format!("NUL byte in the PTX of {module}")))?;
            // SAFETY: `src` is NUL-terminated PTX text; the module lives until `Drop`.
            let m = unsafe { cudarc::driver::result::module::load_data(src.as_ptr() as *const _) }?;
            modules.push(RawModule(m));
            for name in entry_names(entries) {
                // SAFETY: `m` was just loaded and is not freed before `Drop`.
                let f = unsafe { cudarc::driver::result::module::get_function(m, cstr(&name)?) }?;
                funcs.insert(name, RawFunction(f));
            }
        }
        set_function_attributes(&funcs, smem_optin)?;
        let pdl_supported = maj >= 9;
        let pdl = pdl_supported && pdl_env().unwrap_or(true);
        let argmax_scratch =
            stream.alloc_zeros::<u64>(kernels::ARGMAX_MAX_ROWS * kernels::ARGMAX_PARTS)?;
        Ok(Self {
            ctx,
            stream,
            arch,
            name,
            sm_count,
            smem_optin,
            ptx_cache_hits: hits,
            funcs,
            modules,
            pdl,
            pdl_supported,
            gemv_split: std::env::var("KAIROS_CUDA_GEMV_SPLIT").map_or(true, |v| v != "0"),
            gemv_bulk_bps: std::env::var("KAIROS_CUDA_GEMV_BULK_BPS").ok().and_then(|v| v.parse().ok()).filter(|&b| (1..=4).contains(&b)).unwrap_or(1),
            gemv_bulk_ring: std::env::var("KAIROS_CUDA_GEMV_BULK_RING_KB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0) << 10,
            gemv_bulk_min_bytes: match env_flag("KAIROS_CUDA_GEMV_BULK") {
                Some(false) => usize::MAX,
                _ => std::env::var("KAIROS_CUDA_GEMV_BULK_MIN_MB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(128) << 20,
            },
            gemv_split_target: std::env::var("KAIROS_CUDA_GEMV_SPLIT_TARGET").ok().and_then(|v| v.parse().ok()).unwrap_or(16384),
            topk_rank: std::env::var("KAIROS_CUDA_TOPK_RANK").map_or(true, |v| v != "0"),
            down_rank: std::env::var("KAIROS_CUDA_DOWN_RANK").map_or(true, |v| v != "0"),
            // set per model when a CudaBackend is assembled (model::step_folds, env first)
            norm_fold: false,
            rope_fold: false,
            norm_gemv_blocks_per_sm: std::env::var("KAIROS_CUDA_NORM_BLOCKS").ok().and_then(|v| v.parse().ok()).filter(|&b| b > 0).unwrap_or(2),
            qkv_norm: std::env::var("KAIROS_CUDA_QKV_NORM").map_or(true, |v| v != "0"),
            norm_gemv_threads: match std::env::var("KAIROS_CUDA_NORM_THREADS").ok().as_deref() {
                Some("256") => 256,
                _ => 512,
            },
            attention_heads: std::env::var("KAIROS_CUDA_ATT_HEADS").ok().and_then(|v| v.parse().ok()).filter(|h| (1..=8).contains(h)),
            attention_one_head_rows: std::env::var("KAIROS_CUDA_ATT_ONE_HEAD_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4),
            attention_blocks_per_sm: std::env::var("KAIROS_CUDA_ATT_BLOCKS_PER_SM").ok().and_then(|v| v.parse().ok()).unwrap_or(2),
            attention_tile_rows: std::env::var("KAIROS_CUDA_ATT_TILE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(16),
            attention_tile_bps: std::env::var("KAIROS_CUDA_ATT_TILE_BPS").ok().and_then(|v| v.parse().ok()).filter(|&b| (1..=8).contains(&b)).unwrap_or(1),
            argmax_scratch,
            probe: launch::LaunchProbe::from_env(),
            recorder: std::sync::Mutex::new(None),
            opts_list,
            persistent: HashMap::new(),
        })
    }

    /// Warps per output row of a one-row GEMV (1, 2, 4 or 8): doubled while the matrix
    /// has fewer than `gemv_split_target` (16384) warps' worth of rows and every lane keeps
    /// at least one 16-byte load of its row. 1 when split GEMVs are off, for steps being
    /// recorded for the persistent kernel (which runs the plain bodies), and for columns
    /// not a multiple of 8. (On the H100, 16384 instead of 4096 made the Qwen3-30B-A3B b1
    /// step 6.3% faster and gpt-oss-20b 3.9%: Qwen3's q|k|v over 4 warps a row and its
    /// o-projection over 8 keep more loads in flight; higher targets changed nothing.)
    pub fn gemv_split_warps(&self, rows: usize, cols: usize, n: usize) -> usize {
        if !self.gemv_split || n != 1 || !cols.is_multiple_of(8) || self.is_recording() {
            return 1;
        }
        let mut ks = 1;
        while ks < 8 && rows * ks < self.gemv_split_target && cols / 8 >= 64 * ks {
            ks *= 2;
        }
        ks
    }

    /// Whether launches are being recorded for the persistent step (which runs only the
    /// kernels of its table).
    pub(crate) fn is_recording(&self) -> bool {
        self.recorder.lock().map_or(true, |r| r.is_some())
    }

    /// From now on launches are recorded, not enqueued, until `take_recording`.
    pub(crate) fn start_recording(&self) {
        *self.recorder.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// The launches recorded since `start_recording`; launches are enqueued again.
    pub(crate) fn take_recording(&self) -> Vec<Recorded> {
        self.recorder.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }

    /// The persistent decode-step kernel (`kernels/persistent.cu`) for models of this
    /// head dimension and steps of up to `rows` rows, registers sized for `blocks_per_sm`
    /// blocks (compiled once, cached on disk like every module).
    pub(crate) fn persistent_kernel(&mut self, head_dim: usize, blocks_per_sm: u32, rows: usize) -> Result<RawFunction> {
        if let Some(f) = self.persistent.get(&(head_dim, blocks_per_sm, rows)) {
            return Ok(*f);
        }
        let counters = std::env::var("KAIROS_CUDA_PK_SYNC").is_ok_and(|v| v == "counters");
        let src = persistent_source()?;
        let mut opts = self.opts_list.clone();
        opts.extend(persistent_opts(head_dim, blocks_per_sm, rows, counters));
        let module = format!("persistent_d{head_dim}_b{blocks_per_sm}_n{rows}{}", if counters { "_ctr" } else { "" });
        let (ptx, _) = compile_cached(&module, &src, &opts, ptx_cache_dir().as_deref(), &self.arch, driver_version(), nvrtc_version())?;
        let cstr = |s: &str| std::ffi::CString::new(s).map_err(|_| CudaError::Shape(format!("NUL byte in {s:?}")));
        self.ctx.bind_to_thread()?;
        let text = cstr(&ptx.to_src())?;
        // SAFETY: NUL-terminated PTX; the module is unloaded in `Drop` with the others.
        let m = unsafe { cudarc::driver::result::module::load_data(text.as_ptr() as *const _) }?;
        self.modules.push(RawModule(m));
        // SAFETY: `m` was just loaded and lives until `Drop`.
        let f = RawFunction(unsafe { cudarc::driver::result::module::get_function(m, cstr("persistent_step")?) }?);
        self.persistent.insert((head_dim, blocks_per_sm, rows), f);
        Ok(f)
    }

    /// Starts a launch of a kernel handle this context loaded (`persistent_kernel`).
    pub(crate) fn launch_fn(&self, f: RawFunction) -> Launch<'_> {
        Launch::new(&self.stream, f, false)
    }

    /// Turns programmatic dependent launch on or off for later launches (a no-op
    /// where unsupported). `KAIROS_CUDA_PDL=0|1` in the environment wins.
    pub fn set_pdl(&mut self, on: bool) {
        self.pdl = self.pdl_supported && pdl_env().unwrap_or(on);
    }

    /// How many blocks of `block` threads of kernel `name` one SM holds at once (registers and
    /// static shared memory); 1 where the driver cannot say.
    pub(crate) fn blocks_per_sm(&self, name: &str, block: u32) -> usize {
        let Some(f) = self.funcs.get(name) else { return 1 };
        if self.ctx.bind_to_thread().is_err() {
            return 1;
        }
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `f` is a function of a module this context loaded and keeps until `Drop`.
        let r = unsafe { cudarc::driver::sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f.0, block as std::ffi::c_int, 0) };
        if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS && n > 0 { n as usize } else { 1 }
    }

    /// Starts a launch of kernel `name` on this context's stream.
    pub(crate) fn launch(&self, name: &str) -> Launch<'_> {
        let f = *self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} not loaded"));
        let skip = self.probe.skips(name);
        Launch::new(&self.stream, f, self.pdl).recorded_by(&self.recorder, name).skipped(skip)
    }
}

impl Drop for CudaContext {
    fn drop(&mut self) {
        // Best effort: work using the modules must be done first.
        let _ = self.stream.synchronize();
        if self.ctx.bind_to_thread().is_ok() {
            for m in self.modules.drain(..) {
                // SAFETY: each module was loaded once in `new` and is unloaded once here.
                unsafe {
                    let _ = cudarc::driver::sys::cuModuleUnload(m.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every GEMV the launch paths can name (`kernels::gemv_kernel`) is an entry point the
    /// context loads (entries ending in "_n" stand for _n1 ..= _n8).
    #[test]
    fn every_gemv_name_is_loaded() {
        let loaded: Vec<String> = SOURCES
            .iter()
            .flat_map(|(_, _, e)| e.iter())
            .flat_map(|e| if e.ends_with("_n") { (1..=8).map(|n| format!("{e}{n}")).collect() } else { vec![e.to_string()] })
            .collect();
        for (xt, acc) in [("bf16", false), ("f32", false), ("f32", true), ("bf16", true)] {
            for n in 1..=8 {
                let (name, rows) = kernels::gemv_kernel(xt, n, 1, acc);
                assert!(loaded.contains(&name), "{name} not loaded");
                assert_eq!(rows, if n >= 4 { 16 } else { 8 });
            }
            for ks in [2, 4, 8] {
                let (name, rows) = kernels::gemv_kernel(xt, 1, ks, acc);
                assert!(loaded.contains(&name), "{name} not loaded");
                assert_eq!(rows, 8 / ks);
            }
        }
    }

    /// NVRTC alone (no GPU, no driver) compiles every kernel module for the
    /// Hopper target and each lists its entry points: a kernel edit that does
    /// not compile fails here, on any machine with an NVRTC library —
    /// scripts/test.sh fetches one from PyPI, so CI checks it. Skipped (with a
    /// line) where none can be loaded; `KAIROS_REQUIRE_NVRTC=1` makes that a failure.
    #[test]
    fn every_kernel_module_compiles_for_sm90() {
        // SAFETY: only asks the dynamic loader whether the library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(std::env::var_os("KAIROS_REQUIRE_NVRTC").is_none(), "KAIROS_REQUIRE_NVRTC is set but no NVRTC library loads");
            eprintln!("skipping: no NVRTC library (scripts/test.sh fetches one; put its folder on LD_LIBRARY_PATH)");
            return;
        }
        let mut opts = vec!["--gpu-architecture=sm_90".to_string(), "--std=c++17".to_string()];
        // the tuning defines compile too (`KAIROS_NVRTC_DEFINES`, as CudaContext::new takes them)
        if let Ok(defs) = std::env::var("KAIROS_NVRTC_DEFINES") {
            opts.extend(defs.split_whitespace().map(|d| format!("-D{d}")));
        }
        let nvrtc = nvrtc_version();
        for flavor in [PdlFlavor::Early, PdlFlavor::Late] {
            let mut opts = opts.clone();
            opts.extend(flavor.defines().iter().map(|d| d.to_string()));
            let compiled: Vec<(String, Result<(Ptx, bool)>)> = std::thread::scope(|sc| {
                let handles: Vec<_> = SOURCES
                    .iter()
                    .map(|(module, src, _)| {
                        let opts = &opts;
                        sc.spawn(move || (module.to_string(), compile_cached(module, src, opts, None, "sm_90", 0, nvrtc)))
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("NVRTC thread")).collect()
            });
            for ((module, ptx), (_, _, funcs)) in compiled.into_iter().zip(SOURCES) {
                let ptx = ptx.unwrap_or_else(|e| panic!("kernels/{module}.cu ({flavor:?}): {e}")).0.to_src();
                for f in entry_names(funcs) {
                    assert!(ptx.contains(&format!(".entry {f}(")), "kernels/{module}.cu ({flavor:?}): no entry point {f} in the PTX");
                }
            }
        }
    }

    /// The persistent step module (every kernel source in one, ~1 min of NVRTC here)
    /// compiles for sm_90 with both orderings, where `KAIROS_NVRTC_PERSISTENT=1` and an
    /// NVRTC library loads (run by hand after changing kernels it runs).
    #[test]
    fn persistent_module_compiles_for_sm90() {
        // SAFETY: only asks the dynamic loader whether the library can be opened.
        if std::env::var_os("KAIROS_NVRTC_PERSISTENT").is_none() || !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipping: set KAIROS_NVRTC_PERSISTENT=1 with NVRTC on LD_LIBRARY_PATH");
            return;
        }
        let src = persistent_source().expect("source");
        // both orderings with the dense models' PDL flavor, the barrier one with the MoE models'
        for (counters, flavor) in [(false, PdlFlavor::Early), (true, PdlFlavor::Early), (false, PdlFlavor::Late)] {
            let mut opts = vec!["--gpu-architecture=sm_90".to_string(), "--std=c++17".to_string()];
            opts.extend(flavor.defines().iter().map(|d| d.to_string()));
            opts.extend(persistent_opts(128, 2, 8, counters));
            let (ptx, _) = compile_cached("persistent_check", &src, &opts, None, "sm_90", 0, nvrtc_version())
                .unwrap_or_else(|e| panic!("persistent step (counters {counters}, {flavor:?}): {e}"));
            assert!(ptx.to_src().contains(".entry persistent_step("), "no persistent_step entry");
        }
    }
}
