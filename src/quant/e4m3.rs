//! FP8 E4M3FN (bias 7, max 448, no infinities, 0x7f/0xff = NaN) and
//! E8M0 (power-of-two scale `2^(s-127)`, 0xff = NaN) helpers.

/// Largest finite E4M3FN magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// E8M0 NaN encoding.
pub const E8M0_NAN: u8 = 0xff;

const fn build_e4m3_lut() -> [f32; 256] {
    let mut lut = [0f32; 256];
    let mut b = 0usize;
    while b < 256 {
        let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
        let e = ((b >> 3) & 0x0f) as u32;
        let m = (b & 0x07) as u32;
        lut[b] = if e == 15 && m == 7 {
            f32::from_bits(0x7fc0_0000 | (((b as u32) & 0x80) << 24))
        } else if e == 0 {
            sign * (m as f32) * (1.0 / 512.0)
        } else {
            // 2^(e-7) built from its bit pattern (exact).
            sign * (1.0 + m as f32 / 8.0) * f32::from_bits((e + 120) << 23)
        };
        b += 1;
    }
    lut
}

/// Decoded value of every E4M3FN byte (NaN at 0x7f and 0xff).
pub static E4M3_LUT: [f32; 256] = build_e4m3_lut();

/// Decodes one E4M3FN byte.
#[inline]
pub fn e4m3_decode(bits: u8) -> f32 {
    E4M3_LUT[bits as usize]
}

/// Encodes `v` to E4M3FN with round-to-nearest-even.
///
/// Finite values beyond ±448 and ±inf saturate to ±448 (0x7e/0xfe); NaN encodes
/// to 0x7f (0xff if the sign bit is set). Values below the smallest subnormal
/// (2^-9) round to ±0 with ties to even.
#[inline]
pub fn e4m3_encode_rne(v: f32) -> u8 {
    let sign: u8 = if v.is_sign_negative() { 0x80 } else { 0 };
    if v.is_nan() {
        return sign | 0x7f;
    }
    let a = v.abs();
    let mag: u32 = if a >= E4M3_MAX {
        0x7e
    } else if a < f32::from_bits(121 << 23) {
        // below 2^-6: subnormal grid m · 2^-9 (m = 8 is 2^-6 = code 0x08, also correct)
        (a * 512.0).round_ties_even() as u32
    } else {
        // normal: keep 3 mantissa bits of the f32, RNE on the 20 dropped bits;
        // a mantissa carry propagates into the exponent field naturally.
        let bits = a.to_bits();
        let rounded = (bits + 0x7ffff + ((bits >> 20) & 1)) >> 20;
        (rounded - (120 << 3)).min(0x7e)
    };
    sign | mag as u8
}

/// Decodes an E8M0 scale byte: `2^(s-127)`, 0xff = NaN. s = 0 is 2^-127 (an f32 subnormal).
#[inline]
pub fn e8m0_decode(s: u8) -> f32 {
    match s {
        E8M0_NAN => f32::NAN,
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits((s as u32) << 23),
    }
}

/// Encodes the power-of-two exponent `e` (scale 2^e) as E8M0, clamped to [-127, 127].
#[inline]
pub fn e8m0_encode_exp(e: i32) -> u8 {
    (e.clamp(-127, 127) + 127) as u8
}

/// `floor(log2(a))` for finite `a > 0` (exact, from the bit pattern; handles subnormals).
/// Returns `i32::MIN` for `a == 0`.
#[inline]
pub fn e8m0_floor_log2(a: f32) -> i32 {
    let bits = a.abs().to_bits();
    if bits == 0 {
        return i32::MIN;
    }
    let exp = (bits >> 23) as i32;
    if exp == 0 {
        // subnormal: value = mantissa · 2^-149
        (31 - bits.leading_zeros() as i32) - 149
    } else {
        exp - 127
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_e4m3_code_round_trips() {
        for b in 0u16..256 {
            let b = b as u8;
            let v = e4m3_decode(b);
            let back = e4m3_encode_rne(v);
            assert_eq!(back, b, "code 0x{b:02x} value {v}");
        }
    }

    #[test]
    fn e4m3_reference_values() {
        assert_eq!(e4m3_decode(0x7e), 448.0);
        assert_eq!(e4m3_decode(0xfe), -448.0);
        assert_eq!(e4m3_decode(0x38), 1.0);
        assert_eq!(e4m3_decode(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_decode(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_decode(0x07), 7.0 * 2f32.powi(-9));
        assert!(e4m3_decode(0x7f).is_nan() && e4m3_decode(0xff).is_nan());
        assert_eq!(e4m3_decode(0x80), 0.0);
        assert!(e4m3_decode(0x80).is_sign_negative());
    }

    #[test]
    fn e4m3_encode_is_nearest_even() {
        // sweep all pairs of adjacent positive finite codes: midpoints go to the even code
        for b in 0u8..0x7e {
            let lo = e4m3_decode(b);
            let hi = e4m3_decode(b + 1);
            let mid = 0.5 * (lo + hi);
            let even = if b % 2 == 0 { b } else { b + 1 };
            assert_eq!(e4m3_encode_rne(mid), even, "mid {mid} between 0x{b:02x}");
            assert_eq!(e4m3_encode_rne(-mid), even | 0x80);
            let eps = (hi - lo) * 0.01;
            assert_eq!(e4m3_encode_rne(mid - eps), b);
            assert_eq!(e4m3_encode_rne(mid + eps), b + 1);
        }
    }

    #[test]
    fn e4m3_saturates_and_specials() {
        assert_eq!(e4m3_encode_rne(448.0), 0x7e);
        assert_eq!(e4m3_encode_rne(460.0), 0x7e);
        assert_eq!(e4m3_encode_rne(1e9), 0x7e);
        assert_eq!(e4m3_encode_rne(-1e9), 0xfe);
        assert_eq!(e4m3_encode_rne(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_encode_rne(f32::NEG_INFINITY), 0xfe);
        assert_eq!(e4m3_encode_rne(f32::NAN), 0x7f);
        // below half the smallest subnormal -> 0; exactly half -> 0 (even); above -> 1
        assert_eq!(e4m3_encode_rne(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_encode_rne(1.01 * 2f32.powi(-10)), 0x01);
        assert_eq!(e4m3_encode_rne(1e-30), 0x00);
        assert_eq!(e4m3_encode_rne(f32::from_bits(1)), 0x00);
    }

    #[test]
    fn e4m3_agrees_with_rne_reference_on_sweep() {
        // reference: nearest finite code by brute force, ties to even code
        let finite: Vec<u8> = (0u8..0x7f).collect();
        let mut v = 1e-4f32;
        while v < 500.0 {
            let got = e4m3_encode_rne(v);
            let best = finite
                .iter()
                .copied()
                .min_by(|&a, &b| {
                    let (da, db) = ((e4m3_decode(a) - v).abs(), (e4m3_decode(b) - v).abs());
                    da.partial_cmp(&db).unwrap().then((a % 2).cmp(&(b % 2)))
                })
                .unwrap();
            assert_eq!(got, best, "v = {v}");
            v *= 1.0173;
        }
    }

    #[test]
    fn e8m0_helpers() {
        assert_eq!(e8m0_decode(127), 1.0);
        assert_eq!(e8m0_decode(128), 2.0);
        assert_eq!(e8m0_decode(1), 2f32.powi(-126));
        assert_eq!(e8m0_decode(0), 2f32.powi(-127));
        assert_eq!(e8m0_decode(254), 2f32.powi(127));
        assert!(e8m0_decode(255).is_nan());
        assert_eq!(e8m0_encode_exp(0), 127);
        assert_eq!(e8m0_encode_exp(-200), 0);
        assert_eq!(e8m0_encode_exp(200), 254);
        for s in 0u8..255 {
            assert_eq!(e8m0_encode_exp(e8m0_floor_log2(e8m0_decode(s))), s);
        }
        assert_eq!(e8m0_floor_log2(6.0), 2);
        assert_eq!(e8m0_floor_log2(0.99), -1);
        assert_eq!(e8m0_floor_log2(f32::from_bits(1)), -149);
        assert_eq!(e8m0_floor_log2(0.0), i32::MIN);
    }
}
