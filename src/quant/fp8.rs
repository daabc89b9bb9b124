//! FP8 E4M3FN dense weights with f32 scales that multiply on dequantization:
//! per output row (`scale_block = None`, `scales.len() == rows`), or 2-D `b×b` blocks
//! (`scale_block = Some(b)`, `scales` = `[ceil(rows/b), ceil(cols/b)]`, the
//! DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv` layout with b = 128).

use rayon::prelude::*;

use super::e4m3::{e4m3_encode_rne, E4M3_LUT, E4M3_MAX};
use super::kernels::{accumulate, lane_sums, par_matmul, use_avx2, MAX_N};
use super::{check_finite, check_len, QuantError, ScaleRule};

/// Scale-shrink factors tried by [`ScaleRule::MseSearch`] (1.0 = the spec scale).
const MSE_FACTORS: [f32; 6] = [1.0, 0.97, 0.94, 0.91, 0.88, 0.85];

/// An FP8 E4M3FN `[rows, cols]` matrix with per-row or 2-D block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` E4M3FN bytes, row-major.
    pub data: Vec<u8>,
    /// Per-row scales (`rows`), or per-block scales (`ceil(rows/b) * ceil(cols/b)`).
    pub scales: Vec<f32>,
    /// `None`: per-row scales; `Some(b)`: `b×b` block scales.
    pub scale_block: Option<usize>,
}

/// Chooses the scale for a group of values: spec = amax/448 (1.0 for all-zero groups);
/// MseSearch tries a few smaller scales (clipping the extremes) and keeps the lowest SSE.
fn choose_scale<'a>(
    group: impl Fn() -> Box<dyn Iterator<Item = f32> + 'a>,
    rule: ScaleRule,
) -> f32 {
    let amax = group().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return 1.0;
    }
    let spec = amax / E4M3_MAX;
    if spec.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return f32::MIN_POSITIVE; // amax so tiny the scale underflows: everything rounds to 0
    }
    match rule {
        ScaleRule::Spec => spec,
        ScaleRule::MseSearch => {
            let sse = |s: f32| -> f32 {
                group()
                    .map(|x| {
                        let e = x - E4M3_LUT[e4m3_encode_rne(x / s) as usize] * s;
                        e * e
                    })
                    .sum()
            };
            let mut best = (sse(spec), spec);
            for f in &MSE_FACTORS[1..] {
                let s = spec * f;
                let e = sse(s);
                if e < best.0 {
                    best = (e, s);
                }
            }
            best.1
        }
    }
}

impl Fp8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix with one scale per output row.
    /// Errors on a length mismatch or NaN/±inf input ([`QuantError::NonFinite`]).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        rule: ScaleRule,
    ) -> Result<Self, QuantError> {
        check_len("fp8 weights", rows * cols, w.len())?;
        check_finite(w)?;
        let mut data = vec![0u8; rows * cols];
        let mut scales = vec![1f32; rows];
        if cols > 0 {
            data.par_chunks_mut(cols)
                .zip(scales.par_iter_mut())
                .zip(w.par_chunks(cols))
                .for_each(|((d, s), row)| {
                    *s = choose_scale(|| Box::new(row.iter().copied()), rule);
                    for (o, &x) in d.iter_mut().zip(row) {
                        *o = e4m3_encode_rne(x / *s);
                    }
                });
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
            scale_block: None,
        })
    }

    /// Quantizes with one scale per `block × block` tile (edge tiles may be partial).
    pub fn quantize_blocked(
        w: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
        rule: ScaleRule,
    ) -> Result<Self, QuantError> {
        if block == 0 {
            return Err(QuantError::ScaleBlock(block));
        }
        check_len("fp8 weights", rows * cols, w.len())?;
        check_finite(w)?;
        let (br, bc) = (rows.div_ceil(block), cols.div_ceil(block));
        let scales: Vec<f32> = (0..br * bc)
            .into_par_iter()
            .map(|t| {
                let (r0, c0) = ((t / bc) * block, (t % bc) * block);
                let (r1, c1) = ((r0 + block).min(rows), (c0 + block).min(cols));
                let group = move || -> Box<dyn Iterator<Item = f32> + '_> {
                    Box::new(
                        (r0..r1).flat_map(move |r| w[r * cols + c0..r * cols + c1].iter().copied()),
                    )
                };
                choose_scale(group, rule)
            })
            .collect();
        let mut data = vec![0u8; rows * cols];
        if cols > 0 {
            data.par_chunks_mut(cols)
                .zip(w.par_chunks(cols))
                .enumerate()
                .for_each(|(r, (d, row))| {
                    for (c, (o, &x)) in d.iter_mut().zip(row).enumerate() {
                        *o = e4m3_encode_rne(x / scales[(r / block) * bc + c / block]);
                    }
                });
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
            scale_block: Some(block),
        })
    }

    /// Wraps checkpoint tensors with per-row scales (a per-tensor scale can be broadcast
    /// by the caller). Validates sizes, rejects NaN data bytes and non-finite scales.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
    ) -> Result<Self, QuantError> {
        check_len("fp8 scales", rows, scales.len())?;
        Self::validate(rows, cols, data, scales, None)
    }

    /// Wraps checkpoint tensors with `block × block` scales (`[ceil(rows/b), ceil(cols/b)]`).
    pub fn from_parts_blocked(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
        block: usize,
    ) -> Result<Self, QuantError> {
        if block == 0 {
            return Err(QuantError::ScaleBlock(block));
        }
        check_len(
            "fp8 block scales",
            rows.div_ceil(block) * cols.div_ceil(block),
            scales.len(),
        )?;
        Self::validate(rows, cols, data, scales, Some(block))
    }

    fn validate(
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
        scale_block: Option<usize>,
    ) -> Result<Self, QuantError> {
        check_len("fp8 data", rows * cols, data.len())?;
        if let Some(index) = data.iter().position(|&b| b & 0x7f == 0x7f) {
            return Err(QuantError::NanEncoding {
                what: "fp8 data",
                index,
                byte: data[index],
            });
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            return Err(QuantError::TensorScale(*s));
        }
        Ok(Self {
            rows,
            cols,
            data,
            scales,
            scale_block,
        })
    }

    /// Scale of element (r, c).
    #[inline]
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        match self.scale_block {
            None => self.scales[r],
            Some(b) => self.scales[(r / b) * self.cols.div_ceil(b) + c / b],
        }
    }

    /// Dequantizes the whole matrix to row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, row)| self.dequantize_row(r, row));
        }
        out
    }

    /// Dequantizes row `r` into `out[..cols]`. Panics if `r >= rows` or `out` is too short.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let data = &self.data[r * self.cols..(r + 1) * self.cols];
        let step = self.scale_block.unwrap_or(self.cols.max(1));
        for (c0, (o, d)) in out[..self.cols]
            .chunks_mut(step)
            .zip(data.chunks(step))
            .enumerate()
        {
            let s = self.scale_at(r, c0 * step);
            for (v, &b) in o.iter_mut().zip(d) {
                *v = E4M3_LUT[b as usize] * s;
            }
        }
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` (row-major): E4M3 decoded in registers (AVX2/F16C
    /// when `cols % 32 == 0` and the block size is a multiple of 32, scalar LUT
    /// otherwise), each decoded chunk reused for all `n` rows of `x`.
    ///
    /// # Panics
    /// If `x.len() < n * cols` or `y.len() < n * rows`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_impl(x, n, y, use_avx2());
    }

    /// Panics unless the (public) fields are still consistent; the SIMD kernels rely on it.
    fn assert_consistent(&self) {
        let nscales = match self.scale_block {
            None => self.rows,
            Some(b) => self.rows.div_ceil(b.max(1)) * self.cols.div_ceil(b.max(1)),
        };
        assert!(
            self.data.len() == self.rows * self.cols
                && self.scales.len() == nscales
                && self.scale_block != Some(0),
            "Fp8Matrix fields are inconsistent with rows = {}, cols = {}",
            self.rows,
            self.cols
        );
    }

    pub(crate) fn matmul_impl(&self, x: &[f32], n: usize, y: &mut [f32], simd: bool) {
        self.assert_consistent();
        let simd = simd
            && self.cols.is_multiple_of(32)
            && self.scale_block.is_none_or(|b| b.is_multiple_of(32));
        par_matmul(self.rows, self.cols, x, n, y, |r0, r1, xs, nn, out| {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` is only true when `use_avx2()` confirmed the CPU features
                // and cols is a multiple of 32; sizes were validated at construction.
                unsafe { self.chunk_avx2(r0, r1, xs, nn, out) };
                return;
            }
            let _ = simd;
            self.chunk_scalar(r0, r1, xs, nn, out);
        });
    }

    fn chunk_scalar(&self, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]) {
        let cols = self.cols;
        let mut wv = [0f32; 32];
        for r in r0..r1 {
            let mut acc = [[0f32; 8]; MAX_N];
            let mut c0 = 0;
            while c0 < cols {
                // chunks of up to 32 that never straddle a scale block
                let lim = self
                    .scale_block
                    .map_or(cols, |b| ((c0 / b + 1) * b).min(cols));
                let len = (lim - c0).min(32);
                let s = self.scale_at(r, c0);
                for (v, &b) in wv
                    .iter_mut()
                    .zip(&self.data[r * cols + c0..r * cols + c0 + len])
                {
                    *v = E4M3_LUT[b as usize] * s;
                }
                accumulate(&wv[..len], xs, cols, c0, nn, &mut acc);
                c0 += len;
            }
            lane_sums(&acc, nn, &mut out[(r - r0) * MAX_N..]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_avx2(&self, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]) {
        use super::kernels::avx2::{decode_e4m3x8, rows_x32};
        use std::arch::x86_64::*;
        let cols = self.cols;
        let dp = self.data.as_ptr();
        rows_x32(r0, r1, cols / 32, cols, xs, nn, out, |r, k| {
            let p = dp.add(r * cols + k * 32);
            // decoded values are E4M3 · 2^-8; the 256 is folded into the scale
            let w = [
                decode_e4m3x8(p),
                decode_e4m3x8(p.add(8)),
                decode_e4m3x8(p.add(16)),
                decode_e4m3x8(p.add(24)),
            ];
            (w, _mm256_set1_ps(self.scale_at(r, k * 32) * 256.0))
        });
    }

    /// Storage size in bytes (data + f32 scales).
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * self.scales.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::e4m3::e4m3_decode;
    use crate::quant::testutil::{check_matmul, normal, rmse};

    /// |err| <= half an E4M3 ULP at |x|/s (2^-10 in the subnormal range), times s.
    fn check_bounds(w: &[f32], q: &Fp8Matrix) {
        let d = q.dequantize();
        for (k, (&x, &y)) in w.iter().zip(&d).enumerate() {
            let s = q.scale_at(k / q.cols, k % q.cols);
            let a = (x / s).abs();
            let half_ulp = if a < 2f32.powi(-6) {
                2f32.powi(-10)
            } else {
                2f32.powi(crate::quant::e8m0_floor_log2(a) - 4)
            };
            let err = (x - y).abs();
            if a > E4M3_MAX {
                assert!(
                    (err - (x.abs() - E4M3_MAX * s)).abs() <= 1e-5 * x.abs(),
                    "saturation {x}"
                );
            } else {
                assert!(err <= half_ulp * s * (1.0 + 1e-5), "x={x} y={y} s={s}");
            }
        }
    }

    #[test]
    fn exact_grid_zero_rows_and_max() {
        // row 0: all zeros; row 1: every finite positive code times 2^-3 (max -> 448 code)
        let cols = 126;
        let mut w = vec![0f32; 2 * cols];
        for c in 0..cols {
            w[cols + c] = e4m3_decode(c as u8 + 1) * 0.125;
        }
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let q = Fp8Matrix::quantize(&w, 2, cols, rule).unwrap();
            assert_eq!(q.scales[0], 1.0);
            assert!(q.data[..cols].iter().all(|&b| b == 0));
            if rule == ScaleRule::Spec {
                assert_eq!(q.scales[1], 0.125);
                assert_eq!(q.data[2 * cols - 1], 0x7e);
                assert_eq!(q.dequantize(), w);
            }
            check_bounds(&w, &q);
        }
    }

    #[test]
    fn subnormal_and_saturation() {
        // tiny values relative to the row max land in the E4M3 subnormal range
        let mut w = vec![1e-4f32; 64];
        w[0] = 448.0;
        w[1] = 3e-3;
        let q = Fp8Matrix::quantize(&w, 1, 64, ScaleRule::Spec).unwrap();
        assert_eq!(q.scales[0], 1.0);
        check_bounds(&w, &q);
        assert_eq!(q.data[1], e4m3_encode_rne(3e-3));
        assert!(q.data[1] < 0x08);
        // f32 subnormal inputs
        let tiny: Vec<f32> = (0..32).map(|k| k as f32 * 1e-40).collect();
        let q = Fp8Matrix::quantize(&tiny, 1, 32, ScaleRule::Spec).unwrap();
        check_bounds(&tiny, &q);
        // MseSearch shrinks the scale: values above 448·s saturate exactly
        let w = normal(4 * 256, 9);
        let q = Fp8Matrix::quantize(&w, 4, 256, ScaleRule::MseSearch).unwrap();
        check_bounds(&w, &q);
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = vec![1f32; 64];
        w[9] = f32::NAN;
        assert!(matches!(
            Fp8Matrix::quantize(&w, 2, 32, ScaleRule::Spec),
            Err(QuantError::NonFinite { index: 9, .. })
        ));
        w[9] = f32::INFINITY;
        assert!(matches!(
            Fp8Matrix::quantize_blocked(&w, 2, 32, 128, ScaleRule::Spec),
            Err(QuantError::NonFinite { index: 9, .. })
        ));
        assert!(matches!(
            Fp8Matrix::quantize(&w, 3, 32, ScaleRule::Spec),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Fp8Matrix::quantize_blocked(&w, 2, 32, 0, ScaleRule::Spec),
            Err(QuantError::ScaleBlock(0))
        ));
        assert!(matches!(
            Fp8Matrix::from_parts(2, 4, vec![0; 8], vec![1.0]),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Fp8Matrix::from_parts(2, 4, vec![0; 7], vec![1.0; 2]),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Fp8Matrix::from_parts(2, 4, vec![0, 0, 0xff, 0, 0, 0, 0, 0], vec![1.0; 2]),
            Err(QuantError::NanEncoding { index: 2, .. })
        ));
        assert!(matches!(
            Fp8Matrix::from_parts(2, 4, vec![0; 8], vec![1.0, f32::INFINITY]),
            Err(QuantError::TensorScale(_))
        ));
        assert!(matches!(
            Fp8Matrix::from_parts_blocked(200, 300, vec![0; 60000], vec![1.0; 5], 128),
            Err(QuantError::Length { .. })
        ));
        let m = Fp8Matrix::from_parts_blocked(200, 300, vec![0; 60000], vec![1.0; 6], 128).unwrap();
        assert_eq!(m.bytes(), 60000 + 24);
    }

    #[test]
    fn error_bound_and_rmse_on_normal_data() {
        let (rows, cols) = (64, 1024);
        let w = normal(rows * cols, 13);
        let spec = Fp8Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
        let mse = Fp8Matrix::quantize(&w, rows, cols, ScaleRule::MseSearch).unwrap();
        let blk = Fp8Matrix::quantize_blocked(&w, rows, cols, 128, ScaleRule::Spec).unwrap();
        for q in [&spec, &mse, &blk] {
            check_bounds(&w, q);
        }
        let (a, b, c) = (
            rmse(&w, &spec.dequantize()),
            rmse(&w, &mse.dequantize()),
            rmse(&w, &blk.dequantize()),
        );
        println!("fp8 RMSE on N(0,1): per-row spec {a:.6}, per-row mse-search {b:.6}, block-128 spec {c:.6}");
        assert!(b <= a);
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        for &(rows, cols) in &[(37, 96), (130, 256), (5, 40)] {
            let w = normal(rows * cols, rows as u64 + 2);
            let q = Fp8Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
            let wd = q.dequantize();
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul(x, n, y));
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul_impl(x, n, y, false));
            for block in [32, 128, 48] {
                let q = Fp8Matrix::quantize_blocked(&w, rows, cols, block, ScaleRule::MseSearch)
                    .unwrap();
                let wd = q.dequantize();
                check_matmul(&wd, rows, cols, |x, n, y| q.matmul(x, n, y));
                check_matmul(&wd, rows, cols, |x, n, y| q.matmul_impl(x, n, y, false));
            }
        }
    }
}
