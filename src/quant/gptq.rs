//! GPTQ for FP4 weights (Frantar et al. 2022, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers"), with the MXFP4 / NVFP4 block
//! scales chosen on the fly.
//!
//! A linear `y = x·Wᵀ` is quantized to minimise its output error on calibration inputs
//! `X` (`[n, cols]`): `‖X Wᵀ − X Ŵᵀ‖² = Σ_rows (w − ŵ) H (w − ŵ)ᵀ` with `H = XᵀX`.
//! Columns are quantized left to right; each column's rounding error is spread over the
//! columns not yet quantized through the upper Cholesky factor `U` of `H⁻¹`
//! (`H⁻¹ = UᵀU`): `w[k] -= (w[j] − ŵ[j]) / U[j,j] · U[j,k]` for every `k > j`.
//! A block's scale is chosen when its first column is reached, from the block's values
//! *after* the updates of the earlier columns, so the scale fits what is rounded.
//!
//! As in the reference implementation, `H` gets a fraction (1% by default) of its mean
//! diagonal added (dampening) and columns never excited (`H[j,j] = 0`) are zeroed.
//! Rows are independent given `U`; they are processed in tiles (so `U` is streamed once
//! per tile, not once per row), tiles in parallel.

use rayon::prelude::*;

use super::e2m1::{e2m1_decode, e2m1_encode_rne, pack_codes};
use super::kernels::matmul_f32;
use super::mxfp4::{self, MXFP4_BLOCK};
use super::nvfp4::{self, NVFP4_BLOCK};
use super::{check_finite, check_len, Mxfp4Matrix, Nvfp4Matrix, QuantError, ScaleRule};

/// The reference implementation's dampening: 1% of the mean diagonal of `H`.
pub const DEFAULT_DAMP: f64 = 0.01;
/// Rows quantized together while one row of `U` is in cache.
const ROW_TILE: usize = 16;

/// `H = Σ xᵀx` over calibration rows `x` (the inputs of one linear), f64 accumulation.
#[derive(Debug, Clone, PartialEq)]
pub struct Hessian {
    pub dim: usize,
    /// Row-major `[dim, dim]`.
    pub data: Vec<f64>,
    /// Number of rows accumulated.
    pub samples: usize,
}

impl Hessian {
    pub fn new(dim: usize) -> Self {
        Self { dim, data: vec![0.0; dim * dim], samples: 0 }
    }

    /// Adds the `n` rows of the row-major `[n, dim]` batch `x`.
    ///
    /// # Panics
    /// If `x.len() < n * dim` (caller contract: the backend's own activations).
    pub fn add_batch(&mut self, x: &[f32], n: usize) {
        let d = self.dim;
        assert!(x.len() >= n * d, "Hessian::add_batch: {} values for {n} rows of {d}", x.len());
        if n == 0 {
            return;
        }
        // xt = Xᵀ ([d, n]); then XᵀX = xt · xtᵀ with the f32 matmul kernel.
        let mut xt = vec![0f32; d * n];
        for (t, row) in x[..n * d].chunks_exact(d).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                xt[i * n + t] = v;
            }
        }
        let mut g = vec![0f32; d * d];
        matmul_f32(&xt, d, n, &xt, d, &mut g);
        for (h, v) in self.data.iter_mut().zip(&g) {
            *h += *v as f64;
        }
        self.samples += n;
    }
}

/// What GPTQ needs from a Hessian: `U` (upper Cholesky factor of the dampened `H⁻¹`)
/// and the columns that no calibration input excited.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    pub dim: usize,
    /// Row-major `[dim, dim]`, upper triangular.
    u: Vec<f32>,
    dead: Vec<bool>,
}

/// Dot product with four accumulators (lets the compiler vectorise).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

impl GptqFactor {
    /// Dampens `h` by `damp · mean(diag)` and factors it.
    ///
    /// `U` comes from the order-reversed problem: with `P` the reversal permutation and
    /// `P H P = L Lᵀ`, `H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P)` and `P L⁻¹ P` is upper triangular with
    /// a positive diagonal, i.e. exactly the upper Cholesky factor of `H⁻¹` (one
    /// factorisation and one triangular inverse instead of three factorisations).
    pub fn from_hessian(h: &Hessian, damp: f64) -> Result<Self, QuantError> {
        let d = h.dim;
        check_len("hessian", d * d, h.data.len())?;
        let mut r = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                r[i * d + j] = h.data[(d - 1 - i) * d + (d - 1 - j)];
            }
        }
        let dead: Vec<bool> = (0..d).map(|i| h.data[i * d + i] == 0.0).collect();
        let mean_diag = (0..d).map(|i| h.data[i * d + i]).sum::<f64>() / d.max(1) as f64;
        let lambda = damp * mean_diag;
        for i in 0..d {
            let rev = d - 1 - i;
            if dead[rev] {
                r[i * d + i] = 1.0;
            }
            r[i * d + i] += lambda;
        }
        // In-place lower Cholesky factor of r (row-major, dot products of row prefixes).
        for j in 0..d {
            let (head, tail) = r.split_at_mut(j * d);
            let row_j = &mut tail[..d];
            for k in 0..j {
                let s = row_j[k] - dot(&head[k * d..k * d + k], &row_j[..k]);
                row_j[k] = s / head[k * d + k];
            }
            let s = row_j[j] - dot(&row_j[..j], &row_j[..j]);
            if !(s > 0.0 && s.is_finite()) {
                return Err(QuantError::NotPositiveDefinite { column: d - 1 - j });
            }
            row_j[j] = s.sqrt();
        }
        // Row-wise inverse of the lower factor: inv[i] = (e_i − Σ_{k<i} L[i,k] inv[k]) / L[i,i].
        let mut inv = vec![0f64; d * d];
        for i in 0..d {
            let (done, rest) = inv.split_at_mut(i * d);
            let row = &mut rest[..d];
            row[i] = 1.0;
            for k in 0..i {
                let l = r[i * d + k];
                if l != 0.0 {
                    for (o, v) in row[..=k].iter_mut().zip(&done[k * d..k * d + k + 1]) {
                        *o -= l * v;
                    }
                }
            }
            let diag = r[i * d + i];
            for o in &mut row[..=i] {
                *o /= diag;
            }
        }
        let mut u = vec![0f32; d * d];
        for i in 0..d {
            for j in i..d {
                u[i * d + j] = inv[(d - 1 - i) * d + (d - 1 - j)] as f32;
            }
        }
        Ok(Self { dim: d, u, dead })
    }
}

/// Codes (unpacked, one per element) and per-block scale bytes of a GPTQ pass.
struct GptqCodes {
    codes: Vec<u8>,
    scales: Vec<u8>,
}

/// The column-by-column GPTQ pass; `scale(block values)` returns (scale byte, scale value).
fn gptq_pass<S>(w: &[f32], rows: usize, cols: usize, f: &GptqFactor, block: usize, scale: S) -> GptqCodes
where
    S: Fn(&[f32]) -> (u8, f32) + Sync,
{
    let nb = cols / block;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0u8; rows * nb];
    let u = &f.u;
    codes
        .par_chunks_mut(ROW_TILE * cols)
        .zip(scales.par_chunks_mut(ROW_TILE * nb))
        .zip(w.par_chunks(ROW_TILE * cols))
        .for_each(|((codes, scales), w)| {
            let tile = w.len() / cols;
            let mut wt = w.to_vec();
            for row in wt.chunks_exact_mut(cols) {
                for (v, &dead) in row.iter_mut().zip(&f.dead) {
                    if dead {
                        *v = 0.0;
                    }
                }
            }
            let mut d = vec![0f32; tile];
            for b in 0..nb {
                let j0 = b * block;
                for r in 0..tile {
                    let (s, dv) = scale(&wt[r * cols + j0..r * cols + j0 + block]);
                    scales[r * nb + b] = s;
                    d[r] = dv;
                }
                for j in j0..j0 + block {
                    let ujj = u[j * cols + j];
                    let urow = &u[j * cols + j + 1..(j + 1) * cols];
                    for r in 0..tile {
                        let row = &mut wt[r * cols..(r + 1) * cols];
                        let x = row[j];
                        let c = e2m1_encode_rne(x / d[r]);
                        codes[r * cols + j] = c;
                        let e = (x - e2m1_decode(c) * d[r]) / ujj;
                        if e != 0.0 {
                            for (v, &uk) in row[j + 1..].iter_mut().zip(urow) {
                                *v -= e * uk;
                            }
                        }
                    }
                }
            }
        });
    GptqCodes { codes, scales }
}

fn check_inputs(w: &[f32], rows: usize, cols: usize, f: &GptqFactor, format: &'static str, block: usize) -> Result<(), QuantError> {
    if !cols.is_multiple_of(block) {
        return Err(QuantError::BlockAlignment { format, cols, block });
    }
    check_len("gptq weights", rows * cols, w.len())?;
    check_len("gptq hessian dim", cols, f.dim)?;
    check_finite(w)
}

fn pack(codes: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; codes.len() / 2];
    pack_codes(codes, &mut out);
    out
}

/// GPTQ into MXFP4 (block scales by `rule` on the error-compensated values).
pub fn gptq_mxfp4(w: &[f32], rows: usize, cols: usize, f: &GptqFactor, rule: ScaleRule) -> Result<Mxfp4Matrix, QuantError> {
    check_inputs(w, rows, cols, f, "mxfp4", MXFP4_BLOCK)?;
    let q = gptq_pass(w, rows, cols, f, MXFP4_BLOCK, |xs| mxfp4::block_scale(xs, rule));
    Mxfp4Matrix::from_parts(rows, cols, pack(&q.codes), q.scales)
}

/// GPTQ into NVFP4; the tensor scale is the spec one of the original weights.
pub fn gptq_nvfp4(w: &[f32], rows: usize, cols: usize, f: &GptqFactor, rule: ScaleRule) -> Result<Nvfp4Matrix, QuantError> {
    check_inputs(w, rows, cols, f, "nvfp4", NVFP4_BLOCK)?;
    let ts = nvfp4::tensor_scale_for(w);
    let q = gptq_pass(w, rows, cols, f, NVFP4_BLOCK, |xs| nvfp4::block_scale(xs, ts, rule));
    Nvfp4Matrix::from_parts(rows, cols, pack(&q.codes), q.scales, ts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::normal;

    /// Correlated inputs: x = z·A with a random mixing matrix plus a shared component.
    fn correlated(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let z = normal(n * d, seed);
        let a = normal(d * d, seed + 1);
        let common = normal(n, seed + 2);
        let mut x = vec![0f32; n * d];
        for t in 0..n {
            for j in 0..d {
                let mut s = 2.0 * common[t];
                for k in 0..d {
                    s += z[t * d + k] * a[k * d + j] * 0.3;
                }
                // uneven column magnitudes, as in real activations
                x[t * d + j] = s * (1.0 + (j % 7) as f32);
            }
        }
        x
    }

    fn hessian(x: &[f32], n: usize, d: usize) -> Hessian {
        let mut h = Hessian::new(d);
        h.add_batch(x, n);
        h
    }

    /// ‖X Wᵀ − X Ŵᵀ‖² in f64.
    fn output_error(x: &[f32], n: usize, w: &[f32], wq: &[f32], rows: usize, cols: usize) -> f64 {
        let mut s = 0f64;
        for t in 0..n {
            for r in 0..rows {
                let e: f64 = (0..cols).map(|c| x[t * cols + c] as f64 * (w[r * cols + c] - wq[r * cols + c]) as f64).sum();
                s += e * e;
            }
        }
        s
    }

    #[test]
    fn hessian_matches_naive_sum() {
        let (n, d) = (37, 20);
        let x = normal(n * d, 5);
        let mut h = Hessian::new(d);
        h.add_batch(&x[..10 * d], 10);
        h.add_batch(&x[10 * d..], n - 10);
        assert_eq!(h.samples, n);
        for i in 0..d {
            for j in 0..d {
                let want: f64 = (0..n).map(|t| x[t * d + i] as f64 * x[t * d + j] as f64).sum();
                assert!((h.data[i * d + j] - want).abs() <= 1e-4 * want.abs().max(1.0), "{i},{j}");
            }
        }
    }

    #[test]
    fn factor_is_cholesky_of_dampened_inverse() {
        let (n, d) = (200, 24);
        let x = correlated(n, d, 11);
        let h = hessian(&x, n, d);
        let f = GptqFactor::from_hessian(&h, DEFAULT_DAMP).expect("factor");
        let mean = (0..d).map(|i| h.data[i * d + i]).sum::<f64>() / d as f64;
        // (UᵀU)·(H + λI) = I
        for i in 0..d {
            for j in 0..d {
                let mut s = 0f64;
                for k in 0..d {
                    let hinv_ik: f64 = (0..d).map(|m| f.u[m * d + i] as f64 * f.u[m * d + k] as f64).sum();
                    let hk = h.data[k * d + j] + if k == j { DEFAULT_DAMP * mean } else { 0.0 };
                    s += hinv_ik * hk;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-3, "({i},{j}) = {s}");
            }
            for j in 0..i {
                assert_eq!(f.u[i * d + j], 0.0, "U must be upper triangular");
            }
        }
    }

    #[test]
    fn indefinite_hessian_is_an_error() {
        let h = Hessian { dim: 2, data: vec![1.0, 3.0, 3.0, 1.0], samples: 1 };
        assert!(matches!(GptqFactor::from_hessian(&h, DEFAULT_DAMP), Err(QuantError::NotPositiveDefinite { .. })));
    }

    #[test]
    fn identity_hessian_equals_round_to_nearest() {
        let (rows, cols) = (40, 64);
        let w = normal(rows * cols, 3);
        let mut h = Hessian::new(cols);
        for i in 0..cols {
            h.data[i * cols + i] = 1.0;
        }
        let f = GptqFactor::from_hessian(&h, DEFAULT_DAMP).expect("factor");
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            assert_eq!(gptq_mxfp4(&w, rows, cols, &f, rule), Mxfp4Matrix::quantize(&w, rows, cols, rule));
            assert_eq!(gptq_nvfp4(&w, rows, cols, &f, rule), Nvfp4Matrix::quantize(&w, rows, cols, rule));
        }
    }

    #[test]
    fn weights_on_the_grid_are_kept_exactly() {
        let (rows, cols, n) = (24, 96, 300);
        let grid = Mxfp4Matrix::quantize(&normal(rows * cols, 8), rows, cols, ScaleRule::Spec).expect("q").dequantize();
        let x = correlated(n, cols, 21);
        let f = GptqFactor::from_hessian(&hessian(&x, n, cols), DEFAULT_DAMP).expect("factor");
        let q = gptq_mxfp4(&grid, rows, cols, &f, ScaleRule::Spec).expect("gptq");
        assert_eq!(q.dequantize(), grid);
    }

    #[test]
    fn gptq_lowers_output_error_on_correlated_inputs() {
        let (rows, cols, n) = (48, 128, 512);
        let w = normal(rows * cols, 9);
        let x = correlated(n, cols, 31);
        let f = GptqFactor::from_hessian(&hessian(&x, n, cols), DEFAULT_DAMP).expect("factor");
        for rule in [ScaleRule::Spec, ScaleRule::MseSearch] {
            let rtn = Mxfp4Matrix::quantize(&w, rows, cols, rule).expect("rtn").dequantize();
            let g = gptq_mxfp4(&w, rows, cols, &f, rule).expect("gptq").dequantize();
            let (e_rtn, e_g) = (output_error(&x, n, &w, &rtn, rows, cols), output_error(&x, n, &w, &g, rows, cols));
            assert!(e_g < 0.7 * e_rtn, "mxfp4 {rule:?}: gptq {e_g:.4e} vs rtn {e_rtn:.4e}");
            let rtn = Nvfp4Matrix::quantize(&w, rows, cols, rule).expect("rtn").dequantize();
            let g = gptq_nvfp4(&w, rows, cols, &f, rule).expect("gptq").dequantize();
            let (e_rtn, e_g) = (output_error(&x, n, &w, &rtn, rows, cols), output_error(&x, n, &w, &g, rows, cols));
            assert!(e_g < 0.7 * e_rtn, "nvfp4 {rule:?}: gptq {e_g:.4e} vs rtn {e_rtn:.4e}");
        }
    }

    #[test]
    fn dead_columns_are_zeroed_and_bad_shapes_rejected() {
        let (rows, cols, n) = (8, 32, 64);
        let mut x = correlated(n, cols, 41);
        for t in 0..n {
            x[t * cols + 5] = 0.0;
        }
        let f = GptqFactor::from_hessian(&hessian(&x, n, cols), DEFAULT_DAMP).expect("factor");
        let w = normal(rows * cols, 2);
        let q = gptq_mxfp4(&w, rows, cols, &f, ScaleRule::Spec).expect("gptq").dequantize();
        assert!((0..rows).all(|r| q[r * cols + 5] == 0.0));
        assert!(matches!(gptq_mxfp4(&w[..rows * 16], rows, 16, &f, ScaleRule::Spec), Err(QuantError::BlockAlignment { .. })));
        assert!(matches!(gptq_nvfp4(&w[..rows * 16], rows, 16, &f, ScaleRule::Spec), Err(QuantError::Length { .. })));
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(matches!(gptq_mxfp4(&bad, rows, cols, &f, ScaleRule::Spec), Err(QuantError::NonFinite { index: 3, .. })));
    }
}
