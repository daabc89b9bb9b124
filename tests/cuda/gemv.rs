//! CUDA GEMVs (bf16 dense, MXFP4 experts) and the MoE router / combine vs f64 CPU references;
//! timing sweep printed. Needs a GPU:
//! `cargo test --release --features cuda --test cuda -- gemv:: --test-threads=1 --nocapture`.

use crate::support::*;

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
        (2048, 4096), // Qwen3 o_proj: split in 2
        (128, 2048),  // Qwen3 router: split in 8
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
                &format!("bf16_gemv f32-x rows {rows} cols {cols} n {n} (split {})", c.gemv_split_warps(rows, cols, n)),
                &down(&y),
                &want,
                1e-5,
            );
        }
    }
    // every split count on a shape each can take (KS warps x 32 lanes x 8 columns | 2048)
    for ks in [1usize, 2, 4, 8] {
        let (rows, cols) = (100usize, 2048usize);
        let w = rbf(&randn(&mut r, rows * cols, 1.0));
        let x = rbf(&randn(&mut r, cols, 1.0));
        let want = ref_gemv(&w, &x, rows, cols, 1);
        let mut y = nan_f32(rows);
        c.bf16_gemv_split(&up(&to_bf(&w)), &up(&x), &mut y, rows, cols, 1, ks).unwrap();
        check(&format!("bf16_gemv f32-x rows {rows} cols {cols} n 1, {ks} warps per row"), &down(&y), &want, 1e-5);
    }
    assert!(c.bf16_gemv_split(&up(&[0u16; 16]), &up(&[0f32; 16]), &mut nan_f32(2), 2, 8, 1, 3).is_err());
    if c.gemv_split {
        // Qwen3-30B-A3B: o-proj, router, q|k|v, lm_head (default target: 16384 warps)
        let got = [(2048, 4096), (128, 2048), (5120, 2048), (151936, 2048)].map(|(r, cc)| c.gemv_split_warps(r, cc, 1));
        assert_eq!(got, [8, 8, 4, 1]);
    }
    assert_eq!(c.gemv_split_warps(2048, 4096, 2), 1, "split only for one input row");
    // timing (weights rotated past L2)
    for &(rows, cols, what) in &[
        (49152usize, 576usize, "SmolLM2 lm_head"),
        (1536, 576, "SmolLM2 gate"),
        (576, 1536, "SmolLM2 down"),
        (4096, 2048, "Qwen3-30B q_proj"),
        (2048, 4096, "Qwen3-30B o_proj"),
        (128, 2048, "Qwen3-30B router"),
        (2880, 4096, "gpt-oss-20b o_proj"),
        (151936, 2048, "Qwen3 lm_head"),
    ] {
        let w = up(&to_bf(&randn(&mut r, rows * cols, 1.0)));
        let ws = copies(&w, 256 << 20);
        for &n in &[1usize, 8] {
            let x = up(&to_bf(&randn(&mut r, n * cols, 1.0)));
            let mut y = nan_f32(n * rows);
            let bytes = (rows * cols * 2 + n * cols * 2 + n * rows * 4) as f64;
            let us = bench(|i| {
                c.bf16_gemv(&ws[i % ws.len()], &x, &mut y, rows, cols, n)
                    .unwrap()
            });
            let ks = c.gemv_split_warps(rows, cols, n);
            report("bf16_gemv", &format!("{what} {rows}x{cols} n {n} (split {ks})"), us, bytes);
            if ks > 1 {
                let us = bench(|i| c.bf16_gemv_split(&ws[i % ws.len()], &x, &mut y, rows, cols, n, 1).unwrap());
                report("bf16_gemv", &format!("{what} {rows}x{cols} n {n} (one warp per row)"), us, bytes);
            }
        }
    }
}

/// The bulk-copy GEMV (kernels/gemv_bulk.cu): against the f64 reference with bias and
/// accumulation, bit for bit against the one-warp-per-row GEMV (the same sums in the same
/// order), on tiles resident whole, streamed through a ring, and through a single buffer.
#[test]
fn bf16_gemv_bulk() {
    guard!();
    let c = cx();
    let mut r = rng();
    for &(rows, cols) in &[
        (5120usize, 2048usize), // Qwen3 q|k|v: 5 chunks per block, all resident
        (2048, 4096),           // Qwen3 o-proj
        (128, 2048),            // fewer rows than SMs
        (20000, 2048),          // more chunks than the ring holds
        (700, 8192),            // 128 KB chunks: one buffer, refilled
        (5120, 2880),           // gpt-oss q|k|v: partial last activation chunk per lane
        (960, 576),
        (77, 1032),
        (3, 8),
    ] {
        let plan = c.gemv_bulk_plan(rows, cols).expect("a bulk plan");
        let w = rbf(&randn(&mut r, rows * cols, 1.0));
        let dw = up(&to_bf(&w));
        let x = rbf(&randn(&mut r, cols, 1.0));
        let bias = randn(&mut r, rows, 1.0);
        let y0 = randn(&mut r, rows, 1.0);
        let dot = ref_gemv(&w, &x, rows, cols, 1);
        let what = format!("bf16_gemv_bulk {rows}x{cols} (tile {}, stages {}, p{})", plan.tile, plan.stages, plan.pmax);
        // f32 x, no bias: bit for bit the one-warp-per-row kernel's
        let mut y = nan_f32(rows);
        c.bf16_gemv_bulk(&dw, &up(&x), &mut y, rows, cols, None, false).unwrap();
        let got = down(&y);
        check(&format!("{what} f32-x"), &got, &dot, 1e-5);
        let mut y1 = nan_f32(rows);
        c.bf16_gemv_split(&dw, &up(&x), &mut y1, rows, cols, 1, 1).unwrap();
        let one = down(&y1);
        let diff = got.iter().zip(&one).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(diff, 0, "{what}: {diff} rows differ from bf16_gemv_f32x_n1");
        // bf16 x, with bias, accumulating
        let want: Vec<f64> = dot.iter().zip(&bias).zip(&y0).map(|((d, b), y)| d + *b as f64 + *y as f64).collect();
        let mut y = up(&y0);
        c.bf16_gemv_bulk(&dw, &up(&to_bf(&x)), &mut y, rows, cols, Some(&up(&bias)), true).unwrap();
        check(&format!("{what} bf16-x bias acc"), &down(&y), &want, 1e-5);
        // bias, not accumulating (whatever y held is overwritten)
        let want: Vec<f64> = dot.iter().zip(&bias).map(|(d, b)| d + *b as f64).collect();
        let mut y = nan_f32(rows);
        c.bf16_gemv_bulk(&dw, &up(&x), &mut y, rows, cols, Some(&up(&bias)), false).unwrap();
        check(&format!("{what} f32-x bias"), &down(&y), &want, 1e-5);
    }
    assert!(c.gemv_bulk_plan(100, 100).is_none(), "cols % 8");
    assert!(c.bf16_gemv_bulk(&up(&[0u16; 100]), &up(&[0f32; 10]), &mut nan_f32(10), 10, 10, None, false).is_err());
    // timing, eager launches (no predecessor to overlap): weights rotated past L2
    for &(rows, cols, what) in &[
        (5120usize, 2048usize, "Qwen3-30B q|k|v"),
        (2048, 4096, "Qwen3-30B o_proj"),
        (5120, 2880, "gpt-oss-20b q|k|v"),
        (2880, 4096, "gpt-oss-20b o_proj"),
        (151936, 2048, "Qwen3 lm_head"),
        (960, 576, "SmolLM2 q|k|v"),
    ] {
        let w = up(&to_bf(&randn(&mut r, rows * cols, 1.0)));
        let ws = copies(&w, 256 << 20);
        let x = up(&randn(&mut r, cols, 1.0));
        let mut y = nan_f32(rows);
        let bytes = (rows * cols * 2 + cols * 4 + rows * 4) as f64;
        let us = bench(|i| c.bf16_gemv(&ws[i % ws.len()], &x, &mut y, rows, cols, 1).unwrap());
        report("bf16_gemv", &format!("{what} {rows}x{cols} (split {})", c.gemv_split_warps(rows, cols, 1)), us, bytes);
        let us = bench(|i| c.bf16_gemv_bulk(&ws[i % ws.len()], &x, &mut y, rows, cols, None, false).unwrap());
        report("bf16_gemv_bulk", &format!("{what} {rows}x{cols}"), us, bytes);
    }
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
