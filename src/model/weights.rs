//! Weight storage: one type for float and quantized matrices, so a model
//! definition never needs a quantized copy of itself.

use half::bf16;

use crate::quant::{Fp8Matrix, Mxfp4Matrix, Nvfp4Matrix};


/// A `[rows, cols]` matrix (rows = output features), in any storage precision.
pub enum Weight {
    F32 { rows: usize, cols: usize, data: Vec<f32> },
    Bf16 { rows: usize, cols: usize, data: Vec<bf16> },
    Mxfp4(Mxfp4Matrix),
    Nvfp4(Nvfp4Matrix),
    Fp8(Fp8Matrix),
}

/// Storage precision, as reported by `kairos inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    F32,
    Bf16,
    Fp8,
    Mxfp4,
    Nvfp4,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
            Precision::Mxfp4 => "mxfp4",
            Precision::Nvfp4 => "nvfp4",
        }
    }
}

impl Weight {
    pub fn f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Weight::F32 { rows, cols, data }
    }

    pub fn rows(&self) -> usize {
        match self {
            Weight::F32 { rows, .. } | Weight::Bf16 { rows, .. } => *rows,
            Weight::Mxfp4(m) => m.rows,
            Weight::Nvfp4(m) => m.rows,
            Weight::Fp8(m) => m.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weight::F32 { cols, .. } | Weight::Bf16 { cols, .. } => *cols,
            Weight::Mxfp4(m) => m.cols,
            Weight::Nvfp4(m) => m.cols,
            Weight::Fp8(m) => m.cols,
        }
    }

    pub fn precision(&self) -> Precision {
        match self {
            Weight::F32 { .. } => Precision::F32,
            Weight::Bf16 { .. } => Precision::Bf16,
            Weight::Mxfp4(_) => Precision::Mxfp4,
            Weight::Nvfp4(_) => Precision::Nvfp4,
            Weight::Fp8(_) => Precision::Fp8,
        }
    }

    /// Bytes this matrix occupies (and reads per full pass).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::F32 { data, .. } => data.len() * 4,
            Weight::Bf16 { data, .. } => data.len() * 2,
            Weight::Mxfp4(m) => m.bytes(),
            Weight::Nvfp4(m) => m.bytes(),
            Weight::Fp8(m) => m.bytes(),
        }
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Weight::F32 { cols, data, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
            Weight::Bf16 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                    *o = v.to_f32();
                }
            }
            Weight::Mxfp4(m) => m.dequantize_row(r, out),
            Weight::Nvfp4(m) => m.dequantize_row(r, out),
            Weight::Fp8(m) => m.dequantize_row(r, out),
        }
    }

    /// The whole matrix as f32 (quantization, conversion, tests).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Weight::F32 { data, .. } => data.clone(),
            Weight::Bf16 { data, .. } => data.iter().map(|v| v.to_f32()).collect(),
            Weight::Mxfp4(m) => m.dequantize(),
            Weight::Nvfp4(m) => m.dequantize(),
            Weight::Fp8(m) => m.dequantize(),
        }
    }
}

/// A linear layer: `y = x·Wᵀ + b`.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.rows()
    }
    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }
}
