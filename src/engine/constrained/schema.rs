//! Verdict schema: the ordered list of fields of a verdict JSON object.
//!
//! The schema comes from the pipeline TOML config, e.g.
//!
//! ```toml
//! [[verdict.fields]]
//! name = "decision"
//! kind = "enum"
//! values = ["allow", "review", "block"]
//!
//! [[verdict.fields]]
//! name = "score"
//! kind = "number"
//! min = 0.0
//! max = 1.0
//! decimals = 2
//!
//! [[verdict.fields]]
//! name = "reason"
//! kind = "string"
//! max_chars = 200
//! ```
//!
//! The compiled grammar emits the fields in this order with canonical
//! (space-free) JSON: `{"decision":"block","score":0.93,"reason":"..."}`.
//! The first field must be an `enum` (the decision).

use serde::{Deserialize, Serialize};

use super::ConstraintError;

/// Largest supported `decimals` for `number` fields.
pub const MAX_DECIMALS: u32 = 9;
/// Largest supported `max_chars` for `string` fields (the string part of the
/// automaton has `8 * max_chars` states).
pub const MAX_STRING_CHARS: usize = 4096;
/// Largest supported magnitude of a `number` bound.
pub const MAX_NUMBER_ABS: f64 = 1e15;

/// The verdict schema: fields in emission order; the first one is the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictSchema {
    pub fields: Vec<FieldSpec>,
}

/// One field of the verdict object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldSpec {
    /// JSON key. Printable ASCII, no `"` or `\`.
    pub name: String,
    /// Value type; in TOML/JSON the tag key is `kind`
    /// (`"enum"`, `"number"`, `"integer"`, `"string"`) next to its parameters.
    #[serde(flatten)]
    pub kind: FieldKind,
}

/// Value type of a field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FieldKind {
    /// A JSON string that is exactly one of `values` (non-empty, printable,
    /// no `"`/`\`/control characters).
    Enum { values: Vec<String> },
    /// A JSON number in `[min, max]` with at most `decimals` fraction digits
    /// (emitted like `0.87`; no exponent, no leading zeros). Default decimals: 2.
    Number {
        min: f64,
        max: f64,
        #[serde(default = "default_decimals")]
        decimals: u32,
    },
    /// A JSON integer in `[min, max]`.
    Integer { min: i64, max: i64 },
    /// A JSON string of at most `max_chars` Unicode scalar values. Content is
    /// restricted to printable characters without `"` and `\` (so no escapes
    /// are ever needed) and without control characters (C0, DEL, C1).
    String { max_chars: usize },
}

fn default_decimals() -> u32 {
    2
}

impl FieldSpec {
    pub fn new(name: &str, kind: FieldKind) -> Self {
        FieldSpec {
            name: name.to_string(),
            kind,
        }
    }
}

impl VerdictSchema {
    /// Fraud-detection verdict:
    /// `{"decision":"allow|review|block","score":0..1,"reason":"…"}`.
    pub fn fraud_default() -> Self {
        VerdictSchema {
            fields: vec![
                FieldSpec::new(
                    "decision",
                    FieldKind::Enum {
                        values: vec!["allow".into(), "review".into(), "block".into()],
                    },
                ),
                FieldSpec::new(
                    "score",
                    FieldKind::Number {
                        min: 0.0,
                        max: 1.0,
                        decimals: 2,
                    },
                ),
                FieldSpec::new("reason", FieldKind::String { max_chars: 200 }),
            ],
        }
    }

    /// Trading verdict:
    /// `{"signal":"buy|sell|hold","confidence":0..1,"horizon_s":integer,"reason":"…"}`.
    pub fn trading_default() -> Self {
        VerdictSchema {
            fields: vec![
                FieldSpec::new(
                    "signal",
                    FieldKind::Enum {
                        values: vec!["buy".into(), "sell".into(), "hold".into()],
                    },
                ),
                FieldSpec::new(
                    "confidence",
                    FieldKind::Number {
                        min: 0.0,
                        max: 1.0,
                        decimals: 2,
                    },
                ),
                FieldSpec::new(
                    "horizon_s",
                    FieldKind::Integer {
                        min: 1,
                        max: 86_400,
                    },
                ),
                FieldSpec::new("reason", FieldKind::String { max_chars: 200 }),
            ],
        }
    }

    /// Name of the decision field (the first field).
    pub fn decision_field(&self) -> Option<&str> {
        self.fields.first().map(|f| f.name.as_str())
    }

    /// Validate the schema; the compiled grammar relies on these invariants.
    pub fn validate(&self) -> Result<(), ConstraintError> {
        let first = self.fields.first().ok_or(ConstraintError::EmptySchema)?;
        if !matches!(first.kind, FieldKind::Enum { .. }) {
            return Err(ConstraintError::DecisionNotEnum {
                field: first.name.clone(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.fields {
            if f.name.is_empty() || !f.name.bytes().all(is_safe_ascii) {
                return Err(ConstraintError::InvalidFieldName {
                    field: f.name.clone(),
                });
            }
            if !seen.insert(f.name.as_str()) {
                return Err(ConstraintError::DuplicateField {
                    field: f.name.clone(),
                });
            }
            match &f.kind {
                FieldKind::Enum { values } => {
                    if values.is_empty() {
                        return Err(ConstraintError::EmptyEnum {
                            field: f.name.clone(),
                        });
                    }
                    let mut vs = std::collections::HashSet::new();
                    for v in values {
                        if v.is_empty() || !v.chars().all(is_safe_char) || !vs.insert(v.as_str()) {
                            return Err(ConstraintError::InvalidEnumValue {
                                field: f.name.clone(),
                                value: v.clone(),
                            });
                        }
                    }
                }
                FieldKind::Number { min, max, decimals } => {
                    if *decimals > MAX_DECIMALS {
                        return Err(ConstraintError::InvalidRange {
                            field: f.name.clone(),
                            detail: format!("decimals {decimals} > {MAX_DECIMALS}"),
                        });
                    }
                    let ok = min.is_finite()
                        && max.is_finite()
                        && min.abs() <= MAX_NUMBER_ABS
                        && max.abs() <= MAX_NUMBER_ABS
                        && min <= max;
                    if !ok {
                        return Err(ConstraintError::InvalidRange {
                            field: f.name.clone(),
                            detail: format!("need finite min <= max within ±{MAX_NUMBER_ABS:e}, got [{min}, {max}]"),
                        });
                    }
                    let (lo, hi) = scaled_bounds(*min, *max, *decimals);
                    if lo > hi {
                        return Err(ConstraintError::InvalidRange {
                            field: f.name.clone(),
                            detail: format!("no value with {decimals} decimals in [{min}, {max}]"),
                        });
                    }
                }
                FieldKind::Integer { min, max } => {
                    if min > max {
                        return Err(ConstraintError::InvalidRange {
                            field: f.name.clone(),
                            detail: format!("min {min} > max {max}"),
                        });
                    }
                }
                FieldKind::String { max_chars } => {
                    if *max_chars > MAX_STRING_CHARS {
                        return Err(ConstraintError::InvalidRange {
                            field: f.name.clone(),
                            detail: format!("max_chars {max_chars} > {MAX_STRING_CHARS}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Bounds of a number field in units of `10^-decimals` (inclusive).
pub(super) fn scaled_bounds(min: f64, max: f64, decimals: u32) -> (i128, i128) {
    let scale = 10f64.powi(decimals as i32);
    // Tolerate float noise such as 0.1 * 100 = 10.000000000000002.
    let lo = (min * scale - 1e-6).ceil() as i128;
    let hi = (max * scale + 1e-6).floor() as i128;
    (lo, hi)
}

/// Printable ASCII other than `"` and `\`.
pub(super) fn is_safe_ascii(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

/// Characters allowed inside enum values (and, byte-wise, string contents).
pub(super) fn is_safe_char(c: char) -> bool {
    if c.is_ascii() {
        is_safe_ascii(c as u8)
    } else {
        !c.is_control()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialize_json_and_toml() {
        let j = r#"{"fields":[
            {"name":"decision","kind":"enum","values":["allow","review","block"]},
            {"name":"score","kind":"number","min":0.0,"max":1.0},
            {"name":"reason","kind":"string","max_chars":200}]}"#;
        let s: VerdictSchema = serde_json::from_str(j).expect("json");
        assert_eq!(s, VerdictSchema::fraud_default());
        let t = r#"
            [[fields]]
            name = "signal"
            kind = "enum"
            values = ["buy", "sell", "hold"]
            [[fields]]
            name = "confidence"
            kind = "number"
            min = 0.0
            max = 1.0
            decimals = 2
            [[fields]]
            name = "horizon_s"
            kind = "integer"
            min = 1
            max = 86400
            [[fields]]
            name = "reason"
            kind = "string"
            max_chars = 200
        "#;
        let s: VerdictSchema = toml::from_str(t).expect("toml");
        assert_eq!(s, VerdictSchema::trading_default());
        s.validate().expect("valid");
    }

    #[test]
    fn validation_errors_name_the_field() {
        let mut s = VerdictSchema::fraud_default();
        s.fields.swap(0, 1);
        match s.validate() {
            Err(ConstraintError::DecisionNotEnum { field }) => assert_eq!(field, "score"),
            other => panic!("unexpected {other:?}"),
        }
        let mut s = VerdictSchema::fraud_default();
        s.fields[0].kind = FieldKind::Enum {
            values: vec!["a\"b".into()],
        };
        assert!(matches!(
            s.validate(),
            Err(ConstraintError::InvalidEnumValue { .. })
        ));
        let mut s = VerdictSchema::fraud_default();
        s.fields[1].kind = FieldKind::Number {
            min: 2.0,
            max: 1.0,
            decimals: 2,
        };
        assert!(
            matches!(s.validate(), Err(ConstraintError::InvalidRange { field, .. }) if field == "score")
        );
        let s = VerdictSchema { fields: vec![] };
        assert!(matches!(s.validate(), Err(ConstraintError::EmptySchema)));
        let mut s = VerdictSchema::fraud_default();
        s.fields[2].name = "score".into();
        assert!(matches!(
            s.validate(),
            Err(ConstraintError::DuplicateField { .. })
        ));
    }
}
