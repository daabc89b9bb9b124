//! Event validation: bytes -> a JSON object of the schema, or a DLQ reason.

use serde_json::{Map, Value};

use super::config::{EventSchema, FieldType};

/// Why an event went to the DLQ (the `kairos-dlq-reason` header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("oversized: {size} bytes > {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("not UTF-8 at byte {0}")]
    NotUtf8(usize),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("missing field `{0}`")]
    MissingField(String),
    #[error("field `{field}` must be {want}")]
    WrongType { field: String, want: &'static str },
    #[error("field `{field}` is longer than {limit} characters")]
    StringTooLong { field: String, limit: usize },
}

fn type_ok(v: &Value, t: FieldType) -> bool {
    match t {
        FieldType::String => v.is_string(),
        FieldType::Number => v.is_number(),
        FieldType::Integer => v.is_i64() || v.is_u64(),
        FieldType::Bool => v.is_boolean(),
        FieldType::Object => v.is_object(),
        FieldType::Array => v.is_array(),
    }
}

fn type_name(t: FieldType) -> &'static str {
    match t {
        FieldType::String => "a string",
        FieldType::Number => "a number",
        FieldType::Integer => "an integer",
        FieldType::Bool => "a boolean",
        FieldType::Object => "an object",
        FieldType::Array => "an array",
    }
}

fn longest_string(v: &Value, limit: usize, path: &str) -> Option<String> {
    match v {
        Value::String(s) if s.chars().count() > limit => Some(path.to_owned()),
        Value::Array(a) => a.iter().find_map(|x| longest_string(x, limit, path)),
        Value::Object(o) => o.iter().find_map(|(k, x)| longest_string(x, limit, k)),
        _ => None,
    }
}

pub fn validate(payload: &[u8], schema: &EventSchema) -> Result<Map<String, Value>, Rejection> {
    if payload.len() > schema.max_bytes {
        return Err(Rejection::Oversized { size: payload.len(), limit: schema.max_bytes });
    }
    let text = std::str::from_utf8(payload).map_err(|e| Rejection::NotUtf8(e.valid_up_to()))?;
    let value: Value = serde_json::from_str(text).map_err(|e| Rejection::NotJson(e.to_string()))?;
    let Value::Object(map) = value else { return Err(Rejection::NotObject) };
    for (field, &t) in &schema.required {
        let v = map.get(field).ok_or_else(|| Rejection::MissingField(field.clone()))?;
        if !type_ok(v, t) {
            return Err(Rejection::WrongType { field: field.clone(), want: type_name(t) });
        }
    }
    for (k, v) in &map {
        if let Some(field) = longest_string(v, schema.max_string_chars, k) {
            return Err(Rejection::StringTooLong { field, limit: schema.max_string_chars });
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema() -> EventSchema {
        EventSchema {
            max_bytes: 200,
            required: [("amount".to_string(), FieldType::Number), ("card_id".to_string(), FieldType::String)]
                .into_iter()
                .collect(),
            max_string_chars: 20,
        }
    }

    #[test]
    fn every_kind_of_bad_event_has_its_reason() {
        let s = schema();
        assert!(matches!(validate(&[b'a'; 300], &s), Err(Rejection::Oversized { .. })));
        assert!(matches!(validate(&[0xff, 0xfe], &s), Err(Rejection::NotUtf8(0))));
        assert!(matches!(validate(b"{nope", &s), Err(Rejection::NotJson(_))));
        assert!(matches!(validate(b"[1,2]", &s), Err(Rejection::NotObject)));
        assert_eq!(validate(br#"{"amount":1}"#, &s), Err(Rejection::MissingField("card_id".into())));
        assert!(matches!(validate(br#"{"amount":"x","card_id":"c"}"#, &s), Err(Rejection::WrongType { .. })));
        assert!(matches!(
            validate(br#"{"amount":1,"card_id":"cccccccccccccccccccccccccccccc"}"#, &s),
            Err(Rejection::StringTooLong { .. })
        ));
        assert!(validate(br#"{"amount":1.5,"card_id":"c1"}"#, &s).is_ok());
    }

    /// Found by fuzz/event_validate: without serde_json's `float_roundtrip`
    /// `1e105` parsed to 1.0000000000000001e105, so the prompt showed the
    /// model a number the event did not contain.
    #[test]
    fn numbers_reach_the_prompt_exactly() {
        let s = EventSchema { max_bytes: 200, required: Default::default(), max_string_chars: 20 };
        for text in ["1e105", "0.1", "123456789.123456789", "-2.2250738585072014e-308", "5e-324"] {
            let map = validate(format!(r#"{{"x":{text}}}"#).as_bytes(), &s).expect("valid");
            let escaped = crate::pipeline::prompt::escape_event(&map);
            let back: Value = serde_json::from_str(&escaped).expect("JSON");
            assert_eq!(back["x"].as_f64(), text.parse::<f64>().ok(), "{text} -> {escaped}");
        }
    }

    /// A JSON value of a random type (strings may hold `<`, quotes, non-ASCII).
    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "[a-z<>\"\\\\é\\u{0}]{0,30}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>().prop_map(Value::from), 0..3).prop_map(Value::Array),
        ]
    }

    proptest! {
        /// Any bytes at all (a Kafka record is untrusted): a verdict on the
        /// bytes, never a panic; a rejection always has a reason for the DLQ header.
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match validate(&bytes, &schema()) {
                Ok(map) => prop_assert!(bytes.len() <= 200 && map.contains_key("amount") && map.contains_key("card_id")),
                Err(r) => prop_assert!(!r.to_string().is_empty()),
            }
        }

        /// Objects with the required fields present or not, of any type: the
        /// outcome is exactly what the schema says, the first problem named.
        #[test]
        fn objects_are_accepted_or_rejected_with_the_right_reason(
            amount in proptest::option::of(any_value()),
            card in proptest::option::of(any_value()),
            extra in proptest::option::of(any_value()),
        ) {
            let mut m = Map::new();
            for (k, v) in [("amount", amount), ("card_id", card), ("note", extra)] {
                if let Some(v) = v {
                    m.insert(k.to_string(), v);
                }
            }
            let bytes = serde_json::to_vec(&Value::Object(m.clone())).expect("serialize");
            let s = schema();
            let r = validate(&bytes, &s);
            if bytes.len() > s.max_bytes {
                prop_assert!(matches!(r, Err(Rejection::Oversized { .. })), "{:?}", r);
                return Ok(());
            }
            // required fields are checked in name order: amount, then card_id
            let first_problem = [("amount", FieldType::Number), ("card_id", FieldType::String)].into_iter().find_map(|(f, t)| match m.get(f) {
                None => Some(Rejection::MissingField(f.into())),
                Some(v) if !type_ok(v, t) => Some(Rejection::WrongType { field: f.into(), want: type_name(t) }),
                Some(_) => None,
            });
            match (first_problem, r) {
                (Some(want), Err(got)) => prop_assert_eq!(want, got),
                (Some(want), Ok(_)) => prop_assert!(false, "accepted, expected {:?}", want),
                (None, Ok(map)) => prop_assert_eq!(map, m),
                (None, Err(Rejection::StringTooLong { .. })) => {}
                (None, Err(e)) => prop_assert!(false, "rejected a valid object: {:?}", e),
            }
        }
    }
}
