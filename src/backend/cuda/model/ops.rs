//! Building blocks of a step that are not kernels of their own: GEMVs over any
//! number of rows (launches of up to 8) with an optional bias, random
//! fills for benchmark weights, expert bias adds, and the pre-norm that folds a
//! pending residual (delta or MoE combine) in.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};

use super::{CudaContext, CudaError, Res};
use crate::backend::cuda::gemm::{BlasGemm, GEMM_MIN_ROWS};
use crate::backend::cuda::kernels::{gemv_kernel, Act, KvShape, GEMV_NORM_MAX};
use crate::model::config::Activation;

pub(super) fn lc(x: usize, y: usize, z: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x as u32, y as u32, z as u32), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub(super) fn dptr<T>(s: &CudaSlice<T>, st: &Arc<CudaStream>) -> u64 {
    let (p, _g) = s.device_ptr(st);
    p
}

impl CudaContext {
    pub(super) fn up<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Res<CudaSlice<T>> {
        Ok(self.stream.memcpy_stod(v)?)
    }

    pub(super) fn fill_bf16(&self, n: usize, seed: u64, scale: f32, offset: f32) -> Res<CudaSlice<u16>> {
        let mut s = self.stream.alloc_zeros::<u16>(n.max(1))?;
        let nn = n as i64;
        let mut b = self.launch("fill_random_bf16");
        b.arg(&mut s).arg(&nn).arg(&seed).arg(&scale).arg(&offset);
        unsafe { b.launch(lc(n.div_ceil(256).clamp(1, self.sm_count as usize * 32), 1, 1, 256)) }?;
        Ok(s)
    }

    pub(super) fn fill_u8(&self, n: usize, seed: u64, lo: i32, range: i32) -> Res<CudaSlice<u8>> {
        let mut s = self.stream.alloc_zeros::<u8>(n.max(1))?;
        let nn = n as i64;
        let mut b = self.launch("fill_random_u8");
        b.arg(&mut s).arg(&nn).arg(&seed).arg(&lo).arg(&range);
        unsafe { b.launch(lc(n.div_ceil(256).clamp(1, self.sm_count as usize * 32), 1, 1, 256)) }?;
        Ok(s)
    }

    /// y f32 [n, rows] = x [n, cols] . W^T (+ bias f32 [rows] on every row, added in the
    /// GEMV) for any n, in launches of up to 8 rows; x and y are raw device pointers,
    /// x bf16 when `x_bf16`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_ext(
        &self,
        w: &CudaSlice<u16>,
        x: u64,
        x_bf16: bool,
        y: u64,
        rows: usize,
        cols: usize,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Res<()> {
        self.gemv_rows(w, x, x_bf16, y, rows, cols, n, bias, false)
    }

    /// y f32 [n, rows] += x [n, cols] . W^T (+ bias): `gemv_ext` adding into y (the
    /// o-projection, f32 x, and a dense down projection, bf16 x, into the residual stream).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_acc(
        &self,
        w: &CudaSlice<u16>,
        x: u64,
        x_bf16: bool,
        y: u64,
        rows: usize,
        cols: usize,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Res<()> {
        self.gemv_rows(w, x, x_bf16, y, rows, cols, n, bias, true)
    }

    /// Whether [`Self::gemv_norm`] takes inputs of `hidden` values.
    pub(super) fn gemv_norm_fits(hidden: usize) -> bool {
        hidden.is_multiple_of(8) && (8..=GEMV_NORM_MAX).contains(&hidden)
    }

    /// y f32 [rows] = bf16(rmsnorm(x) * ln) . W^T (+ bias) for ONE row x f32 [cols]: the norm
    /// computed by every block of the GEMV (bf16_gemv_norm_*), bit-equal to
    /// `rmsnorm_residual` (no delta) followed by `gemv_ext` on its bf16 output.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_norm(
        &self,
        w: &CudaSlice<u16>,
        x: &CudaSlice<f32>,
        ln: &CudaSlice<u16>,
        eps: f32,
        y: u64,
        rows: usize,
        cols: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Res<()> {
        if !Self::gemv_norm_fits(cols) || x.len() < cols || ln.len() < cols || w.len() < rows * cols {
            return Err(CudaError::Shape(format!("normalising GEMV: {rows} x {cols}")));
        }
        if let Some(b) = bias {
            if b.len() < rows {
                return Err(CudaError::Shape(format!("GEMV bias: {} values for {rows} rows", b.len())));
            }
        }
        let ks = self.gemv_split_warps(rows, cols, 1);
        let name = if ks > 1 { format!("bf16_gemv_norm_k{ks}") } else { "bf16_gemv_norm_n1".to_string() };
        let threads = self.norm_gemv_threads;
        let (r, c, null) = (rows as i32, cols as i32, 0u64);
        let mut b = self.launch(&name);
        b.arg(w).arg(x).arg(&y).arg(&r).arg(&c);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&null),
        };
        b.arg(ln).arg(&eps);
        // a few blocks per SM, each normalising once and then taking row tiles in turn
        let tiles = rows.div_ceil(threads / 32 / ks);
        let blocks = tiles.min(self.sm_count as usize * self.norm_gemv_blocks_per_sm);
        unsafe { b.launch(lc(blocks, 1, 1, threads as u32)) }?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv_rows(
        &self,
        w: &CudaSlice<u16>,
        x: u64,
        x_bf16: bool,
        y: u64,
        rows: usize,
        cols: usize,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
        acc: bool,
    ) -> Res<()> {
        if let Some(b) = bias {
            if b.len() < rows {
                return Err(CudaError::Shape(format!("GEMV bias: {} values for {rows} rows", b.len())));
            }
        }
        let null = 0u64;
        let xs = if x_bf16 { 2 } else { 4 };
        let (r, c) = (rows as i32, cols as i32);
        // a large weight (the LM head) at one row: streamed through shared memory
        if n == 1 && rows * cols * 2 >= self.gemv_bulk_min_bytes && w.len() >= rows * cols && !self.is_recording() {
            let wp = dptr(w, &self.stream);
            if wp.is_multiple_of(16) && self.gemv_bulk_plan(rows, cols).is_some() {
                return self.gemv_bulk_raw(wp, x, x_bf16, y, rows, cols, bias, acc);
            }
        }
        let mut j0 = 0;
        while j0 < n {
            let nn = (n - j0).min(8);
            let ks = self.gemv_split_warps(rows, cols, nn);
            let (name, rpb) = gemv_kernel(if x_bf16 { "bf16" } else { "f32" }, nn, ks, acc);
            let xp = x + (j0 * cols * xs) as u64;
            let yp = y + (j0 * rows * 4) as u64;
            let mut b = self.launch(&name);
            b.arg(w).arg(&xp).arg(&yp).arg(&r).arg(&c);
            match bias {
                Some(bb) => b.arg(bb),
                None => b.arg(&null),
            };
            unsafe { b.launch(lc(rows.div_ceil(rpb), 1, 1, 256)) }?;
            j0 += nn;
        }
        Ok(())
    }

    /// y f32 [n, cols] += bias [cols], y a raw device pointer.
    pub(super) fn add_bias(&self, y: u64, bias: &CudaSlice<f32>, n: usize, cols: usize) -> Res<()> {
        let (nn, c) = (n as i32, cols as i32);
        let mut b = self.launch("add_bias_f32");
        b.arg(&y).arg(bias).arg(&nn).arg(&c);
        unsafe { b.launch(lc((n * cols).div_ceil(256).clamp(1, self.sm_count as usize * 8), 1, 1, 256)) }?;
        Ok(())
    }

    pub(super) fn add_expert_bias(&self, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, ids: &CudaSlice<i32>, n_assign: usize, cols: usize) -> Res<()> {
        let (nn, c) = (n_assign as i32, cols as i32);
        let mut b = self.launch("add_expert_bias");
        b.arg(y).arg(bias).arg(ids).arg(&nn).arg(&c);
        unsafe { b.launch(lc((n_assign * cols).div_ceil(256).clamp(1, self.sm_count as usize * 8), 1, 1, 256)) }?;
        Ok(())
    }
}

/// A dense bf16 weight applied to n rows (+ bias): one cuBLAS GEMM from
/// `GEMM_MIN_ROWS` rows when cuBLAS is available, else the GEMVs (which read the
/// weight once per 8 rows).
#[allow(clippy::too_many_arguments)]
pub(super) fn dense(
    cx: &CudaContext,
    gemm: &mut Option<BlasGemm>,
    w: &CudaSlice<u16>,
    x: u64,
    x_bf16: bool,
    y: u64,
    rows: usize,
    cols: usize,
    n: usize,
    bias: Option<&CudaSlice<f32>>,
) -> Res<()> {
    match gemm {
        Some(g) if n >= GEMM_MIN_ROWS => {
            g.gemm(cx, w, x, x_bf16, y, rows, cols, n)?;
            match bias {
                Some(b) => cx.add_bias(y, b, n, rows),
                None => Ok(()),
            }
        }
        _ => cx.gemv_ext(w, x, x_bf16, y, rows, cols, n, bias),
    }
}

/// A KV cache of `n_slots` slots holding the first `old.n_slots` slots of `k`/`v`
/// (the target backend and the DFlash drafter grow theirs this way).
pub(super) fn grow_kv(
    cx: &CudaContext,
    k: &CudaSlice<u16>,
    v: &CudaSlice<u16>,
    old: KvShape,
    n_slots: usize,
) -> std::result::Result<(CudaSlice<u16>, CudaSlice<u16>, KvShape), cudarc::driver::DriverError> {
    let kv = KvShape { n_slots, ..old };
    let st = &cx.stream;
    let mut k2 = st.alloc_zeros::<u16>(kv.len())?;
    let mut v2 = st.alloc_zeros::<u16>(kv.len())?;
    st.memcpy_dtod(k, &mut k2.slice_mut(0..old.len()))?;
    st.memcpy_dtod(v, &mut v2.slice_mut(0..old.len()))?;
    st.synchronize()?;
    Ok((k2, v2, kv))
}

/// What the residual stream still has to absorb before the next norm.
#[derive(Clone, Copy)]
pub(super) enum Pend {
    None,
    /// `delta` [n, hidden]
    Delta,
    /// the MoE expert outputs `ye` [n*k, hidden] weighted by `tw` [n, k]
    Moe,
}

/// residual += pending; out = rmsnorm(residual) * w.
#[allow(clippy::too_many_arguments)]
pub(super) fn pre_norm<O: Act>(
    cx: &CudaContext,
    x: &mut CudaSlice<f32>,
    pend: Pend,
    delta: &CudaSlice<f32>,
    ye: &CudaSlice<f32>,
    tw: &CudaSlice<f32>,
    k: usize,
    moe_bias: Option<(&CudaSlice<f32>, &CudaSlice<i32>)>,
    w: &CudaSlice<u16>,
    out: &mut CudaSlice<O>,
    n: usize,
    h: usize,
    eps: f32,
) -> Res<()> {
    match pend {
        Pend::None => cx.rmsnorm_residual::<O>(x, None, w, out, n, h, eps),
        Pend::Delta => cx.rmsnorm_residual::<O>(x, Some(delta), w, out, n, h, eps),
        Pend::Moe => {
            let name = if O::NAME == "bf16" { "rmsnorm_moe_bf16" } else { "rmsnorm_moe_f32" };
            let (kk, hh) = (k as i32, h as i32);
            let null = 0u64;
            let mut lb = cx.launch(name);
            lb.arg(x).arg(ye).arg(tw).arg(&kk);
            match moe_bias {
                Some((bias, ids)) => lb.arg(bias).arg(ids),
                None => lb.arg(&null).arg(&null),
            };
            lb.arg(w).arg(out).arg(&hh).arg(&eps);
            unsafe { lb.launch(lc(n, 1, 1, if n < 64 { 1024 } else { 256 })) }?;
            Ok(())
        }
    }
}

pub(super) fn activation(cx: &CudaContext, act: Activation, gu: &CudaSlice<f32>, out: &mut CudaSlice<u16>, n: usize, inter: usize) -> Res<()> {
    match act {
        Activation::SiluGlu => cx.swiglu::<u16>(gu, out, n, inter),
        Activation::GptOssGlu { alpha, limit } => cx.swiglu_oai::<u16>(gu, out, n, inter, alpha, limit),
    }
}
