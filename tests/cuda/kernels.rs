//! Small CUDA kernels (embedding, rmsnorm, RoPE, KV write, SwiGLU, argmax, the PTX cache)
//! vs plain-f32/f64 CPU references, plus a timing sweep (printed, never asserted). Needs a GPU:
//! `cargo test --release --features cuda --test cuda -- kernels:: --test-threads=1 --nocapture`.
//! Attention: attention.rs; GEMVs and MoE: gemv.rs (this folder).

use crate::support::*;

#[test]
fn embedding_gather() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(vocab, hidden, n) in &[
        (49152usize, 576usize, 1usize),
        (49152, 576, 64),
        (1000, 100, 7),
        (151936, 2048, 5),
    ] {
        let table = to_bf(&randn(&mut r, vocab * hidden, 1.0));
        let ids: Vec<i32> = (0..n).map(|_| r.gen_range(0..vocab as i32)).collect();
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&i| {
                table[i as usize * hidden..(i as usize + 1) * hidden]
                    .iter()
                    .map(|b| bf16::from_bits(*b).to_f64())
            })
            .collect();
        let (dt, di) = (up(&table), up(&ids));
        let mut o32 = nan_f32(n * hidden);
        c.embedding_gather(&dt, &di, &mut o32, n, hidden).unwrap();
        check(
            &format!("embedding f32 vocab {vocab} hidden {hidden} n {n}"),
            &down(&o32),
            &want,
            0.0,
        );
        let mut o16 = nan_bf(n * hidden);
        c.embedding_gather(&dt, &di, &mut o16, n, hidden).unwrap();
        check(
            &format!("embedding bf16 vocab {vocab} hidden {hidden} n {n}"),
            &from_bf(&down(&o16)),
            &want,
            0.0,
        );
        if n == 64 {
            let us = bench(|_| c.embedding_gather(&dt, &di, &mut o32, n, hidden).unwrap());
            report(
                "embedding_gather",
                &format!("n {n} hidden {hidden} ->f32"),
                us,
                (n * hidden * 6) as f64,
            );
        }
    }
}

#[test]
fn rmsnorm_residual() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(n, hidden, with_delta) in &[
        (1usize, 576usize, true),
        (8, 2048, true),
        (3, 2880, false),
        (5, 1000, true),
        (64, 4096, true),
    ] {
        let res = randn(&mut r, n * hidden, 2.0);
        let delta = randn(&mut r, n * hidden, 1.0);
        let w = rbf(&randn(&mut r, hidden, 1.5));
        let mut res_ref = res.clone();
        let want = ref_rmsnorm(
            &mut res_ref,
            if with_delta { Some(&delta) } else { None },
            &w,
            hidden,
            1e-6,
        );
        let (dd, dw) = (up(&delta), up(&to_bf(&w)));
        let mut dres = up(&res);
        let mut out = nan_bf(n * hidden);
        c.rmsnorm_residual(
            &mut dres,
            if with_delta { Some(&dd) } else { None },
            &dw,
            &mut out,
            n,
            hidden,
            1e-6,
        )
        .unwrap();
        let tag = format!("n {n} hidden {hidden} delta {with_delta}");
        check(
            &format!("rmsnorm bf16 out {tag}"),
            &from_bf(&down(&out)),
            &want,
            8e-3,
        );
        let rr: Vec<f64> = res_ref.iter().map(|v| *v as f64).collect();
        check(&format!("rmsnorm residual {tag}"), &down(&dres), &rr, 1e-6);
        let mut dres = up(&res);
        let mut o32 = nan_f32(n * hidden);
        c.rmsnorm_residual(
            &mut dres,
            if with_delta { Some(&dd) } else { None },
            &dw,
            &mut o32,
            n,
            hidden,
            1e-6,
        )
        .unwrap();
        check(&format!("rmsnorm f32 out {tag}"), &down(&o32), &want, 1e-5);
        if n == 64 || n == 1 {
            let us = bench(|_| {
                c.rmsnorm_residual(&mut dres, Some(&dd), &dw, &mut out, n, hidden, 1e-6)
                    .unwrap()
            });
            report(
                "rmsnorm_residual",
                &tag,
                us,
                (n * hidden * (4 + 4 + 4 + 2)) as f64,
            );
        }
    }
}

#[test]
fn rope_qk() {
    guard!();
    let c = cx();
    let mut r = rng();
    // (n_tokens, n_q, n_kv, D, theta, qk_norm, mscale)
    for &(nt, nq, nkv, d, theta, norm, ms) in &[
        (1usize, 9usize, 3usize, 64usize, 100000.0f64, false, 1.0f32),
        (5, 9, 3, 64, 100000.0, false, 1.0),
        (3, 32, 4, 128, 1000000.0, true, 1.0),
        (2, 64, 8, 64, 150000.0, false, 1.3466),
        (4, 16, 2, 256, 10000.0, true, 1.0),
    ] {
        let w = (nq + 2 * nkv) * d;
        let qkv = randn(&mut r, nt * w, 2.0);
        let pos: Vec<i32> = (0..nt)
            .map(|i| if i == 0 { 0 } else { r.gen_range(0..32768) })
            .collect();
        let inv = inv_freq(d, theta);
        let qn = rbf(&randn(&mut r, d, 1.5));
        let kn = rbf(&randn(&mut r, d, 1.5));
        // reference (f64)
        let mut want: Vec<f64> = qkv.iter().map(|v| *v as f64).collect();
        for t in 0..nt {
            for h in 0..nq + nkv {
                let x = &mut want[t * w + h * d..t * w + h * d + d];
                if norm {
                    let nw = if h < nq { &qn } else { &kn };
                    let ss: f64 = x.iter().map(|v| v * v).sum();
                    let iv = 1.0 / (ss / d as f64 + 1e-6).sqrt();
                    for i in 0..d {
                        x[i] *= iv * nw[i] as f64;
                    }
                }
                for i in 0..d / 2 {
                    // angle rounded to f32 as HF computes it (inv_freq @ positions in f32)
                    let ang = (pos[t] as f32 * inv[i]) as f64;
                    let (s, co) = ((ang.sin() * ms as f64), (ang.cos() * ms as f64));
                    let (a, b) = (x[i], x[i + d / 2]);
                    x[i] = a * co - b * s;
                    x[i + d / 2] = b * co + a * s;
                }
            }
        }
        let (dp, di, dqn, dkn) = (up(&pos), up(&inv), up(&to_bf(&qn)), up(&to_bf(&kn)));
        let mut dq = up(&qkv);
        let (qo, ko) = if norm {
            (Some(&dqn), Some(&dkn))
        } else {
            (None, None)
        };
        c.rope_qk(&mut dq, &dp, &di, qo, ko, nt, nq, nkv, d, 1e-6, ms)
            .unwrap();
        check(
            &format!("rope n {nt} q {nq} kv {nkv} D {d} norm {norm} mscale {ms}"),
            &down(&dq),
            &want,
            2e-5,
        );
    }
    // timing: Qwen3-30B shape, 64 tokens
    let (nt, nq, nkv, d) = (64, 32, 4, 128);
    let mut dq = up(&randn(&mut r, nt * (nq + 2 * nkv) * d, 1.0));
    let dp = up(&(0..nt as i32).collect::<Vec<_>>());
    let di = up(&inv_freq(d, 1e6));
    let dn = up(&to_bf(&vec![1.0; d]));
    let us = bench(|_| {
        c.rope_qk(
            &mut dq,
            &dp,
            &di,
            Some(&dn),
            Some(&dn),
            nt,
            nq,
            nkv,
            d,
            1e-6,
            1.0,
        )
        .unwrap()
    });
    report(
        "rope_qk",
        "n 64 q 32 kv 4 D 128 qk-norm",
        us,
        (nt * (nq + nkv) * d * 8) as f64,
    );
}

#[test]
fn kv_cache_write() {
    guard!();
    let c = cx();
    let mut r = rng();
    let (nq, nkv, d, nt) = (9, 3, 64, 4);
    let kv = KvShape {
        n_slots: 3,
        n_layers: 2,
        n_kv_heads: nkv,
        max_pos: 50,
        head_dim: d,
    };
    let qkv = randn(&mut r, nt * (nq + 2 * nkv) * d, 1.0);
    let slots = vec![2i32, 0, 1, 2];
    let pos = vec![0i32, 49, 7, 8];
    let init = to_bf(&randn(&mut r, kv.len(), 1.0));
    let (mut kc, mut vc) = (init.clone(), init.clone());
    for t in 0..nt {
        for h in 0..nkv {
            let off = (((slots[t] as usize * 2 + 1) * nkv + h) * 50 + pos[t] as usize) * d;
            for i in 0..d {
                let row = t * (nq + 2 * nkv) * d;
                kc[off + i] = bf16::from_f32(qkv[row + (nq + h) * d + i]).to_bits();
                vc[off + i] = bf16::from_f32(qkv[row + (nq + nkv + h) * d + i]).to_bits();
            }
        }
    }
    let (mut dk, mut dv) = (up(&init), up(&init));
    c.kv_cache_write(
        &up(&qkv),
        &mut dk,
        &mut dv,
        &up(&slots),
        &up(&pos),
        nt,
        nq,
        1,
        &kv,
    )
    .unwrap();
    assert!(down(&dk) == kc, "k cache mismatch");
    assert!(down(&dv) == vc, "v cache mismatch");
    println!("  kv_cache_write: exact");
}

#[test]
fn swiglu() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(n, inter) in &[(1usize, 1536usize), (4, 768), (3, 100), (2, 2880)] {
        let gu = randn(&mut r, n * 2 * inter, 6.0);
        let dgu = up(&gu);
        let mut want = vec![0f64; n * inter];
        let mut want_oai = vec![0f64; n * inter];
        let (alpha, limit) = (1.702f64, 7.0f64);
        for t in 0..n {
            for i in 0..inter {
                let g = gu[t * 2 * inter + i] as f64;
                let u = gu[t * 2 * inter + inter + i] as f64;
                want[t * inter + i] = g / (1.0 + (-g).exp()) * u;
                let g = (gu[t * 2 * inter + 2 * i] as f64).min(limit);
                let u = (gu[t * 2 * inter + 2 * i + 1] as f64).clamp(-limit, limit);
                want_oai[t * inter + i] = (u + 1.0) * g / (1.0 + (-alpha * g).exp());
            }
        }
        let mut o = nan_f32(n * inter);
        c.swiglu(&dgu, &mut o, n, inter).unwrap();
        check(
            &format!("swiglu f32 n {n} I {inter}"),
            &down(&o),
            &want,
            1e-6,
        );
        let mut o = nan_bf(n * inter);
        c.swiglu(&dgu, &mut o, n, inter).unwrap();
        check(
            &format!("swiglu bf16 n {n} I {inter}"),
            &from_bf(&down(&o)),
            &want,
            8e-3,
        );
        let mut o = nan_f32(n * inter);
        c.swiglu_oai(&dgu, &mut o, n, inter, 1.702, 7.0).unwrap();
        check(
            &format!("swiglu_oai f32 n {n} I {inter}"),
            &down(&o),
            &want_oai,
            1e-6,
        );
        let mut o = nan_bf(n * inter);
        c.swiglu_oai(&dgu, &mut o, n, inter, 1.702, 7.0).unwrap();
        check(
            &format!("swiglu_oai bf16 n {n} I {inter}"),
            &from_bf(&down(&o)),
            &want_oai,
            8e-3,
        );
    }
    let (n, inter) = (64, 768 * 8);
    let dgu = up(&randn(&mut r, n * 2 * inter, 3.0));
    let mut o = nan_bf(n * inter);
    let us = bench(|_| c.swiglu(&dgu, &mut o, n, inter).unwrap());
    report(
        "swiglu",
        &format!("n {n} I {inter} ->bf16"),
        us,
        (n * inter * 10) as f64,
    );
}

#[test]
fn argmax() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(n, v) in &[
        (1usize, 49152usize),
        (1, 151936),
        (4, 151936),
        (3, 1000),
        (2, 7),
    ] {
        let logits = randn(&mut r, n * v, 10.0);
        let want: Vec<i32> = (0..n)
            .map(|t| {
                let row = &logits[t * v..(t + 1) * v];
                let mut b = 0;
                for i in 1..v {
                    if row[i] > row[b] {
                        b = i;
                    }
                }
                b as i32
            })
            .collect();
        let dl = up(&logits);
        let mut o = up(&vec![-1i32; n]);
        c.argmax(&dl, &mut o, n, v).unwrap();
        assert_eq!(down(&o), want, "argmax n {n} V {v}");
        println!("  argmax n {n} V {v}: exact");
        if v > 100000 {
            let us = bench(|_| c.argmax(&dl, &mut o, n, v).unwrap());
            report("argmax", &format!("n {n} V {v}"), us, (n * v * 4) as f64);
        }
    }
    // ties: lowest index wins
    let mut logits = vec![0.5f32; 5000];
    logits[4000] = 2.0;
    logits[1234] = 2.0;
    let mut o = up(&[-1i32; 1]);
    c.argmax(&up(&logits), &mut o, 1, 5000).unwrap();
    assert_eq!(down(&o), vec![1234]);
}

#[test]
fn ptx_cache_reload() {
    guard!();
    // a second context must load every module from the on-disk cache
    let c2 = CudaContext::new(0).unwrap();
    println!(
        "  second context: {} modules from the PTX cache",
        c2.ptx_cache_hits
    );
    assert!(c2.ptx_cache_hits > 0 || kairos::backend::cuda::ptx_cache_dir().is_none());
}
