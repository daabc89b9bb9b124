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
}
