//! Calibration for GPTQ: run the unquantized model on the CPU over a calibration
//! text and accumulate, per dense MLP layer, `H = XᵀX` of the inputs of its linears.

use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::cpu::{CpuBackend, MlpSite, MlpTap};
use crate::backend::{Backend, BackendError, Chunk, LogitsFor};
use crate::model::family::{Mlp, ModelWeights};
use crate::model::quantize::calibration::Calibration;

struct HessianTap(Arc<Mutex<Calibration>>);

impl MlpTap for HessianTap {
    fn record(&mut self, layer: usize, site: MlpSite, x: &[f32], n: usize) {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Some(h)) = c.layers.get_mut(layer) {
            match site {
                MlpSite::GateUpInput => h.input.add_batch(x, n),
                MlpSite::DownInput => h.down_input.add_batch(x, n),
            }
        }
    }
}

/// Hessians of every dense MLP's linear inputs over `tokens`, fed in independent
/// windows of at most `window` tokens (each window a fresh sequence).
pub fn collect_mlp_hessians(weights: Arc<ModelWeights>, tokens: &[u32], window: usize) -> Result<Calibration, BackendError> {
    let dims = weights.layers.iter().map(|l| match &l.mlp {
        Mlp::Dense(m) => Some((m.gate.in_features(), m.down.in_features())),
        Mlp::Moe(_) => None,
    });
    let calib = Arc::new(Mutex::new(Calibration::new(dims)));
    let mut b = CpuBackend::new(weights);
    b.set_mlp_tap(Some(Box::new(HessianTap(Arc::clone(&calib)))));
    for win in tokens.chunks(window.max(1)) {
        let seq = b.new_sequence();
        let out = b.forward(&[Chunk { seq, tokens: win }], LogitsFor::Last);
        b.free_sequence(seq);
        out?;
    }
    drop(b); // drops the tap's reference
    let c = match Arc::try_unwrap(calib) {
        Ok(m) => m.into_inner().unwrap_or_else(PoisonError::into_inner),
        Err(shared) => shared.lock().unwrap_or_else(PoisonError::into_inner).clone(),
    };
    Ok(c)
}
