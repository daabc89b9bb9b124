//! Block dequantization for the ggml tensor types kairos loads from GGUF.
//!
//! Every function takes the raw little-endian bytes of a whole number of blocks
//! and writes `blocks * block_elems` f32 values. Callers (see `gguf.rs`) check
//! lengths up front; these functions additionally never index out of range:
//! they work on `chunks_exact`, so a short trailing block is simply ignored.
//!
//! Layouts follow ggml's `ggml-common.h` / `ggml-quants.c` definitions.

use half::{bf16, f16};

/// ggml type ids (`enum ggml_type`).
pub const GGML_TYPE_F32: u32 = 0;
pub const GGML_TYPE_F16: u32 = 1;
pub const GGML_TYPE_Q4_0: u32 = 2;
pub const GGML_TYPE_Q4_1: u32 = 3;
pub const GGML_TYPE_Q5_0: u32 = 6;
pub const GGML_TYPE_Q5_1: u32 = 7;
pub const GGML_TYPE_Q8_0: u32 = 8;
pub const GGML_TYPE_Q4_K: u32 = 12;
pub const GGML_TYPE_Q6_K: u32 = 14;
pub const GGML_TYPE_BF16: u32 = 30;

/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// (name, elements per block, bytes per block) for every ggml type id we know
/// the storage size of. Types whose size is known but which we cannot
/// dequantize still parse (so a file can be inspected), but `tensor_f32`
/// reports them as unsupported.
pub fn type_layout(t: u32) -> Option<(&'static str, usize, usize)> {
    Some(match t {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        _ => return None,
    })
}

/// Human-readable type name ("type 99" for unknown ids).
pub fn type_name(t: u32) -> String {
    match type_layout(t) {
        Some((n, _, _)) => n.to_string(),
        None => format!("type {t}"),
    }
}

/// Whether `dequantize` supports this type.
pub fn can_dequantize(t: u32) -> bool {
    matches!(
        t,
        GGML_TYPE_F32
            | GGML_TYPE_F16
            | GGML_TYPE_BF16
            | GGML_TYPE_Q4_0
            | GGML_TYPE_Q4_1
            | GGML_TYPE_Q5_0
            | GGML_TYPE_Q5_1
            | GGML_TYPE_Q8_0
            | GGML_TYPE_Q4_K
            | GGML_TYPE_Q6_K
    )
}

/// Dequantize `src` (whole blocks of type `t`) into `dst`.
/// Returns `false` if the type is not supported. `dst.len()` decides how many
/// blocks are decoded (`dst.len() / block_elems`); extra source bytes are ignored.
pub fn dequantize(t: u32, src: &[u8], dst: &mut [f32]) -> bool {
    match t {
        GGML_TYPE_F32 => dequant_f32(src, dst),
        GGML_TYPE_F16 => dequant_f16(src, dst),
        GGML_TYPE_BF16 => dequant_bf16(src, dst),
        GGML_TYPE_Q4_0 => dequant_q4_0(src, dst),
        GGML_TYPE_Q4_1 => dequant_q4_1(src, dst),
        GGML_TYPE_Q5_0 => dequant_q5_0(src, dst),
        GGML_TYPE_Q5_1 => dequant_q5_1(src, dst),
        GGML_TYPE_Q8_0 => dequant_q8_0(src, dst),
        GGML_TYPE_Q4_K => dequant_q4_k(src, dst),
        GGML_TYPE_Q6_K => dequant_q6_k(src, dst),
        _ => return false,
    }
    true
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    match (b.get(i), b.get(i + 1)) {
        (Some(&lo), Some(&hi)) => f16::from_le_bytes([lo, hi]).to_f32(),
        _ => 0.0,
    }
}

pub fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

/// Q4_0: `{ f16 d; u8 qs[16] }`, x = (nibble - 8) * d; low nibbles are
/// elements 0..16, high nibbles 16..32.
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
        let d = f16_at(blk, 0);
        let qs = &blk[2..18];
        let (lo, hi) = out.split_at_mut(16);
        for ((q, a), b) in qs.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *a = ((q & 0x0F) as i32 - 8) as f32 * d;
            *b = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: `{ f16 d; f16 m; u8 qs[16] }`, x = nibble * d + m.
pub fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let qs = &blk[4..20];
        let (lo, hi) = out.split_at_mut(16);
        for ((q, a), b) in qs.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *a = (q & 0x0F) as f32 * d + m;
            *b = (q >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0: `{ f16 d; u8 qh[4]; u8 qs[16] }`, 5th bit of element j in bit j of qh.
pub fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(22)) {
        let d = f16_at(blk, 0);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..22];
        let (lo, hi) = out.split_at_mut(16);
        for (j, ((q, a), b)) in qs.iter().zip(lo.iter_mut()).zip(hi.iter_mut()).enumerate() {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            *a = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            *b = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: `{ f16 d; f16 m; u8 qh[4]; u8 qs[16] }`, x = q5 * d + m.
pub fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(24)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let qs = &blk[8..24];
        let (lo, hi) = out.split_at_mut(16);
        for (j, ((q, a), b)) in qs.iter().zip(lo.iter_mut()).zip(hi.iter_mut()).enumerate() {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            *a = ((q & 0x0F) as u32 | h0) as f32 * d + m;
            *b = ((q >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// Q8_0: `{ f16 d; i8 qs[32] }`, x = q * d.
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
        let d = f16_at(blk, 0);
        for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

/// 6-bit (scale, min) pair `j` (0..8) packed in the 12 `scales` bytes of Q4_K/Q5_K.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`, 8 sub-blocks of 32;
/// x = d*sc*nibble - dmin*m. Each 32 bytes of qs hold two sub-blocks
/// (low nibbles first, then high nibbles).
pub fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(144)) {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        for (g, (o64, q32)) in out
            .chunks_exact_mut(64)
            .zip(qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * g, scales);
            let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (lo, hi) = o64.split_at_mut(32);
            for ((q, a), b) in q32.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
                *a = d1 * (q & 0x0F) as f32 - m1;
                *b = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

/// Q6_K: `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`, x = d * sc * (q6 - 32).
pub fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (out, blk) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(210)) {
        let ql_all = &blk[0..128];
        let qh_all = &blk[128..192];
        let sc_all = &blk[192..208];
        let d = f16_at(blk, 208);
        for half_i in 0..2 {
            let y = &mut out[half_i * 128..half_i * 128 + 128];
            let ql = &ql_all[half_i * 64..half_i * 64 + 64];
            let qh = &qh_all[half_i * 32..half_i * 32 + 32];
            let sc = &sc_all[half_i * 8..half_i * 8 + 8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Undo llama.cpp's convert-time permutation of Q (n_head) / K (n_kv_head) rows so weights match HF layout.
///
/// The converter maps HF row `h*hd + i*hd/2 + j` (i in 0..2, j in 0..hd/2) to GGUF row
/// `h*hd + 2*j + i`; this applies the inverse. `data` is `[rows, cols]` row-major
/// (`cols == 1` for a bias). Does nothing if the shapes are inconsistent
/// (use [`try_unpermute_qk`] to get an error instead).
pub fn unpermute_qk(data: &mut [f32], n_heads: usize, rows: usize, cols: usize) {
    let _ = try_unpermute_qk(data, n_heads, rows, cols);
}

/// Checked form of [`unpermute_qk`].
pub fn try_unpermute_qk(
    data: &mut [f32],
    n_heads: usize,
    rows: usize,
    cols: usize,
) -> Result<(), super::gguf::GgufError> {
    let bad = |what: String| super::gguf::GgufError::BadTensor {
        tensor: "q/k projection".into(),
        what,
    };
    if n_heads
        .checked_mul(2)
        .is_none_or(|d| d == 0 || !rows.is_multiple_of(d))
    {
        return Err(bad(format!(
            "{rows} rows cannot be split into {n_heads} heads of even size"
        )));
    }
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(bad(format!(
            "data length {} != {rows} x {cols}",
            data.len()
        )));
    }
    let hd = rows / n_heads;
    let half = hd / 2;
    let src = data.to_vec();
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..half {
                let dst_row = h * hd + i * half + j;
                let src_row = h * hd + 2 * j + i;
                data[dst_row * cols..(dst_row + 1) * cols]
                    .copy_from_slice(&src[src_row * cols..(src_row + 1) * cols]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic generator so tests need no extra crates.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u8
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "elem {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn layouts_known() {
        assert_eq!(type_layout(12), Some(("Q4_K", 256, 144)));
        assert_eq!(type_layout(4), None);
        assert!(type_name(99).contains("99"));
    }

    #[test]
    fn f32_f16_bf16() {
        let mut src = Vec::new();
        for v in [1.5f32, -2.25, 0.0] {
            src.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = vec![0.0; 3];
        dequant_f32(&src, &mut out);
        assert_eq!(out, vec![1.5, -2.25, 0.0]);
        let src: Vec<u8> = [0.5f32, -3.0].iter().flat_map(|&v| h(v)).collect();
        let mut out = vec![0.0; 2];
        dequant_f16(&src, &mut out);
        assert_eq!(out, vec![0.5, -3.0]);
        // bf16 is the top half of an f32.
        let src: Vec<u8> = [1.0f32, -0.75]
            .iter()
            .map(|v| (v.to_bits() >> 16) as u16)
            .flat_map(|b| b.to_le_bytes())
            .collect();
        dequant_bf16(&src, &mut out);
        assert_eq!(out, vec![1.0, -0.75]);
    }

    #[test]
    fn q4_0_reference() {
        let mut r = Lcg(1);
        let mut blk = h(0.125).to_vec();
        let qs = r.bytes(16);
        blk.extend_from_slice(&qs);
        let mut want = vec![0.0f32; 32];
        for j in 0..16 {
            want[j] = 0.125 * ((qs[j] % 16) as f32 - 8.0);
            want[j + 16] = 0.125 * ((qs[j] / 16) as f32 - 8.0);
        }
        let mut got = vec![0.0; 32];
        assert!(dequantize(GGML_TYPE_Q4_0, &blk, &mut got));
        close(&got, &want);
    }

    #[test]
    fn q4_1_reference() {
        let mut r = Lcg(2);
        let mut blk = h(0.5).to_vec();
        blk.extend_from_slice(&h(-1.0));
        let qs = r.bytes(16);
        blk.extend_from_slice(&qs);
        let mut want = vec![0.0f32; 32];
        for j in 0..16 {
            want[j] = 0.5 * (qs[j] % 16) as f32 - 1.0;
            want[j + 16] = 0.5 * (qs[j] / 16) as f32 - 1.0;
        }
        let mut got = vec![0.0; 32];
        dequant_q4_1(&blk, &mut got);
        close(&got, &want);
    }

    #[test]
    fn q5_0_q5_1_reference() {
        let mut r = Lcg(3);
        let qh = r.bytes(4);
        let qs = r.bytes(16);
        let qhv = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        let q5 = |j: usize| -> u32 {
            let nib = if j < 16 { qs[j] % 16 } else { qs[j - 16] / 16 } as u32;
            nib + 16 * ((qhv >> j) & 1)
        };
        let mut b0 = h(0.25).to_vec();
        b0.extend_from_slice(&qh);
        b0.extend_from_slice(&qs);
        let want0: Vec<f32> = (0..32).map(|j| 0.25 * (q5(j) as f32 - 16.0)).collect();
        let mut got = vec![0.0; 32];
        dequant_q5_0(&b0, &mut got);
        close(&got, &want0);
        let mut b1 = h(0.25).to_vec();
        b1.extend_from_slice(&h(2.0));
        b1.extend_from_slice(&qh);
        b1.extend_from_slice(&qs);
        let want1: Vec<f32> = (0..32).map(|j| 0.25 * q5(j) as f32 + 2.0).collect();
        dequant_q5_1(&b1, &mut got);
        close(&got, &want1);
    }

    #[test]
    fn q8_0_reference() {
        let mut r = Lcg(4);
        let mut blk = h(0.03125).to_vec();
        let qs = r.bytes(32);
        blk.extend_from_slice(&qs);
        let want: Vec<f32> = qs.iter().map(|&q| 0.03125 * (q as i8) as f32).collect();
        let mut got = vec![0.0; 32];
        dequant_q8_0(&blk, &mut got);
        close(&got, &want);
    }

    /// Reference Q4_K: spell out the 6-bit packing bit by bit from the spec.
    #[test]
    fn q4_k_reference() {
        let mut r = Lcg(5);
        // Choose 8 scales and 8 mins (6-bit each) and pack them per ggml:
        // sub-blocks 0..4: low 6 bits in scales[j] / scales[j+4];
        // sub-blocks 4..8: low 4 bits in scales[j+4] (scale low nibble, min high nibble),
        // top 2 bits in the top 2 bits of scales[j-4] (scale) and scales[j] (min).
        let sc: Vec<u8> = (0..8).map(|_| r.next() % 64).collect();
        let mn: Vec<u8> = (0..8).map(|_| r.next() % 64).collect();
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            packed[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            packed[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
        }
        let qs = r.bytes(128);
        let (d, dmin) = (0.0625f32, 0.5f32);
        let mut blk = h(d).to_vec();
        blk.extend_from_slice(&h(dmin));
        blk.extend_from_slice(&packed);
        blk.extend_from_slice(&qs);
        let mut want = vec![0.0f32; 256];
        for (i, w) in want.iter_mut().enumerate() {
            let sub = i / 32; // sub-block 0..8
            let byte = qs[(sub / 2) * 32 + i % 32];
            let q = if sub % 2 == 0 { byte % 16 } else { byte / 16 };
            *w = d * sc[sub] as f32 * q as f32 - dmin * mn[sub] as f32;
        }
        let mut got = vec![0.0; 256];
        assert!(dequantize(GGML_TYPE_Q4_K, &blk, &mut got));
        close(&got, &want);
    }

    /// Reference Q6_K from the spec: element i of each 128-half uses
    /// ql nibble (low nibble for i%128 < 64, from ql[(i%64)]), 2 high bits from
    /// qh[i%32] at shift 2*((i%128)/32), scale index (i/16).
    #[test]
    fn q6_k_reference() {
        let mut r = Lcg(6);
        let ql = r.bytes(128);
        let qh = r.bytes(64);
        let sc: Vec<u8> = r.bytes(16);
        let d = 0.01f32;
        let mut blk = ql.clone();
        blk.extend_from_slice(&qh);
        blk.extend_from_slice(&sc);
        blk.extend_from_slice(&h(d));
        let d = f16::from_f32(d).to_f32();
        let mut want = vec![0.0f32; 256];
        for (i, w) in want.iter_mut().enumerate() {
            let half_i = i / 128;
            let k = i % 128;
            let quarter = k / 32;
            let l = k % 32;
            let ql_byte = ql[half_i * 64 + l + if quarter % 2 == 1 { 32 } else { 0 }];
            let low = if quarter < 2 {
                ql_byte & 15
            } else {
                ql_byte >> 4
            };
            let high = (qh[half_i * 32 + l] >> (2 * quarter)) & 3;
            let q = (low | (high << 4)) as i32 - 32;
            let s = sc[i / 16] as i8;
            *w = d * s as f32 * q as f32;
        }
        let mut got = vec![0.0; 256];
        dequant_q6_k(&blk, &mut got);
        close(&got, &want);
    }

    #[test]
    fn short_input_never_panics() {
        let mut out = vec![0.0; 256];
        for t in [0, 1, 2, 3, 6, 7, 8, 12, 14, 30] {
            assert!(dequantize(t, &[1, 2, 3], &mut out));
        }
        assert!(!dequantize(10, &[], &mut out));
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_heads, hd, cols) = (3usize, 8usize, 5usize);
        let rows = n_heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let mut gg = vec![0f32; rows * cols];
        for h in 0..n_heads {
            for j in 0..hd / 2 {
                for i in 0..2 {
                    let dst = h * hd + j * 2 + i;
                    let src = h * hd + i * hd / 2 + j;
                    gg[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gg, hf);
        unpermute_qk(&mut gg, n_heads, rows, cols);
        assert_eq!(gg, hf);
        let mut bad = vec![0f32; 10];
        assert!(try_unpermute_qk(&mut bad, 3, 10, 1).is_err());
    }
}
