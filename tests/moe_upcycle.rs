//! MoE correctness without a pretrained MoE: a dense model upcycled into E
//! identical experts per layer, with any router, gives the dense logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::model::family::{Mlp, ModelWeights};
use kairos::model::upcycle::Upcycle;
use kairos::model::{load_model, load_model_with};

fn logits(w: ModelWeights, prompt: &[u32]) -> Vec<f32> {
    let mut b = CpuBackend::new(Arc::new(w));
    let seq = b.new_sequence();
    b.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::All).expect("forward")
}

fn check(model: &Path, prompt_text: &str) {
    let dense = load_model(model).expect("load");
    let prompt = dense.tokenizer.encode(prompt_text, true).expect("encode");
    let want = logits(dense.weights, &prompt);
    for (experts, top_k) in [(4, 2), (8, 3)] {
        let (e, k) = (experts, top_k);
        let moe = load_model_with(model, Some(Upcycle { experts, top_k })).expect("load upcycled").weights;
        let moe_layers = moe.layers.iter().filter(|l| matches!(&l.mlp, Mlp::Moe(m) if m.experts.len() == e)).count();
        assert_eq!(moe_layers, moe.layers.len(), "every layer is an MoE of {e} experts");
        assert_eq!(moe.config.moe.as_ref().map(|m| m.top_k), Some(k));
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

fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("KAIROS_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !p.exists() {
        assert!(std::env::var("CI").is_err(), "CI must fetch the test model");
        eprintln!("skipping: {} not found", p.display());
        return None;
    }
    Some(p)
}

#[test]
fn upcycled_smollm2_equals_dense() {
    let Some(p) = smollm2() else { return };
    check(&p, "Fraud detection on card transactions needs");
}

/// `kairos generate --json` on SmolLM2 as stored and with `--upcycle E,K`.
fn generate_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kairos"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", "Card 4242 paid 9,000 EUR in Lagos at 3 am. Verdict:", "--max-new-tokens", "12", "--json"])
        .args(extra)
        .output()
        .expect("run kairos");
    assert!(out.status.success(), "kairos generate {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn generate_upcycled_gives_the_dense_tokens() {
    let Some(p) = smollm2() else { return };
    let dense = generate_json(&p, &[]);
    let moe = generate_json(&p, &["--upcycle", "8,2"]);
    assert_eq!(dense["output_ids"].as_array().map(Vec::len), Some(12));
    assert_eq!(moe["output_ids"], dense["output_ids"], "{moe} vs {dense}");
}

#[test]
fn generate_refuses_a_bad_upcycle() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kairos"))
        .args(["generate", "--model"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama"))
        .args(["--prompt", "hi", "--upcycle", "2,3"])
        .output()
        .expect("run kairos");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("top-k 3 must be between 1 and the expert count 2"), "{err}");
}

#[test]
fn upcycling_an_moe_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_moe");
    let e = load_model_with(&dir, Some(Upcycle { experts: 4, top_k: 2 })).err().expect("an MoE cannot be upcycled");
    assert!(e.to_string().contains("already a mixture of experts"), "{e}");
}
