//! Quantizing a loaded model: the `--quant SPEC` policy and its application.
//!
//! A spec reads `experts=mxfp4|nvfp4[,dense=bf16|fp8][,scale=spec|mse][,method=rtn|gptq][,down=fp8|bf16]`:
//! * `experts`: the format of every MoE expert's gate/up/down (and, for dense
//!   models or the dense layers of MoE models, the MLP gate/up/down).
//! * `dense` (optional): attention q/k/v/o in that format; the embedding and an
//!   untied lm_head become bf16 (never lower). Without it they stay as loaded.
//! * `scale` (optional, default `spec`): the per-block scale rule
//!   ([`ScaleRule::Spec`] or [`ScaleRule::MseSearch`]).
//! * `method` (optional, default `rtn`): round-to-nearest, or GPTQ with Hessians of the
//!   MLP inputs from a calibration text ([`calibration::Calibration`]; FP4 targets only).
//! * `down` (optional): keep every `down_proj` in FP8 (or bf16) instead of FP4 — a
//!   mixed-precision MLP, reported as such.
//!
//! Routers, norms, biases, q/k norms and attention sinks always stay f32.
//! Weights already in the target format are kept as they are (so applying a
//! spec twice, or to a pre-quantized checkpoint, changes nothing).
//!
//! [`save`] writes a quantized model as an HF-style folder and [`packed`] reads
//! such tensors (and NVIDIA ModelOpt NVFP4 / FP8 checkpoints) back.

pub mod calibration;
pub mod packed;
pub mod save;

use std::fmt;
use std::str::FromStr;

use half::bf16;
use rayon::prelude::*;

use self::calibration::{Calibration, LayerFactors};
use super::family::{GatedMlp, Mlp, ModelWeights};
use super::weights::{Linear, Weight};
use super::ModelError;
use crate::quant::{gptq, Fp8Matrix, Mxfp4Matrix, Nvfp4Matrix, QuantError, QuantFormat, ScaleRule};

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

/// How FP4 codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMethod {
    /// Round each weight to the nearest code of its block's scale.
    #[default]
    Rtn,
    /// GPTQ error compensation with calibration Hessians ([`crate::quant::gptq`]).
    Gptq,
}

/// A parsed `--quant` spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// `Mxfp4` or `Nvfp4`.
    pub experts: QuantFormat,
    pub dense: Option<DenseFormat>,
    pub scale: ScaleRule,
    pub method: QuantMethod,
    /// `down_proj` in this format instead of `experts` (mixed-precision MLPs).
    pub down: Option<DenseFormat>,
}

/// Why a `--quant` spec could not be parsed. Each names the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantSpecError {
    #[error("--quant `{spec}`: part `{part}` is not key=value (expected e.g. experts=mxfp4,dense=fp8)")]
    NotKeyValue { spec: String, part: String },
    #[error("--quant `{spec}`: unknown key `{key}` (expected experts, dense, scale, method or down)")]
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
    #[error("method=gptq: no calibration Hessian for `{name}` (GPTQ covers dense MLPs; calibrate with a text first)")]
    NoCalibration { name: String },
    #[error("method=gptq: factoring the Hessian of layer {layer} failed: {source}")]
    Factor { layer: usize, source: QuantError },
}

impl FromStr for QuantSpec {
    type Err = QuantSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.to_string();
        let (mut experts, mut dense, mut scale, mut method, mut down) = (None, None, None, None, None);
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
                "method" => {
                    dup(method.is_some())?;
                    method = Some(match value.as_str() {
                        "rtn" => QuantMethod::Rtn,
                        "gptq" => QuantMethod::Gptq,
                        _ => return Err(bad("rtn or gptq")),
                    });
                }
                "down" => {
                    dup(down.is_some())?;
                    down = Some(match value.as_str() {
                        "bf16" => DenseFormat::Bf16,
                        "fp8" | "fp8_e4m3" | "e4m3" => DenseFormat::Fp8,
                        _ => return Err(bad("fp8 or bf16")),
                    });
                }
                _ => return Err(QuantSpecError::UnknownKey { spec, key }),
            }
        }
        let experts = experts.ok_or(QuantSpecError::MissingExperts { spec })?;
        Ok(QuantSpec { experts, dense, scale: scale.unwrap_or_default(), method: method.unwrap_or_default(), down })
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
        write!(f, ",scale={scale}")?;
        // Only written when set, so specs recorded by older folders read back unchanged.
        if self.method == QuantMethod::Gptq {
            write!(f, ",method=gptq")?;
        }
        if let Some(d) = self.down {
            write!(f, ",down={}", d.as_str())?;
        }
        Ok(())
    }
}

/// What one weight becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Format(QuantFormat),
    Bf16,
}

impl DenseFormat {
    fn target(self) -> Target {
        match self {
            DenseFormat::Bf16 => Target::Bf16,
            DenseFormat::Fp8 => Target::Format(QuantFormat::Fp8),
        }
    }
}

/// How one weight is converted: by GPTQ (`Some(factor)`), required GPTQ without a
/// Hessian (`gptq_missing`), or round-to-nearest.
struct Job<'a> {
    name: String,
    weight: &'a mut Weight,
    target: Target,
    factor: Option<&'a crate::quant::gptq::GptqFactor>,
    gptq_missing: bool,
}

impl<'a> Job<'a> {
    fn new(name: String, weight: &'a mut Weight, target: Target) -> Self {
        Self { name, weight, target, factor: None, gptq_missing: false }
    }
}

/// Quantizes `w` in place following `spec` (linears in parallel). With
/// `method=gptq` every FP4 linear that still needs quantizing must have a Hessian:
/// use [`apply_quant_calibrated`].
pub fn apply_quant(w: &mut ModelWeights, spec: &QuantSpec) -> Result<(), QuantizeError> {
    apply_quant_calibrated(w, spec, None)
}

/// [`apply_quant`] with calibration Hessians for `method=gptq` (ignored for `rtn`).
pub fn apply_quant_calibrated(w: &mut ModelWeights, spec: &QuantSpec, calib: Option<&Calibration>) -> Result<(), QuantizeError> {
    let factors: Vec<Option<LayerFactors>> = match (spec.method, calib) {
        (QuantMethod::Gptq, Some(c)) => c.factors()?,
        _ => Vec::new(),
    };
    let mut jobs: Vec<Job> = Vec::new();
    let dense_target = spec.dense.map(DenseFormat::target);
    if spec.dense.is_some() {
        jobs.push(Job::new("embed".into(), &mut w.embed, Target::Bf16));
        if let Some(h) = w.lm_head.as_mut() {
            jobs.push(Job::new("lm_head".into(), h, Target::Bf16));
        }
    }
    let fp4 = Target::Format(spec.experts);
    let down = spec.down.map_or(fp4, DenseFormat::target);
    let gptq = spec.method == QuantMethod::Gptq;
    for (i, l) in w.layers.iter_mut().enumerate() {
        if let Some(t) = dense_target {
            let a = &mut l.attention;
            for (n, lin) in [("q", &mut a.q), ("k", &mut a.k), ("v", &mut a.v), ("o", &mut a.o)] {
                jobs.push(Job::new(format!("layers.{i}.attn.{n}"), &mut lin.weight, t));
            }
        }
        let f = factors.get(i).and_then(Option::as_ref);
        match &mut l.mlp {
            Mlp::Dense(m) => push_mlp(&mut jobs, format!("layers.{i}.mlp"), m, [fp4, fp4, down], gptq, f),
            Mlp::Moe(m) => {
                for (e, x) in m.experts.iter_mut().enumerate() {
                    push_mlp(&mut jobs, format!("layers.{i}.experts.{e}"), x, [fp4, fp4, down], gptq, None);
                }
            }
        }
    }
    jobs.into_par_iter().try_for_each(|j| convert(j, spec.scale))
}

/// The spec a `kairos quantize` folder was written with (`quantization_config.kairos_spec`).
pub fn recorded_spec(config: &serde_json::Value) -> Result<Option<QuantSpec>, ModelError> {
    let q = &config["quantization_config"];
    // gpt-oss folders carry `quant_method = "mxfp4"` (for transformers) and the spec.
    let spec = match (q["quant_method"].as_str(), q["kairos_spec"].as_str()) {
        (_, Some(s)) => s,
        (Some("kairos"), None) => {
            return Err(ModelError::Config("quantization_config (kairos) has no `kairos_spec` string".into()))
        }
        _ => return Ok(None),
    };
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

fn push_mlp<'a>(jobs: &mut Vec<Job<'a>>, p: String, m: &'a mut GatedMlp, t: [Target; 3], gptq: bool, f: Option<&'a LayerFactors>) {
    let GatedMlp { gate, up, down } = m;
    let factors = [f.map(|f| &f.input), f.map(|f| &f.input), f.map(|f| &f.down_input)];
    for (((n, lin), t), factor) in [("gate", gate), ("up", up), ("down", down)].into_iter().zip(t).zip(factors) {
        let lin: &mut Linear = lin;
        // GPTQ applies to FP4 targets; FP8/bf16 (e.g. `down=fp8`) stay round-to-nearest.
        let fp4 = matches!(t, Target::Format(QuantFormat::Mxfp4 | QuantFormat::Nvfp4));
        let use_gptq = gptq && fp4;
        jobs.push(Job {
            name: format!("{p}.{n}"),
            weight: &mut lin.weight,
            target: t,
            factor: if use_gptq { factor } else { None },
            gptq_missing: use_gptq && factor.is_none(),
        });
    }
}

fn convert(job: Job<'_>, rule: ScaleRule) -> Result<(), QuantizeError> {
    let Job { name, weight: w, target, factor, gptq_missing } = job;
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
            if gptq_missing {
                return Err(QuantizeError::NoCalibration { name });
            }
            let data = w.to_f32();
            let err = |source| QuantizeError::Linear { name: name.clone(), rows, cols, format: f.as_str(), source };
            match (f, factor) {
                (QuantFormat::Mxfp4, Some(h)) => Weight::Mxfp4(gptq::gptq_mxfp4(&data, rows, cols, h, rule).map_err(err)?),
                (QuantFormat::Nvfp4, Some(h)) => Weight::Nvfp4(gptq::gptq_nvfp4(&data, rows, cols, h, rule).map_err(err)?),
                (QuantFormat::Mxfp4, None) => Weight::Mxfp4(Mxfp4Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
                (QuantFormat::Nvfp4, None) => Weight::Nvfp4(Nvfp4Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
                (QuantFormat::Fp8, _) => Weight::Fp8(Fp8Matrix::quantize(&data, rows, cols, rule).map_err(err)?),
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
        let base = QuantSpec { experts: QuantFormat::Mxfp4, dense: None, scale: ScaleRule::Spec, method: QuantMethod::Rtn, down: None };
        assert_eq!(s, base);
        assert_eq!(s.to_string(), "experts=mxfp4,scale=spec");
        let s: QuantSpec = "experts=nvfp4, dense=fp8,scale=mse".parse().expect("spec");
        assert_eq!(s, QuantSpec { experts: QuantFormat::Nvfp4, dense: Some(DenseFormat::Fp8), scale: ScaleRule::MseSearch, ..base });
        assert_eq!(s.to_string().parse::<QuantSpec>(), Ok(s));
        let s: QuantSpec = "experts=mxfp4,method=gptq,down=fp8".parse().expect("spec");
        assert_eq!(s, QuantSpec { method: QuantMethod::Gptq, down: Some(DenseFormat::Fp8), ..base });
        assert_eq!(s.to_string().parse::<QuantSpec>(), Ok(s));
        assert!(matches!("experts=mxfp4,method=awq".parse::<QuantSpec>(), Err(QuantSpecError::BadValue { key, .. }) if key == "method"));
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
