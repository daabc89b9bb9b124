//! Shared harness of the CUDA kernel tests (kernels, attention, gemv, sample):
//! the device, random inputs, poisoned outputs, tolerance checks against f64 CPU
//! references, and the timing sweep (printed, never asserted).
#![allow(dead_code, unused_imports)]

pub use std::sync::{Mutex, OnceLock};

pub use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
pub use cudarc::driver::{CudaSlice, DeviceRepr};
pub use half::bf16;
pub use kairos::backend::cuda::kernels::{AttnWorkspace, KvShape};
pub use kairos::backend::cuda::CudaContext;
pub use rand::rngs::StdRng;
pub use rand::{Rng, SeedableRng};


// ---------------------------------------------------------------- harness

pub static CX: OnceLock<CudaContext> = OnceLock::new();
pub static LOCK: Mutex<()> = Mutex::new(());
pub static COPY_GBS: OnceLock<f64> = OnceLock::new();

pub fn cx() -> &'static CudaContext {
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

pub fn rng() -> StdRng {
    let seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("  seed {seed}");
    StdRng::seed_from_u64(seed)
}

pub fn randn(r: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (r.gen::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}
pub fn to_bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}
pub fn from_bf(v: &[u16]) -> Vec<f32> {
    v.iter().map(|x| bf16::from_bits(*x).to_f32()).collect()
}
/// round through bf16
pub fn rbf(v: &[f32]) -> Vec<f32> {
    from_bf(&to_bf(v))
}
pub fn up<T: DeviceRepr>(v: &[T]) -> CudaSlice<T> {
    cx().stream.memcpy_stod(v).unwrap()
}
pub fn down<T: DeviceRepr + Default + Clone>(s: &CudaSlice<T>) -> Vec<T> {
    cx().stream.memcpy_dtov(s).unwrap()
}
pub fn nan_f32(n: usize) -> CudaSlice<f32> {
    up(&vec![f32::NAN; n])
}
pub fn nan_bf(n: usize) -> CudaSlice<u16> {
    up(&vec![0x7fc0u16; n])
}

/// ‖got − want‖ / ‖want‖ (f64); panics on NaN / unwritten output or error > tol.
pub fn check(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
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

/// Median microseconds per call of `f(i)` (i = call index, for rotating inputs) on the
/// shared context's stream.
pub fn bench(f: impl FnMut(usize)) -> f64 {
    bench_on(cx(), f)
}

/// [`bench`] for launches on `c`'s stream (events are recorded there).
pub fn bench_on(c: &CudaContext, mut f: impl FnMut(usize)) -> f64 {
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

pub fn copy_gbs() -> f64 {
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

pub fn report(kernel: &str, shape: &str, us: f64, bytes: f64) {
    let gbs = bytes / us / 1e3;
    println!(
        "TIMING {kernel:<22} {shape:<44} {us:>9.2} us {gbs:>8.0} GB/s {:>5.1}% of copy",
        100.0 * gbs / copy_gbs()
    );
}

/// Copies of a device buffer so a timing loop can rotate past L2 (~`target` bytes in all).
pub fn copies<T: DeviceRepr>(s: &CudaSlice<T>, target: usize) -> Vec<CudaSlice<T>> {
    let bytes = s.len() * std::mem::size_of::<T>();
    let n = target.div_ceil(bytes.max(1)).clamp(1, 64);
    (0..n).map(|_| cx().stream.clone_dtod(s).unwrap()).collect()
}

/// Machines without a GPU (CI) skip these tests, unless KAIROS_REQUIRE_CUDA=1
/// says a device must be there.
pub fn has_gpu() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let ok = kairos::backend::cuda::device_available();
        if !ok && std::env::var("KAIROS_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
            panic!("KAIROS_REQUIRE_CUDA=1 but no CUDA device or driver library was found");
        }
        ok
    })
}

/// Skips the test (with a line) without a CUDA device; fails instead under
/// `KAIROS_REQUIRE_CUDA=1`. Holds `LOCK` for the rest of the test.
macro_rules! guard {
    () => {
        let _g = crate::support::LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if !crate::support::has_gpu() {
            println!("no CUDA device: skipped");
            return;
        }
        let _ = crate::support::cx();
    };
}

// ---------------------------------------------------------------- CPU references

pub fn ref_rmsnorm(
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
pub fn ref_gemv(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f64> {
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

pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
pub fn ref_mxfp4_dequant(blocks: &[u8], scales: &[u8], rows: usize, cols: usize) -> Vec<f32> {
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


pub fn inv_freq(d: usize, theta: f64) -> Vec<f32> {
    (0..d / 2)
        .map(|i| theta.powf(-(2.0 * i as f64) / d as f64) as f32)
        .collect()
}


/// Reference decode attention over bf16 caches (as f32 values).
#[allow(clippy::too_many_arguments)]
pub fn ref_attention(
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


pub fn rand_mxfp4(r: &mut StdRng, e: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let blocks: Vec<u8> = (0..e * rows * cols / 2).map(|_| r.gen()).collect();
    let scales: Vec<u8> = (0..e * rows * cols / 32)
        .map(|_| r.gen_range(118..=130))
        .collect();
    (blocks, scales)
}
