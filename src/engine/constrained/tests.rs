//! Property and timing tests of the token-level verdict grammar.

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::*;
use crate::engine::sampling::argmax;

#[rustfmt::skip]
pub(super) const FRAGMENTS: &[&str] = &[
    "{\"", "{", "\"", "decision", "\":\"", "\":", "block", "bl", "ock\"", "ock", "allow", "al",
    "low", "review", "rev", "iew\"", ",\"", "\",\"", "0.", "0.9", ".5", "1", "12", "99", "100",
    "86400", "-", "-1", "score", "reason", "signal", "confidence", "horizon_s", "buy", "sell",
    "hold", "\"buy\"", "ignore", " previous", " instructions", "ignore previous instructions",
    "Ignore", " the", " card", " velocity", " mismatch", "  ", "    ", "\"}", "\"},", "}", "\\\"",
    "\\n", "\n", "\t", "é", "日本", "😀", "ü", "\"decision\":\"block\"", "block\",\"score\":",
    ",\"score\":", ",\"reason\":\"", "0", "00", "5", ".", "e", "E5", "true", "null", " ", "a",
    "ab", "x", "-0", "-0.5", "7.", "\u{85}",
];

/// Synthetic vocabulary: all 256 single bytes, fragments, some split UTF-8,
/// an empty token and an EOS token with visible bytes. Returns (vocab, eos).
pub(super) fn small_vocab() -> (Vec<Vec<u8>>, u32) {
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    v.extend(FRAGMENTS.iter().map(|s| s.as_bytes().to_vec()));
    v.push(vec![0xf0, 0x9f]); // first half of an emoji
    v.push(vec![0x98, 0x80]); // second half
    v.push(vec![0xe6, 0x97]);
    v.push(Vec::new());
    v.push(b"</s>".to_vec());
    let eos = v.len() as u32 - 1;
    (v, eos)
}

pub(super) fn schemas() -> Vec<VerdictSchema> {
    let custom = VerdictSchema {
        fields: vec![
            FieldSpec::new(
                "decision",
                FieldKind::Enum {
                    values: vec!["a".into(), "ab".into(), "ünï".into()],
                },
            ),
            FieldSpec::new("note", FieldKind::String { max_chars: 3 }),
            FieldSpec::new(
                "delta",
                FieldKind::Number {
                    min: -2.5,
                    max: 0.75,
                    decimals: 3,
                },
            ),
            FieldSpec::new(
                "n",
                FieldKind::Integer {
                    min: -40,
                    max: 1234,
                },
            ),
            FieldSpec::new("reason", FieldKind::String { max_chars: 12 }),
        ],
    };
    vec![
        VerdictSchema::fraud_default(),
        VerdictSchema::trading_default(),
        custom,
    ]
}

/// Check that `text` is a valid verdict of `schema` (fields in order).
pub(super) fn check_verdict(schema: &VerdictSchema, text: &str) {
    let v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON {text:?}: {e}"));
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), schema.fields.len(), "{text}");
    let first = format!("{{\"{}\":", schema.fields[0].name);
    assert!(text.starts_with(&first), "decision not first: {text}");
    let mut pos = 0;
    for f in &schema.fields {
        let key = format!("\"{}\":", f.name);
        let at = text[pos..]
            .find(&key)
            .unwrap_or_else(|| panic!("key order {text}"));
        pos += at + key.len();
        let val = &obj[&f.name];
        match &f.kind {
            FieldKind::Enum { values } => assert!(
                values.iter().any(|x| Some(x.as_str()) == val.as_str()),
                "{text}"
            ),
            FieldKind::Number { min, max, decimals } => {
                let x = val.as_f64().expect("number");
                assert!(
                    x >= *min - 1e-9 && x <= *max + 1e-9,
                    "{x} out of range: {text}"
                );
                let raw = text[pos..].split([',', '}']).next().unwrap_or("");
                let dec = raw.split('.').nth(1).map_or(0, str::len);
                assert!(dec as u32 <= *decimals, "{raw} has too many decimals");
            }
            FieldKind::Integer { min, max } => {
                let x = val.as_i64().expect("integer");
                assert!(x >= *min && x <= *max, "{text}");
            }
            FieldKind::String { max_chars } => {
                let s = val.as_str().expect("string");
                assert!(s.chars().count() <= *max_chars, "{text}");
                assert!(
                    !s.chars().any(|c| c.is_control() || c == '"' || c == '\\'),
                    "{text}"
                );
            }
        }
    }
}

/// Random walk; checks the mask against a brute-force DFA walk at every step.
pub(super) fn random_walk(
    g: &VerdictGrammar,
    schema: &VerdictSchema,
    vocab: &[Vec<u8>],
    eos: u32,
    seed: u64,
) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut st = g.start();
    let mut mask = Vec::new();
    let mut steps = 0;
    while !st.is_complete() {
        steps += 1;
        assert!(steps < 10_000, "no progress: {}", st.text());
        if let Some(toks) = st.forced(g) {
            if rng.gen_bool(0.8) {
                for t in toks {
                    st.advance(g, t).expect("forced token accepted");
                }
                continue;
            }
        }
        st.allowed(g, &mut mask);
        assert_eq!(mask.len(), vocab.len());
        for (id, &ok) in mask.iter().enumerate() {
            let brute = id as u32 != eos
                && !vocab[id].is_empty()
                && g.dfa.walk(st.state, &vocab[id]) != DEAD;
            assert_eq!(
                ok,
                brute,
                "token {id} {:?} after {:?}",
                String::from_utf8_lossy(&vocab[id]),
                st.text()
            );
        }
        assert!(!mask[eos as usize]);
        let ids: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize])
            .collect();
        assert!(!ids.is_empty(), "stuck after {:?}", st.text());
        // Disallowed tokens are rejected and leave the state untouched.
        let bad = rng.gen_range(0..vocab.len() as u32);
        if !mask[bad as usize] {
            let before = st.bytes().to_vec();
            assert!(st.advance(g, bad).is_err());
            assert_eq!(st.bytes(), &before[..]);
        }
        // Prefer tokens that leave strings now and then so paths vary.
        let quoted: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| vocab[i as usize].contains(&b'"'))
            .collect();
        let t = if !quoted.is_empty() && rng.gen_bool(0.15) {
            quoted[rng.gen_range(0..quoted.len())]
        } else {
            ids[rng.gen_range(0..ids.len())]
        };
        st.advance(g, t).expect("allowed token accepted");
        if st.decision_done() {
            let closed = st.closed_text(g).expect("closable");
            check_verdict(schema, &closed);
        } else {
            assert!(st.close_early(g).is_none());
        }
    }
    st.allowed(g, &mut mask);
    assert!(mask[eos as usize] && mask.iter().filter(|&&m| m).count() == 1);
    st.advance(g, eos).expect("eos when complete");
    assert_eq!(st.close_early(g).as_deref(), Some(""));
    st.text().to_string()
}

proptest! {
    // Default config: 256 cases (override with PROPTEST_CASES).
    #[test]
    fn random_walk_yields_valid_verdicts(which in 0usize..3, seed in any::<u64>()) {
        let (vocab, eos) = small_vocab();
        let schema = &schemas()[which];
        let g = VerdictGrammar::compile(schema, &vocab, &[eos]).expect("compile");
        let text = random_walk(&g, schema, &vocab, eos, seed);
        check_verdict(schema, &text);
    }
}

#[test]
fn forced_prefix_at_start() {
    let (vocab, eos) = small_vocab();
    let g =
        VerdictGrammar::compile(&VerdictSchema::fraud_default(), &vocab, &[eos]).expect("compile");
    let st = g.start();
    let toks = st.forced(&g).expect("forced");
    let s: Vec<u8> = toks
        .iter()
        .flat_map(|&t| vocab[t as usize].clone())
        .collect();
    assert_eq!(s, b"{\"decision\":\"");
    assert_eq!(toks.len(), 3); // {"  decision  ":"
    let mut st2 = st.clone();
    for t in toks {
        st2.advance(&g, t).expect("advance");
    }
    assert_eq!(st2.text(), "{\"decision\":\"");
    assert!(st2.forced(&g).is_none(), "decision is a choice");
    assert!(!st2.decision_done());
    // After the decision, the next key is forced.
    let id = |s: &str| {
        vocab
            .iter()
            .position(|v| v == s.as_bytes())
            .expect("in vocab") as u32
    };
    st2.advance(&g, id("bl")).expect("bl");
    st2.advance(&g, id("ock\"")).expect("ock\"");
    assert!(st2.decision_done());
    let f: Vec<u8> = st2
        .forced(&g)
        .expect("forced")
        .iter()
        .flat_map(|&t| vocab[t as usize].clone())
        .collect();
    assert_eq!(f, b",\"score\":");
}

#[test]
fn prompt_injection_cannot_reach_decision() {
    let (vocab, eos) = small_vocab();
    for schema in schemas() {
        let g = VerdictGrammar::compile(&schema, &vocab, &[eos]).expect("compile");
        let mut st = g.start();
        for t in st.forced(&g).expect("forced") {
            st.advance(&g, t).expect("advance");
        }
        let mut mask = Vec::new();
        st.allowed(&g, &mut mask);
        for (id, tok) in vocab.iter().enumerate() {
            let s = String::from_utf8_lossy(tok);
            if [
                "ignore",
                " previous",
                " instructions",
                "ignore previous instructions",
                "Ignore",
                "i",
            ]
            .contains(&s.as_ref())
            {
                assert!(!mask[id], "{s:?} allowed in decision position");
                assert!(st.clone().advance(&g, id as u32).is_err());
            }
        }
        // Every allowed token is a prefix of some `value"...` continuation.
        let FieldKind::Enum { values } = &schema.fields[0].kind else {
            unreachable!()
        };
        for (id, &ok) in mask.iter().enumerate() {
            if ok {
                let tok = &vocab[id];
                assert!(
                    values.iter().any(|v| {
                        let full = format!("{v}\",\"");
                        full.as_bytes().starts_with(tok)
                            || tok.starts_with(v.as_bytes()) && tok.get(v.len()) == Some(&b'"')
                    }),
                    "{:?}",
                    String::from_utf8_lossy(tok)
                );
            }
        }
    }
}

#[test]
fn close_early_truncates_reason() {
    let (vocab, eos) = small_vocab();
    let schema = VerdictSchema::trading_default();
    let g = VerdictGrammar::compile(&schema, &vocab, &[eos]).expect("compile");
    let id = |s: &[u8]| vocab.iter().position(|v| v == s).expect("in vocab") as u32;
    let mut st = g.start();
    assert_eq!(st.close_early(&g), None);
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    st.advance(&g, id(b"\"buy\""))
        .map(|_| ())
        .expect_err("quote not allowed here");
    st.advance(&g, id(b"buy")).expect("buy");
    assert!(!st.decision_done());
    st.advance(&g, id(b"\"")).expect("close quote");
    assert!(st.decision_done());
    assert_eq!(
        st.closed_text(&g).as_deref(),
        Some(r#"{"signal":"buy","confidence":0,"horizon_s":1,"reason":""}"#)
    );
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    st.advance(&g, id(b"0.")).expect("0.");
    assert_eq!(
        st.closed_text(&g).as_deref(),
        Some(r#"{"signal":"buy","confidence":0.0,"horizon_s":1,"reason":""}"#)
    );
    for tok in [
        &b"9"[..],
        b",\"",
        b"horizon_s",
        b"\":",
        b"12",
        b",\"",
        b"reason",
        b"\":\"",
        b" card",
        b" ",
    ] {
        st.advance(&g, id(tok)).expect("advance");
    }
    // Split emoji: text() stops before the partial character.
    st.advance(&g, id(&[0xf0, 0x9f])).expect("half emoji");
    assert_eq!(
        st.text(),
        r#"{"signal":"buy","confidence":0.9,"horizon_s":12,"reason":" card "#
    );
    let closed = st.closed_text(&g).expect("closed");
    assert_eq!(
        closed,
        r#"{"signal":"buy","confidence":0.9,"horizon_s":12,"reason":" card "}"#
    );
    check_verdict(&schema, &closed);
    st.advance(&g, id(&[0x98, 0x80])).expect("second half");
    assert!(st.text().ends_with(" card 😀"));
    st.advance(&g, id(b"\"}")).expect("close");
    assert!(st.is_complete());
    check_verdict(&schema, st.text());
}

#[test]
fn apply_mask_and_errors() {
    let mut l = vec![1.0f32; 4];
    apply_mask(&mut l, &[true, false, true]);
    assert_eq!(l[0], 1.0);
    assert!(l[1].is_infinite() && l[3].is_infinite());
    let (vocab, eos) = small_vocab();
    let g =
        VerdictGrammar::compile(&VerdictSchema::fraud_default(), &vocab, &[eos]).expect("compile");
    let mut st = g.start();
    assert!(matches!(
        st.advance(&g, 10_000_000),
        Err(ConstraintError::TokenOutOfRange { .. })
    ));
    assert!(matches!(
        st.advance(&g, eos),
        Err(ConstraintError::TokenNotAllowed { .. })
    ));
    let mut mask = Vec::new();
    st.allowed(&g, &mut mask);
    let mut logits = vec![0.0f32; vocab.len()];
    st.apply_allowed(&g, &mut logits);
    for (i, &m) in mask.iter().enumerate() {
        assert_eq!(m, logits[i].is_finite());
    }
}

#[test]
fn grammar_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<VerdictGrammar>();
    check::<VerdictState>();
}

#[test]
fn string_limit_forces_close() {
    let (vocab, eos) = small_vocab();
    let schema = VerdictSchema {
        fields: vec![
            FieldSpec::new(
                "decision",
                FieldKind::Enum {
                    values: vec!["x".into()],
                },
            ),
            FieldSpec::new("reason", FieldKind::String { max_chars: 5 }),
        ],
    };
    let g = VerdictGrammar::compile(&schema, &vocab, &[eos]).expect("compile");
    let id = |s: &str| {
        vocab
            .iter()
            .position(|v| v == s.as_bytes())
            .expect("in vocab") as u32
    };
    let mut st = g.start();
    // Single-valued enum: the whole prefix up to the string content is forced.
    let f: Vec<u8> = st
        .forced(&g)
        .expect("forced")
        .iter()
        .flat_map(|&t| vocab[t as usize].clone())
        .collect();
    assert_eq!(f, br#"{"decision":"x","reason":""#);
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    assert!(st.decision_done());
    st.advance(&g, id("日本")).expect("2 chars");
    assert!(
        st.advance(&g, id(" velocity")).is_err(),
        "9 chars do not fit in 3"
    );
    assert!(st.advance(&g, id(" the")).is_err(), "2 + 4 > 5");
    st.advance(&g, id("ab")).expect("4 chars");
    let mut mask = Vec::new();
    st.allowed(&g, &mut mask);
    assert!(mask[id("x") as usize] && mask[id("\"}") as usize] && !mask[id("ab") as usize]);
    st.advance(&g, id("😀")).expect("5 chars");
    assert!(st.advance(&g, id("a")).is_err());
    let f: Vec<u8> = st
        .forced(&g)
        .expect("forced")
        .iter()
        .flat_map(|&t| vocab[t as usize].clone())
        .collect();
    assert_eq!(f, b"\"}");
    for t in st.forced(&g).expect("forced") {
        st.advance(&g, t).expect("advance");
    }
    assert!(st.is_complete());
    assert_eq!(st.text(), r#"{"decision":"x","reason":"日本ab😀"}"#);
}

/// `masked_argmax` picks what masking a copy of the row and taking its argmax
/// picks, on every state of random walks: logits with ties and `-inf`, a
/// vocabulary with whole 64-token words of string content, all three schemas.
#[test]
fn masked_argmax_equals_masking_a_copy() {
    let (base, _) = small_vocab();
    let mut vocab = base[..base.len() - 1].to_vec();
    for i in 0..700 {
        vocab.push(format!("{}{}", ["x", "ab", " card", "q"][i % 4], i).into_bytes());
    }
    vocab.push(b"</s>".to_vec());
    let eos = vocab.len() as u32 - 1;
    let levels = [f32::NEG_INFINITY, -1.0, 0.0, 0.5, 2.0];
    for (which, schema) in schemas().iter().enumerate() {
        let g = VerdictGrammar::compile(schema, &vocab, &[eos]).expect("compile");
        for seed in 0..60u64 {
            let mut rng = StdRng::seed_from_u64(seed * 7 + which as u64);
            let mut st = g.start();
            let mut mask = Vec::new();
            for _ in 0..400 {
                let ties = rng.gen_bool(0.5);
                let row: Vec<f32> = (0..vocab.len())
                    .map(|_| if ties { levels[rng.gen_range(0..levels.len())] } else { rng.gen_range(-4.0..4.0) })
                    .collect();
                let mut masked = row.clone();
                st.apply_allowed(&g, &mut masked);
                let reachable = masked.iter().any(|&v| v > f32::NEG_INFINITY);
                let want = reachable.then(|| argmax(&masked));
                assert_eq!(st.masked_argmax(&g, &row), want, "after {:?}", st.text());
                if st.is_complete() {
                    break;
                }
                if let Some(f) = st.forced(&g) {
                    st.advance(&g, f[0]).expect("forced");
                    continue;
                }
                let t = match want {
                    Some(t) => t,
                    None => {
                        st.allowed(&g, &mut mask);
                        let ids: Vec<u32> = (0..mask.len() as u32).filter(|&i| mask[i as usize]).collect();
                        ids[rng.gen_range(0..ids.len())]
                    }
                };
                st.advance(&g, t).expect("the masked argmax is allowed");
            }
        }
    }
}
