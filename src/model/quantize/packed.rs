//! Reading pre-quantized linears from a checkpoint (see [`super::save`] for the
//! tensor names). Called by `Loader::linear` before the float path:
//!
//! * MXFP4: `<p>.weight_blocks` u8 `[out, in/32, 16]` + `<p>.weight_scales` u8 `[out, in/32]`.
//! * NVFP4 (NVIDIA ModelOpt): `<p>.weight` u8 `[out, in/2]` + `<p>.weight_scale`
//!   F8_E4M3 (or u8) `[out, in/16]` + `<p>.weight_scale_2` f32 scalar.
//! * FP8: `<p>.weight` F8_E4M3 `[out, in]` + `<p>.weight_scale` f32 (scalar, `[out]` or
//!   `[out, 1]`), or `<p>.weight_scale_inv` f32 `[ceil(out/b), ceil(in/b)]` (block scales).

use crate::model::family::check_shape;
use crate::model::tensors::{TensorRaw, TensorSource};
use crate::model::weights::Weight;
use crate::model::ModelError;
use crate::quant::{Fp8Matrix, Mxfp4Matrix, Nvfp4Matrix, QuantError};

fn raw(src: &dyn TensorSource, name: &str) -> Result<TensorRaw, ModelError> {
    src.get_raw(name)?
        .ok_or_else(|| ModelError::MissingTensor(format!("`{name}` in {}", src.describe())))
}

fn expect_dtype(t: &TensorRaw, name: &str, allowed: &[&str]) -> Result<(), ModelError> {
    if allowed.contains(&t.dtype.as_str()) {
        Ok(())
    } else {
        Err(ModelError::Format(format!("tensor `{name}` has dtype {}, expected {}", t.dtype, allowed.join(" or "))))
    }
}

/// f32 values of a small tensor (scales), from f32, bf16 or f16 storage.
fn floats(src: &dyn TensorSource, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    let t = src
        .get_f32(name)?
        .ok_or_else(|| ModelError::MissingTensor(format!("`{name}` in {}", src.describe())))?;
    Ok((t.shape, t.data))
}

fn bad(prefix: &str, e: QuantError) -> ModelError {
    ModelError::Format(format!("pre-quantized linear `{prefix}`: {e}"))
}

/// The packed weight of linear `prefix` (`[rows, cols]`), or `None` when the
/// checkpoint stores it as a plain float `<prefix>.weight`.
pub fn load_packed(src: &dyn TensorSource, prefix: &str, rows: usize, cols: usize) -> Result<Option<Weight>, ModelError> {
    let blocks = format!("{prefix}.weight_blocks");
    if src.contains(&blocks) {
        let b = raw(src, &blocks)?;
        expect_dtype(&b, &blocks, &["U8"])?;
        check_shape(&blocks, &b.shape, &[rows, cols / 32, 16])?;
        let scales = format!("{prefix}.weight_scales");
        let s = raw(src, &scales)?;
        expect_dtype(&s, &scales, &["U8"])?;
        check_shape(&scales, &s.shape, &[rows, cols / 32])?;
        let m = Mxfp4Matrix::from_parts(rows, cols, b.bytes, s.bytes).map_err(|e| bad(prefix, e))?;
        return Ok(Some(Weight::Mxfp4(m)));
    }
    let wname = format!("{prefix}.weight");
    let scale = format!("{prefix}.weight_scale");
    let scale_inv = format!("{prefix}.weight_scale_inv");
    if !src.contains(&scale) && !src.contains(&scale_inv) {
        return Ok(None);
    }
    let w = raw(src, &wname)?;
    match w.dtype.as_str() {
        "U8" | "I8" => {
            check_shape(&wname, &w.shape, &[rows, cols / 2])?;
            let s = raw(src, &scale)?;
            expect_dtype(&s, &scale, &["F8_E4M3", "U8"])?;
            check_shape(&scale, &s.shape, &[rows, cols / 16])?;
            let s2 = format!("{prefix}.weight_scale_2");
            let (shape, v) = floats(src, &s2)?;
            if v.len() != 1 {
                return Err(ModelError::Shape(format!("tensor `{s2}` has shape {shape:?}, expected a scalar")));
            }
            let m = Nvfp4Matrix::from_parts(rows, cols, w.bytes, s.bytes, v[0]).map_err(|e| bad(prefix, e))?;
            Ok(Some(Weight::Nvfp4(m)))
        }
        "F8_E4M3" => {
            check_shape(&wname, &w.shape, &[rows, cols])?;
            let m = if src.contains(&scale_inv) {
                let (shape, v) = floats(src, &scale_inv)?;
                let [br, bc] = shape[..] else {
                    return Err(ModelError::Shape(format!("tensor `{scale_inv}` has shape {shape:?}, expected 2-D block scales")));
                };
                let block = (1..=rows.max(cols)).find(|b| rows.div_ceil(*b) == br && cols.div_ceil(*b) == bc).ok_or_else(|| {
                    ModelError::Shape(format!("tensor `{scale_inv}` has shape {shape:?}, no square block fits [{rows}, {cols}]"))
                })?;
                Fp8Matrix::from_parts_blocked(rows, cols, w.bytes, v, block)
            } else {
                let (shape, v) = floats(src, &scale)?;
                let per_row = match v.len() {
                    1 => vec![v[0]; rows],
                    n if n == rows => v,
                    _ => {
                        return Err(ModelError::Shape(format!(
                            "tensor `{scale}` has shape {shape:?}, expected a scalar or [{rows}] per-row scales"
                        )))
                    }
                };
                Fp8Matrix::from_parts(rows, cols, w.bytes, per_row)
            };
            Ok(Some(Weight::Fp8(m.map_err(|e| bad(prefix, e))?)))
        }
        other => Err(ModelError::Format(format!(
            "tensor `{wname}` has dtype {other} next to `{scale}`: expected U8 (NVFP4) or F8_E4M3 (FP8)"
        ))),
    }
}
