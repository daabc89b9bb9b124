//! The int8-activation MoE kernels (`kernels/moe_q8.cu`) against f64 CPU
//! references on fresh random inputs, outputs poisoned first. The references use
//! the same int8 activations the kernels read, so the expert GEMVs are checked to
//! float tolerance (not to the int8 rounding). Needs a GPU: `cargo test --release
//! --features cuda --test cuda -- moe_q8::`; without one it prints a skip line.


use std::sync::OnceLock;

use cudarc::driver::{CudaSlice, DeviceRepr};
use kairos::backend::cuda::kernels_q8::{Experts, GateAct};
use kairos::backend::cuda::CudaContext;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

static CX: OnceLock<Option<CudaContext>> = OnceLock::new();

fn cx() -> Option<&'static CudaContext> {
    CX.get_or_init(|| {
        if !kairos::backend::cuda::device_available() {
            assert!(std::env::var_os("KAIROS_REQUIRE_CUDA").is_none(), "KAIROS_REQUIRE_CUDA is set but no CUDA device was found");
            println!("no CUDA device: skipped");
            return None;
        }
        Some(CudaContext::new(0).expect("open CUDA device 0 and compile kernels"))
    })
    .as_ref()
}

fn up<T: DeviceRepr>(c: &CudaContext, v: &[T]) -> CudaSlice<T> {
    c.stream.memcpy_stod(v).unwrap()
}
fn down<T: DeviceRepr + Default + Clone>(c: &CudaContext, s: &CudaSlice<T>) -> Vec<T> {
    c.stream.memcpy_dtov(s).unwrap()
}
fn rng() -> StdRng {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("  seed {seed}");
    StdRng::seed_from_u64(seed)
}
fn randn(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0) + r.gen_range(-1.0f32..1.0)).collect()
}
fn bf(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}
fn from_bf(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

/// What the kernels do: per 32-block d = max|x| / 127, q = round-half-even(x / d).
fn quantize_q8(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / 32];
    for (b, blk) in x.chunks(32).enumerate() {
        let m = blk.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        d[b] = m;
        for (i, v) in blk.iter().enumerate() {
            q[b * 32 + i] = if m > 0.0 { (v / m).round_ties_even() as i8 } else { 0 };
        }
    }
    (q, d)
}

const E2M1: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// Row `r` of expert `e`, dequantized (f64).
fn mx_row(blocks: &[u8], scales: &[u8], e: usize, rows: usize, r: usize, cols: usize) -> Vec<f64> {
    let nb = cols / 32;
    let row = e * rows + r;
    (0..cols)
        .map(|c| {
            let byte = blocks[(row * nb + c / 32) * 16 + (c % 32) / 2];
            let nib = if c % 2 == 0 { byte & 15 } else { byte >> 4 };
            let v = if nib & 8 != 0 { -E2M1[(nib & 7) as usize] } else { E2M1[(nib & 7) as usize] };
            v * 2f64.powi(scales[row * nb + c / 32] as i32 - 127)
        })
        .collect()
}
fn dot(w: &[f64], q: &[i8], d: &[f32]) -> f64 {
    w.iter().enumerate().map(|(c, wv)| wv * q[c] as f64 * d[c / 32] as f64).sum()
}
fn rand_mx(r: &mut StdRng, e: usize, rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    ((0..e * rows * cols / 2).map(|_| r.gen()).collect(), (0..e * rows * cols / 32).map(|_| r.gen_range(118..=130)).collect())
}
fn check(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (unwritten?), want {w}");
        num += (*g as f64 - w).powi(2);
        den += w * w;
    }
    let rel = (num / den.max(1e-30)).sqrt();
    println!("  {what:<60} rel_l2 {rel:.2e} (tol {tol:.0e})");
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.0e}");
}

#[test]
fn rmsnorm_writes_int8_blocks() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    for &(n, h) in &[(1usize, 2048usize), (3, 576), (70, 2880)] {
        let x = randn(&mut r, n * h);
        let delta = randn(&mut r, n * h);
        let w: Vec<u16> = randn(&mut r, h).iter().map(|v| bf(*v)).collect();
        let (mut dx, dd, dw) = (up(c, &x), up(c, &delta), up(c, &w));
        let mut out = up(c, &vec![0x7fc0u16; n * h]);
        let mut xq = up(c, &vec![-128i8; n * h]);
        let mut xd = up(c, &vec![f32::NAN; n * h / 32]);
        c.rmsnorm_residual_q8(&mut dx, Some(&dd), &dw, &mut out, &mut xq, &mut xd, n, h, 1e-6).unwrap();
        let (out, xq, xd) = (down(c, &out), down(c, &xq), down(c, &xd));
        // the int8 blocks encode the kernel's own (pre-bf16-rounding) output: check them
        // against the bf16 output, which is that value to within bf16 rounding
        for t in 0..n {
            for b in 0..h / 32 {
                let d = xd[t * h / 32 + b];
                assert!(d.is_finite() && d >= 0.0, "rows {n} hidden {h}: scale {d}");
                let blk: Vec<f32> = (0..32).map(|i| from_bf(out[t * h + b * 32 + i])).collect();
                let m = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!((d * 127.0 - m).abs() <= 1e-2 * m + 1e-30, "block max {m} vs scale*127 {}", d * 127.0);
                for i in 0..32 {
                    let q = xq[t * h + b * 32 + i];
                    assert!(q != -128, "unwritten / out of range int8");
                    let err = (q as f32 * d - blk[i]).abs();
                    assert!(err <= 0.5 * d + 1e-2 * blk[i].abs() + 1e-30, "q {q} d {d} v {}", blk[i]);
                }
            }
        }
        println!("  rmsnorm_residual_q8 rows {n} hidden {h}: int8 blocks within half a step");
    }
}

#[test]
fn expert_gemv_int8() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    // Qwen3-30B-A3B down (cols 768: 8 lanes a row), gate_up-like (2048: a warp a row), gpt-oss 2880, odd sizes
    for &(ne, rows, cols, n_assign, x_div) in
        &[(16usize, 2048usize, 768usize, 8usize, 1usize), (16, 1536, 2048, 12, 4), (4, 2880, 2880, 4, 2), (3, 37, 96, 5, 1)]
    {
        let (bl, sc) = rand_mx(&mut r, ne, rows, cols);
        let ids: Vec<i32> = (0..n_assign).map(|_| r.gen_range(0..ne as i32)).collect();
        let nx = n_assign.div_ceil(x_div);
        let (xq, xd) = quantize_q8(&randn(&mut r, nx * cols));
        let mut want = Vec::new();
        for (a, &e) in ids.iter().enumerate() {
            let xr = a / x_div;
            for row in 0..rows {
                let w = mx_row(&bl, &sc, e as usize, rows, row, cols);
                want.push(dot(&w, &xq[xr * cols..(xr + 1) * cols], &xd[xr * cols / 32..(xr + 1) * cols / 32]));
            }
        }
        let mut y = up(c, &vec![f32::NAN; n_assign * rows]);
        c.mxfp4_moe_gemv_q8(&up(c, &bl), &up(c, &sc), &up(c, &xq), &up(c, &xd), &mut y, Experts::Ids(&up(c, &ids)), n_assign, x_div, rows, cols, ne)
            .unwrap();
        check(&format!("mxfp4_moe_gemv_q8 E {ne} rows {rows} cols {cols} assign {n_assign}"), &down(c, &y), &want, 1e-5);
    }
}

#[test]
fn gate_up_activation_int8() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    for (act, inter, cols, with_bias) in [
        (GateAct::SiluGlu, 768usize, 2048usize, false),
        (GateAct::GptOss { alpha: 1.702, limit: 7.0 }, 96, 2880, true),
        (GateAct::SiluGlu, 64, 96, true),
    ] {
        let (ne, n_tok, k) = (8usize, 3usize, 2usize);
        let n_assign = n_tok * k;
        let (bl, sc) = rand_mx(&mut r, ne, 2 * inter, cols);
        let ids: Vec<i32> = (0..n_assign).map(|_| r.gen_range(0..ne as i32)).collect();
        let (xq, xd) = quantize_q8(&randn(&mut r, n_tok * cols));
        let bias: Vec<f32> = randn(&mut r, ne * 2 * inter);
        // reference: the activation in f64, then the same int8 block quantization
        let mut want_act = Vec::new();
        for (a, &e) in ids.iter().enumerate() {
            let e = e as usize;
            let (xs, ds) = (&xq[(a / k) * cols..(a / k + 1) * cols], &xd[(a / k) * cols / 32..(a / k + 1) * cols / 32]);
            for j in 0..inter {
                let (gr, ur) = match act {
                    GateAct::SiluGlu => (j, inter + j),
                    GateAct::GptOss { .. } => (2 * j, 2 * j + 1),
                };
                let mut g = dot(&mx_row(&bl, &sc, e, 2 * inter, gr, cols), xs, ds);
                let mut u = dot(&mx_row(&bl, &sc, e, 2 * inter, ur, cols), xs, ds);
                if with_bias {
                    g += bias[e * 2 * inter + gr] as f64;
                    u += bias[e * 2 * inter + ur] as f64;
                }
                let v = match act {
                    GateAct::SiluGlu => g / (1.0 + (-g).exp()) * u,
                    GateAct::GptOss { alpha, limit } => {
                        let (l, al) = (limit as f64, alpha as f64);
                        let g = g.min(l);
                        let u = u.clamp(-l, l);
                        (u + 1.0) * (g / (1.0 + (-al * g).exp()))
                    }
                };
                want_act.push(v);
            }
        }
        let mut aq = up(c, &vec![-128i8; n_assign * inter]);
        let mut ad = up(c, &vec![f32::NAN; n_assign * inter / 32]);
        let db = up(c, &bias);
        c.moe_gate_up_q8(
            &up(c, &bl), &up(c, &sc), &up(c, &xq), &up(c, &xd), Experts::Ids(&up(c, &ids)), with_bias.then_some(&db), act, &mut aq, &mut ad,
            n_assign, k, inter, cols, ne,
        )
        .unwrap();
        let (aq, ad) = (down(c, &aq), down(c, &ad));
        let got: Vec<f32> = aq.iter().enumerate().map(|(i, q)| {
            assert!(*q != -128, "unwritten int8 at {i}");
            *q as f32 * ad[i / 32]
        }).collect();
        // int8 blocks carry at most half a step of rounding: relative l2 well under 1%
        check(&format!("moe_gate_up_q8 {act:?} inter {inter} cols {cols} bias {with_bias}"), &got, &want_act, 1e-2);
    }
}

/// The grouped expert GEMVs (each expert read once for all of its assignments, listed by
/// `moe_group`) give exactly what the per-assignment kernels give: the per-row sums run
/// in the same order. Shapes: Qwen3-30B-A3B (128 experts, gate/up 2048 -> 2x768, down
/// 768 -> 2048: 8 lanes a row) at 64 tokens x top-8, gpt-oss-like (32 experts, 2880,
/// clamped GLU with biases: a warp a row) at 16 x 4, and a skewed routing where one expert
/// takes 40 assignments (several chunks of 8).
#[test]
fn grouped_matches_per_assignment() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    for (act, ne, inter, hidden, n_tok, k, skew) in [
        (GateAct::SiluGlu, 128usize, 768usize, 2048usize, 64usize, 8usize, false),
        (GateAct::GptOss { alpha: 1.702, limit: 7.0 }, 32, 96, 2880, 16, 4, false),
        (GateAct::SiluGlu, 16, 64, 96, 20, 4, true),
    ] {
        let n_assign = n_tok * k;
        let ids: Vec<i32> = (0..n_assign).map(|a| if skew && a % 2 == 0 { 3 } else { r.gen_range(0..ne as i32) }).collect();
        // moe_group against a host listing
        let dids = up(c, &ids);
        let mut off = up(c, &vec![-7i32; ne + 1]);
        let mut list = up(c, &vec![-7i32; n_assign]);
        c.moe_group(&dids, n_assign, ne, &mut off, &mut list).unwrap();
        let (off_h, list_h) = (down(c, &off), down(c, &list));
        let mut want_list = Vec::new();
        let mut want_off = vec![0i32];
        for e in 0..ne as i32 {
            want_list.extend((0..n_assign as i32).filter(|&a| ids[a as usize] == e));
            want_off.push(want_list.len() as i32);
        }
        assert_eq!(off_h, want_off, "moe_group offsets");
        assert_eq!(list_h, want_list, "moe_group list");
        // gate/up + activation, then down, both ways
        let (gbl, gsc) = rand_mx(&mut r, ne, 2 * inter, hidden);
        let (dbl, dsc) = rand_mx(&mut r, ne, hidden, inter);
        let (gbl, gsc, dbl, dsc) = (up(c, &gbl), up(c, &gsc), up(c, &dbl), up(c, &dsc));
        let (xq, xd) = quantize_q8(&randn(&mut r, n_tok * hidden));
        let (xq, xd) = (up(c, &xq), up(c, &xd));
        let bias = up(c, &randn(&mut r, ne * 2 * inter));
        let bias = matches!(act, GateAct::GptOss { .. }).then_some(&bias);
        let mut outs = Vec::new();
        for grouped in [false, true] {
            let mut aq = up(c, &vec![99i8; n_assign * inter]);
            let mut ad = up(c, &vec![f32::NAN; n_assign * inter / 32]);
            let mut y = up(c, &vec![f32::NAN; n_assign * hidden]);
            let ex = if grouped { Experts::Grouped { off: &off, list: &list } } else { Experts::Ids(&dids) };
            c.moe_gate_up_q8(&gbl, &gsc, &xq, &xd, ex, bias, act, &mut aq, &mut ad, n_assign, k, inter, hidden, ne).unwrap();
            c.mxfp4_moe_gemv_q8(&dbl, &dsc, &aq, &ad, &mut y, ex, n_assign, 1, hidden, inter, ne).unwrap();
            outs.push((down(c, &aq), down(c, &ad), down(c, &y)));
        }
        let (a, b) = (&outs[0], &outs[1]);
        assert!(b.2.iter().all(|v| v.is_finite()), "grouped: an output was not written");
        assert_eq!(a.0, b.0, "E {ne}: int8 activations differ");
        assert!(a.1.iter().zip(&b.1).all(|(x, y)| x.to_bits() == y.to_bits()), "E {ne}: activation scales differ");
        let diff = a.2.iter().zip(&b.2).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(diff, 0, "E {ne}: {diff} of {} expert outputs differ", a.2.len());
        println!("  E {ne}, {n_tok} tokens x top-{k}: grouped == per-assignment (bitwise), {} outputs", a.2.len());
    }
}

/// `router_norm_q8` (the post-attention norm folded into the router GEMV, every block
/// normalising the rows itself) against an f64 reference: logits = bf16(rmsnorm(x) * w) .
/// router (+ bias) to float tolerance, and the int8 blocks within half a step of the
/// normalised row. Shapes: Qwen3-30B-A3B (2048, 128 experts) at 1 and 8 rows, gpt-oss
/// (2880, 32 experts, bias), SmolLM2-like (576) and a row longer than the kernel's
/// preloaded chunks (8448 = 1056 chunks of 8 > 4 x 256).
#[test]
fn router_norm_matches_reference() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    for &(n, h, ne, with_bias) in &[(1usize, 2048usize, 128usize, false), (8, 2048, 128, false), (3, 2880, 32, true), (2, 576, 8, false), (1, 8448, 16, true)] {
        let x: Vec<f32> = randn(&mut r, n * h).iter().map(|v| v * 3.0).collect();
        let w: Vec<u16> = randn(&mut r, h).iter().map(|v| bf(*v)).collect();
        let wr: Vec<u16> = randn(&mut r, ne * h).iter().map(|v| bf(v * 0.05)).collect();
        let bias = randn(&mut r, ne);
        let (dx, dw, dwr, db) = (up(c, &x), up(c, &w), up(c, &wr), up(c, &bias));
        let mut logits = up(c, &vec![f32::NAN; n * ne]);
        let mut xq = up(c, &vec![-128i8; n * h]);
        let mut xd = up(c, &vec![f32::NAN; n * h / 32]);
        c.router_norm_q8(&dx, &dw, &dwr, with_bias.then_some(&db), &mut logits, &mut xq, &mut xd, n, h, ne, 1e-6).unwrap();
        let (logits, xq, xd) = (down(c, &logits), down(c, &xq), down(c, &xd));
        assert_eq!(down(c, &dx), x, "the residual must not change");
        let mut want = Vec::new();
        for t in 0..n {
            let row = &x[t * h..(t + 1) * h];
            let inv = 1.0 / (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64 + 1e-6).sqrt();
            let hn: Vec<f64> = row.iter().zip(&w).map(|(v, wv)| *v as f64 * inv * from_bf(*wv) as f64).collect();
            for e in 0..ne {
                let d: f64 = (0..h).map(|i| from_bf(bf(hn[i] as f32)) as f64 * from_bf(wr[e * h + i]) as f64).sum();
                want.push(d + if with_bias { bias[e] as f64 } else { 0.0 });
            }
            for b in 0..h / 32 {
                let d = xd[t * h / 32 + b];
                let m = (0..32).fold(0f64, |m, i| m.max(hn[b * 32 + i].abs()));
                assert!(d.is_finite() && (d as f64 * 127.0 - m).abs() <= 1e-5 * m + 1e-30, "rows {n} hidden {h}: scale {d} vs max {m}");
                for i in 0..32 {
                    let q = xq[t * h + b * 32 + i];
                    assert!(q != -128, "unwritten / out of range int8");
                    let err = (q as f64 * d as f64 - hn[b * 32 + i]).abs();
                    assert!(err <= 0.5 * d as f64 * (1.0 + 1e-4) + 1e-5 * m, "q {q} d {d} v {}", hn[b * 32 + i]);
                }
            }
        }
        check(&format!("router_norm_q8 rows {n} hidden {h} experts {ne} bias {with_bias}"), &logits, &want, 1e-4);
    }
}

/// `moe_gate_up_q8_topk` (each block ranking its token's router logits) gives what
/// `moe_router_topk` followed by `moe_gate_up_q8` gives: the same expert ids in the same
/// order and bit for bit the same int8 activations; the weights (stored by the blocks of
/// row tile 0) to float rounding (the softmax sum runs in another order). Shapes:
/// Qwen3-30B-A3B (128 experts top-8, 2048 -> 2x768) at 1 and 8 rows, gpt-oss-like
/// (32 top-4, 2880, biases, clamped GLU, no renormalisation) and 256 experts top-32.
#[test]
fn gate_up_topk_matches_separate_launches() {
    let Some(c) = cx() else { return };
    let mut r = rng();
    for &(n, ne, k, inter, cols, renorm, oss) in &[
        (1usize, 128usize, 8usize, 768usize, 2048usize, true, false),
        (8, 128, 8, 768, 2048, true, false),
        (3, 32, 4, 96, 2880, false, true),
        (2, 256, 32, 64, 256, true, false),
        (1, 64, 4, 1536, 512, true, false),
    ] {
        let act = if oss { GateAct::GptOss { alpha: 1.702, limit: 7.0 } } else { GateAct::SiluGlu };
        let n_assign = n * k;
        let (bl, sc) = rand_mx(&mut r, ne, 2 * inter, cols);
        let (xq, xd) = quantize_q8(&randn(&mut r, n * cols));
        // rounded to a coarse grid so that ties occur (picked lowest index first)
        let logits: Vec<f32> = randn(&mut r, n * ne).iter().map(|v| (v * 8.0).round() / 8.0).collect();
        let bias = randn(&mut r, ne * 2 * inter);
        let (dbl, dsc, dxq, dxd, dlg, db) = (up(c, &bl), up(c, &sc), up(c, &xq), up(c, &xd), up(c, &logits), up(c, &bias));
        let bias_arg = oss.then_some(&db);
        // separate launches
        let mut ids = up(c, &vec![-7i32; n_assign]);
        let mut tw = up(c, &vec![f32::NAN; n_assign]);
        c.moe_router_topk(&dlg, &mut ids, &mut tw, n, ne, k, renorm).unwrap();
        let mut aq = up(c, &vec![-128i8; n_assign * inter]);
        let mut ad = up(c, &vec![f32::NAN; n_assign * inter / 32]);
        c.moe_gate_up_q8(&dbl, &dsc, &dxq, &dxd, Experts::Ids(&ids), bias_arg, act, &mut aq, &mut ad, n_assign, k, inter, cols, ne).unwrap();
        // one launch
        let mut ids2 = up(c, &vec![-7i32; n_assign]);
        let mut tw2 = up(c, &vec![f32::NAN; n_assign]);
        let mut aq2 = up(c, &vec![-128i8; n_assign * inter]);
        let mut ad2 = up(c, &vec![f32::NAN; n_assign * inter / 32]);
        c.moe_gate_up_q8_topk(&dbl, &dsc, &dxq, &dxd, &dlg, k, renorm, &mut ids2, &mut tw2, bias_arg, act, &mut aq2, &mut ad2, n, inter, cols, ne)
            .unwrap();
        let what = format!("rows {n} experts {ne} top-{k} inter {inter} cols {cols}");
        let ids1 = down(c, &ids);
        assert!(ids1.iter().all(|&e| e >= 0 && (e as usize) < ne), "{what}: separate top-k ids {ids1:?}");
        assert_eq!(down(c, &ids2), ids1, "{what}: expert ids");
        let (w1, w2) = (down(c, &tw), down(c, &tw2));
        assert!(w1.iter().zip(&w2).all(|(a, b)| (a - b).abs() <= 1e-6 * a.abs().max(1e-30)), "{what}: weights {w1:?} vs {w2:?}");
        assert_eq!(down(c, &aq2), down(c, &aq), "{what}: int8 activations");
        let (d1, d2) = (down(c, &ad), down(c, &ad2));
        assert!(d1.iter().zip(&d2).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: activation scales");
        // the down GEMV that ranks the logits itself reads the experts the ids name
        let (dbl2, dsc2) = rand_mx(&mut r, ne, cols, inter);
        let (dbl2, dsc2) = (up(c, &dbl2), up(c, &dsc2));
        let mut y1 = up(c, &vec![f32::NAN; n_assign * cols]);
        let mut y2 = up(c, &vec![f32::NAN; n_assign * cols]);
        c.mxfp4_moe_gemv_q8(&dbl2, &dsc2, &aq, &ad, &mut y1, Experts::Ids(&ids), n_assign, 1, cols, inter, ne).unwrap();
        c.mxfp4_moe_gemv_q8(&dbl2, &dsc2, &aq, &ad, &mut y2, Experts::Rank { logits: &dlg, top_k: k }, n_assign, 1, cols, inter, ne)
            .unwrap();
        let (y1, y2) = (down(c, &y1), down(c, &y2));
        assert!(y1.iter().all(|v| v.is_finite()), "{what}: down GEMV by ids left outputs unwritten");
        assert!(y1.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: down GEMV ranking its experts");
        println!("  moe_gate_up_q8_topk {what}: equal to top-k + gate/up; the ranking down GEMV equals the ids one");
    }
}
