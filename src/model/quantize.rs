//! Quantizing a loaded model: the `--quant SPEC` policy and its application.
//!
//! A spec reads `experts=mxfp4|nvfp4[,dense=bf16|fp8][,scale=spec|mse]`:
//! * `experts`: the format of every MoE expert's gate/up/down (and, for dense
//!   models or the dense layers of MoE models, the MLP gate/up/down).
//! * `dense` (optional): attention q/k/v/o in that format; the embedding and an
//!   untied lm_head become bf16 (never lower). Without it they stay as loaded.
//! * `scale` (optional, default `spec`): the per-block scale rule
//!   ([`ScaleRule::Spec`] or [`ScaleRule::MseSearch`]).
//!
//! Routers, norms, biases, q/k norms and attention sinks always stay f32.
//! Weights already in the target format are kept as they are (so applying a
//! spec twice, or to a pre-quantized checkpoint, changes nothing).
//!
//! [`save`] writes a quantized model as an HF-style folder and [`packed`] reads
//! such tensors (and NVIDIA ModelOpt NVFP4 / FP8 checkpoints) back.

pub mod packed;
pub mod save;

use std::fmt;
use std::str::FromStr;

use half::bf16;
use rayon::prelude::*;

use super::family::{GatedMlp, Mlp, ModelWeights};
use super::weights::{Linear, Weight};
use super::ModelError;
use crate::quant::{Fp8Matrix, Mxfp4Matrix, Nvfp4Matrix, QuantError, QuantFormat, ScaleRule};

/// Storage of the attention projections (and the bf16 cap of embeddings/lm_head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseFormat {
    Bf16,
    Fp8,
}

impl DenseFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DenseFormat::Bf16 => "bf16",
            DenseFormat::Fp8 => "fp8",
        }
    }
}

/// A parsed `--quant` spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// `Mxfp4` or `Nvfp4`.
    pub experts: QuantFormat,
    pub dense: Option<DenseFormat>,
    pub scale: ScaleRule,
}

/// Why a `--quant` spec could not be parsed. Each names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantSpecError {
    #[error("--quant `{spec}`: part `{part}` is not key=value (expected e.g. experts=mxfp4,dense=fp8)")]
    NotKeyValue { spec: String, part: String },
    #[error("--quant `{spec}`: unknown key `{key}` (expected experts, dense or scale)")]
    UnknownKey { spec: String, key: String },
    #[error("--quant `{spec}`: `{key}={value}` is not valid (expected {expected})")]
    BadValue { spec: String, key: String, value: String, expected: &'static str },
    #[error("--quant `{spec}`: key `{key}` is given twice")]
    Duplicate { spec: String, key: String },
    #[error("--quant `{spec}`: `experts=` is required (mxfp4 or nvfp4)")]
    MissingExperts { spec: String },
}

/// Why a model could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("cannot quantize `{name}` ([{rows}, {cols}]) to {format}: {source}")]
    Linear { name: String, rows: usize, cols: usize, format: &'static str, source: QuantError },
}

impl FromStr for QuantSpec {
    type Err = QuantSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.to_string();
        let (mut experts, mut dense, mut scale) = (None, None, None);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, value)) = part.split_once('=') else {
                return Err(QuantSpecError::NotKeyValue { spec, part: part.into() });
            };
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            let bad = |expected| QuantSpecError::BadValue {
                spec: spec.clone(),
                key: key.clone(),
                value: value.clone(),
                expected,
            };
            let dup = |taken: bool| {
                if taken {
                    Err(QuantSpecError::Duplicate { spec: spec.clone(), key: key.clone() })
                } else {
                    Ok(())
                }
            };
            match key.as_str() {
                "experts" | "mlp" => {
                    dup(experts.is_some())?;
                    experts = Some(match value.as_str() {
                        "mxfp4" => QuantFormat::Mxfp4,
                        "nvfp4" => QuantFormat::Nvfp4,
                        _ => return Err(bad("mxfp4 or nvfp4")),
                    });
                }
                "dense" | "attention" => {
                    dup(dense.is_some())?;
                    dense = Some(match value.as_str() {
                        "bf16" => DenseFormat::Bf16,
                        "fp8" | "fp8_e4m3" | "e4m3" => DenseFormat::Fp8,
                        _ => return Err(bad("bf16 or fp8")),
                    });
                }
                "scale" => {
                    dup(scale.is_some())?;
                    scale = Some(match value.as_str() {
                        "spec" => ScaleRule::Spec,
                        "mse" => ScaleRule::MseSearch,
                        _ => return Err(bad("spec or mse")),
                    });
                }
                _ => return Err(QuantSpecError::UnknownKey { spec, key }),
            }
        }
        let experts = experts.ok_or(QuantSpecError::MissingExperts { spec })?;
        Ok(QuantSpec { experts, dense, scale: scale.unwrap_or_default() })
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "experts={}", self.experts)?;
        if let Some(d) = self.dense {
            write!(f, ",dense={}", d.as_str())?;
        }
        let scale = match self.scale {
            ScaleRule::Spec => "spec",
            ScaleRule::MseSearch => "mse",
        };
        write!(f, ",scale={scale}")
    }
}

/// What one weight becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Format(QuantFormat),
    Bf16,
}

/// Quantizes `w` in place following `spec` (linears in parallel).
pub fn apply_quant(w: &mut ModelWeights, spec: &QuantSpec) -> Result<(), QuantizeError> {
    let mut jobs: Vec<(String, &mut Weight, Target)> = Vec::new();
    let dense_target = spec.dense.map(|d| match d {
        DenseFormat::Bf16 => Target::Bf16,
        DenseFormat::Fp8 => Target::Format(QuantFormat::Fp8),
    });
    if spec.dense.is_some() {
        jobs.push(("embed".into(), &mut w.embed, Target::Bf16));
        if let Some(h) = w.lm_head.as_mut() {
            jobs.push(("lm_head".into(), h, Target::Bf16));
        }
    }
    let fp4 = Target::Format(spec.experts);
    for (i, l) in w.layers.iter_mut().enumerate() {
        if let Some(t) = dense_target {
            let a = &mut l.attention;
            for (n, lin) in [("q", &mut a.q), ("k", &mut a.k), ("v", &mut a.v), ("o", &mut a.o)] {
                jobs.push((format!("layers.{i}.attn.{n}"), &mut lin.weight, t));
            }
        }
        match &mut l.mlp {
            Mlp::Dense(m) => push_mlp(&mut jobs, format!("layers.{i}.mlp"), m, fp4),
            Mlp::Moe(m) => {
                for (e, x) in m.experts.iter_mut().enumerate() {
                    push_mlp(&mut jobs, format!("layers.{i}.experts.{e}"), x, fp4);
                }
            }
        }
    }
    jobs.into_par_iter().try_for_each(|(name, weight, target)| convert(&name, weight, target, spec.scale))
}

/// The spec a `kairos quantize` folder was written with (`quantization_config.kairos_spec`).
pub fn recorded_spec(config: &serde_json::Value) -> Result<Option<QuantSpec>, ModelError> {
    let q = &config["quantization_config"];
    if q["quant_method"].as_str() != Some("kairos") {
        return Ok(None);
    }
    let spec = q["kairos_spec"]
        .as_str()
        .ok_or_else(|| ModelError::Config("quantization_config (kairos) has no `kairos_spec` string".into()))?;
    spec.parse()
        .map(Some)
        .map_err(|e| ModelError::Config(format!("quantization_config.kairos_spec: {e}")))
}

/// Re-applies the recorded spec after loading a `kairos quantize` folder: packed weights
/// stay as stored; bf16-valued tensors get bf16 storage again (exact).
pub fn restore_recorded(config: &serde_json::Value, w: &mut ModelWeights) -> Result<(), ModelError> {
    if let Some(spec) = recorded_spec(config)? {
        apply_quant(w, &spec).map_err(|e| ModelError::Format(e.to_string()))?;
    }
    Ok(())
}

fn push_mlp<'a>(jobs: &mut Vec<(String, &'a mut Weight, Target)>, p: String, m: &'a mut GatedMlp, t: Target) {
    let GatedMlp { gate, up, down } = m;
    for (n, lin) in [("gate", gate), ("up", up), ("down", down)] {
        let lin: &mut Linear = lin;
        jobs.push((format!("{p}.{n}"), &mut lin.weight, t));
    }
}

fn convert(name: &str, w: &mut Weight, target: Target, rule: ScaleRule) -> Result<(), QuantizeError> {
    let (rows, cols) = (w.rows(), w.cols());
    let new = match target {
        Target::Bf16 => match w {
            // bf16 is the cap: never raise the precision of an FP8/FP4 weight.
            Weight::F32 { data, .. } => Weight::Bf16 { rows, cols, data: data.iter().map(|&v| bf16::from_f32(v)).collect() },
            _ => return Ok(()),
        },
        Target::Format(f) => {
            let same = matches!(
                (f, &*w),
                (QuantFormat::Mxfp4, Weight::Mxfp4(_)) | (QuantFormat::Nvfp4, Weight::Nvfp4(_)) | (QuantFormat::Fp8, Weight::Fp8(_))
            );
            if same {
                return Ok(());
            }
            let data = w.to_f32();
            let err = |source| QuantizeError::Linear { name: name.to_string(), rows, cols, format: f.as_str(), source };
            match f {
                QuantFormat::Mxfp4 => Weight::Mxfp4(Mxfp4Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
                QuantFormat::Nvfp4 => Weight::Nvfp4(Nvfp4Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
                QuantFormat::Fp8 => Weight::Fp8(Fp8Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
            }
        }
    };
    *w = new;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_spec_parses() {
        let s: QuantSpec = "experts=mxfp4".parse().expect("spec");
        assert_eq!(s, QuantSpec { experts: QuantFormat::Mxfp4, dense: None, scale: ScaleRule::Spec });
        let s: QuantSpec = "experts=nvfp4, dense=fp8,scale=mse".parse().expect("spec");
        assert_eq!(s, QuantSpec { experts: QuantFormat::Nvfp4, dense: Some(DenseFormat::Fp8), scale: ScaleRule::MseSearch });
        assert_eq!(s.to_string().parse::<QuantSpec>(), Ok(s));
    }

    #[test]
    fn quant_spec_errors_name_the_part() {
        let e = "experts=int4".parse::<QuantSpec>().unwrap_err();
        assert!(matches!(&e, QuantSpecError::BadValue { key, value, .. } if key == "experts" && value == "int4"), "{e}");
        assert!(e.to_string().contains("experts=int4"));
        assert!(matches!("experts=mxfp4,foo=1".parse::<QuantSpec>(), Err(QuantSpecError::UnknownKey { key, .. }) if key == "foo"));
        assert!(matches!("mxfp4".parse::<QuantSpec>(), Err(QuantSpecError::NotKeyValue { part, .. }) if part == "mxfp4"));
        assert!(matches!("dense=fp8".parse::<QuantSpec>(), Err(QuantSpecError::MissingExperts { .. })));
        assert!(matches!("experts=mxfp4,dense=fp4".parse::<QuantSpec>(), Err(QuantSpecError::BadValue { key, .. }) if key == "dense"));
        assert!(matches!("experts=mxfp4,experts=nvfp4".parse::<QuantSpec>(), Err(QuantSpecError::Duplicate { .. })));
    }
}
