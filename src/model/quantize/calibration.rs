//! Calibration statistics for `method=gptq`: per dense MLP layer, the Hessians
//! `H = XᵀX` of the input of `gate_proj`/`up_proj` (shared) and of `down_proj`.
//! Collected by running the unquantized model on a calibration text
//! (`kairos::engine::calibrate`), consumed by [`super::apply_quant_calibrated`].

use rayon::prelude::*;

use super::QuantizeError;
use crate::quant::gptq::{GptqFactor, Hessian, DEFAULT_DAMP};

/// Hessians of one dense MLP.
#[derive(Debug, Clone)]
pub struct MlpHessians {
    /// Input of `gate_proj` and `up_proj` (`[hidden, hidden]`).
    pub input: Hessian,
    /// Input of `down_proj` (`[intermediate, intermediate]`).
    pub down_input: Hessian,
}

/// GPTQ factors of one dense MLP.
pub struct LayerFactors {
    pub input: GptqFactor,
    pub down_input: GptqFactor,
}

/// Hessians per layer (`None` for layers without a dense MLP, e.g. MoE layers).
#[derive(Debug, Clone)]
pub struct Calibration {
    pub layers: Vec<Option<MlpHessians>>,
    /// Dampening as a fraction of the mean Hessian diagonal (GPTQ's default 1%).
    pub damp: f64,
}

impl Calibration {
    /// Empty Hessians for layers of `hidden` → `intermediate` dense MLPs (`None` = skip).
    pub fn new(layers: impl IntoIterator<Item = Option<(usize, usize)>>) -> Self {
        let layers = layers
            .into_iter()
            .map(|dims| dims.map(|(hidden, inter)| MlpHessians { input: Hessian::new(hidden), down_input: Hessian::new(inter) }))
            .collect();
        Self { layers, damp: DEFAULT_DAMP }
    }

    /// Calibration rows seen by the first calibrated layer.
    pub fn samples(&self) -> usize {
        self.layers.iter().flatten().map(|h| h.input.samples).next().unwrap_or(0)
    }

    /// Factors every layer's Hessians (layers in parallel).
    pub fn factors(&self) -> Result<Vec<Option<LayerFactors>>, QuantizeError> {
        self.layers
            .par_iter()
            .enumerate()
            .map(|(layer, h)| {
                let Some(h) = h else { return Ok(None) };
                let f = |x: &Hessian| GptqFactor::from_hessian(x, self.damp).map_err(|source| QuantizeError::Factor { layer, source });
                Ok(Some(LayerFactors { input: f(&h.input)?, down_input: f(&h.down_input)? }))
            })
            .collect()
    }
}
