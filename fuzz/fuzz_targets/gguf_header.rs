//! Fuzz the GGUF header / metadata / tensor-table parser.
//!
//! Any input must give `Ok` or a typed `GgufError`: no panic, no abort, no
//! huge allocation from a lying count. When the header parses, the derived
//! values are exercised too (range check, sizes, shapes), and the input is
//! also loaded as a whole file so `tensor_f32` runs on in-range tensors.
#![no_main]

use kairos::model::gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = GgufFile::parse_bytes(data) else { return };
    let _ = header.check_data_ranges(data.len() as u64);
    for t in &header.tensors {
        let _ = (t.n_bytes(), t.shape(), t.n_elements());
    }
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for t in &file.tensors {
            // Bound the work per input: skip tensors over 1M elements.
            if t.n_elements() <= 1 << 20 {
                let _ = file.tensor_f32(&t.name);
            }
        }
        let _ = file.get_str_array("tokenizer.ggml.tokens");
        let _ = file.get_u64("general.alignment");
    }
});
