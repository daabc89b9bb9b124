//! Rotary embedding frequencies, as transformers computes them for each
//! `rope_type`; shared by every backend.

use crate::model::config::{RopeConfig, RopeScaling};

pub struct RopeTable {
    /// Inverse frequencies, `head_dim / 2` of them.
    pub inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub scale: f64,
}

impl RopeTable {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let base = cfg.theta;
        let plain: Vec<f64> =
            (0..half).map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64)).collect();
        match &cfg.scaling {
            RopeScaling::None => Self { inv_freq: plain, scale: 1.0 },
            RopeScaling::Linear { factor } => {
                Self { inv_freq: plain.iter().map(|f| f / factor).collect(), scale: 1.0 }
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let low_wl = original_max_position / low_freq_factor;
                let high_wl = original_max_position / high_freq_factor;
                let inv_freq = plain
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let s = (original_max_position / wl - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - s) * f / factor + s * f
                        }
                    })
                    .collect();
                Self { inv_freq, scale: 1.0 }
            }
            RopeScaling::Yarn { factor, original_max_position, beta_fast, beta_slow, truncate, attention_factor } => {
                let dim = head_dim as f64;
                let corr = |rot: f64| {
                    dim * (original_max_position / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim - 1.0);
                let span = if (high - low).abs() < f64::EPSILON { 0.001 } else { high - low };
                let inv_freq = (0..half)
                    .map(|i| {
                        let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let pos = base.powf((2 * i) as f64 / dim);
                        (1.0 / (factor * pos)) * (1.0 - extrapolation) + (1.0 / pos) * extrapolation
                    })
                    .collect();
                let scale = attention_factor
                    .unwrap_or(if *factor > 1.0 { 0.1 * factor.ln() + 1.0 } else { 1.0 });
                Self { inv_freq, scale }
            }
        }
    }

    /// cos and sin for one position, `head_dim / 2` each, computed like transformers
    /// (frequency × position in f32, then cos/sin, then the attention scale).
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = (f as f32) * (pos as f32);
            cos[i] = angle.cos() * self.scale as f32;
            sin[i] = angle.sin() * self.scale as f32;
        }
    }
}
