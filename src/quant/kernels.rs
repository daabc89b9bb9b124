//! Shared CPU matmul machinery: the rayon row-chunk driver, AVX2/FMA/F16C block
//! decoders (runtime-detected, with portable scalar fallbacks in each format), and a
//! plain f32 reference matmul with the same structure for speed comparisons.

use rayon::prelude::*;

/// Rows of `x` processed per pass (accumulators live on the stack).
pub(crate) const MAX_N: usize = 16;
/// Maximum output rows per rayon task.
pub(crate) const MAX_CHUNK: usize = 64;

/// Raw output pointer shared by rayon tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: every task writes only the `y` elements of its own (disjoint) row range.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// True when the AVX2 + FMA + F16C kernels can run on this CPU.
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Drives `y[n, rows] = x[n, cols] · Wᵀ` in parallel over chunks of output rows.
///
/// `kernel(r0, r1, xs, nn, out)` must fill `out[(r - r0) * MAX_N + i]` with the dot
/// product of weight row `r` and row `i` of `xs` (`nn <= MAX_N` rows of `cols` floats).
///
/// # Panics
/// If `x.len() < n * cols` or `y.len() < n * rows`.
pub(crate) fn par_matmul<F>(rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32], kernel: F)
where
    F: Fn(usize, usize, &[f32], usize, &mut [f32]) + Sync,
{
    assert!(
        x.len() >= n * cols,
        "matmul: x has {} values, need {}",
        x.len(),
        n * cols
    );
    assert!(
        y.len() >= n * rows,
        "matmul: y has {} values, need {}",
        y.len(),
        n * rows
    );
    if n == 0 || rows == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = (rows / (threads * 4)).clamp(4, MAX_CHUNK);
    let nchunks = rows.div_ceil(chunk);
    let yp = SyncPtr(y.as_mut_ptr());
    let work = |c: usize| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        let mut out = [0f32; MAX_CHUNK * MAX_N];
        let mut i0 = 0;
        while i0 < n {
            let nn = (n - i0).min(MAX_N);
            kernel(r0, r1, &x[i0 * cols..(i0 + nn) * cols], nn, &mut out);
            let p = yp.get();
            for (k, r) in (r0..r1).enumerate() {
                for i in 0..nn {
                    // SAFETY: (i0+i) < n and r < rows, so the index is < n*rows <= y.len();
                    // row r belongs to this task only, so no other task writes it.
                    unsafe { *p.add((i0 + i) * rows + r) = out[k * MAX_N + i] };
                }
            }
            i0 += nn;
        }
    };
    if nchunks == 1 {
        work(0);
    } else {
        (0..nchunks).into_par_iter().for_each(work);
    }
}

/// Plain f32 `y[n, rows] = x[n, cols] · Wᵀ` (W row-major `[rows, cols]`), same driver and
/// SIMD structure as the quantized kernels; the baseline for speed comparisons.
///
/// # Panics
/// If `w.len() < rows * cols`, `x.len() < n * cols` or `y.len() < n * rows`.
pub fn matmul_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: &mut [f32]) {
    assert!(w.len() >= rows * cols, "matmul_f32: w too short");
    let avx = use_avx2();
    par_matmul(rows, cols, x, n, y, |r0, r1, xs, nn, out| {
        #[cfg(target_arch = "x86_64")]
        if avx && cols.is_multiple_of(32) {
            // SAFETY: CPU features checked by `use_avx2`; slices sized by the driver.
            unsafe { avx2::f32_chunk(w, cols, r0, r1, xs, nn, out) };
            return;
        }
        let _ = avx;
        for r in r0..r1 {
            let mut acc = [[0f32; 8]; MAX_N];
            for c0 in (0..cols).step_by(32) {
                let len = (cols - c0).min(32);
                accumulate(
                    &w[r * cols + c0..r * cols + c0 + len],
                    xs,
                    cols,
                    c0,
                    nn,
                    &mut acc,
                );
            }
            lane_sums(&acc, nn, &mut out[(r - r0) * MAX_N..]);
        }
    });
}

/// Portable accumulation used by the scalar kernels: `acc[i][k % 8] += w[k] · x_i[off + k]`
/// for the `nn` rows of `xs` (stride `cols`). Lanes are reduced once per output row
/// (see [`lane_sums`]), not per block; the 8-wide inner loop autovectorizes.
#[inline]
pub(crate) fn accumulate(
    w: &[f32],
    xs: &[f32],
    cols: usize,
    off: usize,
    nn: usize,
    acc: &mut [[f32; 8]; MAX_N],
) {
    let len = w.len();
    let main = len - len % 8;
    for (i, a) in acc.iter_mut().enumerate().take(nn) {
        let x = &xs[i * cols + off..i * cols + off + len];
        for (wc, xc) in w[..main].chunks_exact(8).zip(x[..main].chunks_exact(8)) {
            for k in 0..8 {
                a[k] += wc[k] * xc[k];
            }
        }
        for k in main..len {
            a[k - main] += w[k] * x[k];
        }
    }
}

/// Writes the lane sums of `acc[..nn]` to `out[..nn]`.
#[inline]
pub(crate) fn lane_sums(acc: &[[f32; 8]; MAX_N], nn: usize, out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc).take(nn) {
        *o = a.iter().sum();
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! AVX2/FMA/F16C building blocks. All functions require those CPU features.
    use super::MAX_N;
    use crate::quant::e2m1::E2M1_X2_I8;
    use std::arch::x86_64::*;

    /// The E2M1 ×2 i8 lookup table in a register (for `pshufb`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fp4_lut() -> __m128i {
        _mm_loadu_si128(E2M1_X2_I8.as_ptr() as *const __m128i)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn i8x8_to_ps(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
    }

    /// Decodes 16 packed bytes (32 E2M1 codes, low nibble first) to 4×8 floats
    /// holding **twice** the E2M1 values (exact integers), in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_fp4x32(p: *const u8, lut: __m128i) -> [__m256; 4] {
        let b = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, m));
        let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), m));
        let e0 = _mm_unpacklo_epi8(lo, hi); // elements 0..16
        let e1 = _mm_unpackhi_epi8(lo, hi); // elements 16..32
        [
            i8x8_to_ps(e0),
            i8x8_to_ps(_mm_srli_si128(e0, 8)),
            i8x8_to_ps(e1),
            i8x8_to_ps(_mm_srli_si128(e1, 8)),
        ]
    }

    /// Decodes 8 packed bytes (16 E2M1 codes) to 2×8 floats holding twice the values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_fp4x16(p: *const u8, lut: __m128i) -> [__m256; 2] {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let m = _mm_set1_epi8(0x0f);
        let lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, m));
        let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), m));
        let e0 = _mm_unpacklo_epi8(lo, hi);
        [i8x8_to_ps(e0), i8x8_to_ps(_mm_srli_si128(e0, 8))]
    }

    /// Decodes 8 E4M3FN bytes to floats holding the value × 2^-8 (exact, via f16:
    /// E4M3 is E5M2-shaped after a shift, and f16 has bias 15 = 7 + 8). NaN codes are
    /// not special-cased (rejected at construction).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_e4m3x8(p: *const u8) -> __m256 {
        let w = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
        let mag = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7f)), 7);
        _mm256_cvtph_ps(_mm_or_si128(sign, mag))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `acc[i] += scale · Σ_k w[k] · x_i[k*8..]` for the `nn` rows of x (stride `cols`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fma_block4(
        w: &[__m256; 4],
        sv: __m256,
        x: *const f32,
        cols: usize,
        nn: usize,
        acc: &mut [__m256; MAX_N],
    ) {
        for (i, a) in acc.iter_mut().enumerate().take(nn) {
            let xp = x.add(i * cols);
            let p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
            let p1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xp.add(8)));
            let p0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), p0);
            let p1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), p1);
            *a = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), sv, *a);
        }
    }

    /// n = 1 variant of [`fma_block4`] with two register accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fma_block4_one(
        w: &[__m256; 4],
        sv: __m256,
        xp: *const f32,
        a0: &mut __m256,
        a1: &mut __m256,
    ) {
        let p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
        let p1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xp.add(8)));
        let p0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), p0);
        let p1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), p1);
        *a0 = _mm256_fmadd_ps(p0, sv, *a0);
        *a1 = _mm256_fmadd_ps(p1, sv, *a1);
    }

    /// Row loop shared by the kernels whose rows split into 32-element steps: for each
    /// row `r` in `r0..r1` and step `k` in `0..steps`, `dec(r, k)` returns the 4×8 decoded
    /// weights and the scale to apply; `out[(r - r0) * MAX_N + i]` receives the dot
    /// product with row `i` of `xs`. n = 1 keeps its accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_x32<F>(
        r0: usize,
        r1: usize,
        steps: usize,
        cols: usize,
        xs: &[f32],
        nn: usize,
        out: &mut [f32],
        dec: F,
    ) where
        F: Fn(usize, usize) -> ([__m256; 4], __m256),
    {
        let xp = xs.as_ptr();
        if nn == 1 {
            for r in r0..r1 {
                let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for k in 0..steps {
                    let (w, sv) = dec(r, k);
                    fma_block4_one(&w, sv, xp.add(k * 32), &mut a0, &mut a1);
                }
                out[(r - r0) * MAX_N] = hsum(_mm256_add_ps(a0, a1));
            }
        } else {
            for r in r0..r1 {
                let mut acc = [_mm256_setzero_ps(); MAX_N];
                for k in 0..steps {
                    let (w, sv) = dec(r, k);
                    fma_block4(&w, sv, xp.add(k * 32), cols, nn, &mut acc);
                }
                store(&acc, nn, &mut out[(r - r0) * MAX_N..]);
            }
        }
    }

    /// Like [`fma_block4`] for a 16-element block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fma_block2(
        w: &[__m256; 2],
        sv: __m256,
        x: *const f32,
        cols: usize,
        nn: usize,
        acc: &mut [__m256; MAX_N],
    ) {
        for (i, a) in acc.iter_mut().enumerate().take(nn) {
            let xp = x.add(i * cols);
            let p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
            let p0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), p0);
            *a = _mm256_fmadd_ps(p0, sv, *a);
        }
    }

    /// Writes the horizontal sums of `acc[..nn]` to `out[..nn]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn store(acc: &[__m256; MAX_N], nn: usize, out: &mut [f32]) {
        for i in 0..nn {
            out[i] = hsum(acc[i]);
        }
    }

    /// f32 reference chunk kernel (`cols % 32 == 0`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_chunk(
        w: &[f32],
        cols: usize,
        r0: usize,
        r1: usize,
        xs: &[f32],
        nn: usize,
        out: &mut [f32],
    ) {
        let one = _mm256_set1_ps(1.0);
        let wp = w.as_ptr();
        rows_x32(r0, r1, cols / 32, cols, xs, nn, out, |r, k| {
            let p = wp.add(r * cols + k * 32);
            let wv = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            (wv, one)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::{assert_close, normal};

    fn naive(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                let mut s = 0f64;
                for c in 0..cols {
                    s += w[r * cols + c] as f64 * x[i * cols + c] as f64;
                }
                y[i * rows + r] = s as f32;
            }
        }
        y
    }

    #[test]
    fn f32_matmul_matches_naive() {
        for &(rows, cols) in &[(37, 64), (200, 96), (5, 40)] {
            let w = normal(rows * cols, 1);
            for n in [1, 3, 17, 40] {
                let x = normal(n * cols, 2 + n as u64);
                let mut y = vec![f32::NAN; n * rows];
                matmul_f32(&w, rows, cols, &x, n, &mut y);
                assert_close(&y, &naive(&w, rows, cols, &x, n), 1e-4);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_decoders_match_scalar_tables() {
        use crate::quant::e2m1::decode_packed;
        use crate::quant::e4m3::E4M3_LUT;
        use std::arch::x86_64::*;
        if !use_avx2() {
            return;
        }
        let lanes =
            |v: __m256| -> [f32; 8] { unsafe { std::mem::transmute::<__m256, [f32; 8]>(v) } };
        // every byte value appears in some 16-byte group, in both nibble positions
        for base in (0..256).step_by(16) {
            let bytes: Vec<u8> = (0..16).map(|k| (base + k * 7) as u8).collect();
            let mut want = [0f32; 32];
            decode_packed(&bytes, 2.0, &mut want);
            let got = unsafe { avx2::decode_fp4x32(bytes.as_ptr(), avx2::fp4_lut()) };
            let got: Vec<f32> = got.iter().flat_map(|&v| lanes(v)).collect();
            assert_eq!(got, want);
            let got16 = unsafe { avx2::decode_fp4x16(bytes.as_ptr(), avx2::fp4_lut()) };
            let got16: Vec<f32> = got16.iter().flat_map(|&v| lanes(v)).collect();
            assert_eq!(got16, want[..16]);
        }
        for base in (0..256).step_by(8) {
            let bytes: Vec<u8> = (base..base + 8).map(|b| b as u8).collect();
            let got = lanes(unsafe { avx2::decode_e4m3x8(bytes.as_ptr()) });
            for (k, &b) in bytes.iter().enumerate() {
                if b & 0x7f != 0x7f {
                    let want = E4M3_LUT[b as usize];
                    assert_eq!(got[k] * 256.0, want, "byte {b:#x}");
                    assert_eq!((got[k] * 256.0).is_sign_negative(), want.is_sign_negative());
                }
            }
        }
    }

    #[test]
    fn accumulate_handles_tails() {
        let w: Vec<f32> = (0..13).map(|v| v as f32).collect();
        let xs: Vec<f32> = (0..40).map(|v| (v % 13) as f32).collect(); // 2 rows, cols = 20
        let mut acc = [[0f32; 8]; MAX_N];
        accumulate(&w, &xs, 20, 0, 2, &mut acc);
        let mut out = [0f32; 2];
        lane_sums(&acc, 2, &mut out);
        let want0: f32 = (0..13).map(|v| (v * v) as f32).sum();
        let want1: f32 = (0..13).map(|v| (v * ((20 + v) % 13)) as f32).sum();
        assert_eq!(out, [want0, want1]);
    }
}
