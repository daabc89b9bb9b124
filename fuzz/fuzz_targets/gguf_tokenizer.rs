//! Fuzz building a tokenizer from GGUF metadata (hostile vocabularies,
//! merges, token types, special ids): `Ok` or a typed error, never a panic.
//! Seed the corpus with small GGUFs that carry a gpt2 or llama vocabulary.
#![no_main]

use kairos::model::gguf::GgufFile;
use kairos::model::gguf_tokenizer::tokenizer_from_gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec()) else { return };
    if let Ok(t) = tokenizer_from_gguf(&file) {
        for text in ["Hello world <s> 12", "héllo\n\t<|im_end|>", ""] {
            if let Ok(enc) = t.tokenizer.encode(text, true) {
                let _ = t.tokenizer.decode(enc.get_ids(), false);
            }
        }
    }
});
