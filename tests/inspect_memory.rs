//! `kairos inspect`: the resident bytes predicted for a precision mix (from the config
//! alone) agree with the bytes of the weights actually loaded with that mix. The only
//! differences are the documented ones, asserted exactly: the prediction counts norms
//! at the dense precision (≥ bf16) while they stay f32, and NVFP4's per-tensor f32
//! scale (4 bytes per matrix) is not in its bits-per-parameter.

use std::path::Path;

use kairos::model::accounting::{measured_resident_bytes, precision_mix, ParamCounts};
use kairos::model::family::Mlp;
use kairos::model::load_model;
use kairos::model::quantize::{apply_quant, QuantSpec};

fn llama() -> kairos::model::LoadedModel {
    load_model(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")).expect("llama fixture")
}

#[test]
fn measured_resident_bytes_match_predicted_mixes() {
    let m = llama();
    let c = m.weights.config.clone();
    let p = ParamCounts::from_config(&c);
    assert_eq!(measured_resident_bytes(&m.weights), precision_mix(&c, &p, "f32", "f32").resident_bytes, "as loaded (f32)");
    let fp4_matrices = m.weights.layers.iter().filter(|l| matches!(l.mlp, Mlp::Dense(_))).count() as u64 * 3;
    for (spec, experts, tensor_scales) in [("experts=mxfp4,dense=bf16", "mxfp4", 0), ("experts=nvfp4,dense=bf16", "nvfp4", 4 * fp4_matrices)] {
        let mut w = llama().weights;
        apply_quant(&mut w, &spec.parse::<QuantSpec>().expect("spec")).expect("quantize");
        let predicted = precision_mix(&c, &p, experts, "bf16").resident_bytes;
        let norms_f32_not_bf16 = 2 * p.norms;
        assert_eq!(measured_resident_bytes(&w), predicted + norms_f32_not_bf16 + tensor_scales, "{spec}");
    }
}
