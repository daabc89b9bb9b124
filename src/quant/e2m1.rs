//! FP4 E2M1 element format (shared by MXFP4 and NVFP4).
//!
//! Code layout: bit 3 = sign, bits 0..3 = magnitude index into
//! `[0, 0.5, 1, 1.5, 2, 3, 4, 6]`. Two codes per byte, low nibble = even element.

/// Largest finite E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Decoded value of each of the 16 E2M1 codes.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E2M1 values times two, as i8 (exact); used by the SIMD kernels with a folded 0.5 factor.
pub const E2M1_X2_I8: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Decodes one E2M1 code (only the low 4 bits of `code` are used).
#[inline]
pub fn e2m1_decode(code: u8) -> f32 {
    E2M1_VALUES[(code & 0x0f) as usize]
}

/// Encodes `v` to the nearest E2M1 code, ties to even code (mantissa bit 0),
/// saturating to ±6. The sign bit follows `v`'s sign (so `-0.0` → `0x8`).
/// NaN encodes to `0x0` (E2M1 has no NaN; callers reject NaN before encoding).
#[inline]
pub fn e2m1_encode_rne(v: f32) -> u8 {
    let a = v.abs();
    // Midpoints between grid points; at a tie the even code wins, hence `<=` / `<`.
    let mag: u8 = if a <= 0.25 || a.is_nan() {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    let sign = if v.is_sign_negative() && !v.is_nan() {
        0x8
    } else {
        0
    };
    sign | mag
}

/// Quantizes `xs` with block scale `d` (value ≈ code · d) into unpacked codes.
#[inline]
pub(crate) fn encode_block(xs: &[f32], d: f32, codes: &mut [u8]) {
    for (c, &x) in codes.iter_mut().zip(xs) {
        *c = e2m1_encode_rne(x / d);
    }
}

/// Squared reconstruction error of `xs` quantized with block scale `d`.
#[inline]
pub(crate) fn block_sse(xs: &[f32], d: f32) -> f32 {
    xs.iter()
        .map(|&x| {
            let q = e2m1_decode(e2m1_encode_rne(x / d)) * d;
            (x - q) * (x - q)
        })
        .sum()
}

/// Packs unpacked codes pairwise: byte k = codes[2k] | codes[2k+1] << 4.
#[inline]
pub(crate) fn pack_codes(codes: &[u8], out: &mut [u8]) {
    for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
        *o = (pair[0] & 0x0f) | (pair[1] << 4);
    }
}

/// Decodes packed bytes into `out` (2 values per byte) multiplied by `scale`.
#[inline]
pub(crate) fn decode_packed(bytes: &[u8], scale: f32, out: &mut [f32]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = E2M1_VALUES[(b & 0x0f) as usize] * scale;
        pair[1] = E2M1_VALUES[(b >> 4) as usize] * scale;
    }
}

/// Half the E2M1 grid spacing around magnitude `a` (in scaled units), for error bounds.
#[cfg(test)]
pub(crate) fn half_ulp(a: f32) -> f32 {
    if a <= 2.0 {
        0.25
    } else if a <= 4.0 {
        0.5
    } else {
        1.0
    }
}

/// Checks the quantization error of one element against the E2M1 grid bound:
/// within half a grid step (scaled by `d`), or exactly the saturation error beyond ±6·d.
#[cfg(test)]
pub(crate) fn assert_elem_bound(x: f32, q: f32, d: f32) {
    let a = (x / d).abs();
    let err = (x - q).abs();
    let tol = 1e-6 * x.abs().max(d);
    if a > E2M1_MAX {
        let sat = x.abs() - E2M1_MAX * d;
        assert!(
            (err - sat).abs() <= tol + 1e-6 * sat,
            "saturated {x}: err {err} vs {sat}"
        );
    } else {
        assert!(err <= half_ulp(a) * d + tol, "x={x} q={q} d={d} err={err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0u8..16 {
            let v = e2m1_decode(code);
            assert_eq!(e2m1_encode_rne(v), code, "code {code} value {v}");
            assert_eq!(v, E2M1_X2_I8[code as usize] as f32 * 0.5);
        }
    }

    #[test]
    fn ties_go_to_even_codes() {
        // midpoint -> expected code (even mantissa)
        let cases = [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
        ];
        for (v, c) in cases {
            assert_eq!(e2m1_encode_rne(v), c, "{v}");
            assert_eq!(e2m1_encode_rne(-v), c | 8, "-{v}");
        }
        // just off the midpoints
        assert_eq!(e2m1_encode_rne(0.2501), 1);
        assert_eq!(e2m1_encode_rne(1.2501), 3);
        assert_eq!(e2m1_encode_rne(4.999), 6);
        assert_eq!(e2m1_encode_rne(5.001), 7);
    }

    #[test]
    fn saturates_and_handles_specials() {
        assert_eq!(e2m1_encode_rne(6.0), 7);
        assert_eq!(e2m1_encode_rne(1e30), 7);
        assert_eq!(e2m1_encode_rne(-1e30), 15);
        assert_eq!(e2m1_encode_rne(f32::INFINITY), 7);
        assert_eq!(e2m1_encode_rne(f32::NAN), 0);
        assert_eq!(e2m1_encode_rne(1e-40), 0);
        assert_eq!(e2m1_encode_rne(-0.0), 8);
    }

    #[test]
    fn pack_low_nibble_is_even() {
        let codes = [1u8, 2, 15, 7];
        let mut out = [0u8; 2];
        pack_codes(&codes, &mut out);
        assert_eq!(out, [0x21, 0x7f]);
        let mut dec = [0f32; 4];
        decode_packed(&out, 2.0, &mut dec);
        assert_eq!(dec, [1.0, 2.0, -12.0, 12.0]);
    }

    #[test]
    fn encode_is_nearest() {
        // brute force: the encoded value is at least as close as any other code
        let mut v = -7.0f32;
        while v <= 7.0 {
            let c = e2m1_encode_rne(v);
            let e = (e2m1_decode(c) - v).abs();
            for k in 0u8..16 {
                assert!(e <= (e2m1_decode(k) - v).abs() + 1e-7, "v={v} c={c} k={k}");
            }
            v += 0.0137;
        }
    }
}
