//! The sharded CUDA backend on ONE GPU: N ranks, each a `CudaBackend` holding only
//! its slices (`CudaBackend::new_rank`: its heads and KV heads, MLP rows, experts,
//! vocabulary rows, plus the full router), run as N threads joined by host-staged
//! collectives (`ShardedCudaBackend::load_one_gpu`; NCCL refuses two ranks on one
//! device, and the host syncs keep these ranks off CUDA graphs). They must give the
//! single-GPU `CudaBackend`'s logits on the MoE fixtures (tp-only, ep-only and
//! tp+ep plans at 2, 4 and 8 ranks, where the head and expert counts allow) and on
//! SmolLM2 when `KAIROS_TEST_MODEL` is set: two sequences prefilled together (all
//! logits, several micro-batches) and 4 batched decode steps fed with the
//! single GPU's greedy tokens.
//!
//! Tolerance, per logit row, relative to the row's largest |logit| (the
//! `cuda_model.rs` convention): sums over ranks change the order of float
//! additions (o_proj and down-projection partial sums, MoE partial outputs), and
//! the bf16 activations (normed hidden, KV cache) now and then round such a
//! difference to the next bf16 value (2^-8 relative); `TOL` = 1e-2 covers that.
//! With top-2 of 4 experts that rounding can also flip a near-tied router choice,
//! which moves a row by about the routing weight, so top-2 runs get `TOL_MOE` =
//! 8e-2 per row (`cuda_model.rs`'s MoE tolerance) with a mean over rows <= `TOL`;
//! each fixture also runs with top-k = all experts (no choice can flip) at `TOL`.
//! Greedy ids must be equal wherever the single GPU's top-1 / top-2 margin exceeds
//! twice the row's bound. A missing reduction or a wrong slice moves logits by far more.
//!
//! Also: the host-staged collectives alone (3 ranks on one GPU), a rank of a world
//! of one over NCCL (graphs on) equals the plain backend (the shard launches are
//! captured), and plans the CUDA kernels cannot run fail with a clear error.
//!
//! Run: `KAIROS_REQUIRE_CUDA=1 cargo test --release --features cuda --test cuda -- shard:: --test-threads=1 --nocapture`
//! (add `KAIROS_TEST_MODEL=models/cache/SmolLM2-135M-Instruct.Q4_1.gguf` for SmolLM2; the
//! NCCL test needs `libnccl.so` on LD_LIBRARY_PATH). Without a GPU every test prints
//! a skip line and passes, unless KAIROS_REQUIRE_CUDA=1.


use std::path::{Path, PathBuf};

use kairos::backend::collectives::nccl::{nccl_available, new_id, NcclComm};
use kairos::backend::cuda::model::{CudaBackend, CudaBackendOptions};
use kairos::backend::cuda::sharded::ShardedCudaBackend;
use kairos::backend::{Backend, Chunk, LogitsFor, SeqId};
use kairos::model::config::ModelConfig;
use kairos::model::shard::device::load_routers;
use kairos::model::shard::{load_rank, open_checkpoint, ShardPlan};
use kairos::model::tensors::TensorSource;
use kairos::model::{load_model, ModelWeights};

const TOL: f32 = 1e-2;
const TOL_MOE: f32 = 8e-2;
/// A real checkpoint (SmolLM2: activation outliers in the hundreds) turns a partial sum that
/// differs in its last f32 bit into many flipped bf16 roundings downstream: tp = 3 measured
/// 1.58e-2 of max |logit| on the H100, the size of the GPU-vs-CPU differences of
/// `cuda_smollm2.rs` (1.63e-2). Held to `cuda_model.rs`'s GPU-vs-CPU bound.
const TOL_REAL: f32 = 3e-2;

fn ready() -> bool {
    if !kairos::backend::cuda::device_available() {
        assert!(std::env::var("KAIROS_REQUIRE_CUDA").map_or(true, |v| v != "1"), "KAIROS_REQUIRE_CUDA=1 but no CUDA device was found");
        println!("no CUDA device: skipped");
        return false;
    }
    true
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn opts() -> CudaBackendOptions {
    // 8 rows per step: the 11-row prefill runs as two micro-batches
    CudaBackendOptions { max_context: Some(256), initial_slots: 2, max_step_tokens: 8, ..Default::default() }
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

#[derive(Default)]
struct Stats {
    rows: usize,
    worst: f32,
    sum: f32,
    ids_checked: usize,
    ids_close: usize,
}

/// Compares logit rows of `vocab` values; returns the reference's argmax of each row.
fn compare(what: &str, want: &[f32], got: &[f32], vocab: usize, tol: f32, st: &mut Stats) -> Vec<u32> {
    assert_eq!(want.len(), got.len(), "{what}: logits length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite sharded logits");
    let mut ids = Vec::new();
    for (r, (w, g)) in want.chunks(vocab).zip(got.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = err / scale;
        assert!(rel <= tol, "{what} row {r}: max |sharded - single| = {err:.3e} is {rel:.3e} of max |logit| {scale:.3}, over {tol}");
        st.rows += 1;
        st.worst = st.worst.max(rel);
        st.sum += rel;
        let (wi, gi) = (argmax(w), argmax(g));
        let top2 = w.iter().enumerate().filter(|(i, _)| *i != wi).fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
        if w[wi] - top2 > 2.0 * tol * scale {
            st.ids_checked += 1;
            assert_eq!(wi, gi, "{what} row {r}: greedy id differs");
        } else {
            st.ids_close += 1;
        }
        ids.push(wi as u32);
    }
    ids
}

const A: &[u32] = &[1, 17, 300, 42, 9, 250, 77];
const B: &[u32] = &[5, 400, 3, 128];

/// Prefill of two sequences (all logits) and 4 batched decode steps on both backends.
fn run_pair(what: &str, single: &mut CudaBackend, sharded: &mut ShardedCudaBackend, tol: f32) -> Stats {
    let vocab = single.vocab_size();
    assert_eq!(sharded.vocab_size(), vocab, "{what}: vocabulary");
    let mut st = Stats::default();
    let sa: [SeqId; 2] = [single.new_sequence(), single.new_sequence()];
    let sb: [SeqId; 2] = [sharded.new_sequence(), sharded.new_sequence()];
    let fit = |t: &[u32]| t.iter().map(|&x| x % vocab as u32).collect::<Vec<_>>();
    let (a, b) = (fit(A), fit(B));
    let want = single.forward(&[Chunk { seq: sa[0], tokens: &a }, Chunk { seq: sa[1], tokens: &b }], LogitsFor::All).expect("single forward");
    let got = sharded.forward(&[Chunk { seq: sb[0], tokens: &a }, Chunk { seq: sb[1], tokens: &b }], LogitsFor::All).expect("sharded forward");
    let ids = compare(&format!("{what} prefill"), &want, &got, vocab, tol, &mut st);
    let mut next = [ids[a.len() - 1], ids[ids.len() - 1]];
    for step in 0..4 {
        let want = single
            .forward(&[Chunk { seq: sa[0], tokens: &next[..1] }, Chunk { seq: sa[1], tokens: &next[1..] }], LogitsFor::Last)
            .expect("single decode");
        let got = sharded
            .forward(&[Chunk { seq: sb[0], tokens: &next[..1] }, Chunk { seq: sb[1], tokens: &next[1..] }], LogitsFor::Last)
            .expect("sharded decode");
        let ids = compare(&format!("{what} decode step {step}"), &want, &got, vocab, tol, &mut st);
        next = [ids[0], ids[1]];
    }
    assert_eq!(sharded.seq_len(sb[0]).expect("len"), a.len() + 4, "{what}: sequence length");
    st
}

/// Every plan on the model at `path` (a fixture folder or a checkpoint), with
/// `top_k` optionally raised to all experts.
fn check(path: &Path, plans: &[(usize, usize, usize)], all_experts: bool) {
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let ck = open_checkpoint(path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut full: ModelConfig = ck.config.clone();
    let mut weights: ModelWeights = load_model(path).unwrap_or_else(|e| panic!("{name}: {e}")).weights;
    let mut routed = false;
    for m in [full.moe.as_mut(), weights.config.moe.as_mut()].into_iter().flatten() {
        if all_experts {
            m.top_k = m.num_experts;
        }
        routed = m.top_k < m.num_experts;
    }
    let mut single = CudaBackend::new(&weights, opts()).expect("single-GPU backend");
    drop(weights);
    let real = path.extension().is_some_and(|e| e == "gguf");
    let tol = if routed {
        TOL_MOE
    } else if real {
        TOL_REAL
    } else {
        TOL
    };
    for &(ranks, tp, ep) in plans {
        let plan = ShardPlan::new(tp, ep, Some(ranks)).expect("plan");
        let what = format!("{name}{} ranks={ranks} tp={tp} ep={ep}", if all_experts { " (top-k = all)" } else { "" });
        let mut sharded = ShardedCudaBackend::load_one_gpu(&full, ck.source.as_ref(), plan, opts()).unwrap_or_else(|e| panic!("{what}: {e}"));
        // no rank holds the whole model
        for r in 0..ranks {
            assert!(sharded.rank(r).weight_bytes() < single.weight_bytes(), "{what}: rank {r} holds as much as the whole model");
        }
        let st = run_pair(&what, &mut single, &mut sharded, tol);
        let mean = st.sum / st.rows as f32;
        assert!(mean <= TOL, "{what}: mean row error {mean:.3e} over {TOL}");
        println!(
            "  {what}: {} rows, worst {:.2e}, mean {mean:.2e} of max |logit| (row tol {tol}); greedy ids equal on {} rows, {} within the margin",
            st.rows, st.worst, st.ids_checked, st.ids_close
        );
    }
}

// (ranks, tp, ep) that keep expert slices on MXFP4 blocks of 32 for expert width 64:
// tp-only (experts split by width), ep-only, tp+ep, and 8 ranks (4 heads cannot be
// split 8 ways: attention replicated, 4 expert groups of 2 width halves).
const PLANS_W64: &[(usize, usize, usize)] = &[(2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 1, 4), (4, 4, 4), (4, 4, 2), (8, 1, 4)];
// expert width 128 also splits 4 ways
const PLANS_W128: &[(usize, usize, usize)] = &[(2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 4, 1), (4, 1, 4), (4, 4, 4), (4, 4, 2), (8, 1, 4)];

#[test]
fn qwen3_moe_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    check(&fixture("qwen3_moe"), PLANS_W64, false);
    check(&fixture("qwen3_moe"), PLANS_W64, true);
}

#[test]
fn mixtral_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    check(&fixture("mixtral"), PLANS_W128, false);
    check(&fixture("mixtral"), PLANS_W128, true);
}

/// gpt-oss with top-k = all experts: sinks, attention / router / expert biases (the
/// summed ones owned by one rank), sliding window; and the pre-packed MXFP4 experts
/// cut on block boundaries.
#[test]
fn gpt_oss_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    check(&fixture("gpt_oss"), PLANS_W64, true);
    check(&fixture("gpt_oss_mxfp4"), &[(2, 2, 2), (4, 4, 2), (8, 1, 4)], true);
}

/// gpt-oss as configured (top-2 of 4). Ignored like `cuda_model.rs`'s `gpt_oss`: this
/// fixture's router has near ties, and one flipped choice swaps 30-50% of a row's MoE
/// output, beyond `TOL_MOE`. Run with `--ignored` to see how far the ranks move it.
#[test]
#[ignore]
fn gpt_oss_top2_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    check(&fixture("gpt_oss"), PLANS_W64, false);
}

#[test]
fn dense_llama_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    // tp over all ranks; tp = 1 keeps attention and MLP whole (vocabulary split only)
    check(&fixture("llama"), &[(2, 2, 1), (4, 4, 1), (4, 1, 1)], false);
    // tied embeddings: the vocabulary-split embedding is the lm_head
    check(&fixture("qwen2"), &[(2, 2, 1), (4, 1, 1)], false);
}

#[test]
fn smollm2_ranks_match_single_gpu() {
    if !ready() {
        return;
    }
    let Some(path) = std::env::var_os("KAIROS_TEST_MODEL").map(PathBuf::from) else {
        assert!(std::env::var_os("KAIROS_REQUIRE_CUDA").is_none(), "KAIROS_REQUIRE_CUDA is set but KAIROS_TEST_MODEL is missing");
        println!("no SmolLM2 model (KAIROS_TEST_MODEL): skipped");
        return;
    };
    // 9 heads / 3 KV heads / MLP 1536: tp 3; tp 1 over 2 and 4 ranks (vocabulary split)
    check(&path, &[(3, 3, 1), (2, 1, 1), (4, 1, 1)], false);
}

/// A rank of a world of one over NCCL, decode graphs on: the shard launches
/// (vocabulary-range embedding, local expert ids, logits all-gather and
/// reassembly) are captured and give the plain backend's logits.
#[test]
fn nccl_world_of_one_rank_matches_single_gpu() {
    if !ready() {
        return;
    }
    if !nccl_available() {
        assert!(std::env::var("KAIROS_REQUIRE_CUDA").map_or(true, |v| v != "1"), "KAIROS_REQUIRE_CUDA=1 but libnccl.so was not found");
        println!("no NCCL library: skipped");
        return;
    }
    for name in ["llama", "qwen3_moe"] {
        let dir = fixture(name);
        let ck = open_checkpoint(&dir).expect("open");
        let m = load_model(&dir).expect("load");
        let mut single = CudaBackend::new(&m.weights, opts()).expect("single");
        let plan = ShardPlan::single();
        let (slices, w) = load_rank(&ck.config, ck.source.as_ref(), &plan, 0).expect("rank 0");
        let routers = load_routers(&ck.config, ck.source.as_ref() as &dyn TensorSource).expect("routers");
        let mut rank = CudaBackend::new_rank(&w, &routers, &ck.config, plan, slices, opts()).expect("rank backend");
        let comm = NcclComm::join_on(rank.context().stream.clone(), 0, 1, new_id().expect("NCCL id")).expect("NCCL world of 1");
        rank.attach_nccl(comm).expect("attach");
        let vocab = single.vocab_size();
        let (a, b) = (single.new_sequence(), rank.new_sequence());
        let mut tok: Vec<u32> = A.to_vec();
        let mut worst = 0f32;
        for step in 0..6 {
            let la = single.forward(&[Chunk { seq: a, tokens: &tok }], LogitsFor::Last).expect("single");
            let lb = rank.forward(&[Chunk { seq: b, tokens: &tok }], LogitsFor::Last).expect("rank");
            let mut st = Stats::default();
            let ids = compare(&format!("{name} NCCL rank, step {step}"), &la, &lb, vocab, 1e-5, &mut st);
            worst = worst.max(st.worst);
            tok = vec![ids[0]];
        }
        println!("  {name}: NCCL world-of-one rank (graphs) == single GPU within {worst:.1e} of max |logit|");
    }
}

/// The host-staged collectives alone: 3 ranks as threads on one GPU, each with its
/// own stream, sum and gather the first `len` values of device buffers.
#[test]
fn host_staged_collectives_on_one_gpu() {
    if !ready() {
        return;
    }
    use kairos::backend::cuda::comm::{DeviceComm, HostStagedComm};
    let (world, len) = (3usize, 5usize);
    let comms = HostStagedComm::world(world);
    let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                s.spawn(move || {
                    let ctx = cudarc::driver::CudaContext::new(0).expect("device 0");
                    let st = ctx.new_stream().expect("stream");
                    // 2 values past `len` that the collectives must leave alone
                    let mine: Vec<f32> = (0..len + 2).map(|i| (10 * r + i) as f32).collect();
                    let mut buf = st.memcpy_stod(&mine).expect("upload");
                    comm.all_reduce_sum(&st, &mut buf, len).expect("all-reduce");
                    let mut all = st.alloc_zeros::<f32>(world * len + 1).expect("alloc");
                    comm.all_gather(&st, &st.memcpy_stod(&mine).expect("upload"), len, &mut all).expect("all-gather");
                    (st.memcpy_dtov(&buf).expect("download"), st.memcpy_dtov(&all).expect("download"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let sum: Vec<f32> = (0..len).map(|i| (0..world).map(|r| (10 * r + i) as f32).sum()).collect();
    let gathered: Vec<f32> = (0..world).flat_map(|r| (0..len).map(move |i| (10 * r + i) as f32)).chain([0.0]).collect();
    for (r, (reduced, all)) in out.iter().enumerate() {
        assert_eq!(&reduced[..len], &sum[..], "rank {r}: all-reduce");
        assert_eq!(&reduced[len..], &[(10 * r + len) as f32, (10 * r + len + 1) as f32], "rank {r}: values past len");
        assert_eq!(all, &gathered, "rank {r}: all-gather");
    }
    println!("  host-staged all-reduce and all-gather: 3 ranks on one GPU agree");
}

/// Plans the CUDA kernels cannot run are refused before anything is uploaded.
#[test]
fn unsupported_plans_fail_clearly() {
    let dir = fixture("qwen3_moe");
    let ck = open_checkpoint(&dir).expect("open");
    // expert width 64 over 4 ranks: slices of 16, not whole MXFP4 blocks
    let e = ShardedCudaBackend::load_one_gpu(&ck.config, ck.source.as_ref(), ShardPlan::new(4, 1, None).expect("plan"), opts())
        .err()
        .expect("16-wide expert slices must be refused");
    assert!(e.to_string().contains("multiple of 32"), "{e}");
    // 4 heads cannot be split 8 ways
    let e = ShardedCudaBackend::load_one_gpu(&ck.config, ck.source.as_ref(), ShardPlan::new(8, 1, None).expect("plan"), opts())
        .err()
        .expect("8-way heads must be refused");
    assert!(e.to_string().contains("num_heads 4 is not divisible by tp 8"), "{e}");
}
