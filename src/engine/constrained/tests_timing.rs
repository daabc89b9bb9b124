//! Mask timing on synthetic 50k / 150k vocabularies (printed, not asserted):
//! `cargo test --release timing -- --nocapture`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::{random_walk, schemas, small_vocab, FRAGMENTS};
use super::*;

/// Synthetic ~50k-token vocabulary resembling a byte-level BPE vocabulary.
fn big_vocab(n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    v.extend(FRAGMENTS.iter().map(|s| s.as_bytes().to_vec()));
    let alpha = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789    .,:;\"'{}()-_";
    let uni = ["é", "ü", "日", "本", "語", "😀", "ß", "ж"];
    while v.len() < n {
        let len = rng.gen_range(2..12);
        let mut t = Vec::new();
        if rng.gen_bool(0.5) {
            t.push(b' ');
        }
        for _ in 0..len {
            if rng.gen_bool(0.03) {
                t.extend_from_slice(uni[rng.gen_range(0..uni.len())].as_bytes());
            } else if rng.gen_bool(0.8) {
                t.push(alpha[rng.gen_range(0..26)]);
            } else {
                t.push(alpha[rng.gen_range(0..alpha.len())]);
            }
        }
        v.push(t);
    }
    v
}

#[test]
fn timing_50k_vocab() {
    use std::time::Instant;
    let vocab = big_vocab(50_000);
    let eos = vocab.len() as u32;
    let t0 = Instant::now();
    let schema = VerdictSchema::fraud_default();
    let g = VerdictGrammar::compile(&schema, &vocab, &[eos]).expect("compile");
    eprintln!(
        "[timing] compile 50k vocab: {:?} ({} DFA states, {} trie nodes, max token {} bytes)",
        t0.elapsed(),
        g.num_states(),
        g.trie.num_nodes(),
        g.trie.max_len
    );
    let id = |s: &str| {
        vocab
            .iter()
            .position(|v| v == s.as_bytes())
            .expect("in vocab") as u32
    };
    let mut mask = Vec::new();
    let mut time = |label: &str, st: &VerdictState| {
        let t = Instant::now();
        st.allowed(&g, &mut mask);
        let first = t.elapsed();
        let reps = 200;
        let t = Instant::now();
        for _ in 0..reps {
            st.allowed(&g, &mut mask);
        }
        let cached = t.elapsed() / reps;
        let mut logits = vec![0.0f32; mask.len()];
        let t = Instant::now();
        for _ in 0..reps {
            st.apply_allowed(&g, &mut logits);
        }
        let apply = t.elapsed() / reps;
        let n = mask.iter().filter(|&&m| m).count();
        eprintln!("[timing] {label:<28} allowed: first {first:>10.1?}  cached {cached:>9.1?}  apply_allowed {apply:>9.1?}  ({n} allowed)");
        // The greedy choice of one row: a masked copy + argmax (the old per-row path
        // of constrained decoding and DFlash verification) vs masked_argmax in place.
        let mut rng = StdRng::seed_from_u64(3);
        let row: Vec<f32> = (0..mask.len()).map(|_| rng.gen_range(-8.0..8.0)).collect();
        let t = Instant::now();
        let mut old = 0;
        for _ in 0..reps {
            let mut l = row.clone();
            st.apply_allowed(&g, &mut l);
            old = crate::engine::sampling::argmax(&l);
        }
        let copy = t.elapsed() / reps;
        let t = Instant::now();
        let mut new = None;
        for _ in 0..reps {
            new = st.masked_argmax(&g, std::hint::black_box(&row));
        }
        let inplace = t.elapsed() / reps;
        assert_eq!(new, Some(old));
        eprintln!("[timing] {label:<28} greedy choice: copy+mask+argmax {copy:>9.1?}  masked_argmax {inplace:>9.1?}");
    };
    let mut st = g.start();
    time("start", &st);
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    time("decision value", &st);
    st.advance(&g, id("block")).expect("block");
    st.advance(&g, id("\"")).expect("quote");
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    time("score", &st);
    st.advance(&g, id("0.")).expect("0.");
    time("score after 0.", &st);
    st.advance(&g, id("9")).expect("9");
    for t in st.forced(&g).into_iter().flatten() {
        st.advance(&g, t).expect("advance");
    }
    st.advance(&g, id(",\"reason\":\"")).expect("reason key");
    time("reason (string, 200 left)", &st);
    st.advance(&g, id(" card")).expect("card");
    time("reason after ' card'", &st);
    for _ in 0..37 {
        st.advance(&g, id(" card")).expect("card");
    }
    time("reason, 10 chars left", &st);
    for (k, schema) in schemas().iter().enumerate() {
        let (sv, seos) = small_vocab();
        let sg = VerdictGrammar::compile(schema, &sv, &[seos]).expect("compile");
        for seed in 0..2 {
            eprintln!(
                "[sample] {}",
                random_walk(&sg, schema, &sv, seos, seed * 10 + k as u64)
            );
        }
    }
    let mut bits = vec![0u64; g.words];
    let t = Instant::now();
    g.trie.fill_allowed(&g.dfa, g.dfa.string_tops[0], &mut bits);
    eprintln!(
        "[timing] full trie walk for the string-content mask (done in compile): {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    g.precompute();
    eprintln!("[timing] precompute all masks: {:?}", t.elapsed());
    let big = big_vocab(150_000);
    let t = Instant::now();
    let g2 = VerdictGrammar::compile(&VerdictSchema::trading_default(), &big, &[big.len() as u32])
        .expect("compile");
    let compile = t.elapsed();
    let mut st = g2.start();
    for t in st.forced(&g2).expect("forced") {
        st.advance(&g2, t).expect("advance");
    }
    let t = Instant::now();
    st.allowed(&g2, &mut mask);
    let first = t.elapsed();
    eprintln!("[timing] 150k vocab: compile {compile:?}, decision mask first {first:?}");
}

/// Same measurements on a real vocabulary when `KAIROS_VOCAB_JSON` points to
/// `{"vocab": [[byte, ...], ...], "eos": id}` (skipped otherwise).
#[test]
fn timing_real_vocab() {
    use std::time::Instant;
    let Ok(path) = std::env::var("KAIROS_VOCAB_JSON") else {
        return;
    };
    let raw = std::fs::read_to_string(&path).expect("read vocab json");
    let v: serde_json::Value = serde_json::from_str(&raw).expect("vocab json");
    let vocab: Vec<Vec<u8>> = serde_json::from_value(v["vocab"].clone()).expect("vocab");
    let eos = v["eos"].as_u64().expect("eos") as u32;
    for schema in [
        VerdictSchema::fraud_default(),
        VerdictSchema::trading_default(),
    ] {
        let t = Instant::now();
        let g = VerdictGrammar::compile(&schema, &vocab, &[eos]).expect("compile");
        eprintln!(
            "[real] {} tokens: compile {:?} ({} states, {} trie nodes, max token {} bytes)",
            vocab.len(),
            t.elapsed(),
            g.num_states(),
            g.trie.num_nodes(),
            g.trie.max_len
        );
        let t = Instant::now();
        g.precompute();
        eprintln!("[real] precompute all masks {:?}", t.elapsed());
        let mut times = Vec::new();
        let mut mask = Vec::new();
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut st = g.start();
            while !st.is_complete() {
                if let Some(toks) = st.forced(&g) {
                    for t in toks {
                        st.advance(&g, t).expect("forced");
                    }
                    continue;
                }
                let t = Instant::now();
                st.allowed(&g, &mut mask);
                times.push(t.elapsed());
                let ids: Vec<u32> = (0..mask.len() as u32)
                    .filter(|&i| mask[i as usize])
                    .collect();
                assert!(!ids.is_empty(), "stuck after {:?}", st.text());
                st.advance(&g, ids[rng.gen_range(0..ids.len())])
                    .expect("allowed");
            }
            super::tests::check_verdict(&schema, st.text());
            if seed < 2 {
                eprintln!("[real] sample {}", st.text());
            }
        }
        times.sort();
        let q = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        eprintln!(
            "[real] allowed(): {} calls, p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
            times.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(1.0)
        );
    }
}
