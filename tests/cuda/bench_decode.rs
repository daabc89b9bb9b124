//! Runs `kairos::bench::decode` on the GPU when `KAIROS_BENCH_DECODE=1`
//! (a benchmark, not a check: it asserts only that it ran). Prints the table;
//! writes the JSON report to `$KAIROS_BENCH_OUT` when set.
//! `KAIROS_BENCH_SHAPES=qwen3-30b-a3b,smollm2-135m`, `KAIROS_BENCH_STEPS=50`,
//! `KAIROS_BENCH_UNFUSED=1` (one launch per op, for A/B), `KAIROS_BENCH_MOE_BF16=1`
//! (experts with bf16 activations and f32 math instead of int8 + dp4a, for A/B).


#[test]
fn bench_decode() {
    if std::env::var_os("KAIROS_BENCH_DECODE").is_none() || !kairos::backend::cuda::device_available() {
        println!("set KAIROS_BENCH_DECODE=1 on a CUDA machine to run: skipped");
        return;
    }
    let mut o = kairos::bench::decode::DecodeBenchOptions::default();
    if let Ok(s) = std::env::var("KAIROS_BENCH_SHAPES") {
        o.shapes = s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect();
    }
    if std::env::var_os("KAIROS_BENCH_UNFUSED").is_some() {
        o.fused = false;
    }
    if let Some(p) = std::env::var_os("KAIROS_BENCH_MODEL") {
        o.model = Some(p.into());
    }
    if let Some(n) = std::env::var("KAIROS_BENCH_NCCL_RANKS").ok().and_then(|s| s.parse().ok()) {
        o.nccl_ranks = n;
    }
    if std::env::var_os("KAIROS_BENCH_MOE_BF16").is_some() {
        o.moe_q8 = false;
    }
    if let Ok(s) = std::env::var("KAIROS_BENCH_BATCHES") {
        o.batches = s.split(',').filter_map(|x| x.parse().ok()).collect();
    }
    if let Ok(s) = std::env::var("KAIROS_BENCH_CONTEXTS") {
        o.contexts = s.split(',').filter_map(|x| x.parse().ok()).collect();
    }
    if let Some(n) = std::env::var("KAIROS_BENCH_STEPS").ok().and_then(|s| s.parse().ok()) {
        o.steps = n;
    }
    let r = kairos::bench::decode::run(&o).expect("bench decode");
    println!("{}", kairos::bench::decode::table(&r));
    let json = serde_json::to_string_pretty(&r).unwrap();
    println!("{json}");
    if let Some(p) = std::env::var_os("KAIROS_BENCH_OUT") {
        std::fs::write(p, json).unwrap();
    }
}
