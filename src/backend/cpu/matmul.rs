//! `y = x·Wᵀ (+ b)` for every weight precision, parallel over output rows.
//! Each weight row is read once per call and applied to all `n` input rows.

use half::bf16;
use std::sync::Arc;

use rayon::prelude::*;

use crate::model::weights::{Linear, Weight};

/// Block-quantized CPU kernels (opt-in, see [`quant_override`]). Declared here
/// so it builds without touching `cpu/mod.rs`; it can move to `pub mod qdot;` there.
#[path = "qdot.rs"]
pub mod qdot;

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    let mut t = [0f32; 8];
    for l in 0..8 {
        t[l] = acc[l] + acc[l + 8];
    }
    s + (t[0] + t[4]) + (t[1] + t[5]) + (t[2] + t[6]) + (t[3] + t[7])
}

#[inline]
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"), allow(dead_code))]
fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for l in 0..16 {
            acc[l] = f32::from_bits((a[l].to_bits() as u32) << 16).mul_add(b[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wr.iter().zip(xr) {
        s += a.to_f32() * b;
    }
    s
}

/// Work per rayon task: at least this many weight bytes (so scheduling is
/// amortised; the old fixed 16 rows gave ~13k tasks per SmolLM2 decode step)...
const MIN_TASK_BYTES: usize = 64 * 1024;
/// ...and about this many tasks per thread, so work stealing can balance a
/// thread that is descheduled on a busy machine.
const TASKS_PER_THREAD: usize = 8;

/// Rows of W per rayon task.
fn rows_per_task(rows: usize, cols: usize, bytes_per_weight: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = MIN_TASK_BYTES.div_ceil((cols * bytes_per_weight).max(1));
    let balanced = rows.div_ceil(threads * TASKS_PER_THREAD);
    balanced.max(min_rows).max(1)
}

/// Same summation order as [`dot`] (two 8-lane FMA accumulators over chunks of
/// 16, scalar FMA tail, then the fixed reduction), so results are bit-identical.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn reduce(a0: __m256, a1: __m256, s: f32) -> f32 {
        let mut t = [0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), _mm256_add_ps(a0, a1));
        s + (t[0] + t[4]) + (t[1] + t[5]) + (t[2] + t[6]) + (t[3] + t[7])
    }

    #[inline(always)]
    unsafe fn tail(w: &[f32], x: &[f32], from: usize) -> f32 {
        let mut s = 0f32;
        for (a, b) in w[from..].iter().zip(&x[from..]) {
            s = a.mul_add(*b, s);
        }
        s
    }

    #[inline(always)]
    pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let cols = x.len();
        let body = cols / 16 * 16;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut i = 0;
        while i < body {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i + 8)), _mm256_loadu_ps(xp.add(i + 8)), a1);
            i += 16;
        }
        reduce(a0, a1, tail(w, x, body))
    }

    /// Four weight rows against one input row, each dot in exactly [`dot_f32`]'s
    /// order (bit-identical), sharing the loads of `x` (prefill: x stays in registers).
    #[inline(always)]
    pub unsafe fn dot4_f32(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let cols = x.len();
        let body = cols / 16 * 16;
        let z = _mm256_setzero_ps();
        let (mut a, mut b) = ([z; 4], [z; 4]);
        let xp = x.as_ptr();
        let wp = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut i = 0;
        while i < body {
            let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[k].add(i)), x0, a[k]);
                b[k] = _mm256_fmadd_ps(_mm256_loadu_ps(wp[k].add(i + 8)), x1, b[k]);
            }
            i += 16;
        }
        let mut out = [0f32; 4];
        for k in 0..4 {
            out[k] = reduce(a[k], b[k], tail(w[k], x, body));
        }
        out
    }

    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// Same order as [`super::dot_bf16`]: 16 lanes summed in order, then the tail.
    #[inline(always)]
    unsafe fn reduce_seq(a0: __m256, a1: __m256) -> f32 {
        let mut t = [0f32; 16];
        _mm256_storeu_ps(t.as_mut_ptr(), a0);
        _mm256_storeu_ps(t.as_mut_ptr().add(8), a1);
        t.iter().sum()
    }

    #[inline(always)]
    pub unsafe fn dot_bf16(w: &[half::bf16], x: &[f32]) -> f32 {
        let cols = x.len();
        let body = cols / 16 * 16;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr());
        let mut i = 0;
        while i < body {
            a0 = _mm256_fmadd_ps(load_bf16(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(load_bf16(wp.add(i + 8)), _mm256_loadu_ps(xp.add(i + 8)), a1);
            i += 16;
        }
        let mut s = reduce_seq(a0, a1);
        for (a, b) in w[body..].iter().zip(&x[body..]) {
            s += a.to_f32() * b;
        }
        s
    }
}

#[inline]
fn dot1_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: AVX2/FMA are enabled at compile time, and `w` is at least `x.len()` long
    // (every caller passes one `cols`-long weight row and one `cols`-long input row).
    unsafe {
        debug_assert_eq!(w.len(), x.len());
        simd::dot_f32(w, x)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    dot(w, x)
}

fn dot4_f32(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: AVX2/FMA are enabled at compile time; every row is `x.len()` long.
    unsafe {
        simd::dot4_f32(w, x)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    [dot(w[0], x), dot(w[1], x), dot(w[2], x), dot(w[3], x)]
}

#[inline]
fn dot1_bf16(w: &[bf16], x: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: as for `dot1_f32`.
    unsafe {
        debug_assert_eq!(w.len(), x.len());
        simd::dot_bf16(w, x)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    dot_bf16(w, x)
}

/// Four rows' dot products with one x row at once (prefill: the rows share each load of x).
type Dot4<T> = fn([&[T]; 4], &[f32]) -> [f32; 4];

/// `y[n, rows] = x[n, cols] · Wᵀ` for a row-major `[rows, cols]` float matrix of
/// element type `T`: parallel over blocks of rows, one row at a time. (Blocking
/// four rows to share the loads of x measured ~30% slower here: it turns one
/// sequential stream through W into four short ones that the prefetchers follow worse.)
#[allow(clippy::too_many_arguments)]
fn float_matmul<T: Sync>(
    data: &[T],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    dot1: impl Fn(&[T], &[f32]) -> f32 + Sync,
    dot4: Option<Dot4<T>>,
) {
    let per = rows_per_task(rows, cols, std::mem::size_of::<T>());
    // One block of rows `r0..r0+out.len()/n`, written row-major `[rows_in_block, n]`.
    let block = |r0: usize, out: &mut [f32]| {
        let mut done = 0;
        if let Some(four) = dot4 {
            // Prefill: four rows at a time share each load of x (same sums, same bits).
            if n >= 4 {
                let rows_here = out.len() / n;
                while done + 4 <= rows_here {
                    let w = |k: usize| &data[(r0 + done + k) * cols..(r0 + done + k + 1) * cols];
                    for t in 0..n {
                        let v = four([w(0), w(1), w(2), w(3)], &x[t * cols..(t + 1) * cols]);
                        for (k, val) in v.into_iter().enumerate() {
                            out[(done + k) * n + t] = val;
                        }
                    }
                    done += 4;
                }
            }
        }
        for (i, o) in out.chunks_mut(n).enumerate().skip(done) {
            let w = &data[(r0 + i) * cols..(r0 + i + 1) * cols];
            for (t, v) in o.iter_mut().enumerate() {
                *v = dot1(w, &x[t * cols..(t + 1) * cols]);
            }
        }
    };
    if n == 1 {
        if rows <= per {
            block(0, y);
        } else {
            y.par_chunks_mut(per).enumerate().for_each(|(c, out)| block(c * per, out));
        }
        return;
    }
    let mut yt = vec![0f32; rows * n];
    if rows <= per {
        block(0, &mut yt);
    } else {
        yt.par_chunks_mut(per * n).enumerate().for_each(|(c, out)| block(c * per, out));
    }
    for r in 0..rows {
        for t in 0..n {
            y[t * rows + r] = yt[r * n + t];
        }
    }
}

/// y[n, rows] = x[n, cols] · Wᵀ, for any precision.
pub fn matmul(w: &Weight, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    debug_assert_eq!(x.len(), n * cols);
    debug_assert_eq!(y.len(), n * rows);
    match w {
        Weight::F32 { data, .. } => match quant_override(data, rows, cols) {
            Some(q) => q.matmul(x, n, y),
            None => float_matmul(data, rows, cols, x, n, y, dot1_f32, Some(dot4_f32)),
        },
        Weight::Bf16 { data, .. } => float_matmul(data, rows, cols, x, n, y, dot1_bf16, None),
        #[allow(unreachable_patterns)]
        other => quantized_matmul(other, x, n, y),
    }
}

/// EXPERIMENTAL, off unless `KAIROS_CPU_QUANT` is set (`auto`, `q8_0` or
/// `q4_1`): each f32 matrix (cols a multiple of 32) is re-quantized once, on
/// first use, into a [`qdot::QMatrix`] cached by its address, and decode reads
/// that instead (`auto`: Q4_1 where the f32 data is exactly Q4_1, as from a GGUF
/// Q4_1 tensor, else Q8_0). Changes numerics (int8 activations), keeps the f32
/// copy resident, and assumes weights are not freed while the process runs: a
/// stand-in for a proper `Weight` variant that the loader would fill.
fn quant_override(data: &[f32], rows: usize, cols: usize) -> Option<Arc<qdot::QMatrix>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MODE: OnceLock<Option<Option<qdot::QFormat>>> = OnceLock::new();
    // keyed by (weight address, rows, cols)
    type Cache = Mutex<HashMap<(usize, usize, usize), Arc<qdot::QMatrix>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mode = *MODE.get_or_init(|| match std::env::var("KAIROS_CPU_QUANT").ok()?.as_str() {
        "auto" => Some(None),
        "q8_0" => Some(Some(qdot::QFormat::Q8_0)),
        "q4_1" => Some(Some(qdot::QFormat::Q4_1)),
        _ => None,
    });
    let format = mode?;
    if !cols.is_multiple_of(qdot::QK) {
        return None;
    }
    let key = (data.as_ptr() as usize, rows, cols);
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    Some(Arc::clone(cache.entry(key).or_insert_with(|| {
        Arc::new(match format {
            Some(f) => qdot::QMatrix::quantize(rows, cols, data, f),
            None => qdot::QMatrix::from_f32_auto(rows, cols, data),
        })
    })))
}

fn quantized_matmul(w: &Weight, x: &[f32], n: usize, y: &mut [f32]) {
    match w {
        Weight::Mxfp4(m) => m.matmul(x, n, y),
        Weight::Nvfp4(m) => m.matmul(x, n, y),
        Weight::Fp8(m) => m.matmul(x, n, y),
        Weight::F32 { .. } | Weight::Bf16 { .. } => unreachable!("float weights take the float path"),
    }
}

/// A linear layer over `n` rows of `x`; returns `[n, out_features]`.
pub fn linear(lin: &Linear, x: &[f32], n: usize) -> Vec<f32> {
    let rows = lin.out_features();
    let mut y = vec![0f32; n * rows];
    matmul(&lin.weight, x, n, &mut y);
    if let Some(b) = &lin.bias {
        for row in y.chunks_mut(rows) {
            for (v, bb) in row.iter_mut().zip(b) {
                *v += bb;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                y[t * rows + r] = (0..cols).map(|c| w[r * cols + c] as f64 * x[t * cols + c] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn batched_rows_are_bit_identical_to_one_row_at_a_time() {
        let (rows, cols) = (70, 100);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0).collect();
        let n = 9;
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 31) % 29) as f32 / 14.0 - 1.0).collect();
        let wt = Weight::f32(rows, cols, w);
        let mut all = vec![0f32; n * rows];
        matmul(&wt, &x, n, &mut all);
        for t in 0..n {
            let mut one = vec![0f32; rows];
            matmul(&wt, &x[t * cols..(t + 1) * cols], 1, &mut one);
            for r in 0..rows {
                assert_eq!(all[t * rows + r].to_bits(), one[r].to_bits(), "t={t} r={r}");
            }
        }
    }

    #[test]
    fn matmul_matches_naive_for_f32_and_bf16() {
        let (rows, cols) = (37, 53);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0).collect();
        for n in [1, 3, 17] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 31) % 29) as f32 / 14.0 - 1.0).collect();
            let want = naive(&w, rows, cols, &x, n);
            let mut got = vec![0f32; n * rows];
            matmul(&Weight::f32(rows, cols, w.clone()), &x, n, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wq: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want = naive(&wq, rows, cols, &x, n);
            matmul(&Weight::Bf16 { rows, cols, data: wb }, &x, n, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }
}
