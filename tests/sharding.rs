//! Sharded forward on N simulated CPU ranks against the single-rank CPU
//! backend: tensor-parallel attention, expert-parallel MoE (all-to-all
//! dispatch and combine) and vocabulary-split logits must give the same
//! logits to float tolerance, for prefill, decode steps and batched sequences.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kairos::backend::cpu::CpuBackend;
use kairos::backend::sharded::ShardedCpuBackend;
use kairos::backend::{Backend, Chunk, LogitsFor};
use kairos::model::config::ModelConfig;
use kairos::model::gguf::GgufFile;
use kairos::model::load::{gguf_config, read_hf_config};
use kairos::model::shard::{open_checkpoint_with, ShardLoadError, ShardPlan};
use kairos::model::upcycle::Upcycle;
use kairos::model::tensors::{GgufSource, SafetensorsSource};
use kairos::model::{load_model, ModelWeights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn worst(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "logit count");
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    (worst, scale)
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap_or(0)
}

/// Two sequences prefilled together (all logits), then `steps` batched decode
/// steps fed with the reference's greedy tokens; every logit row must agree.
fn compare(reference: &mut dyn Backend, sharded: &mut dyn Backend, prompts: [&[u32]; 2], steps: usize, what: &str) {
    let ra = [reference.new_sequence(), reference.new_sequence()];
    let sa = [sharded.new_sequence(), sharded.new_sequence()];
    let vocab = reference.vocab_size();
    let chunks = |ids: [kairos::backend::SeqId; 2], t: [&[u32]; 2]| -> Vec<(kairos::backend::SeqId, Vec<u32>)> {
        vec![(ids[0], t[0].to_vec()), (ids[1], t[1].to_vec())]
    };
    let run = |b: &mut dyn Backend, cs: &[(kairos::backend::SeqId, Vec<u32>)], which| {
        let chunks: Vec<Chunk> = cs.iter().map(|(s, t)| Chunk { seq: *s, tokens: t }).collect();
        b.forward(&chunks, which).expect("forward")
    };
    let want = run(reference, &chunks(ra, prompts), LogitsFor::All);
    let got = run(sharded, &chunks(sa, prompts), LogitsFor::All);
    let (w, s) = worst(&got, &want);
    assert!(w <= 1e-4 * s, "{what}: prefill max |Δlogit| {w} (scale {s})");
    let n0 = prompts[0].len();
    let mut next = [argmax(&want[(n0 - 1) * vocab..n0 * vocab]), argmax(&want[want.len() - vocab..])];
    for step in 0..steps {
        let want = run(reference, &chunks(ra, [&[next[0]], &[next[1]]]), LogitsFor::Last);
        let got = run(sharded, &chunks(sa, [&[next[0]], &[next[1]]]), LogitsFor::Last);
        let (w, s) = worst(&got, &want);
        assert!(w <= 1e-4 * s, "{what}: decode step {step} max |Δlogit| {w} (scale {s})");
        next = [argmax(&want[..vocab]), argmax(&want[vocab..])];
    }
    assert_eq!(sharded.seq_len(sa[0]).expect("len"), n0 + steps);
}

fn sharded_fixture(name: &str, plan: ShardPlan) -> Result<ShardedCpuBackend, ShardLoadError> {
    let dir = fixture(name);
    let (_, config) = read_hf_config(&dir).expect("config");
    let src = SafetensorsSource::open_dir(&dir).expect("open");
    ShardedCpuBackend::load(&config, &src, plan)
}

const A: &[u32] = &[1, 17, 300, 42, 9, 250, 77];
const B: &[u32] = &[5, 400, 3, 128];

fn check_fixture(name: &str, plans: &[(usize, usize, usize)]) {
    let m = load_model(&fixture(name)).expect("load");
    for &(ranks, tp, ep) in plans {
        let plan = ShardPlan::new(tp, ep, Some(ranks)).expect("plan");
        let mut reference = CpuBackend::new(Arc::new(load_model(&fixture(name)).expect("load").weights));
        let mut sharded = sharded_fixture(name, plan).unwrap_or_else(|e| panic!("{name} {plan:?}: {e}"));
        compare(&mut reference, &mut sharded, [A, B], 3, &format!("{name} ranks={ranks} tp={tp} ep={ep}"));
        // No rank holds the whole model: every rank's weights are smaller.
        let whole = resident(&m.weights);
        for r in 0..ranks {
            assert!(resident(sharded.rank_weights(r)) < whole, "{name} {plan:?}: rank {r} holds the whole model");
        }
    }
}

fn resident(w: &ModelWeights) -> usize {
    w.embed.bytes() + w.lm_head.as_ref().map_or(0, |l| l.bytes()) + w.linears().iter().map(|(_, l)| l.weight.bytes()).sum::<usize>()
}

// (ranks, tp, ep): tp-only, ep-only and tp+ep at 2 and 4 ranks; 8 ranks with
// experts split by width (4 heads cannot be split 8 ways).
const MOE_PLANS: &[(usize, usize, usize)] =
    &[(2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 4, 1), (4, 1, 4), (4, 4, 4), (4, 4, 2), (8, 1, 4), (8, 1, 1)];

#[test]
fn qwen3_moe_sharded_matches_single_rank() {
    check_fixture("qwen3_moe", MOE_PLANS);
}

#[test]
fn mixtral_sharded_matches_single_rank() {
    check_fixture("mixtral", MOE_PLANS);
}

#[test]
fn gpt_oss_sharded_matches_single_rank() {
    // Sinks, biases on attention and experts, sliding-window layers.
    check_fixture("gpt_oss", &[(2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 4, 4), (4, 4, 2), (8, 1, 4)]);
}

#[test]
fn gpt_oss_mxfp4_experts_shard_on_block_boundaries() {
    // Expert width 64: whole experts or halves of 32 values keep MXFP4 blocks whole.
    check_fixture("gpt_oss_mxfp4", &[(2, 2, 2), (4, 4, 4), (4, 4, 2)]);
    let e = sharded_fixture("gpt_oss_mxfp4", ShardPlan::new(4, 1, None).expect("plan")).err().expect("16-wide slices must fail");
    assert!(e.to_string().contains("32"), "{e}");
}

#[test]
fn dense_llama_tensor_parallel() {
    check_fixture("llama", &[(2, 2, 1), (4, 4, 1)]);
}

#[test]
fn mismatched_heads_and_experts_are_clear_errors() {
    let e = sharded_fixture("qwen3_moe", ShardPlan::new(8, 1, None).expect("plan")).err().expect("8 ranks, 4 heads");
    assert_eq!(e.to_string(), "shard plan: num_heads 4 is not divisible by tp 8");
    let e = sharded_fixture("mixtral", ShardPlan::new(1, 8, None).expect("plan")).err().expect("4 experts over 8");
    assert_eq!(e.to_string(), "shard plan: 4 experts are not divisible by ep 8");
    let e = sharded_fixture("llama", ShardPlan::new(1, 2, None).expect("plan")).err().expect("dense model");
    assert!(e.to_string().contains("needs an MoE model"), "{e}");
}

#[test]
fn sharded_runs_are_deterministic() {
    let plan = ShardPlan::new(4, 4, None).expect("plan");
    let run = || {
        let mut b = sharded_fixture("qwen3_moe", plan).expect("load");
        let s = b.new_sequence();
        b.forward(&[Chunk { seq: s, tokens: A }], LogitsFor::All).expect("forward")
    };
    assert_eq!(run(), run());
}

// SmolLM2-135M (9 query heads, 3 KV heads), from the real GGUF.

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

fn gguf_source(path: &Path) -> (ModelConfig, GgufSource) {
    let file = GgufFile::open(path).expect("gguf");
    let (_, config) = gguf_config(&file).expect("config");
    let permuted = file.get_str("general.architecture") == Some("llama");
    let src = GgufSource::new(path, file, config.num_heads, config.num_kv_heads, permuted);
    (config, src)
}

#[test]
fn smollm2_tensor_and_expert_parallel() {
    let Some(path) = smollm2() else { return };
    let dense = load_model(&path).expect("load");
    let prompt_a = dense.tokenizer.encode("Card payment flagged in", true).expect("encode");
    let prompt_b = dense.tokenizer.encode("Verdict:", true).expect("encode");
    let mut reference = CpuBackend::new(Arc::new(dense.weights));
    let (config, src) = gguf_source(&path);
    assert_eq!((config.num_heads, config.num_kv_heads), (9, 3));

    let e = ShardedCpuBackend::load(&config, &src, ShardPlan::new(2, 1, None).expect("plan")).err().expect("tp=2");
    assert_eq!(e.to_string(), "shard plan: num_heads 9 is not divisible by tp 2");

    let mut tp3 = ShardedCpuBackend::load(&config, &src, ShardPlan::new(3, 1, None).expect("plan")).expect("tp=3");
    compare(&mut reference, &mut tp3, [&prompt_a, &prompt_b], 2, "smollm2 tp=3");
    drop(tp3);

    // Upcycled to MoE (identical experts): its logits are the dense model's.
    for (ranks, tp, ep, experts) in [(3, 3, 3, 6), (4, 1, 4, 4), (8, 1, 8, 8)] {
        let up = open_checkpoint_with(&path, Some(Upcycle { experts, top_k: 2 })).expect("open upcycled");
        let plan = ShardPlan::new(tp, ep, Some(ranks)).expect("plan");
        let mut b = ShardedCpuBackend::load(&up.config, up.source.as_ref(), plan).unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        let mut fresh = CpuBackend::new(Arc::clone(reference.weights()));
        compare(&mut fresh, &mut b, [&prompt_a, &prompt_b], 2, &format!("smollm2 upcycled E={experts} {plan:?}"));
    }
}

#[test]
fn sharded_greedy_ids_match_transformers() {
    use kairos::engine::generate::{generate, GenerateRequest};
    use kairos::engine::sampling::SamplingParams;
    for (name, (tp, ep)) in [("qwen3_moe", (4, 2)), ("mixtral", (2, 2)), ("gpt_oss", (4, 4))] {
        let ck = kairos::model::shard::open_checkpoint(&fixture(name)).expect("open");
        let plan = ShardPlan::new(tp, ep, None).expect("plan");
        let mut b = ShardedCpuBackend::load(&ck.config, ck.source.as_ref(), plan).expect("load");
        let text = std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference");
        let reference: serde_json::Value = serde_json::from_str(&text).expect("json");
        let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect() };
        for case in reference["cases"].as_array().expect("cases") {
            let want = ids(&case["greedy_ids"]);
            let req = GenerateRequest {
                prompt_ids: ids(&case["prompt_ids"]),
                max_new_tokens: want.len(),
                sampling: SamplingParams::default(),
                eos_ids: ck.tokenizer.eos_ids.clone(),
                top_logits: 0,
            };
            let got = generate(&mut b, &req).expect("generate").output_ids;
            assert_eq!(got, want, "{name} tp={tp} ep={ep}: greedy ids");
        }
    }
}
