//! MXFP4 (OCP Microscaling): E2M1 elements, blocks of 32 along the columns, one
//! E8M0 power-of-two scale per block. Storage follows gpt-oss checkpoints:
//! `blocks` = `[rows, cols/32, 16]` bytes, low nibble = even element; `scales` = `[rows, cols/32]`.

use rayon::prelude::*;

use super::e2m1::{block_sse, encode_block, pack_codes};
use super::fp4::{self, Fp4Matrix};
use super::e4m3::{e8m0_decode, e8m0_encode_exp, e8m0_floor_log2, E8M0_NAN};
use super::kernels::use_avx2;
use super::{check_finite, check_len, QuantError, ScaleRule};

/// Elements per MXFP4 block.
pub const MXFP4_BLOCK: usize = 32;
/// Scale byte used for all-zero blocks (2^0; avoids f32 subnormal scales).
const ZERO_BLOCK_SCALE: u8 = 127;

const fn build_e8m0_half() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut s = 0usize;
    while s < 255 {
        // 2^(s-128): bit patterns for normals, explicit subnormals for s = 0, 1
        t[s] = match s {
            0 => f32::from_bits(1 << 21),
            1 => f32::from_bits(1 << 22),
            _ => f32::from_bits(((s - 1) as u32) << 23),
        };
        s += 1;
    }
    t[255] = f32::NAN;
    t
}

/// Half of every E8M0 scale (`2^(s-128)`), for the kernels' doubled E2M1 values.
static E8M0_HALF: [f32; 256] = build_e8m0_half();

/// An MXFP4-quantized `[rows, cols]` matrix (gpt-oss layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Mxfp4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 2` bytes, `[rows, cols/32, 16]`, low nibble = even element.
    pub blocks: Vec<u8>,
    /// `rows * cols / 32` E8M0 scales, `[rows, cols/32]`.
    pub scales: Vec<u8>,
}

/// Picks the E8M0 exponent for one block.
///
/// Spec (OCP MX v1.0): `floor(log2(amax)) - emax_elem` with emax_elem = 2 for E2M1;
/// elements above 6·2^e then saturate. MseSearch also tries e+1 (no saturation) and
/// e-1 (finer grid) and keeps the lowest squared error, preferring the spec exponent on ties.
fn choose_exp(xs: &[f32], amax: f32, rule: ScaleRule) -> i32 {
    let e = (e8m0_floor_log2(amax) - 2).clamp(-127, 127);
    match rule {
        ScaleRule::Spec => e,
        ScaleRule::MseSearch => {
            let mut best = (block_sse(xs, e8m0_decode(e8m0_encode_exp(e))), e);
            for cand in [e + 1, e - 1] {
                if !(-127..=127).contains(&cand) {
                    continue;
                }
                let sse = block_sse(xs, e8m0_decode(e8m0_encode_exp(cand)));
                if sse < best.0 {
                    best = (sse, cand);
                }
            }
            best.1
        }
    }
}

/// The E8M0 scale byte of one block and its value (`ZERO_BLOCK_SCALE` for all-zero blocks).
pub(crate) fn block_scale(xs: &[f32], rule: ScaleRule) -> (u8, f32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = if amax == 0.0 { ZERO_BLOCK_SCALE } else { e8m0_encode_exp(choose_exp(xs, amax, rule)) };
    (s, e8m0_decode(s))
}

/// Quantizes one block of 32 values into 16 packed bytes; returns the E8M0 scale byte.
fn quantize_block(xs: &[f32], out: &mut [u8], rule: ScaleRule) -> u8 {
    let (s, d) = block_scale(xs, rule);
    let mut codes = [0u8; MXFP4_BLOCK];
    encode_block(xs, d, &mut codes);
    pack_codes(&codes, out);
    s
}

impl Mxfp4Matrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix. Errors if `cols % 32 != 0`, if
    /// `w.len() != rows*cols`, or if `w` holds NaN/±inf ([`QuantError::NonFinite`]).
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        rule: ScaleRule,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(MXFP4_BLOCK) {
            return Err(QuantError::BlockAlignment {
                format: "mxfp4",
                cols,
                block: MXFP4_BLOCK,
            });
        }
        check_len("mxfp4 weights", rows * cols, w.len())?;
        check_finite(w)?;
        let mut blocks = vec![0u8; rows * cols / 2];
        let mut scales = vec![0u8; rows * cols / MXFP4_BLOCK];
        blocks
            .par_chunks_mut(MXFP4_BLOCK / 2)
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks(MXFP4_BLOCK))
            .with_min_len(256)
            .for_each(|((out, s), xs)| *s = quantize_block(xs, out, rule));
        Ok(Self {
            rows,
            cols,
            blocks,
            scales,
        })
    }

    /// Wraps checkpoint tensors (e.g. one expert's `*_blocks` / `*_scales` slices).
    /// Validates alignment and sizes and rejects NaN scales (0xff).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        blocks: Vec<u8>,
        scales: Vec<u8>,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(MXFP4_BLOCK) {
            return Err(QuantError::BlockAlignment {
                format: "mxfp4",
                cols,
                block: MXFP4_BLOCK,
            });
        }
        check_len("mxfp4 blocks", rows * cols / 2, blocks.len())?;
        check_len("mxfp4 scales", rows * cols / MXFP4_BLOCK, scales.len())?;
        if let Some(index) = scales.iter().position(|&s| s == E8M0_NAN) {
            return Err(QuantError::NanEncoding {
                what: "mxfp4 scales",
                index,
                byte: E8M0_NAN,
            });
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            scales,
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

    /// `y[n, rows] = x[n, cols] · Wᵀ` (row-major), dequantizing 32-element blocks in
    /// registers (AVX2 `pshufb` LUT when available, scalar LUT otherwise), each decoded
    /// block reused for all `n` rows of `x`; rayon over chunks of output rows.
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
        use super::kernels::avx2::{decode_fp4x32, fp4_lut, rows_x32};
        use std::arch::x86_64::*;
        let nb = self.cols / MXFP4_BLOCK;
        let lut = fp4_lut();
        let bp = self.blocks.as_ptr();
        let sp = self.scales.as_ptr();
        rows_x32(r0, r1, nb, self.cols, xs, nn, out, |r, b| {
            let k = r * nb + b;
            // decoded values are 2× E2M1: the table holds 2^(s-127) / 2
            (
                decode_fp4x32(bp.add(k * 16), lut),
                _mm256_set1_ps(E8M0_HALF[*sp.add(k) as usize]),
            )
        });
    }

    /// Storage size in bytes (codes + scales).
    pub fn bytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }
}

impl Fp4Matrix for Mxfp4Matrix {
    const BLOCK: usize = MXFP4_BLOCK;
    const NAME: &'static str = "Mxfp4Matrix";
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn codes(&self) -> &[u8] {
        &self.blocks
    }
    fn scale_codes(&self) -> &[u8] {
        &self.scales
    }
    fn block_mul(&self, k: usize) -> f32 {
        e8m0_decode(self.scales[k])
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

    fn check_bounds(w: &[f32], q: &Mxfp4Matrix) {
        let d = q.dequantize();
        for (k, (&x, &y)) in w.iter().zip(&d).enumerate() {
            assert_elem_bound(x, y, e8m0_decode(q.scales[k / MXFP4_BLOCK]));
        }
    }

    #[test]
    fn gpt_oss_packing_hand_built() {
        // element 2k -> low nibble, 2k+1 -> high nibble; scale byte 128 = 2.0
        let mut blocks = vec![0u8; 16];
        blocks[0] = 0x21; // e0 = code 1 (0.5), e1 = code 2 (1.0)
        blocks[1] = 0xf7; // e2 = code 7 (6.0), e3 = code 15 (-6.0)
        blocks[15] = 0x9c; // e30 = code 12 (-2.0), e31 = code 9 (-0.5)
        let m = Mxfp4Matrix::from_parts(1, 32, blocks.clone(), vec![128]).unwrap();
        let d = m.dequantize();
        assert_eq!(&d[..4], &[1.0, 2.0, 12.0, -12.0]);
        assert_eq!(&d[30..], &[-4.0, -1.0]);
        assert!(d[4..30].iter().all(|&v| v == 0.0));
        // and quantize reproduces the exact bytes (amax 12 -> floor(log2) 3 -> e = 1)
        let q = Mxfp4Matrix::quantize(&d, 1, 32, ScaleRule::Spec).unwrap();
        assert_eq!(q.scales, vec![128]);
        assert_eq!(q.blocks, blocks);
    }

    #[test]
    fn e8m0_half_table() {
        for s in 0u8..255 {
            assert_eq!(E8M0_HALF[s as usize], e8m0_decode(s) * 0.5, "s = {s}");
        }
    }

    #[test]
    fn zero_block_and_exact_max() {
        let mut w = vec![0f32; 64];
        // second block: max 6·2^10 and on-grid values -> exact
        for (k, v) in w[32..].iter_mut().enumerate() {
            *v = crate::quant::e2m1_decode(k as u8 % 16) * 1024.0;
        }
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let q = Mxfp4Matrix::quantize(&w, 1, 64, rule).unwrap();
            assert_eq!(q.scales[0], 127);
            assert!(q.blocks[..16].iter().all(|&b| b == 0));
            assert_eq!(q.scales[1], 127 + 10);
            assert_eq!(q.dequantize(), w);
        }
    }

    #[test]
    fn saturation_beyond_max() {
        // amax 7.9 -> spec exponent 0, so 7.9 saturates to 6
        let mut w = vec![0.1f32; 32];
        w[5] = 7.9;
        w[6] = -7.0;
        let q = Mxfp4Matrix::quantize(&w, 1, 32, ScaleRule::Spec).unwrap();
        assert_eq!(q.scales[0], 127);
        let d = q.dequantize();
        assert_eq!((d[5], d[6]), (6.0, -6.0));
        check_bounds(&w, &q);
        // MSE search prefers e+1 here (scale 2: 7.9 -> 8, -7 -> -8)
        let m = Mxfp4Matrix::quantize(&w, 1, 32, ScaleRule::MseSearch).unwrap();
        assert_eq!(m.scales[0], 128);
        // near f32::MAX: no overflow
        let big = vec![3.0e38f32; 32];
        let q = Mxfp4Matrix::quantize(&big, 1, 32, ScaleRule::Spec).unwrap();
        assert!(q.dequantize().iter().all(|v| v.is_finite() && *v > 1e38));
    }

    #[test]
    fn subnormal_range() {
        let w: Vec<f32> = (0..64).map(|k| (k as f32 - 31.5) * 1e-40).collect();
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let q = Mxfp4Matrix::quantize(&w, 1, 64, rule).unwrap();
            check_bounds(&w, &q);
        }
        // values of order 2^-120 use an exponent below the E8M0 range minimum: clamps to -127
        let tiny = vec![f32::from_bits(1); 32];
        let q = Mxfp4Matrix::quantize(&tiny, 1, 32, ScaleRule::Spec).unwrap();
        assert_eq!(q.scales[0], 0);
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = vec![1f32; 64];
        w[40] = f32::NAN;
        assert!(matches!(
            Mxfp4Matrix::quantize(&w, 1, 64, ScaleRule::Spec),
            Err(QuantError::NonFinite { index: 40, .. })
        ));
        w[40] = f32::NEG_INFINITY;
        assert!(matches!(
            Mxfp4Matrix::quantize(&w, 1, 64, ScaleRule::MseSearch),
            Err(QuantError::NonFinite { .. })
        ));
        assert!(matches!(
            Mxfp4Matrix::quantize(&w[..48], 1, 48, ScaleRule::Spec),
            Err(QuantError::BlockAlignment { .. })
        ));
        assert!(matches!(
            Mxfp4Matrix::quantize(&w, 2, 64, ScaleRule::Spec),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Mxfp4Matrix::from_parts(2, 64, vec![0; 63], vec![127; 4]),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![127; 3]),
            Err(QuantError::Length { .. })
        ));
        assert!(matches!(
            Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![127, 127, 255, 127]),
            Err(QuantError::NanEncoding { index: 2, .. })
        ));
        let m = Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![127; 4]).unwrap();
        assert_eq!(m.bytes(), 68);
    }

    #[test]
    #[should_panic(expected = "inconsistent")]
    fn matmul_rejects_tampered_fields() {
        let mut m = Mxfp4Matrix::from_parts(2, 64, vec![0; 64], vec![127; 4]).unwrap();
        m.blocks.truncate(10); // public fields: the kernels must not trust them blindly
        let mut y = [0f32; 2];
        m.matmul(&[0f32; 64], 1, &mut y);
    }

    #[test]
    fn error_bound_and_rmse_on_normal_data() {
        let (rows, cols) = (64, 1024);
        let w = normal(rows * cols, 7);
        let spec = Mxfp4Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
        let mse = Mxfp4Matrix::quantize(&w, rows, cols, ScaleRule::MseSearch).unwrap();
        check_bounds(&w, &spec);
        check_bounds(&w, &mse);
        let (e_spec, e_mse) = (rmse(&w, &spec.dequantize()), rmse(&w, &mse.dequantize()));
        println!("mxfp4 RMSE on N(0,1): spec {e_spec:.5}, mse-search {e_mse:.5}");
        assert!(e_mse <= e_spec);
    }

    #[test]
    fn matmul_matches_dequantized_reference() {
        for &(rows, cols) in &[(37, 96), (130, 256), (3, 32)] {
            let w = normal(rows * cols, rows as u64);
            let q = Mxfp4Matrix::quantize(&w, rows, cols, ScaleRule::MseSearch).unwrap();
            let wd = q.dequantize();
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul(x, n, y));
            check_matmul(&wd, rows, cols, |x, n, y| q.matmul_impl(x, n, y, false));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn mse_search_never_worse_per_block(
            v in proptest::collection::vec(-1000f32..1000f32, 32),
            scale_pow in -30i32..30,
        ) {
            let w: Vec<f32> = v.iter().map(|x| x * 2f32.powi(scale_pow)).collect();
            let a = Mxfp4Matrix::quantize(&w, 1, 32, ScaleRule::Spec).unwrap().dequantize();
            let b = Mxfp4Matrix::quantize(&w, 1, 32, ScaleRule::MseSearch).unwrap().dequantize();
            let sse = |d: &[f32]| w.iter().zip(d).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
            prop_assert!(sse(&b) <= sse(&a) * (1.0 + 1e-6));
        }
    }
}
