//! One-row bf16 GEMVs that stream their weights through shared memory by bulk
//! asynchronous copies (`kernels/gemv_bulk.cu`): one block per SM, each owning a
//! contiguous tile of rows. A step's one-row GEMVs over weights of at least
//! `CudaContext::gemv_bulk_min_bytes` come here (a large LM head).

use cudarc::driver::CudaSlice;

use super::kernels::{grid, len_at_least, need, Act};
use super::{CudaContext, CudaError, Result};

/// Rows of one chunk: one per warp of a 256-thread block.
const CHUNK_ROWS: usize = 8;
/// The kernel's barrier array (`BULK_MAX_STAGES`).
const MAX_STAGES: usize = 32;
/// Activation chunks per lane the entries are compiled for (`_p4` ..= `_p32`): a row of up
/// to 256 * p columns.
const PMAX: [usize; 4] = [4, 8, 16, 32];
/// Static shared memory of the kernel (its barriers and the activation, 16 KB) and a margin.
pub(super) const STATIC_SMEM: usize = 17 * 1024;
/// Entry points, for the module table and the shared-memory opt-in.
pub(super) const ENTRIES: &[&str] = &[
    "bf16_gemv_bulk_bf16x_p4",
    "bf16_gemv_bulk_f32x_p4",
    "bf16_gemv_bulk_bf16x_p8",
    "bf16_gemv_bulk_f32x_p8",
    "bf16_gemv_bulk_bf16x_p16",
    "bf16_gemv_bulk_f32x_p16",
    "bf16_gemv_bulk_bf16x_p32",
    "bf16_gemv_bulk_f32x_p32",
];

/// How a bulk GEMV of `rows` x `cols` is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BulkPlan {
    /// rows per block (a contiguous tile of the weight)
    pub tile: usize,
    /// chunk buffers in the ring (all of a tile's chunks when they fit)
    pub stages: usize,
    /// dynamic shared memory per block, bytes
    pub smem: usize,
    pub blocks: usize,
    /// activation chunks per lane the entry holds (`_p{pmax}`)
    pub pmax: usize,
}

/// The plan for `sm_count` blocks (one per SM, or `CudaContext::gemv_bulk_bps` per SM)
/// with `smem_max` bytes of dynamic shared memory per block, or `None` where the kernel does not apply (cols % 8 != 0, rows wider
/// than 256 * 32 columns, or a chunk that does not fit).
pub fn bulk_plan(rows: usize, cols: usize, sm_count: usize, smem_max: usize) -> Option<BulkPlan> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(8) || sm_count == 0 {
        return None;
    }
    let pmax = PMAX.into_iter().find(|&p| cols <= 256 * p)?;
    let tile = rows.div_ceil(sm_count);
    let chunk = CHUNK_ROWS * cols * 2;
    let stages = tile.div_ceil(CHUNK_ROWS).min(smem_max / chunk).min(MAX_STAGES);
    if stages == 0 {
        return None;
    }
    Some(BulkPlan { tile, stages, smem: stages * chunk, blocks: rows.div_ceil(tile), pmax })
}

impl CudaContext {
    /// [`bulk_plan`] on this device: `gemv_bulk_bps` blocks per SM, each with its share of
    /// the opted-in shared memory (at most `gemv_bulk_ring` bytes of ring, where set).
    pub fn gemv_bulk_plan(&self, rows: usize, cols: usize) -> Option<BulkPlan> {
        let bps = self.gemv_bulk_bps.max(1);
        // an SM's shared memory is the opt-in per block plus 1 KB reserved per block
        let mut ring = ((self.smem_optin + 1024) / bps).saturating_sub(1024 + STATIC_SMEM);
        if self.gemv_bulk_ring > 0 {
            ring = ring.min(self.gemv_bulk_ring);
        }
        bulk_plan(rows, cols, self.sm_count as usize * bps, ring)
    }

    /// y f32 [rows] = x [cols] . W^T (+ bias), or `+=` with `acc`, through the bulk GEMV,
    /// whatever `gemv_bulk_min_bytes` says (tests, timing). Errors where
    /// [`Self::gemv_bulk_plan`] has none.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16_gemv_bulk<X: Act>(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<X>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        bias: Option<&CudaSlice<f32>>,
        acc: bool,
    ) -> Result<()> {
        len_at_least(w, rows * cols, "w")?;
        len_at_least(x, cols, "x")?;
        len_at_least(y, rows, "y")?;
        if let Some(b) = bias {
            len_at_least(b, rows, "bias")?;
        }
        let st = &self.stream;
        let p = |s: &CudaSlice<u16>| cudarc::driver::DevicePtr::device_ptr(s, st).0;
        let xp = cudarc::driver::DevicePtr::device_ptr(x, st).0;
        let yp = cudarc::driver::DevicePtr::device_ptr(&*y, st).0;
        self.gemv_bulk_raw(p(w), xp, X::NAME == "bf16", yp, rows, cols, bias, acc)
    }

    /// The launch of [`Self::bf16_gemv_bulk`] on raw device pointers (the step's buffers);
    /// sizes are the caller's to check. The weight must be 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemv_bulk_raw(
        &self,
        w: u64,
        x: u64,
        x_bf16: bool,
        y: u64,
        rows: usize,
        cols: usize,
        bias: Option<&CudaSlice<f32>>,
        acc: bool,
    ) -> Result<()> {
        let plan = self
            .gemv_bulk_plan(rows, cols)
            .ok_or_else(|| CudaError::Shape(format!("bf16_gemv_bulk: no plan for {rows} x {cols}")))?;
        need(w.is_multiple_of(16), || format!("bf16_gemv_bulk: weight at {w:#x} is not 16-byte aligned"))?;
        let name = format!("bf16_gemv_bulk_{}x_p{}", if x_bf16 { "bf16" } else { "f32" }, plan.pmax);
        let a = [rows as i32, cols as i32, acc as i32, plan.tile as i32, plan.stages as i32];
        let null = 0u64;
        let mut b = self.launch(&name);
        b.arg(&w).arg(&x).arg(&y).arg(&a[0]).arg(&a[1]);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&null),
        };
        b.arg(&a[2]).arg(&a[3]).arg(&a[4]);
        let mut cfg = grid(plan.blocks, 1, 1, 256);
        cfg.shared_mem_bytes = plan.smem as u32;
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tile_per_sm_and_its_chunks_in_the_ring() {
        let smem = 227 * 1024 - STATIC_SMEM;
        // Qwen3-30B-A3B q|k|v: 39 rows per SM, 5 chunks of 32 KB, all resident
        let p = bulk_plan(5120, 2048, 132, smem).expect("plan");
        assert_eq!((p.tile, p.stages, p.smem, p.blocks, p.pmax), (39, 5, 5 * 32768, 132, 8));
        // o-projection: 16 rows, 2 chunks of 64 KB
        let p = bulk_plan(2048, 4096, 132, smem).expect("plan");
        assert_eq!((p.tile, p.stages, p.blocks, p.pmax), (16, 2, 128, 16));
        // an LM head streams through the ring: as many 32 KB chunks as fit
        let p = bulk_plan(151936, 2048, 132, smem).expect("plan");
        assert_eq!((p.tile, p.stages), (1152, 6));
        assert!(p.smem <= smem && p.blocks * p.tile >= 151936);
        // gpt-oss-20b q|k|v (2880 columns: 12 chunks per lane, the p16 entry)
        assert_eq!(bulk_plan(5120, 2880, 132, smem).map(|p| p.pmax), Some(16));
        assert_eq!(bulk_plan(960, 576, 132, smem).map(|p| (p.pmax, p.tile, p.stages)), Some((4, 8, 1)));
    }

    #[test]
    fn no_plan_where_the_kernel_does_not_apply() {
        let smem = 200 * 1024;
        assert_eq!(bulk_plan(100, 100, 132, smem), None, "cols % 8");
        assert_eq!(bulk_plan(100, 256 * 32 + 8, 132, smem), None, "too wide for the registers");
        assert_eq!(bulk_plan(0, 64, 132, smem), None);
        assert_eq!(bulk_plan(100, 8192, 132, 100 * 1024), None, "a chunk larger than the shared memory");
        // fewer rows than SMs: one row per block
        assert_eq!(bulk_plan(128, 2048, 132, smem).map(|p| (p.tile, p.blocks, p.stages)), Some((1, 128, 1)));
    }
}
