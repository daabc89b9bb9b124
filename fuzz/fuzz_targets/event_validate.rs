#![no_main]
//! Arbitrary record payloads through the pipeline's event validation (the
//! entry point every Kafka record goes through) and, when accepted, the
//! escaping into the prompt's data section: a typed rejection (a DLQ
//! reason) or a JSON object, never a panic; an accepted event escapes to
//! JSON without `<`/`>` that parses back to the same object.
use kairos::pipeline::config::{EventSchema, FieldType};
use kairos::pipeline::{prompt::escape_event, validate::validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the limits, so small and large ones both get hit.
    let (limits, payload) = match data.split_first() {
        Some((b, rest)) => (*b, rest),
        None => (0, data),
    };
    let schema = EventSchema {
        max_bytes: 64 + 64 * usize::from(limits & 0x3f),
        required: [
            ("txn_id".to_string(), FieldType::String),
            ("amount".to_string(), FieldType::Number),
            ("n".to_string(), FieldType::Integer),
        ]
        .into_iter()
        .filter(|_| limits & 0x40 == 0)
        .collect(),
        max_string_chars: if limits & 0x80 == 0 { 16 } else { 4096 },
    };
    match validate(payload, &schema) {
        Err(reason) => assert!(!reason.to_string().is_empty()),
        Ok(map) => {
            assert!(payload.len() <= schema.max_bytes);
            let escaped = escape_event(&map);
            assert!(!escaped.contains('<') && !escaped.contains('>'), "{escaped}");
            let back: serde_json::Value = serde_json::from_str(&escaped).expect("escaped event is JSON");
            assert_eq!(back, serde_json::Value::Object(map));
        }
    }
});
