//! The fixtures' weights as the CUDA backend stores them (bf16 matrices and norms,
//! MXFP4 experts), for the model-level tests that compare against the CPU backend.

use std::path::{Path, PathBuf};

use half::bf16;
use kairos::model::family::{Mlp, ModelWeights};
use kairos::model::load_model;
use kairos::model::weights::Weight;
use kairos::quant::{Mxfp4Matrix, ScaleRule};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn to_bf16(w: &mut Weight) {
    let (rows, cols) = (w.rows(), w.cols());
    let data = w.to_f32().into_iter().map(bf16::from_f32).collect();
    *w = Weight::Bf16 { rows, cols, data };
}

pub fn to_mx(w: &mut Weight) {
    let (rows, cols) = (w.rows(), w.cols());
    *w = Weight::Mxfp4(Mxfp4Matrix::quantize(&w.to_f32(), rows, cols, ScaleRule::Spec).expect("quantize"));
}

pub fn round_vec(v: &mut [f32]) {
    for x in v.iter_mut() {
        *x = bf16::from_f32(*x).to_f32();
    }
}

/// The fixture's weights as the CUDA backend stores them.
pub fn prepared(dir: &str) -> ModelWeights {
    let mut w = load_model(&fixtures().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}")).weights;
    to_bf16(&mut w.embed);
    if let Some(h) = w.lm_head.as_mut() {
        to_bf16(h);
    }
    round_vec(&mut w.final_norm);
    for l in w.layers.iter_mut() {
        round_vec(&mut l.input_norm);
        round_vec(&mut l.post_attention_norm);
        let a = &mut l.attention;
        for lin in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
            to_bf16(&mut lin.weight);
        }
        if let Some(v) = a.q_norm.as_mut() {
            round_vec(v);
        }
        if let Some(v) = a.k_norm.as_mut() {
            round_vec(v);
        }
        match &mut l.mlp {
            Mlp::Dense(m) => {
                for lin in [&mut m.gate, &mut m.up, &mut m.down] {
                    to_bf16(&mut lin.weight);
                }
            }
            Mlp::Moe(m) => {
                to_bf16(&mut m.router.weight);
                for e in m.experts.iter_mut() {
                    for lin in [&mut e.gate, &mut e.up, &mut e.down] {
                        to_mx(&mut lin.weight);
                    }
                }
            }
        }
    }
    w
}

