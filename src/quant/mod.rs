//! Low-precision weight formats and CPU kernels: MXFP4, NVFP4 and FP8 (E4M3).
//!
//! * [`Mxfp4Matrix`]: E2M1 values, blocks of 32 along the input (column) dimension,
//!   one E8M0 (power-of-two) scale per block. Byte layout matches gpt-oss checkpoints
//!   (`*_blocks` `[out, in/32, 16]`, low nibble = even element; `*_scales` `[out, in/32]`).
//! * [`Nvfp4Matrix`]: E2M1 values, blocks of 16, one FP8 E4M3 scale per block plus one
//!   f32 per-tensor scale; value = e2m1 · e4m3_scale · tensor_scale. Layout matches
//!   NVIDIA ModelOpt checkpoints (`weight` u8 `[out, in/2]`, low nibble = even element,
//!   `weight_scale` e4m3 `[out, in/16]`, `weight_scale_2` f32 scalar which *multiplies*).
//! * [`Fp8Matrix`]: E4M3FN values with per-output-row f32 scales, or 2-D block scales
//!   (e.g. 128×128, the DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv` layout, which also multiplies).
//!
//! Conventions shared by every format:
//! * Rounding is round-to-nearest, ties-to-even, on the code grid (E2M1/E4M3/E8M0).
//! * Values that overflow the element grid after scaling saturate to ±max (±6 for E2M1,
//!   ±448 for E4M3) instead of producing NaN.
//! * `quantize` rejects NaN and ±inf inputs with [`QuantError::NonFinite`] (they cannot be
//!   represented meaningfully in a shared-scale block and would poison the whole block).
//! * `from_parts` validates buffer sizes and rejects NaN encodings in scales/data
//!   ([`QuantError::NanEncoding`]), so the kernels never have to handle them.
//! * `matmul(x, n, y)` computes `y[n, rows] = x[n, cols] · Wᵀ` with row-major `x`/`y`,
//!   dequantizing blocks in registers and parallelising over output rows with rayon.
//!   It panics if `x.len() < n*cols` or `y.len() < n*rows` (caller contract, not user data).

use std::fmt;
use std::str::FromStr;

pub mod e2m1;
pub mod e4m3;
mod fp4;
pub mod fp8;
pub mod gptq;
pub mod kernels;
pub mod mxfp4;
pub mod nvfp4;
#[cfg(test)]
mod timing;

pub use e2m1::{e2m1_decode, e2m1_encode_rne, E2M1_MAX, E2M1_VALUES};
pub use e4m3::{
    e4m3_decode, e4m3_encode_rne, e8m0_decode, e8m0_encode_exp, e8m0_floor_log2, E4M3_MAX, E8M0_NAN,
};
pub use fp8::Fp8Matrix;
pub use kernels::matmul_f32;
pub use mxfp4::Mxfp4Matrix;
pub use nvfp4::Nvfp4Matrix;

/// Errors raised while quantizing or assembling quantized matrices.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// The column count is not a multiple of the format's block size.
    #[error("{format}: cols = {cols} is not a multiple of the block size {block}")]
    BlockAlignment {
        format: &'static str,
        cols: usize,
        block: usize,
    },
    /// A buffer does not have the length implied by `rows`/`cols`.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// The input contains NaN or ±inf at the given flat index.
    #[error("non-finite input value {value} at index {index}")]
    NonFinite { index: usize, value: f32 },
    /// A stored scale or data byte is a NaN encoding (E8M0 0xFF, E4M3 0x7F/0xFF).
    #[error("{what}: NaN encoding 0x{byte:02x} at index {index}")]
    NanEncoding {
        what: &'static str,
        index: usize,
        byte: u8,
    },
    /// The per-tensor scale is not finite and positive.
    #[error("invalid tensor scale {0}")]
    TensorScale(f32),
    /// Invalid scale block size (must be > 0).
    #[error("invalid scale block size {0}")]
    ScaleBlock(usize),
    /// GPTQ: the dampened Hessian is not positive definite (at this column).
    #[error("gptq: the dampened Hessian is not positive definite (column {column})")]
    NotPositiveDefinite { column: usize },
    /// Unknown format name in [`QuantFormat::from_str`].
    #[error("unknown quantization format '{0}' (expected mxfp4, nvfp4 or fp8)")]
    UnknownFormat(String),
}

/// How per-block scales are chosen during quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleRule {
    /// The format's reference rule: OCP MX spec for MXFP4
    /// (`shared_exp = floor(log2(amax)) - 2`), NVIDIA's rule for NVFP4
    /// (`tensor = amax/(6·448)`, `block = e4m3(amax_b / (6·tensor))`), `amax/448` for FP8.
    #[default]
    Spec,
    /// Per-block search over a few candidate scales around the spec choice, keeping the
    /// one with the lowest block squared error (never worse than `Spec`, block by block).
    MseSearch,
}

/// The quantized weight formats supported by [`crate::quant`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Mxfp4,
    Nvfp4,
    Fp8,
}

impl QuantFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            QuantFormat::Mxfp4 => "mxfp4",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantFormat {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mxfp4" => Ok(QuantFormat::Mxfp4),
            "nvfp4" => Ok(QuantFormat::Nvfp4),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(QuantFormat::Fp8),
            _ => Err(QuantError::UnknownFormat(s.to_string())),
        }
    }
}

/// Returns the first non-finite value of `w` as an error.
pub(crate) fn check_finite(w: &[f32]) -> Result<(), QuantError> {
    match w.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            index,
            value: w[index],
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Length {
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic N(0,1) samples (xorshift + Box-Muller), no extra dependencies.
    pub fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u1, u2) = (next(), next());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
        let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        (s / a.len() as f64).sqrt()
    }

    /// Checks `matmul(x, n, y)` against an f64 reference built from the dequantized
    /// weights `wd`, for n in {1, 3, 17}: |err| <= 1e-5 · Σ|w·x| (relative to the
    /// magnitude of the terms, so cancellation cannot make the bound vacuous).
    pub fn check_matmul(
        wd: &[f32],
        rows: usize,
        cols: usize,
        matmul: impl Fn(&[f32], usize, &mut [f32]),
    ) {
        for n in [1usize, 3, 17] {
            let x = normal(n * cols, 1000 + n as u64);
            let mut y = vec![f32::NAN; n * rows];
            matmul(&x, n, &mut y);
            for i in 0..n {
                for r in 0..rows {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for c in 0..cols {
                        let t = wd[r * cols + c] as f64 * x[i * cols + c] as f64;
                        s += t;
                        mag += t.abs();
                    }
                    let got = y[i * rows + r] as f64;
                    assert!(
                        (got - s).abs() <= 1e-5 * mag + 1e-30,
                        "n={n} i={i} r={r}: {got} vs {s}"
                    );
                }
            }
        }
    }

    /// Asserts |a-b| <= tol * max(1, |b|) elementwise.
    pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let d = (x - y).abs();
            assert!(
                d <= tol * y.abs().max(1.0),
                "index {i}: {x} vs {y} (diff {d})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_from_str() {
        assert_eq!("mxfp4".parse::<QuantFormat>(), Ok(QuantFormat::Mxfp4));
        assert_eq!("NVFP4".parse::<QuantFormat>(), Ok(QuantFormat::Nvfp4));
        assert_eq!("fp8".parse::<QuantFormat>(), Ok(QuantFormat::Fp8));
        assert!(matches!(
            "int4".parse::<QuantFormat>(),
            Err(QuantError::UnknownFormat(_))
        ));
        for f in [QuantFormat::Mxfp4, QuantFormat::Nvfp4, QuantFormat::Fp8] {
            assert_eq!(f.to_string().parse::<QuantFormat>(), Ok(f));
        }
    }
}
