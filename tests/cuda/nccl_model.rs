//! The NCCL path of the CUDA backend with one rank: a `CudaBackend` whose layers
//! all-reduce their attention and MLP / MoE outputs through an NCCL world of one
//! (captured in the decode graphs) gives the logits of the plain single-GPU
//! backend, on a dense and an MoE fixture, over a prefill and graph decode steps.
//! Skips without a GPU or NCCL unless KAIROS_REQUIRE_CUDA=1. cudarc loads
//! `libnccl.so`: link it to `libnccl.so.2` in a folder on LD_LIBRARY_PATH.


use std::path::Path;

use kairos::backend::collectives::nccl::{nccl_available, new_id, NcclComm};
use kairos::backend::cuda::model::{CudaBackend, CudaBackendOptions};
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::model::load_model;

fn ready() -> bool {
    let required = std::env::var("KAIROS_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if !kairos::backend::cuda::device_available() {
        assert!(!required, "KAIROS_REQUIRE_CUDA=1 but no CUDA device was found");
        println!("no CUDA device: skipped");
        return false;
    }
    if !nccl_available() {
        assert!(!required, "KAIROS_REQUIRE_CUDA=1 but libnccl.so was not found");
        println!("no NCCL library: skipped");
        return false;
    }
    true
}

fn check(fixture: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
    let m = load_model(&dir).expect("fixture");
    let opts = || CudaBackendOptions { max_context: Some(256), initial_slots: 2, max_step_tokens: 8, ..Default::default() };
    let mut plain = CudaBackend::new(&m.weights, opts()).expect("plain backend");
    let mut ranked = CudaBackend::new(&m.weights, opts()).expect("backend for NCCL");
    let comm = NcclComm::join_on(ranked.context().stream.clone(), 0, 1, new_id().expect("NCCL id")).expect("NCCL world of 1");
    ranked.attach_nccl(comm).expect("attach");
    let vocab = m.weights.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..11).map(|i| (i * 37 + 5) % vocab).collect();
    let (a, b) = (plain.new_sequence(), ranked.new_sequence());
    let mut tok = prompt.clone();
    let mut worst = 0f32;
    for step in 0..9 {
        let la = plain.forward(&[Chunk { seq: a, tokens: &tok }], LogitsFor::Last).expect("plain forward");
        let lb = ranked.forward(&[Chunk { seq: b, tokens: &tok }], LogitsFor::Last).expect("NCCL forward");
        assert!(lb.iter().all(|v| v.is_finite()), "{fixture} step {step}: non-finite logits");
        let scale = la.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(err / scale);
        assert!(err <= 1e-6 * scale, "{fixture} step {step}: NCCL path differs by {err} (max |logit| {scale})");
        let next = la.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
        tok = vec![next];
    }
    println!("  {fixture}: NCCL world of 1 == single GPU within {worst:.1e} of max |logit| (prefill + 8 graph decode steps)");
}

#[test]
fn nccl_one_rank_matches_single_gpu() {
    if !ready() {
        return;
    }
    check("llama");
    check("qwen3_moe");
}
