//! NVFP4 checkpoints in NVIDIA ModelOpt's exported layout, written by an independent
//! writer (tools/make_nvfp4_modelopt.py: numpy/torch from the published format, not
//! kairos): every decoder linear loads packed as NVFP4, and the logits equal those of
//! transformers run on the script's dequantized weights.

use std::path::Path;
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::engine::generate::{generate, GenerateRequest};
use kairos::engine::sampling::SamplingParams;
use kairos::model::family::Mlp;
use kairos::model::load_model;
use kairos::model::weights::Precision;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn modelopt_nvfp4_checkpoint_matches_dequantized_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_nvfp4_modelopt");
    let m = load_model(&dir).expect("load ModelOpt NVFP4 folder");
    let w = &m.weights;
    for (i, l) in w.layers.iter().enumerate() {
        let a = &l.attention;
        let Mlp::Dense(mlp) = &l.mlp else { panic!("llama layer {i} is dense") };
        for (n, lin) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o), ("gate", &mlp.gate), ("up", &mlp.up), ("down", &mlp.down)] {
            assert_eq!(lin.weight.precision(), Precision::Nvfp4, "layer {i} {n} must stay packed NVFP4");
        }
    }
    assert_eq!(w.lm_head.as_ref().map(|h| h.precision()), Some(Precision::F32), "lm_head is excluded");

    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference")).expect("json");
    let eos = m.tokenizer.eos_ids.clone();
    let mut b = CpuBackend::new(Arc::new(m.weights));
    for (i, case) in reference["cases"].as_array().expect("cases").iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let seq = b.new_sequence();
        let got = b.forward(&[Chunk { seq, tokens: &prompt }], LogitsFor::Last).expect("forward");
        b.free_sequence(seq);
        let want = floats(&case["first_logits"]);
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale, "case {i}: max |Δlogit| {worst} (scale {scale})");
        let req = GenerateRequest {
            prompt_ids: prompt,
            max_new_tokens: ids(&case["greedy_ids"]).len(),
            sampling: SamplingParams::default(),
            eos_ids: eos.clone(),
            top_logits: 0,
        };
        assert_eq!(generate(&mut b, &req).expect("generate").output_ids, ids(&case["greedy_ids"]), "case {i}: greedy ids");
    }
}
