//! Speed comparison of the quantized matmuls against plain f32 (never asserted; ignored
//! by default). Run with
//! `cargo test --release --lib quant::timing -- --ignored --nocapture`.

use super::kernels::{matmul_f32, use_avx2};
use super::testutil::normal;

/// Speed comparison (never asserted). Run with
/// `cargo test --release quant::timing::timing_vs_f32 -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_vs_f32() {
    use crate::quant::{Fp8Matrix, Mxfp4Matrix, Nvfp4Matrix, ScaleRule};
    use std::time::Instant;
    let (rows, cols) = (576, 1536);
    let w = normal(rows * cols, 42);
    let mx = Mxfp4Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
    let nv = Nvfp4Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
    let f8 = Fp8Matrix::quantize(&w, rows, cols, ScaleRule::Spec).unwrap();
    println!(
        "shape {rows}x{cols}, avx2 {}; best-of-batches time per call (machine is shared)",
        use_avx2()
    );
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for n in [1usize, 8] {
            let x = normal(n * cols, 7);
            let time = |name: &str, bytes: usize, f: &(dyn Fn(&mut [f32]) + Sync)| {
                let mut y = vec![0f32; n * rows];
                let best = pool.install(|| {
                    let mut best = f64::INFINITY;
                    for _ in 0..40 {
                        let t = Instant::now();
                        for _ in 0..5 {
                            f(&mut y);
                        }
                        best = best.min(t.elapsed().as_secs_f64() / 5.0);
                    }
                    best
                });
                let us = best * 1e6;
                let gflops = 2.0 * (n * rows * cols) as f64 / us / 1e3;
                println!(
                    "threads={threads} n={n} {name:<13} {us:8.1} us  {gflops:6.2} GFLOP/s  weights {:6.0} KiB",
                    bytes as f64 / 1024.0
                );
            };
            // cold: weights evicted from all caches (64 MiB sweep) before each timed call,
            // as in real decode where a layer's weights are not cache-resident
            let cold = |name: &str, f: &(dyn Fn(&mut [f32]) + Sync)| {
                let mut y = vec![0f32; n * rows];
                let mut sweep = vec![0u8; 64 << 20];
                let mut ts: Vec<f64> = pool.install(|| {
                    (0..15u8)
                        .map(|k| {
                            sweep
                                .iter_mut()
                                .step_by(64)
                                .for_each(|b| *b = b.wrapping_add(k));
                            let t = Instant::now();
                            f(&mut y);
                            t.elapsed().as_secs_f64() * 1e6
                        })
                        .collect()
                });
                ts.sort_by(|a, b| a.total_cmp(b));
                println!(
                    "threads={threads} n={n} {name:<13} {:8.1} us  (cold cache, median)",
                    ts[ts.len() / 2]
                );
            };
            cold("f32", &|y| matmul_f32(&w, rows, cols, &x, n, y));
            cold("mxfp4", &|y| mx.matmul(&x, n, y));
            cold("nvfp4", &|y| nv.matmul(&x, n, y));
            cold("fp8", &|y| f8.matmul(&x, n, y));
            time("f32", 4 * rows * cols, &|y| {
                matmul_f32(&w, rows, cols, &x, n, y)
            });
            time("mxfp4", mx.bytes(), &|y| mx.matmul(&x, n, y));
            time("mxfp4 scalar", mx.bytes(), &|y| {
                mx.matmul_impl(&x, n, y, false)
            });
            time("nvfp4", nv.bytes(), &|y| nv.matmul(&x, n, y));
            time("nvfp4 scalar", nv.bytes(), &|y| {
                nv.matmul_impl(&x, n, y, false)
            });
            time("fp8", f8.bytes(), &|y| f8.matmul(&x, n, y));
            time("fp8 scalar", f8.bytes(), &|y| {
                f8.matmul_impl(&x, n, y, false)
            });
        }
    }
}
