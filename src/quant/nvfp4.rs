//! NVFP4: E2M1 elements, blocks of 16 along the columns, one FP8 E4M3 scale per block
//! and one f32 per-tensor scale: value = e2m1 · e4m3_scale · tensor_scale.
//! Storage follows NVIDIA ModelOpt checkpoints: `weight` u8 `[rows, cols/2]` with the
//! even element in the low nibble, `weight_scale` e4m3 `[rows, cols/16]`, and
//! `weight_scale_2` (the tensor scale, which multiplies on dequantization).

use rayon::prelude::*;

use super::e2m1::{block_sse, encode_block, pack_codes};
use super::fp4::{self, Fp4Matrix};
use super::e4m3::{e4m3_decode, e4m3_encode_rne, E4M3_MAX};
use super::kernels::{use_avx2, MAX_N};
use super::{check_finite, check_len, QuantError, ScaleRule, E2M1_MAX};

/// Elements per NVFP4 block.
pub const NVFP4_BLOCK: usize = 16;
/// E4M3 1.0, the scale ModelOpt stores for all-zero blocks.
const ONE_E4M3: u8 = 0x38;
/// Largest finite positive E4M3 code (448).
const MAX_E4M3: u8 = 0x7e;

/// An NVFP4-quantized `[rows, cols]` matrix (ModelOpt layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Nvfp4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 2` bytes, row-major, low nibble = even element.
    pub packed: Vec<u8>,
    /// `rows * cols / 16` E4M3FN block scales.
    pub scales: Vec<u8>,
    /// Per-tensor f32 scale (`weight_scale_2`), multiplies.
    pub tensor_scale: f32,
}

/// The E4M3 scale code of one block and the block's scale value (`code · ts`).
///
/// Spec (ModelOpt / NVIDIA): code = e4m3(amax_b / (6·ts)); zero blocks store 1.0; a
/// non-zero block whose scale underflows E4M3 gets the smallest subnormal (0x01) instead
/// of 0 so no division by zero occurs. MseSearch also tries the E4M3 codes ±1, ±2
/// around it and keeps the lowest squared error (ties keep the spec code).
pub(crate) fn block_scale(xs: &[f32], ts: f32, rule: ScaleRule) -> (u8, f32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return (ONE_E4M3, ts);
    }
    let spec = e4m3_encode_rne(amax / (E2M1_MAX * ts)).max(1);
    let code = match rule {
        ScaleRule::Spec => spec,
        ScaleRule::MseSearch => {
            let mut best = (block_sse(xs, e4m3_decode(spec) * ts), spec);
            for delta in [-2i32, -1, 1, 2] {
                let c = spec as i32 + delta;
                if !(1..=MAX_E4M3 as i32).contains(&c) {
                    continue;
                }
                let sse = block_sse(xs, e4m3_decode(c as u8) * ts);
                if sse < best.0 {
                    best = (sse, c as u8);
                }
            }
            best.1
        }
    };
    (code, e4m3_decode(code) * ts)
}

/// The spec tensor scale `amax / (6·448)` (1.0 for an all-zero tensor).
pub(crate) fn tensor_scale_for(w: &[f32]) -> f32 {
    let amax = w.par_iter().with_min_len(4096).map(|v| v.abs()).reduce(|| 0.0, f32::max);
    let ts = amax / (E2M1_MAX * E4M3_MAX);
    if ts.partial_cmp(&0.0) == Some(std::cmp::Ordering::Greater) {
        ts
    } else {
        // all-zero tensor (or amax so tiny the scale underflows: everything rounds to 0)
        1.0
    }
}

/// Quantizes one block of 16 values; returns the E4M3 scale code.
fn quantize_block(xs: &[f32], ts: f32, out: &mut [u8], rule: ScaleRule) -> u8 {
    let (code, d) = block_scale(xs, ts, rule);
    let mut codes = [0u8; NVFP4_BLOCK];
    encode_block(xs, d, &mut codes);
    pack_codes(&codes, out);
    code
}

impl Nvfp4Matrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix. The tensor scale is
    /// `amax / (6·448)` (1.0 for an all-zero tensor). Errors if `cols % 16 != 0`, on a
    /// length mismatch, or if `w` holds NaN/±inf ([`QuantError::NonFinite`]).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        rule: ScaleRule,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(NVFP4_BLOCK) {
            return Err(QuantError::BlockAlignment {
                format: "nvfp4",
                cols,
                block: NVFP4_BLOCK,
            });
        }
        check_len("nvfp4 weights", rows * cols, w.len())?;
        check_finite(w)?;
        let tensor_scale = tensor_scale_for(w);
        let mut packed = vec![0u8; rows * cols / 2];
        let mut scales = vec![0u8; rows * cols / NVFP4_BLOCK];
        packed
            .par_chunks_mut(NVFP4_BLOCK / 2)
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks(NVFP4_BLOCK))
            .with_min_len(256)
            .for_each(|((out, s), xs)| *s = quantize_block(xs, tensor_scale, out, rule));
        Ok(Self {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        })
    }

    /// Wraps checkpoint tensors (`weight`, `weight_scale`, `weight_scale_2`). Validates
    /// sizes, rejects NaN E4M3 scales (0x7f/0xff) and a non-finite tensor scale.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        packed: Vec<u8>,
        scales: Vec<u8>,
        tensor_scale: f32,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(NVFP4_BLOCK) {
            return Err(QuantError::BlockAlignment {
                format: "nvfp4",
                cols,
                block: NVFP4_BLOCK,
            });
        }
        check_len("nvfp4 packed", rows * cols / 2, packed.len())?;
        check_len("nvfp4 scales", rows * cols / NVFP4_BLOCK, scales.len())?;
        if let Some(index) = scales.iter().position(|&s| s & 0x7f == 0x7f) {
            return Err(QuantError::NanEncoding {
                what: "nvfp4 scales",
                index,
                byte: scales[index],
            });
        }
        if !tensor_scale.is_finite() {
            return Err(QuantError::TensorScale(tensor_scale));
        }
        Ok(Self {
            rows,
            cols,
            packed,
            scales,
            tensor_scale,
        })
    }

    /// Dequantizes the whole matrix to row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        fp4::dequantize(self)
    }

    /// Dequantizes row `r` into `out[..cols]`. Panics if `r >= rows` or `out` is too short.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        fp4::dequantize_row(self, r, out)
    }

    /// `y[n, rows] = x[n, cols] · Wᵀ` (row-major), dequantizing in registers (pairs of
    /// 16-element blocks per AVX2 step), reusing each decoded block for all `n` rows of
    /// `x`; rayon over chunks of output rows.
    ///
    /// # Panics
    /// If `x.len() < n * cols` or `y.len() < n * rows`.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) {
        self.matmul_impl(x, n, y, use_avx2());
    }

    pub(crate) fn matmul_impl(&self, x: &[f32], n: usize, y: &mut [f32], simd: bool) {
        fp4::matmul(self, x, n, y, simd)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2_rows(&self, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]) {
        use super::kernels::avx2::{
            decode_fp4x16, decode_fp4x32, fma_block2, fma_block4, fp4_lut, rows_x32, store,
        };
        use std::arch::x86_64::*;
        let (cols, nb) = (self.cols, self.cols / NVFP4_BLOCK);
        let lut = fp4_lut();
        let half_ts = 0.5 * self.tensor_scale; // decoded values are 2× E2M1
        let one = _mm256_set1_ps(1.0);
        if nb % 2 == 0 {
            let (bp, sp) = (self.packed.as_ptr(), self.scales.as_ptr());
            rows_x32(r0, r1, nb / 2, cols, xs, nn, out, |r, k| {
                let b = r * nb + 2 * k;
                let w = decode_fp4x32(bp.add(b * 8), lut);
                let sa = _mm256_set1_ps(e4m3_decode(*sp.add(b)) * half_ts);
                let sb = _mm256_set1_ps(e4m3_decode(*sp.add(b + 1)) * half_ts);
                (
                    [
                        _mm256_mul_ps(w[0], sa),
                        _mm256_mul_ps(w[1], sa),
                        _mm256_mul_ps(w[2], sb),
                        _mm256_mul_ps(w[3], sb),
                    ],
                    one,
                )
            });
            return;
        }
        for r in r0..r1 {
            let mut acc = [_mm256_setzero_ps(); MAX_N];
            let bp = self.packed.as_ptr().add(r * nb * 8);
            let sp = &self.scales[r * nb..(r + 1) * nb];
            let mut b = 0;
            while b + 2 <= nb {
                let mut w = decode_fp4x32(bp.add(b * 8), lut);
                let sa = _mm256_set1_ps(e4m3_decode(sp[b]) * half_ts);
                let sb = _mm256_set1_ps(e4m3_decode(sp[b + 1]) * half_ts);
                w = [
                    _mm256_mul_ps(w[0], sa),
                    _mm256_mul_ps(w[1], sa),
                    _mm256_mul_ps(w[2], sb),
                    _mm256_mul_ps(w[3], sb),
                ];
                fma_block4(
                    &w,
                    one,
                    xs.as_ptr().add(b * NVFP4_BLOCK),
                    cols,
                    nn,
                    &mut acc,
                );
                b += 2;
            }
            if b < nb {
                let w = decode_fp4x16(bp.add(b * 8), lut);
                let sv = _mm256_set1_ps(e4m3_decode(sp[b]) * half_ts);
                fma_block2(&w, sv, xs.as_ptr().add(b * NVFP4_BLOCK), cols, nn, &mut acc);
            }
            store(&acc, nn, &mut out[(r - r0) * MAX_N..]);
        }
    }

    /// Storage size in bytes (codes + block scales + the f32 tensor scale).
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.scales.len() + 4
    }
}

impl Fp4Matrix for Nvfp4Matrix {
    const BLOCK: usize = NVFP4_BLOCK;
    const NAME: &'static str = "Nvfp4Matrix";
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn codes(&self) -> &[u8] {
        &self.packed
    }
    fn scale_codes(&self) -> &[u8] {
        &self.scales
    }
    fn block_mul(&self, k: usize) -> f32 {
        e4m3_decode(self.scales[k]) * self.tensor_scale
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn chunk_avx2(&self, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]) {
        // SAFETY: the trait's contract (AVX2/FMA/F16C present, fields consistent)
        unsafe { self.avx2_rows(r0, r1, xs, nn, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::e2m1::assert_elem_bound;
    use crate::quant::testutil::{check_matmul, normal, rmse};
    use proptest::prelude::*;

    fn check_bounds(w: &[f32], q: &Nvfp4Matrix) {
        let d = q.dequantize();
        for (k, (&x, &y)) in w.iter().zip(&d).enumerate() {
            assert_elem_bound(
                x,
                y,
                e4m3_decode(q.scales[k / NVFP4_BLOCK]) * q.tensor_scale,
            );
        }
    }

    #[test]
    fn modelopt_packing_hand_built() {
        // packed = (odd << 4) | even; value = e2m1 · e4m3(scale) · weight_scale_2
        let mut packed = vec![0u8; 16];
        packed[0] = 0x21; // e0 = 0.5, e1 = 1.0
        packed[7] = 0xf7; // e14 = 6, e15 = -6
        packed[8] = 0x0b; // e16 = -1.5 (second block)
        let scales = vec![0x40, 0x30]; // e4m3: 2.0, 0.5
        let m = Nvfp4Matrix::from_parts(1, 32, packed.clone(), scales.clone(), 0.25).unwrap();
        let d = m.dequantize();
        assert_eq!(&d[..2], &[0.25, 0.5]);
        assert_eq!(&d[14..17], &[3.0, -3.0, -0.1875]);
        assert!(d[2..14].iter().chain(&d[17..]).all(|&v| v == 0.0));
    }

    #[test]
    fn spec_scales_follow_nvidia_rule() {
        let w = normal(8 * 64, 3);
        let q = Nvfp4Matrix::quantize(&w, 8, 64, ScaleRule::Spec).unwrap();
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.tensor_scale, amax / (6.0 * 448.0));
        for (b, xs) in w.chunks(16).enumerate() {
            let ab = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.scales[b], e4m3_encode_rne(ab / (6.0 * q.tensor_scale)));
        }
        // the block holding the tensor amax gets the top E4M3 code
        assert!(q.scales.contains(&MAX_E4M3));
        check_bounds(&w, &q);
    }

    #[test]
    fn zero_exact_and_saturation_edges() {
        // all-zero tensor
        let z = vec![0f32; 32];
        let q = Nvfp4Matrix::quantize(&z, 1, 32, ScaleRule::Spec).unwrap();
        assert_eq!((q.tensor_scale, q.scales.clone()), (1.0, vec![ONE_E4M3; 2]));
        assert_eq!(q.dequantize(), z);
        // zero block inside a non-zero tensor, and a block at exactly 6·448·ts
        let mut w = vec![0f32; 32];
        for (k, v) in w[16..].iter_mut().enumerate() {
            *v = crate::quant::e2m1_decode(k as u8) * 448.0;
        }
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let q = Nvfp4Matrix::quantize(&w, 1, 32, rule).unwrap();
            assert_eq!(q.tensor_scale, 1.0);
            assert_eq!(q.scales, vec![ONE_E4M3, MAX_E4M3]);
            assert_eq!(q.dequantize(), w);
        }
        // E4M3 rounding of the block scale can push scaled values past 6: they saturate
        let mut w = vec![0.0f32; 16];
        w[0] = 6.36; // ts = 1 (fixed by the next block): scale e4m3(1.06) = 1.0, 6.36 -> 6
        w.extend(std::iter::repeat_n(2688.0, 16));
        let q = Nvfp4Matrix::quantize(&w, 1, 32, ScaleRule::Spec).unwrap();
        assert_eq!(q.scales[0], ONE_E4M3);
        assert_eq!(q.dequantize()[0], 6.0);
        check_bounds(&w, &q);
    }

    #[test]
    fn subnormal_block_scales() {
        // a block ~1e-5 of the tensor amax needs a subnormal E4M3 scale; below 2^-10 it
        // would underflow and is clamped to the smallest subnormal code 0x01
        let mut w = normal(64, 5);
        for v in &mut w[16..32] {
            *v *= 1e-5;
        }
        for v in &mut w[32..48] {
            *v *= 1e-9;
        }
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let q = Nvfp4Matrix::quantize(&w, 1, 64, rule).unwrap();
            assert!(
                q.scales[1] < 0x08,
                "expected subnormal scale, got {:#x}",
                q.scales[1]
            );
            assert_eq!(q.scales[2], 0x01);
            check_bounds(&w, &q);
        }
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = vec![1f32; 32];
        w[3] = f32::INFINITY;
        assert!(matches!(
            Nvfp4Matrix::quantize(&w, 1, 32, ScaleRule::Spec),
            Err(QuantError::NonFinite { index: 3, .. })
        ));
        w[3] = f32::NAN;
        assert!(matches!(
            Nvfp4Matrix::quantize(&w, 1, 32, ScaleRule::MseSearch),
            Err(QuantError::NonFinite { index: 3, .. })
        ));
        assert!(matches!(
            Nvfp4Matrix::quantize(&w[..24], 1, 24, ScaleRule::Spec),
            Err(QuantError::BlockAlignment { .. })
        ));
        assert!(matches!(
            Nvfp4Matrix::from_parts(1, 32, vec![0; 15], vec![0x38; 2], 1.0),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Nvfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0x38; 3], 1.0),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Nvfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0x38, 0xff], 1.0),
            Err(QuantError::NanEncoding { index: 1, .. })
        ));
        assert!(matches!(
            Nvfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0x38; 2], f32::NAN),
            Err(QuantError::TensorScale(_))
        ));
        let m = Nvfp4Matrix::from_parts(1, 32, vec![0; 16], vec![0x38; 2], 1.0).unwrap();
        assert_eq!(m.bytes(), 16 + 2 + 4);
    }

    #[test]
    fn error_bound_and_rmse_on_normal_data() {
        let (rows, cols) = (64, 1024);
        let w = normal(rows * cols, 11);
        let spec = Nvfp4Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
        let mse = Nvfp4Matrix::quantize(&w, rows, cols, ScaleRule::MseSearch).unwrap();
        check_bounds(&w, &spec);
        check_bounds(&w, &mse);
        let (e_spec, e_mse) = (rmse(&w, &spec.dequantize()), rmse(&w, &mse.dequantize()));
        println!("nvfp4 RMSE on N(0,1): spec {e_spec:.5}, mse-search {e_mse:.5}");
        assert!(e_mse <= e_spec);
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        for &(rows, cols) in &[(37, 96), (130, 256), (5, 48), (2, 16)] {
            let w = normal(rows * cols, rows as u64 + 1);
            let q = Nvfp4Matrix::quantize(&w, rows, cols, ScaleRule::MseSearch).unwrap();
            let wd = q.dequantize();
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul(x, n, y));
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul_impl(x, n, y, false));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn mse_search_never_worse_per_block(
            v in proptest::collection::vec(-1000f32..1000f32, 64),
            scale_pow in -20i32..20,
        ) {
            let w: Vec<f32> = v.iter().map(|x| x * 2f32.powi(scale_pow)).collect();
            let a = Nvfp4Matrix::quantize(&w, 2, 32, ScaleRule::Spec).unwrap();
            let b = Nvfp4Matrix::quantize(&w, 2, 32, ScaleRule::MseSearch).unwrap();
            prop_assert_eq!(a.tensor_scale, b.tensor_scale);
            let (da, db) = (a.dequantize(), b.dequantize());
            for k in 0..4 {
                let sse = |d: &[f32]| (k * 16..k * 16 + 16).map(|j| ((w[j] - d[j]) as f64).powi(2)).sum::<f64>();
                prop_assert!(sse(&db) <= sse(&da) * (1.0 + 1e-6) + 1e-30);
            }
        }
    }
}
