//! Gated MLPs and mixture-of-experts blocks on the CPU: tokens are grouped by
//! expert so each chosen expert's weights are read once per step.

use super::matmul::linear;
use super::ops;
use crate::model::config::{Activation, ModelConfig, RouterKind};
use crate::model::family::{GatedMlp, Moe};

pub fn gated_mlp(m: &GatedMlp, act: Activation, x: &[f32], n: usize) -> Vec<f32> {
    gated_mlp_observed(m, act, x, n, &mut |_| {})
}

/// [`gated_mlp`] that shows `down_proj`'s input to `observe` (calibration).
pub fn gated_mlp_observed(m: &GatedMlp, act: Activation, x: &[f32], n: usize, observe: &mut dyn FnMut(&[f32])) -> Vec<f32> {
    let mut gate = linear(&m.gate, x, n);
    let up = linear(&m.up, x, n);
    ops::gated_activation(act, &mut gate, &up);
    observe(&gate);
    linear(&m.down, &gate, n)
}

/// Router decisions for one token: (expert, weight) pairs.
pub fn route(logits: &[f32], k: usize, kind: RouterKind) -> Vec<(usize, f32)> {
    match kind {
        RouterKind::SoftmaxTopK { renormalize } => {
            let mut p = logits.to_vec();
            ops::softmax(&mut p);
            let top = ops::top_k(&p, k);
            let sum: f32 = top.iter().map(|&e| p[e]).sum();
            top.into_iter().map(|e| (e, if renormalize { p[e] / sum } else { p[e] })).collect()
        }
        RouterKind::TopKSoftmax => {
            let top = ops::top_k(logits, k);
            let mut w: Vec<f32> = top.iter().map(|&e| logits[e]).collect();
            ops::softmax(&mut w);
            top.into_iter().zip(w).collect()
        }
    }
}

pub fn moe_forward(block: &Moe, c: &ModelConfig, x: &[f32], n: usize) -> Vec<f32> {
    let h = c.hidden_size;
    let Some(moe) = c.moe.as_ref() else { return vec![0f32; n * h] };
    let router_logits = linear(&block.router, x, n);
    let e = moe.num_experts;
    // expert -> [(token, weight)]
    let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
    for t in 0..n {
        for (ex, w) in route(&router_logits[t * e..(t + 1) * e], moe.top_k, moe.router) {
            assigned[ex].push((t, w));
        }
    }
    let mut out = vec![0f32; n * h];
    for (ex, tokens) in assigned.iter().enumerate() {
        if tokens.is_empty() {
            continue;
        }
        let mut xs = Vec::with_capacity(tokens.len() * h);
        for &(t, _) in tokens {
            xs.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        let y = gated_mlp(&block.experts[ex], c.activation, &xs, tokens.len());
        for (j, &(t, w)) in tokens.iter().enumerate() {
            for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[j * h..(j + 1) * h]) {
                *o += w * v;
            }
        }
    }
    out
}
