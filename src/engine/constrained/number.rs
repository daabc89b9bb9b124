//! Numeric value segments: BFS over number prefixes
//! (`-?(0|[1-9][0-9]*)(\.[0-9]{1,d})?`) with a feasibility oracle for the
//! range, merging prefixes with the same future language so that the automaton
//! stays small even for `i64::MIN..=i64::MAX`.

/// A syntactically valid number prefix: `-?(0|[1-9][0-9]*)(\.[0-9]*)?`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct NumPrefix {
    neg: bool,
    ndig: u32,
    v: i128,
    dot: bool,
    j: u32,
    f: i128,
}

#[derive(PartialEq, Eq, Hash)]
pub(super) enum NumKey {
    Exact(NumPrefix),
    /// Integer part whose completions with `k` more digits are all in range
    /// (`true`) or all out (`false`), for each `k`.
    IntFree(Vec<bool>),
    /// Fraction with `j` digits whose every completion is in range.
    FracFree(u32),
}

/// Range in units of 10^-decimals, split into magnitude ranges per sign.
pub(super) struct NumSpec {
    d: u32,
    unit: i128,
    pos: Option<(i128, i128)>,
    neg: Option<(i128, i128)>,
}

#[derive(PartialEq)]
enum Fit {
    Empty,
    Full,
    Partial,
}

impl NumSpec {
    pub(super) fn new(lo: i128, hi: i128, d: u32) -> Self {
        let pos = (lo.max(0) <= hi).then_some((lo.max(0), hi));
        // Negative values exclude 0 so "-0" is never produced.
        let neg = ((-hi).max(1) <= -lo).then_some(((-hi).max(1), -lo));
        NumSpec {
            d,
            unit: 10i128.pow(d),
            pos,
            neg,
        }
    }
    fn mag(&self, p: &NumPrefix) -> Option<(i128, i128)> {
        if p.neg {
            self.neg
        } else {
            self.pos
        }
    }
    fn fit(&self, p: &NumPrefix, a: i128, b: i128) -> Fit {
        match self.mag(p) {
            Some((lo, hi)) if !(b < lo || a > hi) => {
                if a >= lo && b <= hi {
                    Fit::Full
                } else {
                    Fit::Partial
                }
            }
            _ => Fit::Empty,
        }
    }
    /// Magnitude interval reachable from a fraction-phase prefix.
    fn frac_interval(&self, p: &NumPrefix) -> (i128, i128) {
        let w = 10i128.pow(self.d - p.j);
        let base = p.v * self.unit + p.f * w;
        (base, base + w - 1)
    }
    /// Fits of an integer-phase prefix (ndig >= 1, v != 0) for k = 0, 1, ...
    fn int_fits(&self, p: &NumPrefix) -> Vec<Fit> {
        let mut out = Vec::new();
        let Some((_, hi)) = self.mag(p) else {
            return out;
        };
        let mut w = self.unit;
        while let Some(a) = p.v.checked_mul(w) {
            if a > hi {
                break;
            }
            out.push(self.fit(p, a, a + w - 1));
            match w.checked_mul(10) {
                Some(x) => w = x,
                None => break,
            }
        }
        out
    }
    fn feasible(&self, p: &NumPrefix) -> bool {
        if p.ndig == 0 {
            self.mag(p).is_some()
        } else if p.dot {
            let (a, b) = self.frac_interval(p);
            self.fit(p, a, b) != Fit::Empty
        } else if p.v == 0 {
            self.fit(p, 0, self.unit - 1) != Fit::Empty
        } else {
            self.int_fits(p).iter().any(|f| *f != Fit::Empty)
        }
    }
    pub(super) fn accepting(&self, p: &NumPrefix) -> bool {
        if p.ndig == 0 || (p.dot && p.j == 0) {
            return false;
        }
        let m = if p.dot {
            self.frac_interval(p).0
        } else {
            p.v * self.unit
        };
        matches!(self.mag(p), Some((lo, hi)) if m >= lo && m <= hi)
    }
    pub(super) fn step(&self, p: &NumPrefix, b: u8) -> Option<NumPrefix> {
        let mut q = *p;
        match b {
            b'-' if p.ndig == 0 && !p.neg => q.neg = true,
            b'.' if p.ndig >= 1 && !p.dot && self.d > 0 => q.dot = true,
            b'0'..=b'9' if !p.dot => {
                if (p.ndig >= 1 && p.v == 0) || p.ndig >= 20 {
                    return None;
                }
                q.v = p.v * 10 + i128::from(b - b'0');
                q.ndig += 1;
            }
            b'0'..=b'9' if p.j < self.d => {
                q.f = p.f * 10 + i128::from(b - b'0');
                q.j += 1;
            }
            _ => return None,
        }
        self.feasible(&q).then_some(q)
    }
    pub(super) fn key(&self, p: &NumPrefix) -> NumKey {
        if p.ndig == 0 || (!p.dot && p.v == 0) {
            return NumKey::Exact(*p);
        }
        if p.dot {
            let (a, b) = self.frac_interval(p);
            return if self.fit(p, a, b) == Fit::Full {
                NumKey::FracFree(p.j)
            } else {
                NumKey::Exact(*p)
            };
        }
        let fits = self.int_fits(p);
        if fits.contains(&Fit::Partial) {
            NumKey::Exact(*p)
        } else {
            let mut v: Vec<bool> = fits.iter().map(|f| *f == Fit::Full).collect();
            while v.last() == Some(&false) {
                v.pop();
            }
            NumKey::IntFree(v)
        }
    }
}

#[cfg(test)]
mod tests {
    //! Automaton-level tests (numbers, enums, strings).

    use super::super::dfa::Dfa;
    use super::super::schema::{scaled_bounds, FieldKind, FieldSpec, VerdictSchema};

    fn accepts(d: &Dfa, s: &str) -> bool {
        d.walk(d.start, s.as_bytes()) == d.accept
    }

    fn num_schema(kind: FieldKind) -> VerdictSchema {
        VerdictSchema {
            fields: vec![
                FieldSpec::new(
                    "d",
                    FieldKind::Enum {
                        values: vec!["a".into(), "ab".into()],
                    },
                ),
                FieldSpec::new("x", kind),
            ],
        }
    }

    #[test]
    fn fraud_examples() {
        let d = Dfa::build(&VerdictSchema::fraud_default(), 8).expect("build");
        assert!(accepts(
            &d,
            r#"{"decision":"block","score":0.93,"reason":"card reused"}"#
        ));
        assert!(accepts(&d, r#"{"decision":"allow","score":1,"reason":""}"#));
        assert!(accepts(
            &d,
            r#"{"decision":"allow","score":1.00,"reason":"ünïcødé ✓ 😀"}"#
        ));
        assert!(!accepts(
            &d,
            r#"{"decision":"allow","score":1.01,"reason":""}"#
        ));
        assert!(!accepts(
            &d,
            r#"{"decision":"allow","score":0.123,"reason":""}"#
        ));
        assert!(!accepts(
            &d,
            r#"{"decision":"allow","score":00.1,"reason":""}"#
        ));
        assert!(!accepts(
            &d,
            r#"{"decision":"maybe","score":0.1,"reason":""}"#
        ));
        assert!(!accepts(
            &d,
            r#"{"decision":"allow","score":0.1,"reason":"a\"b"}"#
        ));
        assert!(!accepts(
            &d,
            "{\"decision\":\"allow\",\"score\":0.1,\"reason\":\"a\nb\"}"
        ));
        assert!(!accepts(
            &d,
            r#"{"decision": "allow","score":0.1,"reason":""}"#
        ));
        assert_eq!(
            d.close_path(d.start).as_deref(),
            Some(&br#"{"decision":"allow","score":0,"reason":""}"#[..])
        );
    }

    #[test]
    fn enum_prefix_values() {
        let d = Dfa::build(&num_schema(FieldKind::Integer { min: 0, max: 5 }), 8).expect("build");
        assert!(accepts(&d, r#"{"d":"a","x":5}"#));
        assert!(accepts(&d, r#"{"d":"ab","x":0}"#));
        assert!(!accepts(&d, r#"{"d":"abc","x":0}"#));
    }

    #[test]
    fn number_ranges_exhaustive() {
        let cases: Vec<(f64, f64, u32)> = vec![
            (0.0, 1.0, 2),
            (-1.5, 2.25, 2),
            (0.5, 0.75, 3),
            (-3.0, -0.1, 1),
            (10.0, 123.0, 0),
            (7.0, 7.0, 1),
        ];
        for (min, max, dec) in cases {
            let d = Dfa::build(
                &num_schema(FieldKind::Number {
                    min,
                    max,
                    decimals: dec,
                }),
                8,
            )
            .expect("build");
            let (lo, hi) = scaled_bounds(min, max, dec);
            let unit = 10i64.pow(dec);
            let mut n_ok = 0;
            for units in -3000i64..3000 {
                for extra in 0..(1 + u32::from(dec > 0)) {
                    // Canonical rendering with `dec` decimals, plus trailing zeros variants.
                    let mag = units.abs();
                    let mut s = format!("{}{}", if units < 0 { "-" } else { "" }, mag / unit);
                    if dec > 0 {
                        s += &format!(".{:0w$}", mag % unit, w = dec as usize);
                    }
                    if extra == 1 {
                        s += "0";
                    }
                    let text = format!(r#"{{"d":"a","x":{s}}}"#);
                    let want = i128::from(units) >= lo && i128::from(units) <= hi && extra == 0;
                    assert_eq!(accepts(&d, &text), want, "{text} [{min},{max}] dec {dec}");
                    n_ok += usize::from(want);
                }
            }
            assert!(n_ok > 0);
            assert!(!accepts(&d, r#"{"d":"a","x":-0}"#));
        }
    }

    #[test]
    fn integer_ranges() {
        for (min, max) in [
            (1i64, 86_400i64),
            (-20, 35),
            (-1000, -999),
            (i64::MIN, i64::MAX),
            (0, 0),
        ] {
            let d = Dfa::build(&num_schema(FieldKind::Integer { min, max }), 8).expect("build");
            assert!(
                d.num_states() < 2000,
                "{min}..{max}: {} states",
                d.num_states()
            );
            let probes = [
                min,
                max,
                min.saturating_add(1),
                max.saturating_sub(1),
                0,
                1,
                -1,
                99,
                100,
                86_400,
                86_401,
                min.saturating_sub(1),
                max.saturating_add(1),
            ];
            for v in probes {
                let text = format!(r#"{{"d":"a","x":{v}}}"#);
                assert_eq!(
                    accepts(&d, &text),
                    v >= min && v <= max,
                    "{text} in [{min},{max}]"
                );
            }
            assert!(!accepts(&d, r#"{"d":"a","x":01}"#));
            assert!(!accepts(&d, r#"{"d":"a","x":1.0}"#));
        }
    }
}
