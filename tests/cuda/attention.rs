//! CUDA decode attention (split-K, sinks, sliding window, GQA) and a whole decode layer captured
//! in a CUDA graph, vs f64 CPU references; timing sweep printed. Needs a GPU:
//! `cargo test --release --features cuda --test cuda -- attention:: --test-threads=1 --nocapture`.

use crate::support::*;

#[test]
fn attention_decode() {
    guard!();
    let c = cx();
    // every heads-per-block the launcher may pick (kernels/attention.cu's hpb): groups that
    // split a kv head's query heads unevenly (3 = 2 + 1), and more heads per block than a kv head has
    for hpb in [8usize, 4, 3, 2, 1] {
        let mut own = CudaContext::new(0).expect("a second context");
        own.attention_heads = Some(hpb);
        attention_cases(&own, &format!("heads/block {hpb}"));
    }
    // the shared-memory tile kernel (head_dim 64 / 128; the D 256 case runs the split kernel)
    let mut tile = CudaContext::new(0).expect("a third context");
    tile.attention_tile_rows = 1;
    attention_cases(&tile, "tile");
    attention_timing(c, "attention_decode");
    attention_timing(&tile, "attention_tile");
}

fn attention_cases(c: &CudaContext, kernel: &str) {
    let mut r = rng();
    // (n_q, n_kv, D, n_seq, max_pos, window, sinks, n_splits)
    for &(nq, nkv, d, nseq, maxp, window, sinks, nsp) in &[
        (
            9usize, 3usize, 64usize, 1usize, 512usize, 0usize, false, 1usize,
        ),
        (9, 3, 64, 4, 512, 0, false, 4),
        (32, 4, 128, 3, 1024, 0, false, 8),
        (64, 8, 64, 5, 700, 128, true, 3),
        (64, 8, 64, 2, 300, 0, true, 16),
        (16, 1, 256, 2, 333, 0, false, 5),
        (8, 8, 128, 3, 200, 50, true, 2),
        (32, 4, 128, 2, 1024, 0, true, 300),
    ] {
        let kv = KvShape {
            n_slots: nseq + 2,
            n_layers: 2,
            n_kv_heads: nkv,
            max_pos: maxp,
            head_dim: d,
        };
        let layer = 1;
        let kc = to_bf(&randn(&mut r, kv.len(), 1.0));
        let vc = to_bf(&randn(&mut r, kv.len(), 1.0));
        let q = randn(&mut r, nseq * nq * d, 1.0);
        let mut slots: Vec<i32> = (0..kv.n_slots as i32).collect();
        slots.reverse();
        slots.truncate(nseq);
        let lens: Vec<i32> = (0..nseq)
            .map(|i| {
                if i == 0 {
                    1
                } else {
                    r.gen_range(1..=maxp as i32)
                }
            })
            .collect();
        let sk = randn(&mut r, nq, 3.0);
        let scale = 1.0 / (d as f32).sqrt();
        let want = ref_attention(
            &q,
            &from_bf(&kc),
            &from_bf(&vc),
            &slots,
            &lens,
            if sinks { Some(&sk) } else { None },
            &kv,
            layer,
            nq,
            scale,
            window,
        );
        let (dk, dv, dq, ds, dl, dsk) = (up(&kc), up(&vc), up(&q), up(&slots), up(&lens), up(&sk));
        let mut ws = AttnWorkspace::new(c, nseq, nq, nsp, d).unwrap();
        let mut out = nan_f32(nseq * nq * d);
        // the buffers were written on the shared context's stream; `c` has its own
        cx().stream.synchronize().unwrap();
        c.attention_decode(
            &dq,
            &dk,
            &dv,
            &ds,
            &dl,
            if sinks { Some(&dsk) } else { None },
            &mut out,
            &mut ws,
            nseq,
            nq,
            nq * d,
            layer,
            &kv,
            scale,
            window,
            nsp,
        )
        .unwrap();
        c.stream.synchronize().unwrap();
        check(
            &format!("attention q {nq} kv {nkv} D {d} seqs {nseq} lens<={maxp} win {window} sinks {sinks} splits {nsp} {kernel}"),
            &down(&out),
            &want,
            1e-4,
        );
    }
}

fn attention_timing(c: &CudaContext, name: &str) {
    let mut r = rng();
    // timing: 8 sequences x 4096 positions, Qwen3-30B (32/4 x 128), SmolLM2 (9/3 x 64), gpt-oss (64/8 x 64)
    for &(nq, nkv, d, nseq, len) in &[
        (32usize, 4usize, 128usize, 8usize, 4096usize),
        (9, 3, 64, 8, 4096),
        (64, 8, 64, 1, 8192),
        (32, 4, 128, 1, 32768),
        // batch-1 decode at the bench's contexts
        (32, 4, 128, 1, 2048),
        (64, 8, 64, 1, 2048),
        (32, 4, 128, 4, 2048),
        (32, 4, 128, 1, 128),
        (64, 8, 64, 1, 128),
    ] {
        let kv = KvShape {
            n_slots: nseq,
            n_layers: 1,
            n_kv_heads: nkv,
            max_pos: len,
            head_dim: d,
        };
        let dk = up(&to_bf(&randn(&mut r, kv.len(), 1.0)));
        let dv = up(&to_bf(&randn(&mut r, kv.len(), 1.0)));
        let dq = up(&randn(&mut r, nseq * nq * d, 1.0));
        let ds = up(&(0..nseq as i32).collect::<Vec<_>>());
        let dl = up(&vec![len as i32; nseq]);
        let nsp = c.attention_splits(nseq, nq, nkv, d, false, len, 128);
        // the buffers were written on the shared context's stream; `c` may have its own
        cx().stream.synchronize().unwrap();
        let mut ws = AttnWorkspace::new(c, nseq, nq, nsp, d).unwrap();
        let mut out = nan_f32(nseq * nq * d);
        let us = bench_on(c, |_| {
            c.attention_decode(
                &dq,
                &dk,
                &dv,
                &ds,
                &dl,
                None,
                &mut out,
                &mut ws,
                nseq,
                nq,
                nq * d,
                0,
                &kv,
                0.1,
                0,
                nsp,
            )
            .unwrap()
        });
        report(
            name,
            &format!("q {nq} kv {nkv} D {d} seqs {nseq} len {len} splits {nsp}"),
            us,
            (kv.len() * 4) as f64,
        );
    }
}

/// One SmolLM2-shaped decoder layer (hidden 576, 9/3 heads of 64, intermediate 1536)
/// for a batch of 4 sequences, run eagerly and as a captured CUDA graph: the graph
/// must reproduce the eager result bit for bit; both are timed.
#[test]
fn decode_layer_graph() {
    guard!();
    let c = cx();
    let mut r = rng();
    let (b, h, nq, nkv, d, inter) = (4usize, 576usize, 9usize, 3usize, 64usize, 1536usize);
    let wqkv_rows = (nq + 2 * nkv) * d;
    let kv = KvShape {
        n_slots: b,
        n_layers: 1,
        n_kv_heads: nkv,
        max_pos: 1024,
        head_dim: d,
    };
    let wb = |r: &mut StdRng, n: usize, s: f32| up(&to_bf(&randn(r, n, s)));
    let (ln1, ln2) = (wb(&mut r, h, 1.0), wb(&mut r, h, 1.0));
    let wqkv = wb(&mut r, wqkv_rows * h, 0.05);
    let wo = wb(&mut r, h * h, 0.05);
    let wgu = wb(&mut r, 2 * inter * h, 0.05);
    let wd = wb(&mut r, h * inter, 0.03);
    let res0 = up(&randn(&mut r, b * h, 1.0));
    let mut res = nan_f32(b * h);
    let mut xn = nan_bf(b * h);
    let mut qkv = nan_f32(b * wqkv_rows);
    let mut attn = nan_f32(b * nq * d);
    let mut o = nan_f32(b * h);
    let mut gu = nan_f32(b * 2 * inter);
    let mut act = nan_bf(b * inter);
    let mut dn = nan_f32(b * h);
    let mut kc = wb(&mut r, kv.len(), 1.0);
    let mut vc = wb(&mut r, kv.len(), 1.0);
    let lens: Vec<i32> = (0..b).map(|_| r.gen_range(1..1024)).collect();
    let dpos = up(&lens.iter().map(|l| l - 1).collect::<Vec<_>>());
    let dlens = up(&lens);
    let dslots = up(&(0..b as i32).collect::<Vec<_>>());
    let dinv = up(&inv_freq(d, 100000.0));
    let nsp = 8;
    let mut ws = AttnWorkspace::new(c, b, nq, nsp, d).unwrap();
    let mut step = |res: &mut CudaSlice<f32>, xn: &mut CudaSlice<u16>| {
        c.stream.memcpy_dtod(&res0, res).unwrap();
        c.rmsnorm_residual(res, None, &ln1, xn, b, h, 1e-5).unwrap();
        c.bf16_gemv(&wqkv, xn, &mut qkv, wqkv_rows, h, b).unwrap();
        c.rope_qk(&mut qkv, &dpos, &dinv, None, None, b, nq, nkv, d, 1e-5, 1.0)
            .unwrap();
        c.kv_cache_write(&qkv, &mut kc, &mut vc, &dslots, &dpos, b, nq, 0, &kv)
            .unwrap();
        c.attention_decode(
            &qkv, &kc, &vc, &dslots, &dlens, None, &mut attn, &mut ws, b, nq, wqkv_rows, 0, &kv,
            0.125, 0, nsp,
        )
        .unwrap();
        c.bf16_gemv(&wo, &attn, &mut o, h, nq * d, b).unwrap();
        c.rmsnorm_residual(res, Some(&o), &ln2, xn, b, h, 1e-5)
            .unwrap();
        c.bf16_gemv(&wgu, xn, &mut gu, 2 * inter, h, b).unwrap();
        c.swiglu(&gu, &mut act, b, inter).unwrap();
        c.bf16_gemv(&wd, &act, &mut dn, h, inter, b).unwrap();
        c.rmsnorm_residual(res, Some(&dn), &ln1, xn, b, h, 1e-5)
            .unwrap();
    };
    step(&mut res, &mut xn);
    let (eager_res, eager_xn) = (down(&res), down(&xn));
    assert!(
        eager_res.iter().all(|v| v.is_finite()),
        "eager layer produced non-finite values"
    );
    // poison, capture, replay
    c.stream
        .memcpy_htod(&vec![f32::NAN; b * h], &mut res)
        .unwrap();
    c.stream
        .memcpy_htod(&vec![0x7fc0u16; b * h], &mut xn)
        .unwrap();
    c.stream.synchronize().unwrap();
    c.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    step(&mut res, &mut xn);
    let graph = c
        .stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("captured graph");
    graph.launch().unwrap();
    let (g_res, g_xn) = (down(&res), down(&xn));
    assert!(
        g_res
            .iter()
            .zip(&eager_res)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "graph residual differs from eager"
    );
    assert_eq!(g_xn, eager_xn, "graph normed output differs from eager");
    println!("  decode layer: graph replay == eager (bitwise)");
    let eager = bench(|_| step(&mut res, &mut xn));
    let replay = bench(|_| graph.launch().unwrap());
    let bytes = ((wqkv_rows + h + 2 * inter) * h + h * inter) * 2;
    report(
        "layer eager (12 ops)",
        &format!("SmolLM2 layer, batch {b}"),
        eager,
        bytes as f64,
    );
    report(
        "layer CUDA graph",
        &format!("SmolLM2 layer, batch {b}"),
        replay,
        bytes as f64,
    );
}
