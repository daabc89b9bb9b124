//! The CPU backend against transformers: tiny random checkpoints of every
//! family (tests/fixtures, made by tools/make_fixtures.py) and the real
//! SmolLM2-135M-Instruct GGUF. Greedy ids must be identical; first-step
//! logits within 1e-4 of the largest logit's magnitude.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::engine::generate::{generate, GenerateRequest};
use kairos::engine::sampling::SamplingParams;
use kairos::model::{load_model, LoadedModel};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture readable")).expect("fixture JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn prompt_ids(m: &LoadedModel, case: &Value) -> Vec<u32> {
    let prompt = case["prompt"].as_str().expect("prompt");
    if case["chat"].as_bool().unwrap_or(false) {
        m.tokenizer.encode_chat(prompt).expect("chat encode")
    } else {
        m.tokenizer.encode(prompt, true).expect("encode")
    }
}

fn greedy(backend: &mut dyn Backend, prompt: &[u32], n: usize, eos: &[u32]) -> Vec<u32> {
    let req = GenerateRequest {
        prompt_ids: prompt.to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        eos_ids: eos.to_vec(),
        top_logits: 0,
    };
    generate(backend, &req).expect("generate").output_ids
}

fn first_logits(backend: &mut dyn Backend, prompt: &[u32]) -> Vec<f32> {
    let seq = backend.new_sequence();
    let l = backend.forward(&[Chunk { seq, tokens: prompt }], LogitsFor::Last).expect("forward");
    backend.free_sequence(seq);
    l
}

fn check_family(dir: &str) {
    let path = fixtures().join(dir);
    let m = load_model(&path).unwrap_or_else(|e| panic!("{dir}: {e}"));
    let reference = read_json(&path.join("reference.json"));
    let eos = m.tokenizer.eos_ids.clone();
    let mut backend = CpuBackend::new(Arc::new(m.weights));
    let model_tok = load_model(&path).expect("reload for tokenizer");
    for (i, case) in reference["cases"].as_array().expect("cases").iter().enumerate() {
        let want_prompt = ids(&case["prompt_ids"]);
        assert_eq!(prompt_ids(&model_tok, case), want_prompt, "{dir} case {i}: prompt ids");
        let logits = first_logits(&mut backend, &want_prompt);
        let want: Vec<f32> = case["first_logits"]
            .as_array()
            .expect("first_logits")
            .iter()
            .map(|x| x.as_f64().expect("f") as f32)
            .collect();
        assert_eq!(logits.len(), want.len(), "{dir}: vocab");
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let worst = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4 * scale.max(1.0), "{dir} case {i}: max |Δlogit| {worst} (scale {scale})");
        let want_ids = ids(&case["greedy_ids"]);
        let got = greedy(&mut backend, &want_prompt, want_ids.len(), &eos);
        assert_eq!(got, want_ids, "{dir} case {i}: greedy ids");
    }
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn llama_sharded_matches_transformers() {
    check_family("llama_sharded");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_family("qwen3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_family("qwen3_moe");
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral");
}

#[test]
fn gpt_oss_matches_transformers() {
    check_family("gpt_oss");
}

#[test]
fn gpt_oss_native_mxfp4_matches_transformers() {
    check_family("gpt_oss_mxfp4");
}

/// The real model. CI fetches it (scripts/fetch_model.sh); elsewhere the test
/// is skipped with a note unless KAIROS_TEST_MODEL points at it.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("KAIROS_TEST_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var("CI").is_err(), "CI must fetch the test model first (scripts/fetch_model.sh)");
    eprintln!("skipping: {} not found (run scripts/fetch_model.sh)", p.display());
    None
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(path) = smollm2_path() else { return };
    let m = load_model(&path).expect("load SmolLM2");
    let reference = read_json(&fixtures().join("smollm2_reference.json"));
    let eos = m.tokenizer.eos_ids.clone();
    let tok = load_model(&path).expect("reload");
    let mut backend = CpuBackend::new(Arc::new(m.weights));
    for (i, case) in reference["cases"].as_array().expect("cases").iter().enumerate() {
        let want_prompt = ids(&case["prompt_ids"]);
        assert_eq!(prompt_ids(&tok, case), want_prompt, "case {i}: prompt ids");
        let logits = first_logits(&mut backend, &want_prompt);
        for pair in case["first_top_logits"].as_array().expect("top logits") {
            let id = pair[0].as_u64().expect("id") as usize;
            let want = pair[1].as_f64().expect("logit") as f32;
            assert!((logits[id] - want).abs() <= 2e-3 * want.abs().max(1.0), "case {i}: logit[{id}] {} vs {want}", logits[id]);
        }
        let want_ids = ids(&case["greedy_ids"]);
        let got = greedy(&mut backend, &want_prompt, want_ids.len(), &eos);
        assert_eq!(got, want_ids, "case {i}: greedy ids ({:?})", case["prompt"]);
        let text = tok.tokenizer.decode(&got).expect("decode");
        assert_eq!(text.trim_end_matches("<|im_end|>"), case["greedy_text"].as_str().expect("text").trim_end_matches("<|im_end|>"), "case {i}: text");
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2_path() else { return };
    let m = load_model(&path).expect("load SmolLM2");
    let summary = read_json(&fixtures().join("smollm2_tokenizer_summary.json"));
    for case in summary["tokenize_cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        for (key, special) in [("ids_with_special", true), ("ids", false), ("ids_no_special", false)] {
            if let Some(want) = case.get(key) {
                assert_eq!(m.tokenizer.encode(text, special).expect("encode"), ids(want), "{text:?} ({key})");
            }
        }
    }
}
