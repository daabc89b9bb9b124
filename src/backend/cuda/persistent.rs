//! The persistent decode step: a recorded decode step replayed as ONE kernel.
//!
//! The backend records the launches of a step (`CudaContext::start_recording`) once
//! per batch bucket, `translate` turns them into instructions, and
//! `kernels/persistent.cu` runs them: every block of a grid sized to the GPU walks the
//! program and runs its share of each instruction's blocks (the same kernel bodies the
//! ordinary launches run), each after the previous instruction has completed (counted
//! on the device; no grid-wide barrier). Kernel boundaries (launch, ramp-up, drain: most
//! of a batch-1 MoE step) become dependency waits, GEMVs load their first weights before
//! waiting, and each instruction prefetches the next weight-reading instruction's
//! weights into L2 while it runs.
//!
//! Measured on the H100 it is SLOWER than the CUDA graph of ordinary launches (Qwen3-30B-A3B
//! shape, batch 1: 5.13 ms per step against 3.32; SmolLM2 1.04 against 0.70;
//! bench/results/cuda_decode_h100.md): an instruction costs 5-8 us even when tiny, so it
//! is opt-in (`KAIROS_CUDA_PERSISTENT=1`) until instructions are fused per layer.
//! `KAIROS_CUDA_PK_PROFILE=1` times each instruction (`kairos bench decode` prints it).
//!
//! Only launches whose kernels have a persistent form are accepted (the decode path of
//! one GPU without collectives, hidden-state capture or cuBLAS); anything else makes
//! `translate` fail with the reason and the backend keeps its ordinary graph.

use cudarc::driver::{CudaSlice, DriverError, LaunchConfig};

use super::launch::{RawFunction, Recorded};
use super::{CudaContext, CudaError};

/// The kernel sources the persistent module is compiled from (after common.cuh).
pub(crate) const MODULES: &[&str] = &["embedding", "rmsnorm", "model", "attention", "gemv", "moe", "moe_q8", "argmax", "swiglu"];
pub(crate) const SOURCE: &str = include_str!("../../../kernels/persistent.cu");

/// u64 words per instruction and the first argument word (kernels/persistent.cu).
const WORDS: usize = 32;
const ARG0: usize = 5;
/// Prefetch at most this much of one weight into L2 (H100: 50 MB of L2).
const PREFETCH_CAP: u64 = 32 << 20;

/// Kernels with a persistent form and their op codes (the PK_OP_* of persistent.cu).
const OPS: &[(&str, u64)] = &[
    ("embedding_gather_f32", 0),
    ("rmsnorm_residual", 1),
    ("rmsnorm_residual_f32out", 2),
    ("rmsnorm_residual_q8", 3),
    ("rmsnorm_moe_bf16", 4),
    ("rmsnorm_moe_f32", 5),
    ("rope_qk_kv", 6),
    ("attention_split", 7),
    ("moe_router_topk", 8),
    ("moe_router_topk_512", 9),
    ("moe_gate_up_q8", 10),
    ("mxfp4_q8_l32", 11),
    ("mxfp4_q8_l8", 12),
    ("argmax_partial", 13),
    ("argmax_final", 14),
    ("swiglu_bf16", 15),
    ("swiglu_oai_bf16", 16),
];
/// bf16_gemv_{bf16x,f32x}_n{N}: base + N - 1
const GEMV_BF16X: u64 = 20;
const GEMV_F32X: u64 = 30;

fn op_code(name: &str, head_dim: usize) -> Option<u64> {
    if let Some(n) = name.strip_prefix("bf16_gemv_bf16x_n") {
        return n.parse::<u64>().ok().filter(|n| (1..=8).contains(n)).map(|n| GEMV_BF16X + n - 1);
    }
    if let Some(n) = name.strip_prefix("bf16_gemv_f32x_n") {
        return n.parse::<u64>().ok().filter(|n| (1..=8).contains(n)).map(|n| GEMV_F32X + n - 1);
    }
    if let Some(d) = name.strip_prefix("attention_split_d") {
        // one attention instantiation per module: the model's head dimension
        return (d.parse::<usize>().ok() == Some(head_dim)).then_some(7);
    }
    OPS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// The recorded launches as instruction words, or why they cannot run persistently.
pub(crate) fn translate(recs: &[Recorded], head_dim: usize) -> Result<Vec<u64>, String> {
    if !matches!(head_dim, 64 | 128) {
        return Err(format!("head_dim {head_dim} (the persistent step has attention for 64 and 128)"));
    }
    let mut words = Vec::with_capacity(recs.len() * WORDS);
    // (instruction, weight pointer, bytes) of the weight-reading instructions
    let mut weights: Vec<(usize, u64, u64)> = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let op = op_code(&r.name, head_dim).ok_or_else(|| format!("kernel {} has no persistent form", r.name))?;
        if r.args.len() > WORDS - ARG0 {
            return Err(format!("kernel {}: {} arguments", r.name, r.args.len()));
        }
        let (gx, gy, gz) = (r.grid.0 as u64, r.grid.1 as u64, r.grid.2 as u64);
        let blocks = gx * gy * gz;
        let (ok, nvb) = match r.name.as_str() {
            // one warp per unit: 8 units per 256-thread virtual block
            "rope_qk_kv" | "argmax_final" => (r.block == 32 && gy * gz == 1, blocks.div_ceil(8)),
            // 4 warps (tokens) per launched block: 2 launched blocks per virtual block
            "moe_router_topk" | "moe_router_topk_512" => (r.block == 128 && gy * gz == 1, blocks.div_ceil(2)),
            // one row per block whatever its width (the body strides over the row)
            n if n.starts_with("rmsnorm_") => (matches!(r.block, 256 | 1024) && gy * gz == 1, blocks),
            _ => (r.block == 256, blocks),
        };
        if !ok {
            return Err(format!("kernel {}: block {} grid {:?}", r.name, r.block, r.grid));
        }
        if op >= GEMV_BF16X {
            let (rows, cols) = (r.args[3] & 0xffff_ffff, r.args[4] & 0xffff_ffff);
            weights.push((i, r.args[0], (rows * cols * 2).min(PREFETCH_CAP)));
        }
        let mut w = [0u64; WORDS];
        w[0] = op | (u64::from(r.block) << 32);
        w[1] = gx | (gy << 32);
        w[2] = gz | (nvb << 32);
        w[ARG0..ARG0 + r.args.len()].copy_from_slice(&r.args);
        words.extend_from_slice(&w);
    }
    // Each weight is prefetched by the instruction right after the previous weight
    // reader (so it streams in while the small kernels in between run), or by that
    // reader itself when the two are adjacent.
    let mut prev: Option<usize> = None;
    for &(j, ptr, bytes) in &weights {
        let slot = match prev {
            Some(p) if p + 1 < j => Some(p + 1),
            Some(p) => Some(p),
            None => j.checked_sub(1),
        };
        if let Some(s) = slot {
            words[s * WORDS + 3] = ptr;
            words[s * WORDS + 4] = bytes;
        }
        prev = Some(j);
    }
    Ok(words)
}

/// Time per kernel name of one persistent step: (kernel, ns summed, instructions).
pub type Profile = Vec<(String, f64, usize)>;

/// One bucket's program on the device, with its completion counters.
pub(crate) struct Program {
    prog: CudaSlice<u64>,
    n_instr: i32,
    /// finished virtual blocks per instruction (zeroed before each run)
    done: CudaSlice<u32>,
    /// `KAIROS_CUDA_PK_PROFILE=1`: instruction start times of the last run (ns), and
    /// each instruction's kernel name
    times: Option<(CudaSlice<u64>, Vec<String>)>,
    func: RawFunction,
    grid: u32,
    cooperative: bool,
}

impl Program {
    /// Uploads the instructions (of steps of up to `rows` <= 8 rows) and sizes the grid: `blocks_per_sm` (1 or 2) blocks on
    /// every SM, fewer if the kernel does not fit that many.
    pub(crate) fn new(
        cx: &mut CudaContext,
        recs: &[Recorded],
        words: &[u64],
        head_dim: usize,
        blocks_per_sm: u32,
        rows: usize,
    ) -> Result<Self, CudaError> {
        let func = cx.persistent_kernel(head_dim, blocks_per_sm, rows)?;
        let mut fit = 0i32;
        // SAFETY: `func` is a loaded kernel of this context; plain out-parameter query.
        unsafe { cudarc::driver::sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut fit, func.0, 256, 0) }.result()?;
        let per_sm = (fit.max(0) as u32).min(blocks_per_sm);
        if per_sm == 0 {
            return Err(CudaError::Shape("persistent step: no block fits on an SM".into()));
        }
        let prog = cx.stream.memcpy_stod(words)?;

        let cooperative = std::env::var("KAIROS_CUDA_PK_COOP").map_or(true, |v| v != "0");
        let n_instr = words.len() / WORDS;
        let done = cx.stream.alloc_zeros::<u32>(n_instr.max(1))?;
        let times = if std::env::var("KAIROS_CUDA_PK_PROFILE").is_ok_and(|v| v == "1") {
            Some((cx.stream.alloc_zeros::<u64>(n_instr + 1)?, recs.iter().map(|r| r.name.clone()).collect()))
        } else {
            None
        };
        Ok(Self { prog, n_instr: n_instr as i32, done, times, func, grid: cx.sm_count * per_sm, cooperative })
    }

    pub(crate) fn grid(&self) -> u32 {
        self.grid
    }

    /// With profiling on: time per kernel name over the last run (ns summed over its
    /// instructions, instruction count), as block 0 saw it (instruction start to the
    /// next instruction's start, so each includes its wait), in program order.
    pub(crate) fn profile(&self, cx: &CudaContext) -> Result<Option<Profile>, DriverError> {
        let Some((t, names)) = self.times.as_ref() else { return Ok(None) };
        let ts = cx.stream.memcpy_dtov(t)?;
        let mut out: Profile = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let dt = ts[i + 1].saturating_sub(ts[i]) as f64;
            match out.iter_mut().find(|(n, _, _)| n == name) {
                Some(e) => {
                    e.1 += dt;
                    e.2 += 1;
                }
                None => out.push((name.clone(), dt, 1)),
            }
        }
        Ok(Some(out))
    }

    /// Enqueues the step (graph-capturable: a memset and one launch).
    pub(crate) fn launch(&mut self, cx: &CudaContext) -> Result<(), DriverError> {
        cx.stream.memset_zeros(&mut self.done)?;
        let mut l = cx.launch_fn(self.func);
        let null = 0u64;
        l.arg(&self.prog).arg(&self.n_instr).arg(&mut self.done);
        match self.times.as_mut() {
            Some((t, _)) => l.arg(t),
            None => l.arg(&null),
        };
        if self.cooperative {
            l.cooperative();
        }
        let cfg = LaunchConfig { grid_dim: (self.grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match persistent_step(prog, n_instr, done, times); the program's
        // pointers are the backend's buffers, alive as long as its graphs.
        unsafe { l.launch(cfg) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, grid: (u32, u32, u32), block: u32, args: &[u64]) -> Recorded {
        Recorded { name: name.into(), grid, block, args: args.to_vec() }
    }

    #[test]
    fn op_codes_match_the_kernel_source() {
        let mut defs = std::collections::HashMap::new();
        for line in SOURCE.lines() {
            let mut it = line.split_whitespace();
            if it.next() == Some("#define") {
                if let (Some(name), Some(v)) = (it.next(), it.next()) {
                    if let (Some(n), Ok(v)) = (name.strip_prefix("PK_OP_"), v.parse::<u64>()) {
                        defs.insert(n.to_string(), v);
                    }
                }
            }
        }
        for (name, code) in OPS {
            assert_eq!(defs.get(&name.to_uppercase()), Some(code), "{name}");
        }
        assert_eq!(defs.get("BF16_GEMV_BF16X"), Some(&GEMV_BF16X));
        assert_eq!(defs.get("BF16_GEMV_F32X"), Some(&GEMV_F32X));
        assert_eq!(defs.len(), OPS.len() + 2, "an op in persistent.cu is missing here");
        assert!(SOURCE.contains(&format!("#define PK_WORDS {WORDS}")) && SOURCE.contains(&format!("#define PK_ARG0 {ARG0}")));
    }

    #[test]
    fn translates_a_step_with_prefetch_slots() {
        let recs = [
            rec("rmsnorm_residual", (1, 1, 1), 1024, &[1, 0, 2, 3, 64, 0]),
            rec("bf16_gemv_bf16x_n1", (40, 1, 1), 256, &[0x1000, 3, 4, 320, 64, 0]),
            rec("rope_qk_kv", (20, 1, 1), 32, &[0; 16]),
            rec("attention_split_d64", (4, 2, 1), 256, &[0; 19]),
            rec("bf16_gemv_f32x_n1", (8, 1, 1), 256, &[0x2000, 5, 6, 64, 256, 0]),
            rec("moe_router_topk", (1, 1, 1), 128, &[0; 7]),
        ];
        let w = translate(&recs, 64).unwrap();
        assert_eq!(w.len(), recs.len() * WORDS);
        let ins = |i: usize| &w[i * WORDS..(i + 1) * WORDS];
        assert_eq!(ins(0)[0], 1 | (1024 << 32));
        assert_eq!(ins(1)[0], GEMV_BF16X | (256 << 32));
        assert_eq!(ins(2)[2] >> 32, 3, "20 warps of rope = 3 virtual blocks");
        assert_eq!(ins(3)[0] & 0xffff_ffff, 7);
        assert_eq!(ins(3)[2] >> 32, 8);
        assert_eq!(ins(5)[2] >> 32, 1);
        // first weight (instr 1) prefetched by instr 0; the second (instr 4) by instr 2
        assert_eq!((ins(0)[3], ins(0)[4]), (0x1000, 320 * 64 * 2));
        assert_eq!((ins(2)[3], ins(2)[4]), (0x2000, 64 * 256 * 2));
        assert_eq!(ins(1)[3], 0);
        assert_eq!(ins(1)[ARG0..ARG0 + 6], [0x1000, 3, 4, 320, 64, 0]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let r = |name: &str, block| translate(&[rec(name, (1, 1, 1), block, &[0; 8])], 128);
        assert!(r("add_bias_f32", 256).unwrap_err().contains("no persistent form"));
        assert!(r("attention_split_d64", 256).is_err(), "attention of another head_dim");
        assert!(r("attention_split_d128", 256).is_ok());
        assert!(r("bf16_gemv_bf16x_n9", 256).is_err());
        assert!(r("mxfp4_q8_l32", 128).is_err(), "a 256-thread body launched with 128");
        assert!(translate(&[rec("mxfp4_q8_l32", (1, 1, 1), 256, &[0; 28])], 128).is_err(), "too many arguments");
        assert!(translate(&[], 256).is_err());
    }
}
