//! What MXFP4 and NVFP4 matrices share: E2M1 codes packed two per byte (low nibble =
//! even element) in blocks of `BLOCK` elements along the columns, one scale per block.
//! The formats differ only in the block size and in how a block's multiplier is decoded
//! (E8M0 power of two; E4M3 times a tensor scale), and in their AVX2 kernels.

use rayon::prelude::*;

use super::e2m1::decode_packed;
use super::kernels::{accumulate, lane_sums, par_matmul, MAX_N};

/// A block-scaled E2M1 `[rows, cols]` matrix.
pub(crate) trait Fp4Matrix: Sync {
    /// Elements per block.
    const BLOCK: usize;
    /// The type's name, for the consistency panic.
    const NAME: &'static str;
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// `rows * cols / 2` bytes, row-major.
    fn codes(&self) -> &[u8];
    /// `rows * cols / BLOCK` scale codes, row-major.
    fn scale_codes(&self) -> &[u8];
    /// What block `k` (row-major over `[rows, cols / BLOCK]`) multiplies its E2M1 values by.
    fn block_mul(&self, k: usize) -> f32;
    /// `par_matmul`'s kernel for rows `r0..r1` with AVX2.
    ///
    /// # Safety
    /// Only where `use_avx2()` said the CPU has AVX2, FMA and F16C, and the fields are
    /// consistent (`assert_consistent`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn chunk_avx2(&self, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]);
}

/// Dequantizes the whole matrix to row-major f32.
pub(crate) fn dequantize<M: Fp4Matrix>(m: &M) -> Vec<f32> {
    let mut out = vec![0f32; m.rows() * m.cols()];
    if m.cols() > 0 {
        out.par_chunks_mut(m.cols()).enumerate().for_each(|(r, row)| dequantize_row(m, r, row));
    }
    out
}

/// Dequantizes row `r` into `out[..cols]`. Panics if `r >= rows` or `out` is too short.
pub(crate) fn dequantize_row<M: Fp4Matrix>(m: &M, r: usize, out: &mut [f32]) {
    let (cols, nb) = (m.cols(), m.cols() / M::BLOCK);
    let bytes = &m.codes()[r * cols / 2..(r + 1) * cols / 2];
    for (b, (o, q)) in out[..cols].chunks_exact_mut(M::BLOCK).zip(bytes.chunks_exact(M::BLOCK / 2)).enumerate() {
        decode_packed(q, m.block_mul(r * nb + b), o);
    }
}

/// Panics unless the (public) fields are still consistent; the SIMD kernels rely on it.
fn assert_consistent<M: Fp4Matrix>(m: &M) {
    let (rows, cols) = (m.rows(), m.cols());
    assert!(
        cols.is_multiple_of(M::BLOCK) && m.codes().len() == rows * cols / 2 && m.scale_codes().len() == rows * cols / M::BLOCK,
        "{} fields are inconsistent with rows = {rows}, cols = {cols}",
        M::NAME
    );
}

/// `y[n, rows] = x[n, cols] · Wᵀ` (row-major), dequantizing in registers and reusing each
/// decoded block for all `n` rows of `x`; rayon over chunks of output rows. `simd`: the
/// type's AVX2 kernel (only when `use_avx2()`), else the scalar one.
///
/// # Panics
/// If `x.len() < n * cols`, `y.len() < n * rows`, or the fields are inconsistent.
pub(crate) fn matmul<M: Fp4Matrix>(m: &M, x: &[f32], n: usize, y: &mut [f32], simd: bool) {
    assert_consistent(m);
    par_matmul(m.rows(), m.cols(), x, n, y, |r0, r1, xs, nn, out| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when `use_avx2()` confirmed the CPU features, and
            // the fields were checked above.
            unsafe { m.chunk_avx2(r0, r1, xs, nn, out) };
            return;
        }
        let _ = simd;
        chunk_scalar(m, r0, r1, xs, nn, out);
    });
}

fn chunk_scalar<M: Fp4Matrix>(m: &M, r0: usize, r1: usize, xs: &[f32], nn: usize, out: &mut [f32]) {
    let (cols, nb) = (m.cols(), m.cols() / M::BLOCK);
    let codes = m.codes();
    let mut wv = [0f32; 32];
    let wv = &mut wv[..M::BLOCK];
    for r in r0..r1 {
        let mut acc = [[0f32; 8]; MAX_N];
        for b in 0..nb {
            let k = r * nb + b;
            decode_packed(&codes[k * M::BLOCK / 2..(k + 1) * M::BLOCK / 2], m.block_mul(k), wv);
            accumulate(wv, xs, cols, b * M::BLOCK, nn, &mut acc);
        }
        lane_sums(&acc, nn, &mut out[(r - r0) * MAX_N..]);
    }
}
