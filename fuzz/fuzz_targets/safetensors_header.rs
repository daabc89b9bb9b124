#![no_main]
//! Arbitrary bytes through the safetensors header parser and the f32
//! conversion the loader applies: typed errors only, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = kairos::model::tensors::parse_safetensors(data);
});
