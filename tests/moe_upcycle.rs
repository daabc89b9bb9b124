//! MoE correctness without a pretrained MoE: a dense model upcycled into E
//! identical experts per layer, with any router, gives the dense logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::model::config::{Arch, MoeConfig, RouterKind};
use kairos::model::family::{GatedMlp, Mlp, Moe, ModelWeights};
use kairos::model::load_model;
use kairos::model::weights::{Linear, Weight};

fn copy_linear(l: &Linear) -> Linear {
    Linear { weight: Weight::f32(l.weight.rows(), l.weight.cols(), l.weight.to_f32()), bias: l.bias.clone() }
}

/// Replaces every dense MLP by `experts` copies behind a random router.
fn upcycle(mut w: ModelWeights, experts: usize, top_k: usize, router: RouterKind) -> ModelWeights {
    let h = w.config.hidden_size;
    let mut seed = 12345u64;
    for layer in w.layers.iter_mut() {
        let Mlp::Dense(m) = &layer.mlp else { panic!("dense model expected") };
        let copies: Vec<GatedMlp> = (0..experts)
            .map(|_| GatedMlp { gate: copy_linear(&m.gate), up: copy_linear(&m.up), down: copy_linear(&m.down) })
            .collect();
        let router_w: Vec<f32> = (0..experts * h)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect();
        layer.mlp = Mlp::Moe(Moe { router: Linear { weight: Weight::f32(experts, h, router_w), bias: None }, experts: copies });
    }
    let inter = w.config.intermediate_size;
    w.config.arch = Arch::Qwen3Moe;
    w.config.moe = Some(MoeConfig {
        num_experts: experts,
        top_k,
        expert_intermediate: inter,
        router,
        router_bias: false,
        expert_bias: false,
        dense_layers: vec![],
    });
    w
}

fn logits(w: ModelWeights, prompt: &[u32]) -> Vec<f32> {
    let mut b = CpuBackend::new(Arc::new(w));
    let seq = b.new_sequence();
    b.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::All).expect("forward")
}

fn check(model: &Path, prompt_text: &str) {
    let dense = load_model(model).expect("load");
    let prompt = dense.tokenizer.encode(prompt_text, true).expect("encode");
    let want = logits(dense.weights, &prompt);
    for (e, k) in [(4, 2), (8, 3)] {
        let moe = upcycle(load_model(model).expect("load").weights, e, k, RouterKind::SoftmaxTopK { renormalize: true });
        let got = logits(moe, &prompt);
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale, "E={e} k={k}: max |Δlogit| {worst} (scale {scale})");
    }
}

#[test]
fn upcycled_tiny_llama_equals_dense() {
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama"), "The license is free software");
}

#[test]
fn upcycled_smollm2_equals_dense() {
    let p = std::env::var_os("KAIROS_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !p.exists() {
        assert!(std::env::var("CI").is_err(), "CI must fetch the test model");
        eprintln!("skipping: {} not found", p.display());
        return;
    }
    check(&p, "Fraud detection on card transactions needs");
}
