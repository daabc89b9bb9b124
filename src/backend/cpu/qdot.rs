//! Opt-in block-quantized weight storage for batch-1 CPU decode, which is
//! bound by the bytes of weights read per step.
//!
//! Two llama.cpp-style formats with 32-element blocks:
//! * `Q8_0`: int8 + one f32 scale per block (1.125 B/weight instead of 4);
//! * `Q4_1`: 4-bit + f32 scale and min per block (0.75 B/weight). A GGUF
//!   Q4_1 tensor dequantized to f32 re-quantizes to Q4_1 (almost) exactly, so
//!   [`QMatrix::from_f32_auto`] picks Q4_1 where the block is representable
//!   and Q8_0 elsewhere.
//!
//! Activations are quantized per 32-block to int8 (like llama.cpp's q8_0 /
//! q8_1), and the block dot products run as `maddubs`/`madd` on AVX2. This
//! changes numerics (activation rounding, ~1e-3 relative), so it is never the
//! default: the exact f32 path stays the reference.

use rayon::prelude::*;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4_1,
}

/// A `[rows, cols]` matrix (cols a multiple of 32) in one block format.
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: QFormat,
    /// Per block: the scale.
    d: Vec<f32>,
    /// Per block: the minimum (Q4_1 only; empty for Q8_0).
    m: Vec<f32>,
    /// Q8_0: one i8 per weight. Q4_1: 16 bytes per block, byte `j` holding
    /// element `j` in its low nibble and element `j + 16` in its high nibble.
    qs: Vec<u8>,
}

/// `x` quantized per 32-block: int8 values, scale, and `scale * Σ q` (for the Q4_1 min term).
struct QAct {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

fn quantize_act(x: &[f32]) -> QAct {
    let nb = x.len() / QK;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; nb];
    let mut s = vec![0f32; nb];
    for b in 0..nb {
        let blk = &x[b * QK..(b + 1) * QK];
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if db > 0.0 { 1.0 / db } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in q[b * QK..(b + 1) * QK].iter_mut().zip(blk) {
            let qi = (v * id).round() as i32;
            *o = qi as i8;
            sum += qi;
        }
        d[b] = db;
        s[b] = db * sum as f32;
    }
    QAct { q, d, s }
}

impl QMatrix {
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    pub fn quantize(rows: usize, cols: usize, data: &[f32], format: QFormat) -> Self {
        assert_eq!(cols % QK, 0, "block formats need cols % 32 == 0");
        assert_eq!(data.len(), rows * cols);
        let nb = rows * cols / QK;
        let mut d = vec![0f32; nb];
        let mut m = Vec::new();
        let qs = match format {
            QFormat::Q8_0 => {
                let mut qs = vec![0u8; rows * cols];
                for b in 0..nb {
                    let blk = &data[b * QK..(b + 1) * QK];
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let db = amax / 127.0;
                    let id = if db > 0.0 { 1.0 / db } else { 0.0 };
                    for (o, v) in qs[b * QK..(b + 1) * QK].iter_mut().zip(blk) {
                        *o = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
                    }
                    d[b] = db;
                }
                qs
            }
            QFormat::Q4_1 => {
                m = vec![0f32; nb];
                let mut qs = vec![0u8; rows * cols / 2];
                for b in 0..nb {
                    let blk = &data[b * QK..(b + 1) * QK];
                    let lo = blk.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let db = (hi - lo) / 15.0;
                    let q = |v: f32| if db > 0.0 { ((v - lo) / db).round().clamp(0.0, 15.0) as u8 } else { 0 };
                    for j in 0..QK / 2 {
                        qs[b * QK / 2 + j] = q(blk[j]) | (q(blk[j + QK / 2]) << 4);
                    }
                    d[b] = db;
                    m[b] = lo;
                }
                qs
            }
        };
        Self { rows, cols, format, d, m, qs }
    }

    /// Q4_1 if every block of `data` round-trips through Q4_1 to within
    /// `1e-5` of its range (true for dequantized GGUF Q4_1 tensors), else Q8_0.
    pub fn from_f32_auto(rows: usize, cols: usize, data: &[f32]) -> Self {
        let q4 = Self::quantize(rows, cols, data, QFormat::Q4_1);
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            q4.dequantize_row(r, &mut row);
            for (b, (got, want)) in row.chunks(QK).zip(data[r * cols..(r + 1) * cols].chunks(QK)).enumerate() {
                let range = q4.d[(r * cols) / QK + b] * 15.0;
                let tol = 1e-5 * range.max(f32::MIN_POSITIVE);
                if got.iter().zip(want).any(|(a, w)| (a - w).abs() > tol) {
                    return Self::quantize(rows, cols, data, QFormat::Q8_0);
                }
            }
        }
        q4
    }

    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / QK;
        for (bi, o) in out.chunks_mut(QK).enumerate() {
            let b = r * bpr + bi;
            match self.format {
                QFormat::Q8_0 => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = self.d[b] * (self.qs[b * QK + j] as i8) as f32;
                    }
                }
                QFormat::Q4_1 => {
                    for j in 0..QK / 2 {
                        let byte = self.qs[b * QK / 2 + j];
                        o[j] = self.m[b] + self.d[b] * (byte & 15) as f32;
                        o[j + QK / 2] = self.m[b] + self.d[b] * (byte >> 4) as f32;
                    }
                }
            }
        }
    }

    /// Row `r` of W against one quantized activation row.
    #[inline]
    fn row_dot(&self, r: usize, a: &QAct, t: usize) -> f32 {
        let bpr = self.cols / QK;
        let (b0, tb0) = (r * bpr, t * bpr);
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        // SAFETY: AVX2/FMA are enabled at compile time; every block index is in bounds
        // (`b0 + bpr <= rows * bpr`, `tb0 + bpr <= n * bpr`).
        unsafe {
            match self.format {
                QFormat::Q8_0 => simd::dot_q8_0(&self.qs[b0 * QK..], &self.d[b0..], &a.q[tb0 * QK..], &a.d[tb0..], bpr),
                QFormat::Q4_1 => simd::dot_q4_1(
                    &self.qs[b0 * QK / 2..],
                    &self.d[b0..],
                    &self.m[b0..],
                    &a.q[tb0 * QK..],
                    &a.d[tb0..],
                    &a.s[tb0..],
                    bpr,
                ),
            }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            let mut acc = 0f32;
            for b in 0..bpr {
                let (wb, xb) = (b0 + b, tb0 + b);
                let xq = &a.q[xb * QK..(xb + 1) * QK];
                let isum: i32 = match self.format {
                    QFormat::Q8_0 => (0..QK).map(|j| (self.qs[wb * QK + j] as i8) as i32 * xq[j] as i32).sum(),
                    QFormat::Q4_1 => (0..QK / 2)
                        .map(|j| {
                            let byte = self.qs[wb * QK / 2 + j];
                            (byte & 15) as i32 * xq[j] as i32 + (byte >> 4) as i32 * xq[j + QK / 2] as i32
                        })
                        .sum(),
                };
                acc += self.d[wb] * a.d[xb] * isum as f32;
                if self.format == QFormat::Q4_1 {
                    acc += self.m[wb] * a.s[xb];
                }
            }
            acc
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ`, parallel over blocks of rows.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(y.len(), n * rows);
        let a = quantize_act(x);
        let threads = rayon::current_num_threads().max(1);
        let min_rows = (64 * 1024 / cols).max(1);
        let per = rows.div_ceil(threads * 8).max(min_rows);
        if n == 1 {
            let f = |(c, out): (usize, &mut [f32])| {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.row_dot(c * per + i, &a, 0);
                }
            };
            if rows <= per {
                f((0, y));
            } else {
                y.par_chunks_mut(per).enumerate().for_each(f);
            }
            return;
        }
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(per * n).enumerate().for_each(|(c, out)| {
            for (i, o) in out.chunks_mut(n).enumerate() {
                for (t, v) in o.iter_mut().enumerate() {
                    *v = self.row_dot(c * per + i, &a, t);
                }
            }
        });
        for r in 0..rows {
            for t in 0..n {
                y[t * rows + r] = yt[r * n + t];
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ_b dw[b]·dx[b]·Σ_j w[b,j]·x[b,j] over `nb` blocks.
    #[inline(always)]
    pub unsafe fn dot_q8_0(w: &[u8], dw: &[f32], x: &[i8], dx: &[f32], nb: usize) -> f32 {
        debug_assert!(w.len() >= nb * 32 && x.len() >= nb * 32 && dw.len() >= nb && dx.len() >= nb);
        let ones = _mm256_set1_epi16(1);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let block = |b: usize| -> __m256 {
            let wv = _mm256_loadu_si256(wp.add(b * 32) as *const __m256i);
            let xv = _mm256_loadu_si256(xp.add(b * 32) as *const __m256i);
            let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones))
        };
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*dw.get_unchecked(b) * *dx.get_unchecked(b)), acc0);
            acc1 = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(*dw.get_unchecked(b + 1) * *dx.get_unchecked(b + 1)), acc1);
            b += 2;
        }
        if b < nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*dw.get_unchecked(b) * *dx.get_unchecked(b)), acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    /// Σ_b (dw[b]·dx[b]·Σ_j q[b,j]·x[b,j] + m[b]·sx[b]) over `nb` blocks.
    #[inline(always)]
    pub unsafe fn dot_q4_1(
        w: &[u8],
        dw: &[f32],
        mw: &[f32],
        x: &[i8],
        dx: &[f32],
        sx: &[f32],
        nb: usize,
    ) -> f32 {
        debug_assert!(w.len() >= nb * 16 && x.len() >= nb * 32 && dw.len() >= nb && mw.len() >= nb);
        debug_assert!(dx.len() >= nb && sx.len() >= nb);
        let ones = _mm256_set1_epi16(1);
        let mask = _mm_set1_epi8(0x0F);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let block = |b: usize| -> __m256 {
            let raw = _mm_loadu_si128(wp.add(b * 16) as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let q = _mm256_set_m128i(hi, lo);
            let xv = _mm256_loadu_si256(xp.add(b * 32) as *const __m256i);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones))
        };
        let mut b = 0;
        while b + 2 <= nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*dw.get_unchecked(b) * *dx.get_unchecked(b)), acc0);
            acc1 = _mm256_fmadd_ps(block(b + 1), _mm256_set1_ps(*dw.get_unchecked(b + 1) * *dx.get_unchecked(b + 1)), acc1);
            mins += *mw.get_unchecked(b) * *sx.get_unchecked(b) + *mw.get_unchecked(b + 1) * *sx.get_unchecked(b + 1);
            b += 2;
        }
        if b < nb {
            acc0 = _mm256_fmadd_ps(block(b), _mm256_set1_ps(*dw.get_unchecked(b) * *dx.get_unchecked(b)), acc0);
            mins += *mw.get_unchecked(b) * *sx.get_unchecked(b);
        }
        hsum(_mm256_add_ps(acc0, acc1)) + mins
    }
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

    fn check(format: Option<QFormat>, w: &[f32], rows: usize, cols: usize, tol: f32) -> QFormat {
        let q = match format {
            Some(f) => QMatrix::quantize(rows, cols, w, f),
            None => QMatrix::from_f32_auto(rows, cols, w),
        };
        for n in [1, 3] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i * 31) % 29) as f32 / 14.0 - 1.0).collect();
            let want = naive(w, rows, cols, &x, n);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut got = vec![0f32; n * rows];
            q.matmul(&x, n, &mut got);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= tol * scale, "{:?}: {a} vs {b} (scale {scale})", q.format);
            }
        }
        q.format
    }

    #[test]
    fn q8_0_and_q4_1_match_f32_within_quantization_error() {
        let (rows, cols) = (37, 160);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 113) as f32 / 57.0 - 1.0).collect();
        check(Some(QFormat::Q8_0), &w, rows, cols, 0.02);
        check(Some(QFormat::Q4_1), &w, rows, cols, 0.1);
        // A matrix that is exactly Q4_1 (as dequantized from a GGUF) is detected
        // and only the activation rounding remains.
        let w4: Vec<f32> = (0..rows * cols).map(|i| 0.3 - 0.01 * (i / 32 % 5) as f32 + 0.021 * ((i * 7) % 16) as f32).collect();
        assert_eq!(check(None, &w4, rows, cols, 0.02), QFormat::Q4_1);
        assert_eq!(QMatrix::from_f32_auto(rows, cols, &w).format, QFormat::Q8_0);
    }
}
