//! CUDA kernels vs plain-f32/f64 CPU references, plus a timing sweep (printed,
//! never asserted). Needs a GPU: `cargo test --release --features cuda --test
//! cuda_kernels -- --test-threads=1 --nocapture`.
#![cfg(feature = "cuda")]

use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use kairos::backend::cuda::kernels::{AttnWorkspace, KvShape};
use kairos::backend::cuda::CudaContext;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- harness

static CX: OnceLock<CudaContext> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());
static COPY_GBS: OnceLock<f64> = OnceLock::new();

fn cx() -> &'static CudaContext {
    CX.get_or_init(|| {
        let t = std::time::Instant::now();
        let c = CudaContext::new(0).expect("open CUDA device 0 and compile kernels");
        println!(
            "device: {} ({}, {} SMs); kernels ready in {:.0} ms ({} modules from the PTX cache)",
            c.name,
            c.arch,
            c.sm_count,
            t.elapsed().as_secs_f64() * 1e3,
            c.ptx_cache_hits
        );
        c
    })
}

fn rng() -> StdRng {
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("  seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn randn(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (r.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}
fn to_bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}
fn from_bf(v: &[u16]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_bits(*x).to_f32()).collect()
}
/// round through bf16
fn rbf(v: &[f32]) -> Vec<f32> {
    from_bf(&to_bf(v))
}
fn up<T: DeviceRepr>(v: &[T]) -> CudaSlice<T> {
    cx().stream.memcpy_stod(v).unwrap()
}
fn down<T: DeviceRepr + Default + Clone>(s: &CudaSlice<T>) -> Vec<T> {
    cx().stream.memcpy_dtov(s).unwrap()
}
fn nan_f32(n: usize) -> CudaSlice<f32> {
    up(&vec![f32::NAN; n])
}
fn nan_bf(n: usize) -> CudaSlice<u16> {
    up(&vec![0x7fc0u16; n])
}

/// ‖got − want‖ / ‖want‖ (f64); panics on NaN / unwritten output or error > tol.
fn check(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut num, mut den, mut maxabs) = (0f64, 0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (unwritten or NaN), want {w}"
        );
        let d = *g as f64 - w;
        num += d * d;
        den += w * w;
        maxabs = maxabs.max(d.abs());
    }
    let rel = (num / den.max(1e-30)).sqrt();
    println!("  {what:<58} rel_l2 {rel:.2e}  max_abs {maxabs:.2e}  (tol {tol:.0e})");
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.1e}");
    rel
}

/// Median microseconds per call of `f(i)` (i = call index, for rotating inputs).
fn bench(mut f: impl FnMut(usize)) -> f64 {
    let c = cx();
    for i in 0..3 {
        f(i);
    }
    c.stream.synchronize().unwrap();
    let e0 = c
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let e1 = c
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    // calibrate iterations to ~2 ms per batch
    e0.record(&c.stream).unwrap();
    f(0);
    e1.record(&c.stream).unwrap();
    e1.synchronize().unwrap();
    let one = e0.elapsed_ms(&e1).unwrap().max(1e-3) as f64;
    let iters = ((2.0 / one) as usize).clamp(5, 2000);
    let mut ts = vec![];
    let mut k = 0;
    for _ in 0..7 {
        e0.record(&c.stream).unwrap();
        for _ in 0..iters {
            f(k);
            k += 1;
        }
        e1.record(&c.stream).unwrap();
        e1.synchronize().unwrap();
        ts.push(e0.elapsed_ms(&e1).unwrap() as f64 * 1e3 / iters as f64);
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[3]
}

fn copy_gbs() -> f64 {
    *COPY_GBS.get_or_init(|| {
        let c = cx();
        let n = 256usize << 20; // 1 GiB of f32
        let src = c.stream.alloc_zeros::<f32>(n).unwrap();
        let mut dst = c.stream.alloc_zeros::<f32>(n).unwrap();
        c.stream.memcpy_dtod(&src, &mut dst).unwrap();
        let us = bench(|_| c.stream.memcpy_dtod(&src, &mut dst).unwrap());
        let gbs = 2.0 * (n * 4) as f64 / us / 1e3;
        println!("TIMING device-to-device copy 1 GiB: {us:.1} us, {gbs:.0} GB/s (read + write)");
        gbs
    })
}

fn report(kernel: &str, shape: &str, us: f64, bytes: f64) {
    let gbs = bytes / us / 1e3;
    println!(
        "TIMING {kernel:<22} {shape:<44} {us:>9.2} us {gbs:>8.0} GB/s {:>5.1}% of copy",
        100.0 * gbs / copy_gbs()
    );
}

/// Copies of a device buffer so a timing loop can rotate past L2 (~`target` bytes in all).
fn copies<T: DeviceRepr>(s: &CudaSlice<T>, target: usize) -> Vec<CudaSlice<T>> {
    let bytes = s.len() * std::mem::size_of::<T>();
    let n = target.div_ceil(bytes.max(1)).clamp(1, 64);
    (0..n).map(|_| cx().stream.clone_dtod(s).unwrap()).collect()
}

/// Machines without a GPU (CI) skip these tests, unless KAIROS_REQUIRE_CUDA=1
/// says a device must be there.
fn has_gpu() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let ok = kairos::backend::cuda::device_available();
        if !ok && std::env::var("KAIROS_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
            panic!("KAIROS_REQUIRE_CUDA=1 but no CUDA device or driver library was found");
        }
        ok
    })
}

macro_rules! guard {
    () => {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if !has_gpu() {
            println!("no CUDA device: skipped");
            return;
        }
        let _ = cx();
    };
}

// ---------------------------------------------------------------- CPU references

fn ref_rmsnorm(
    res: &mut [f32],
    delta: Option<&[f32]>,
    w: &[f32],
    hidden: usize,
    eps: f32,
) -> Vec<f64> {
    let mut out = vec![0f64; res.len()];
    for (t, row) in res.chunks_mut(hidden).enumerate() {
        if let Some(d) = delta {
            for i in 0..hidden {
                row[i] += d[t * hidden + i];
            }
        }
        let ss: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let inv = 1.0 / (ss / hidden as f64 + eps as f64).sqrt();
        for i in 0..hidden {
            out[t * hidden + i] = row[i] as f64 * inv * w[i] as f64;
        }
    }
    out
}

/// y[j, r] = sum_c W[r, c] x[j, c]
fn ref_gemv(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n * rows];
    for j in 0..n {
        for r in 0..rows {
            let mut s = 0f64;
            for c in 0..cols {
                s += w[r * cols + c] as f64 * x[j * cols + c] as f64;
            }
            y[j * rows + r] = s;
        }
    }
    y
}

const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
fn ref_mxfp4_dequant(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let blk = c / 32;
            let byte = blocks[(r * (cols / 32) + blk) * 16 + (c % 32) / 2];
            let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
            let mag = E2M1[(nib & 7) as usize];
            let v = if nib & 8 != 0 { -mag } else { mag };
            let s = scales[r * (cols / 32) + blk] as i32;
            w[r * cols + c] = v * 2f32.powi(s - 127);
        }
    }
    w
}

// ---------------------------------------------------------------- tests

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

fn inv_freq(d: usize, theta: f64) -> Vec<f32> {
    (0..d / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / d as f64) as f32)
        .collect()
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

/// Reference decode attention over bf16 caches (as f32 values).
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    slots: &[i32],
    lens: &[i32],
    sinks: Option<&[f32]>,
    kv: &KvShape,
    layer: usize,
    nq: usize,
    scale: f32,
    window: usize,
) -> Vec<f64> {
    let d = kv.head_dim;
    let g = nq / kv.n_kv_heads;
    let mut out = vec![0f64; slots.len() * nq * d];
    for s in 0..slots.len() {
        let len = lens[s] as usize;
        let lo = if window > 0 {
            len.saturating_sub(window)
        } else {
            0
        };
        for h in 0..nq {
            let kvh = h / g;
            let base = (((slots[s] as usize * kv.n_layers + layer) * kv.n_kv_heads + kvh)
                * kv.max_pos)
                * d;
            let qv = &q[(s * nq + h) * d..(s * nq + h + 1) * d];
            let scores: Vec<f64> = (lo..len)
                .map(|p| {
                    (0..d)
                        .map(|i| qv[i] as f64 * kc[base + p * d + i] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let mut m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if let Some(sk) = sinks {
                m = m.max(sk[h] as f64);
            }
            let mut den: f64 = scores.iter().map(|x| (x - m).exp()).sum();
            if let Some(sk) = sinks {
                den += (sk[h] as f64 - m).exp();
            }
            for (j, p) in (lo..len).enumerate() {
                let pr = (scores[j] - m).exp() / den;
                for i in 0..d {
                    out[(s * nq + h) * d + i] += pr * vc[base + p * d + i] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn attention_decode() {
    guard!();
    let c = cx();
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
        check(
            &format!("attention q {nq} kv {nkv} D {d} seqs {nseq} lens<={maxp} win {window} sinks {sinks} splits {nsp}"),
            &down(&out),
            &want,
            1e-4,
        );
    }
    // timing: 8 sequences x 4096 positions, Qwen3-30B (32/4 x 128), SmolLM2 (9/3 x 64), gpt-oss (64/8 x 64)
    for &(nq, nkv, d, nseq, len) in &[
        (32usize, 4usize, 128usize, 8usize, 4096usize),
        (9, 3, 64, 8, 4096),
        (64, 8, 64, 1, 8192),
        (32, 4, 128, 1, 32768),
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
        let nsp = c.attention_splits(nseq, nq, nkv, len, 128);
        let mut ws = AttnWorkspace::new(c, nseq, nq, nsp, d).unwrap();
        let mut out = nan_f32(nseq * nq * d);
        let us = bench(|_| {
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
            "attention_decode",
            &format!("q {nq} kv {nkv} D {d} seqs {nseq} len {len} splits {nsp}"),
            us,
            (kv.len() * 4) as f64,
        );
    }
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
fn bf16_gemv() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(rows, cols) in &[
        (1536usize, 576usize),
        (576, 1536),
        (49152, 576),
        (1536, 2048),
        (77, 100),
        (33, 40),
        (5, 8),
    ] {
        let w = rbf(&randn(&mut r, rows * cols, 1.0));
        let dw = up(&to_bf(&w));
        for &n in &[1usize, 3, 8] {
            let x = rbf(&randn(&mut r, n * cols, 1.0));
            let want = ref_gemv(&w, &x, rows, cols, n);
            let mut y = nan_f32(n * rows);
            c.bf16_gemv(&dw, &up(&to_bf(&x)), &mut y, rows, cols, n)
                .unwrap();
            check(
                &format!("bf16_gemv bf16-x rows {rows} cols {cols} n {n}"),
                &down(&y),
                &want,
                1e-5,
            );
            let mut y = nan_f32(n * rows);
            c.bf16_gemv(&dw, &up(&x), &mut y, rows, cols, n).unwrap();
            check(
                &format!("bf16_gemv f32-x rows {rows} cols {cols} n {n}"),
                &down(&y),
                &want,
                1e-5,
            );
        }
    }
    // timing (weights rotated past L2)
    for &(rows, cols, what) in &[
        (49152usize, 576usize, "SmolLM2 lm_head"),
        (1536, 576, "SmolLM2 gate"),
        (576, 1536, "SmolLM2 down"),
        (4096, 2048, "Qwen3-30B q_proj"),
        (151936, 2048, "Qwen3 lm_head"),
    ] {
        let w = up(&to_bf(&randn(&mut r, rows * cols, 1.0)));
        let ws = copies(&w, 256 << 20);
        for &n in &[1usize, 8] {
            let x = up(&to_bf(&randn(&mut r, n * cols, 1.0)));
            let mut y = nan_f32(n * rows);
            let us = bench(|i| {
                c.bf16_gemv(&ws[i % ws.len()], &x, &mut y, rows, cols, n)
                    .unwrap()
            });
            report(
                "bf16_gemv",
                &format!("{what} {rows}x{cols} n {n}"),
                us,
                (rows * cols * 2 + n * cols * 2 + n * rows * 4) as f64,
            );
        }
    }
}

fn rand_mxfp4(r: &mut StdRng, e: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let blocks: Vec<u8> = (0..e * rows * cols / 2).map(|_| r.gen()).collect();
    let scales: Vec<u8> = (0..e * rows * cols / 32)
        .map(|_| r.gen_range(118..=130))
        .collect();
    (blocks, scales)
}

#[test]
fn mxfp4_gemv() {
    guard!();
    mxfp4_variant("lut");
}

fn mxfp4_variant(v: &str) {
    let c = cx();
    let mut r = rng();
    for &(rows, cols) in &[
        (1536usize, 2048usize),
        (2048, 768),
        (5760, 2880),
        (100, 96),
        (7, 32),
    ] {
        let (bl, sc) = rand_mxfp4(&mut r, 1, rows, cols);
        let w = ref_mxfp4_dequant(&bl, &sc, rows, cols);
        let (db, ds) = (up(&bl), up(&sc));
        for &n in &[1usize, 2, 5, 8] {
            let x = rbf(&randn(&mut r, n * cols, 1.0));
            let want = ref_gemv(&w, &x, rows, cols, n);
            let mut y = nan_f32(n * rows);
            c.mxfp4_gemv(&db, &ds, &up(&to_bf(&x)), &mut y, rows, cols, n)
                .unwrap();
            check(
                &format!("mxfp4[{v}] bf16-x rows {rows} cols {cols} n {n}"),
                &down(&y),
                &want,
                1e-5,
            );
            let mut y = nan_f32(n * rows);
            c.mxfp4_gemv(&db, &ds, &up(&x), &mut y, rows, cols, n)
                .unwrap();
            check(
                &format!("mxfp4[{v}] f32-x rows {rows} cols {cols} n {n}"),
                &down(&y),
                &want,
                1e-5,
            );
        }
    }
    // MoE: 16 experts of Qwen3-30B-A3B gate_up (1536 x 2048) then down (2048 x 768), 3 tokens x top-4
    let (ne, ntok, k) = (16usize, 3usize, 4usize);
    for &(rows, cols, xdiv) in &[(1536usize, 2048usize, k), (2048, 768, 1)] {
        let (bl, sc) = rand_mxfp4(&mut r, ne, rows, cols);
        let ids: Vec<i32> = (0..ntok * k).map(|_| r.gen_range(0..ne as i32)).collect();
        let nx = (ntok * k).div_ceil(xdiv);
        let x = rbf(&randn(&mut r, nx * cols, 1.0));
        let mut want = vec![];
        for (a, &e) in ids.iter().enumerate() {
            let e = e as usize;
            let w = ref_mxfp4_dequant(
                &bl[e * rows * cols / 2..(e + 1) * rows * cols / 2],
                &sc[e * rows * cols / 32..(e + 1) * rows * cols / 32],
                rows,
                cols,
            );
            let xr = &x[(a / xdiv) * cols..(a / xdiv + 1) * cols];
            want.extend(ref_gemv(&w, xr, rows, cols, 1));
        }
        let mut y = nan_f32(ntok * k * rows);
        c.mxfp4_moe_gemv(
            &up(&bl),
            &up(&sc),
            &up(&to_bf(&x)),
            &mut y,
            &up(&ids),
            ntok * k,
            xdiv,
            rows,
            cols,
            ne,
        )
        .unwrap();
        check(
            &format!(
                "mxfp4_moe[{v}] E {ne} assign {} x_div {xdiv} rows {rows} cols {cols}",
                ntok * k
            ),
            &down(&y),
            &want,
            1e-5,
        );
    }
    // timing (weights rotated past L2)
    for &(rows, cols, what) in &[
        (1536usize, 2048usize, "Qwen3-30B expert gate_up"),
        (2048, 768, "Qwen3-30B expert down"),
        (5760, 2880, "gpt-oss expert gate_up"),
        (2880, 2880, "gpt-oss expert down"),
    ] {
        let (bl, sc) = rand_mxfp4(&mut r, 1, rows, cols);
        let (db, ds) = (up(&bl), up(&sc));
        let (bs, ss) = (copies(&db, 256 << 20), copies(&ds, 16 << 20));
        for &n in &[1usize, 8] {
            let x = up(&to_bf(&randn(&mut r, n * cols, 1.0)));
            let mut y = nan_f32(n * rows);
            let us = bench(|i| {
                c.mxfp4_gemv(
                    &bs[i % bs.len()],
                    &ss[i % ss.len()],
                    &x,
                    &mut y,
                    rows,
                    cols,
                    n,
                )
                .unwrap()
            });
            report(
                &format!("mxfp4_gemv[{v}]"),
                &format!("{what} {rows}x{cols} n {n}"),
                us,
                (rows * cols / 2 + rows * cols / 32 + n * cols * 2 + n * rows * 4) as f64,
            );
        }
    }
    // MoE timing: Qwen3-30B-A3B layer, 128 experts, 1 token x top-8, gate_up
    let (ne, rows, cols, k) = (128usize, 1536usize, 2048usize, 8usize);
    let (bl, sc) = rand_mxfp4(&mut r, ne, rows, cols);
    let (db, ds) = (up(&bl), up(&sc));
    let x = up(&to_bf(&randn(&mut r, cols, 1.0)));
    let mut y = nan_f32(k * rows);
    let idsets: Vec<CudaSlice<i32>> = (0..16)
        .map(|_| {
            up(&(0..k)
                .map(|_| r.gen_range(0..ne as i32))
                .collect::<Vec<_>>())
        })
        .collect();
    let us = bench(|i| {
        c.mxfp4_moe_gemv(&db, &ds, &x, &mut y, &idsets[i % 16], k, k, rows, cols, ne)
            .unwrap()
    });
    report(
        &format!("mxfp4_moe_gemv[{v}]"),
        &format!("E {ne} top-{k} 1 tok {rows}x{cols}"),
        us,
        (k * (rows * cols / 2 + rows * cols / 32)) as f64,
    );
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
fn moe_router_and_combine() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(n, e, k, renorm) in &[
        (1usize, 128usize, 8usize, true),
        (7, 32, 4, true),
        (64, 256, 8, true),
        (5, 60, 4, false),
        (3, 8, 2, true),
        // more than 256 experts: the 16-logits-per-lane variant (Kimi-K2: 384, top-8)
        (4, 384, 8, true),
        (3, 300, 4, false),
    ] {
        let logits = randn(&mut r, n * e, 4.0);
        let mut want_ids = vec![];
        let mut want_w = vec![];
        for t in 0..n {
            let row = &logits[t * e..(t + 1) * e];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let p: Vec<f64> = row.iter().map(|v| (*v as f64 - m).exp()).collect();
            let s: f64 = p.iter().sum();
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|a, b| row[*b].partial_cmp(&row[*a]).unwrap().then(a.cmp(b)));
            let sel = &idx[..k];
            let ss: f64 = sel.iter().map(|i| p[*i] / s).sum();
            for &i in sel {
                want_ids.push(i as i32);
                want_w.push(if renorm { p[i] / s / ss } else { p[i] / s });
            }
        }
        let mut ids = up(&vec![-1i32; n * k]);
        let mut w = nan_f32(n * k);
        c.moe_router_topk(&up(&logits), &mut ids, &mut w, n, e, k, renorm)
            .unwrap();
        assert_eq!(down(&ids), want_ids, "router ids n {n} E {e} k {k}");
        check(
            &format!("moe_router_topk n {n} E {e} k {k} renorm {renorm} (ids exact)"),
            &down(&w),
            &want_w,
            1e-5,
        );
    }
    let (n, k, h) = (5usize, 8usize, 2048usize);
    let y = randn(&mut r, n * k * h, 1.0);
    let wts = randn(&mut r, n * k, 1.0);
    let mut want = vec![0f64; n * h];
    for t in 0..n {
        for j in 0..k {
            for i in 0..h {
                want[t * h + i] += wts[t * k + j] as f64 * y[(t * k + j) * h + i] as f64;
            }
        }
    }
    let mut o = nan_f32(n * h);
    c.moe_combine(&up(&y), &up(&wts), &mut o, n, k, h).unwrap();
    check(
        &format!("moe_combine n {n} k {k} H {h}"),
        &down(&o),
        &want,
        1e-6,
    );
    let (n, e, k) = (64, 128, 8);
    let dl = up(&randn(&mut r, n * e, 4.0));
    let mut ids = up(&vec![0i32; n * k]);
    let mut w = nan_f32(n * k);
    let us = bench(|_| {
        c.moe_router_topk(&dl, &mut ids, &mut w, n, e, k, true)
            .unwrap()
    });
    report(
        "moe_router_topk",
        &format!("n {n} E {e} k {k}"),
        us,
        (n * e * 4) as f64,
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
