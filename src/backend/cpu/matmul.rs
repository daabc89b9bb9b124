//! `y = x·Wᵀ (+ b)` for every weight precision, parallel over output rows.
//! Each weight row is read once per call and applied to all `n` input rows.

use half::bf16;
use rayon::prelude::*;

use crate::model::weights::{Linear, Weight};

/// Rows of W handled by one rayon task: large enough to amortise scheduling,
/// small enough to balance two to sixty-four cores.
const ROWS_PER_TASK: usize = 16;

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

/// y[n, rows] = x[n, cols] · Wᵀ, for any precision.
pub fn matmul(w: &Weight, x: &[f32], n: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    debug_assert_eq!(x.len(), n * cols);
    debug_assert_eq!(y.len(), n * rows);
    match w {
        Weight::F32 { data, .. } => rows_parallel(rows, n, y, |r, out| {
            let wr = &data[r * cols..(r + 1) * cols];
            for (t, o) in out.iter_mut().enumerate() {
                *o = dot(wr, &x[t * cols..(t + 1) * cols]);
            }
        }),
        Weight::Bf16 { data, .. } => rows_parallel(rows, n, y, |r, out| {
            let wr = &data[r * cols..(r + 1) * cols];
            for (t, o) in out.iter_mut().enumerate() {
                *o = dot_bf16(wr, &x[t * cols..(t + 1) * cols]);
            }
        }),
        #[allow(unreachable_patterns)]
        other => quantized_matmul(other, x, n, y),
    }
}

fn quantized_matmul(w: &Weight, x: &[f32], n: usize, y: &mut [f32]) {
    match w {
        Weight::Mxfp4(m) => m.matmul(x, n, y),
        Weight::Nvfp4(m) => m.matmul(x, n, y),
        Weight::Fp8(m) => m.matmul(x, n, y),
        Weight::F32 { .. } | Weight::Bf16 { .. } => unreachable!("float weights take the float path"),
    }
}

/// Runs `f(row, out[n])` for every output row in parallel and writes the
/// results transposed into `y[n, rows]`.
fn rows_parallel(rows: usize, n: usize, y: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    if n == 1 {
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, out)| {
            for (i, o) in out.iter_mut().enumerate() {
                f(c * ROWS_PER_TASK + i, std::slice::from_mut(o));
            }
        });
        return;
    }
    let mut yt = vec![0f32; rows * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(c, out)| {
        for (i, o) in out.chunks_mut(n).enumerate() {
            f(c * ROWS_PER_TASK + i, o);
        }
    });
    for r in 0..rows {
        for t in 0..n {
            y[t * rows + r] = yt[r * n + t];
        }
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
