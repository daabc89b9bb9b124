//! `kairos quantize` folders load back bit-identical to quantizing at load, and
//! `kairos eval` perplexity equals exp(mean NLL) computed from forward logits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::engine::eval::{evaluate, EvalOptions};
use kairos::engine::generate::{generate, GenerateRequest};
use kairos::engine::sampling::SamplingParams;
use kairos::model::load::{gguf_config, read_hf_config};
use kairos::model::quantize::save::save_model;
use kairos::model::quantize::{apply_quant, QuantSpec};
use kairos::model::weights::Precision;
use kairos::model::{load_model, LoadedModel};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kairos-quant-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn quantized(path: &Path, spec: &QuantSpec) -> LoadedModel {
    let mut m = load_model(path).expect("load");
    apply_quant(&mut m.weights, spec).expect("quantize");
    m
}

/// Greedy ids and all-position logits of a fixed prompt.
fn run(m: LoadedModel, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let eos = m.tokenizer.eos_ids.clone();
    let mut b = CpuBackend::new(Arc::new(m.weights));
    let seq = b.new_sequence();
    let logits = b.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::All).expect("forward");
    b.free_sequence(seq);
    let req = GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        eos_ids: eos,
        top_logits: 0,
    };
    (generate(&mut b, &req).expect("generate").output_ids, logits)
}

fn precisions(m: &LoadedModel) -> Vec<(String, Precision)> {
    let mut v: Vec<_> = m.weights.linears().into_iter().map(|(n, l)| (n, l.weight.precision())).collect();
    v.push(("embed".into(), m.weights.embed.precision()));
    if let Some(h) = &m.weights.lm_head {
        v.push(("lm_head".into(), h.precision()));
    }
    v
}

fn roundtrip(src: &Path, spec_text: &str, tag: &str) {
    let spec: QuantSpec = spec_text.parse().expect("spec");
    let at_load = quantized(src, &spec);
    let out = tmp(tag);
    let raw = if src.is_dir() {
        read_hf_config(src).expect("config").0
    } else {
        gguf_config(&kairos::model::gguf::GgufFile::open(src).expect("gguf")).expect("config").0
    };
    save_model(&out, &at_load, src, &raw, &spec).expect("save");
    let back = load_model(&out).expect("load quantized folder");
    assert_eq!(precisions(&back), precisions(&at_load), "{tag}: precisions");
    let prompt = at_load.tokenizer.encode("The quick brown fox jumps over", true).expect("encode");
    assert_eq!(back.tokenizer.encode("The quick brown fox jumps over", true).expect("encode"), prompt, "{tag}: tokenizer");
    assert_eq!(back.tokenizer.eos_ids, at_load.tokenizer.eos_ids, "{tag}: eos");
    let (ids_a, logits_a) = run(at_load, &prompt);
    let (ids_b, logits_b) = run(back, &prompt);
    assert_eq!(ids_a, ids_b, "{tag}: greedy ids");
    let same = logits_a.iter().zip(&logits_b).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same && logits_a.len() == logits_b.len(), "{tag}: logits not bit-identical");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn quantized_folder_equals_quantize_at_load_llama() {
    roundtrip(&fixture("llama"), "experts=mxfp4", "llama-mx");
    roundtrip(&fixture("llama"), "experts=nvfp4,dense=fp8", "llama-nv-fp8");
    roundtrip(&fixture("llama"), "experts=mxfp4,dense=bf16,scale=mse", "llama-mx-bf16");
}

#[test]
fn quantized_folder_equals_quantize_at_load_qwen3_moe() {
    roundtrip(&fixture("qwen3_moe"), "experts=nvfp4", "moe-nv");
    roundtrip(&fixture("qwen3_moe"), "experts=mxfp4,dense=fp8", "moe-mx-fp8");
}

#[test]
fn quantized_folder_equals_quantize_at_load_smollm2_gguf() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        eprintln!("skipping: {} not present", p.display());
        return;
    }
    roundtrip(&p, "experts=mxfp4,dense=bf16", "smollm2");
}

#[test]
fn apply_quant_sets_the_policy() {
    let m = quantized(&fixture("qwen3_moe"), &"experts=nvfp4,dense=fp8".parse().expect("spec"));
    for (name, p) in precisions(&m) {
        let want = if name.contains("router") {
            Precision::F32
        } else if name.contains(".attn.") {
            Precision::Fp8
        } else if name == "embed" || name == "lm_head" {
            Precision::Bf16
        } else {
            Precision::Nvfp4
        };
        assert_eq!(p, want, "{name}");
    }
}

/// Tokens of a small text (enough for several windows).
fn text_tokens(m: &LoadedModel) -> Vec<u32> {
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
        .repeat(3);
    m.tokenizer.encode(&text, true).expect("encode")
}

#[test]
fn eval_perplexity_matches_hand_computed_nll() {
    let m = load_model(&fixture("llama")).expect("load");
    let toks = text_tokens(&m);
    assert!(toks.len() > 40, "{}", toks.len());
    let mut b = CpuBackend::new(Arc::new(m.weights));
    // One window holding the whole text: NLL from one forward pass by hand.
    let seq = b.new_sequence();
    let logits = b.forward(&[Chunk { seq, tokens: &toks }], LogitsFor::All).expect("forward");
    b.free_sequence(seq);
    let v = b.vocab_size();
    let mut nll = 0f64;
    for t in 1..toks.len() {
        let row = &logits[(t - 1) * v..t * v];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        nll += lse - row[toks[t] as usize] as f64;
    }
    let want = (nll / (toks.len() - 1) as f64).exp();
    let r = evaluate(&mut b, None, &toks, EvalOptions { window: toks.len(), stride: toks.len() }).expect("eval");
    assert!(r.perplexity.is_finite() && r.perplexity > 1.0);
    assert_eq!(r.tokens_scored, toks.len() - 1);
    assert!((r.perplexity - want).abs() <= 1e-9 * want, "{} vs {want}", r.perplexity);
    // Strided windows score every token once too, with less context: finite, close.
    let s = evaluate(&mut b, None, &toks, EvalOptions { window: 16, stride: 8 }).expect("eval");
    assert_eq!(s.tokens_scored, toks.len() - 1);
    assert!(s.perplexity.is_finite());
}

#[test]
fn eval_against_reference() {
    let path = fixture("qwen3_moe");
    let reference = load_model(&path).expect("load");
    let toks = text_tokens(&reference);
    let opts = EvalOptions { window: 32, stride: 16 };
    let mut r = CpuBackend::new(Arc::new(reference.weights));
    // Same weights on both sides: agreement 1, KL 0, equal perplexities.
    let mut same = CpuBackend::new(Arc::new(load_model(&path).expect("load").weights));
    let e = evaluate(&mut same, Some(&mut r), &toks, opts).expect("eval");
    assert_eq!(e.top1_agreement, Some(1.0));
    assert!(e.kl.expect("kl") < 1e-12);
    assert_eq!(e.perplexity_ref, Some(e.perplexity));
    let mut q = CpuBackend::new(Arc::new(quantized(&path, &"experts=mxfp4".parse().expect("spec")).weights));
    let e = evaluate(&mut q, Some(&mut r), &toks, opts).expect("eval");
    let (ag, kl) = (e.top1_agreement.expect("agreement"), e.kl.expect("kl"));
    assert!((0.0..=1.0).contains(&ag) && kl >= 0.0 && kl.is_finite(), "{ag} {kl}");
    assert!(e.perplexity.is_finite() && e.perplexity_ref.expect("ref").is_finite());
}
