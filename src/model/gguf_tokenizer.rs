//! Build a `tokenizers::Tokenizer` from GGUF metadata, reproducing HF
//! transformers' GGUF conversion (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! - "gpt2": byte-level BPE (tokens re-spelled into the GPT-2 byte alphabet),
//!   ByteLevel pre-tokenizer with the GPT-2 regex, or Split(model regex) +
//!   ByteLevel for known `tokenizer.ggml.pre` values; no BOS unless the file asks.
//! - "llama": SentencePiece BPE with byte fallback, merges from the file or
//!   derived from scores, Metaspace("▁", first); BOS unless the file says no.
//!
//! CONTROL (3) tokens become special added tokens, USER_DEFINED (4) plain ones.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde_json::{json, Map, Value};

use super::gguf::{GgufError, GgufFile, GgufValue};

pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// End-of-generation ids: eos, then eot / eom when the file names them.
    pub eos_ids: Vec<u32>,
    pub chat_template: Option<String>,
    /// Whether prompts start with BOS; `encode(text, true)` already adds it.
    pub add_bos: bool,
}

const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regex for a `tokenizer.ggml.pre` value, as transformers maps them.
/// `None`: the plain GPT-2 ByteLevel regex (e.g. "smollm", "gpt2", "default").
fn pre_split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte -> printable char table (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        extra += u32::from(!printable);
        let c = if printable { b } else { 255 + extra };
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

fn tok_err(what: impl Into<String>) -> GgufError {
    GgufError::Tokenizer(what.into())
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": special})
}

/// Merges from `tokenizer.ggml.merges` ("a b" strings), as pairs.
fn file_merges(f: &GgufFile) -> Result<Option<Vec<(String, String)>>, GgufError> {
    let Some(m) = f.get("tokenizer.ggml.merges") else {
        return Ok(None);
    };
    let bad = |i: usize| {
        tok_err(format!(
            "tokenizer.ggml.merges[{i}] is not a string \"a b\""
        ))
    };
    let arr = m.as_array().ok_or_else(|| bad(0))?;
    let pair = |(i, v): (usize, &GgufValue)| {
        let (a, b) = v
            .as_str()
            .and_then(|s| s.split_once(' '))
            .ok_or_else(|| bad(i))?;
        Ok((a.to_string(), b.to_string()))
    };
    arr.iter()
        .enumerate()
        .map(pair)
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Merges implied by a scored vocabulary, like transformers' `generate_merges`
/// with scores: every split of a token into two vocabulary pieces becomes a
/// merge ranked by (score, left length, right length), highest first (Python's
/// stable `reverse=True` sort), ties in original order.
fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    // Python dict(zip(tokens, scores)): first occurrence fixes the order, last one the score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (&t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for &tok in &order {
        let score = score_of.get(tok).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f32)> = Vec::new();
        for (idx, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(idx);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l, r, score));
            }
        }
        local.sort_by_key(|&(l, r, _)| (vocab.get(l).copied(), vocab.get(r).copied()));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Descending and stable, like Python's `sorted(..., reverse=True)`.
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        let by_score = kb.0.partial_cmp(&ka.0).unwrap_or(std::cmp::Ordering::Equal);
        by_score.then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
    });
    let owned = |(l, r, _): (&str, &str, f32)| (l.to_string(), r.to_string());
    merges.into_iter().map(owned).collect()
}

fn template_post_processor(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Value {
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let sp = |t: Option<(&str, u32)>, ty: u32| {
        t.map(|t| json!({"SpecialToken": {"id": t.0, "type_id": ty}}))
    };
    let single: Vec<Value> = [sp(bos, 0), Some(seq("A", 0)), sp(eos, 0)]
        .into_iter()
        .flatten()
        .collect();
    let tail = [sp(bos, 1), Some(seq("B", 1)), sp(eos, 1)]
        .into_iter()
        .flatten();
    let pair: Vec<Value> = single.iter().cloned().chain(tail).collect();
    let specials: Map<String, Value> = [bos, eos]
        .into_iter()
        .flatten()
        .map(|(t, id)| (t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]})))
        .collect();
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// The model-specific pieces of a tokenizer.json.
struct Parts {
    vocab: Vec<String>,
    model: Value,
    pre_tokenizer: Value,
    decoder: Value,
    add_bos: bool,
    byte_level: bool,
}

fn gpt2_parts(f: &GgufFile, tokens: &[&str], alphabet: &HashSet<char>) -> Result<Parts, GgufError> {
    let table = byte_alphabet();
    let respell = |t: &&str| -> String {
        if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| table[b as usize]).collect()
        }
    };
    let merges = file_merges(f)?.ok_or_else(|| tok_err("gpt2 vocabulary without merges"))?;
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let pre_tokenizer = match f.get_str("tokenizer.ggml.pre").and_then(pre_split_regex) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        None => byte_level(true),
    };
    Ok(Parts {
        vocab: tokens.iter().map(respell).collect(),
        model: json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "merges": merges}),
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true}),
        add_bos: f.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        byte_level: true,
    })
}

fn llama_parts(f: &GgufFile, tokens: &[&str]) -> Result<Parts, GgufError> {
    let merges = match file_merges(f)? {
        Some(m) => m,
        None => {
            let scores = f.get_f32_array("tokenizer.ggml.scores");
            let scores = scores.filter(|s| s.len() == tokens.len()).ok_or_else(|| {
                tok_err("llama vocabulary needs tokenizer.ggml.scores (one per token) or merges")
            })?;
            merges_from_scores(tokens, &scores)
        }
    };
    Ok(Parts {
        vocab: tokens.iter().map(|t| t.to_string()).collect(),
        model: json!({"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "merges": merges}),
        pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}",
                              "prepend_scheme": "first", "split": false}),
        decoder: json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        add_bos: f.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(true),
        byte_level: false,
    })
}

/// Build the tokenizer, special ids and chat template from GGUF metadata.
pub fn tokenizer_from_gguf(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let model = f.get_str("tokenizer.ggml.model");
    let model = model.ok_or_else(|| tok_err("the file has no tokenizer.ggml.model key"))?;
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap_or_default();
    if tokens.is_empty() {
        return Err(tok_err(
            "tokenizer.ggml.tokens is missing, empty or not strings",
        ));
    }
    let n = tokens.len();
    let types = f
        .get_i32_array("tokenizer.ggml.token_type")
        .unwrap_or_default();
    let id = |k: &str| {
        f.get_u32(&format!("tokenizer.ggml.{k}"))
            .filter(|&i| (i as usize) < n)
    };
    let (bos_id, eos_id) = (id("bos_token_id"), id("eos_token_id"));
    let mut eos_ids: Vec<u32> = Vec::new();
    for i in [eos_id, id("eot_token_id"), id("eom_token_id")]
        .into_iter()
        .flatten()
    {
        if !eos_ids.contains(&i) {
            eos_ids.push(i);
        }
    }
    let tok_at = |i: u32| tokens.get(i as usize).copied().unwrap_or("");
    let alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
    let parts = match model {
        "gpt2" => gpt2_parts(f, &tokens, &alphabet)?,
        "llama" => llama_parts(f, &tokens)?,
        other => {
            return Err(tok_err(format!(
                "tokenizer.ggml.model = {other:?} is not supported (\"gpt2\" or \"llama\" only)"
            )))
        }
    };

    // Vocabulary: later duplicates win, as in a Python dict comprehension.
    let mut vocab = Map::new();
    for (i, t) in parts.vocab.into_iter().enumerate() {
        vocab.insert(t, json!(i));
    }
    let mut model_json = parts.model;
    if let Some(obj) = model_json.as_object_mut() {
        obj.insert("vocab".into(), Value::Object(vocab));
    }

    // Added tokens: CONTROL -> special, USER_DEFINED -> plain; plus the named
    // special tokens (bos/eos/unk/pad), which transformers registers as special.
    let mut added: Vec<(usize, &str, bool)> = Vec::new();
    let mut seen = HashSet::new();
    for (i, (&t, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let ok = match ty {
            TOKEN_CONTROL => !parts.byte_level || t.chars().all(|c| alphabet.contains(&c)),
            TOKEN_USER_DEFINED => true,
            _ => false,
        };
        if ok && !t.is_empty() && seen.insert(t) {
            added.push((i, t, ty == TOKEN_CONTROL));
        }
    }
    let unk_id = id("unknown_token_id").or_else(|| {
        // LlamaTokenizer's default unk token.
        let pos = tokens.iter().position(|&t| t == "<unk>");
        pos.filter(|_| !parts.byte_level).map(|i| i as u32)
    });
    for i in [bos_id, eos_id, unk_id, id("padding_token_id")]
        .into_iter()
        .flatten()
    {
        let t = tok_at(i);
        if !t.is_empty() && seen.insert(t) {
            added.push((i as usize, t, true));
        }
    }
    added.sort_by_key(|a| a.0);
    let added: Vec<Value> = added
        .iter()
        .map(|&(i, t, s)| added_token(i, t, s))
        .collect();

    let add_eos = f.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
    let bos = bos_id.filter(|_| parts.add_bos).map(|i| (tok_at(i), i));
    let eos = eos_id.filter(|_| add_eos).map(|i| (tok_at(i), i));
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": template_post_processor(bos, eos),
        "decoder": parts.decoder, "model": model_json,
    });
    let tokenizer = tokenizers::Tokenizer::from_str(&doc.to_string())
        .map_err(|e| tok_err(format!("tokenizers rejected the vocabulary: {e}")))?;
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        eos_ids,
        chat_template: f.get_str("tokenizer.chat_template").map(str::to_string),
        add_bos: parts.add_bos && bos_id.is_some(),
    })
}

/// Tokenizer tests, plus the GGUF parser's own (kept here for gguf.rs's size).
#[cfg(test)]
mod tests {
    use super::super::gguf::{GgufError as E, GgufFile, GgufValue};
    use super::*;

    fn s(x: &str) -> Vec<u8> {
        [&(x.len() as u64).to_le_bytes()[..], x.as_bytes()].concat()
    }
    /// (key, value type id, encoded value)
    type Kv = (String, u32, Vec<u8>);
    fn kv(k: &str, ty: u32, v: Vec<u8>) -> Kv {
        (k.into(), ty, v)
    }
    fn kv_arr(k: &str, elem_ty: u32, items: Vec<Vec<u8>>) -> Kv {
        let n = (items.len() as u64).to_le_bytes();
        kv(
            k,
            9,
            [&elem_ty.to_le_bytes()[..], &n, &items.concat()].concat(),
        )
    }
    fn kv_strs(k: &str, v: &[&str]) -> Kv {
        kv_arr(k, 8, v.iter().map(|x| s(x)).collect())
    }
    /// Tensors: (name, dims as stored, ggml type, data), data 32-byte aligned.
    fn write_gguf(kvs: &[Kv], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            out.extend([s(k), t.to_le_bytes().to_vec(), v.clone()].concat());
        }
        let (mut off, mut data_sec) = (0u64, Vec::new());
        for (name, dims, ty, data) in tensors {
            out.extend(s(name));
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend([ty.to_le_bytes().to_vec(), off.to_le_bytes().to_vec()].concat());
            data_sec.resize(off as usize, 0);
            data_sec.extend(data);
            off = (data_sec.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        [out, data_sec].concat()
    }
    fn patch(b: &[u8], at: usize, v: u64) -> Vec<u8> {
        let mut b = b.to_vec();
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    }
    fn err(b: &[u8]) -> E {
        GgufFile::from_bytes(b.to_vec()).expect_err("must be rejected")
    }

    fn sample() -> Vec<u8> {
        let f32s: Vec<u8> = (0..6)
            .flat_map(|i| (i as f32 / 2.0).to_le_bytes())
            .collect();
        let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let kvs = vec![
            kv("general.architecture", 8, s("llama")),
            kv("llama.block_count", 4, 2u32.to_le_bytes().to_vec()),
            kv("llama.rope.freq_base", 6, 1e4f32.to_le_bytes().to_vec()),
            kv("x.u64", 10, 7u64.to_le_bytes().to_vec()),
            kv("x.neg", 5, (-3i32).to_le_bytes().to_vec()),
            kv("x.flag", 7, vec![1]),
            kv_strs("x.list", &["a", "bc"]),
        ];
        let tensors = [("w", vec![3, 2], 0, f32s), ("q", vec![32, 1], 8, q8)];
        write_gguf(&kvs, &tensors)
    }

    #[test]
    fn roundtrip_minimal_gguf() {
        let f = GgufFile::from_bytes(sample()).unwrap();
        assert_eq!((f.version, f.architecture()), (3, Some("llama")));
        assert_eq!(f.arch_u64("block_count"), Some(2));
        assert_eq!((f.get_u32("x.u64"), f.get_u64("x.neg")), (Some(7), None));
        assert_eq!(f.get_i64("x.neg"), Some(-3));
        assert_eq!(f.get_f32("llama.rope.freq_base"), Some(10000.0));
        assert_eq!(f.get("x.flag"), Some(&GgufValue::Bool(true)));
        assert_eq!(f.get_str_array("x.list"), Some(vec!["a", "bc"]));
        let (shape, w) = f.tensor_f32("w").unwrap();
        assert_eq!((shape, w), (vec![2, 3], vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]));
        let (shape, q) = f.tensor_f32("q").unwrap();
        assert_eq!((shape, q[0], q[31]), (vec![1, 32], -8.0, 7.5));
        assert!(matches!(f.tensor_f32("nope"), Err(E::TensorNotFound(_))));
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let full = sample();
        for n in 0..full.len() {
            let e = err(&full[..n]);
            let ok = matches!(
                e,
                E::BadMagic { .. } | E::Truncated { .. } | E::Corrupt { .. }
            );
            assert!(
                ok || matches!(e, E::TensorOutOfRange { .. }),
                "prefix {n}: {e}"
            );
        }
        // Cut inside the tensor data: the header parses, the range check fails.
        let e = err(&full[..full.len() - 3]);
        assert!(
            matches!(e, E::TensorOutOfRange { ref tensor, .. } if tensor == "q"),
            "{e}"
        );
    }

    #[test]
    fn lying_lengths_and_types() {
        let good = sample();
        // Length of the first metadata key (offset 24) lies.
        let e = err(&patch(&good, 24, u64::MAX / 2));
        assert!(matches!(e, E::Corrupt { offset: 24, .. }), "{e}");
        assert!(e.to_string().contains("string length"), "{e}");
        assert!(matches!(err(&patch(&good, 8, 1 << 30)), E::Corrupt { .. })); // tensor count
        let e = err(&patch(&good, 16, 20)); // metadata count
        assert!(matches!(e, E::Truncated { .. } | E::Corrupt { .. }), "{e}");
        let arr = write_gguf(&[kv_strs("x", &["a"])], &[]);
        assert!(matches!(err(&patch(&arr, 41, u64::MAX)), E::Corrupt { .. })); // array count
        let e = err(&write_gguf(&[], &[("bad", vec![4], 99, vec![0; 16])]));
        assert!(matches!(e, E::UnknownTensorType { ggml_type: 99, ref tensor } if tensor == "bad"));
        // Known but not dequantizable type parses; tensor_f32 says so.
        let f = GgufFile::from_bytes(write_gguf(&[], &[("iq", vec![256], 16, vec![0; 66])]));
        let e = f.unwrap().tensor_f32("iq").unwrap_err();
        assert!(matches!(e, E::UnsupportedTensorType { .. }), "{e}");
        // Tensor offset (at 24 + 9 + 4 + 8 + 4) out of range, then unaligned.
        let t = write_gguf(&[], &[("t", vec![4], 0, vec![0; 16])]);
        let e = err(&patch(&t, 49, 1 << 40));
        assert!(matches!(e, E::TensorOutOfRange { .. }), "{e}");
        assert!(matches!(err(&patch(&t, 49, 3)), E::BadTensor { .. }));
        let mut b = good.clone();
        b[4] = 1;
        assert!(matches!(err(&b), E::UnsupportedVersion(1)));
        assert!(matches!(err(b"GGML...."), E::BadMagic { .. }));
    }

    fn tiny_llama_vocab(extra: Vec<Kv>) -> GgufFile {
        let mut toks: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        toks.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        let pieces = "▁ h e l o w r d ▁h el lo ▁hel ▁hello ▁w or ld ▁wor ▁world <tool> 1 2 12";
        toks.extend(pieces.split(' ').map(str::to_string));
        let ty = |t: &str| match t {
            "<unk>" => 2,
            "<s>" | "</s>" => 3,
            "<tool>" => 4,
            _ if t.starts_with("<0x") => 6,
            _ => 1i32,
        };
        let score = |i: usize| if i < 259 { 0.0 } else { 259.0 - i as f32 };
        let ids: Vec<_> = toks.iter().map(|t| s(t)).collect();
        let scores = (0..toks.len()).map(|i| score(i).to_le_bytes().to_vec());
        let types = toks.iter().map(|t| ty(t).to_le_bytes().to_vec());
        let id = |k: &str, v: u32| kv(k, 4, v.to_le_bytes().to_vec());
        let mut kvs = vec![
            kv("general.architecture", 8, s("llama")),
            kv("tokenizer.ggml.model", 8, s("llama")),
            kv_arr("tokenizer.ggml.tokens", 8, ids),
            kv_arr("tokenizer.ggml.scores", 6, scores.collect()),
            kv_arr("tokenizer.ggml.token_type", 5, types.collect()),
            id("tokenizer.ggml.bos_token_id", 1),
            id("tokenizer.ggml.eos_token_id", 2),
            id("tokenizer.ggml.unknown_token_id", 0),
            kv("tokenizer.chat_template", 8, s("{{ bos_token }}")),
        ];
        kvs.extend(extra);
        GgufFile::from_bytes(write_gguf(&kvs, &[])).unwrap()
    }

    /// Expected ids come from transformers' GGUF conversion of the same vocabulary.
    #[test]
    fn llama_sentencepiece_vocab_matches_transformers() {
        let t = tokenizer_from_gguf(&tiny_llama_vocab(vec![])).unwrap();
        assert!(t.add_bos);
        assert_eq!((t.bos_id, t.eos_ids.clone()), (Some(1), vec![2]));
        assert_eq!(t.chat_template.as_deref(), Some("{{ bos_token }}"));
        let enc = |s: &str, sp: bool| t.tokenizer.encode(s, sp).unwrap().get_ids().to_vec();
        let cases: [(&str, bool, &[u32]); 5] = [
            ("hello world", true, &[1, 271, 276]),
            ("hello world", false, &[271, 276]),
            (" hello  world", false, &[271, 259, 276]),
            (
                "hello<tool>12 world\nx",
                false,
                &[271, 277, 280, 276, 13, 123],
            ),
            ("héllo", false, &[267, 198, 172, 262, 269]),
        ];
        for (text, special, want) in cases {
            assert_eq!(enc(text, special), want, "{text:?}");
        }
        let text = "héllo<tool> world\nx";
        assert_eq!(t.tokenizer.decode(&enc(text, true), true).unwrap(), text);
        let no_bos = kv("tokenizer.ggml.add_bos_token", 7, vec![0]);
        let t = tokenizer_from_gguf(&tiny_llama_vocab(vec![no_bos])).unwrap();
        assert!(!t.add_bos);
        assert_eq!(t.tokenizer.encode("hello", true).unwrap().get_ids(), &[271]);
    }

    #[test]
    fn unsupported_vocab_is_an_error() {
        let (model, toks) = (s("bert"), kv_strs("tokenizer.ggml.tokens", &["a"]));
        let kvs = [kv("tokenizer.ggml.model", 8, model), toks];
        let f = GgufFile::from_bytes(write_gguf(&kvs, &[])).unwrap();
        assert!(matches!(tokenizer_from_gguf(&f), Err(E::Tokenizer(_))));
    }

    const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/cache");

    #[test]
    fn real_smollm2_gguf() {
        let path = std::path::PathBuf::from(MODELS).join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            return eprintln!("skipping: {} not present", path.display());
        }
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.arch_u64("block_count"), Some(30));
        assert_eq!(f.arch_u64("embedding_length"), Some(576));
        let q41 = f.tensors.iter().find(|t| t.ggml_type == 3).unwrap();
        let (shape, w) = f.tensor_f32(&q41.name).unwrap();
        assert_eq!(shape.iter().product::<usize>(), w.len());
        let mean = w.iter().map(|&x| x as f64).sum::<f64>() / w.len() as f64;
        let var = w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / w.len() as f64;
        eprintln!("{} {shape:?}: mean {mean:.5} var {var:.5}", q41.name);
        assert!(w.iter().all(|x| x.is_finite()));
        assert!(mean.abs() < 0.05 && var.sqrt() > 1e-3 && var.sqrt() < 1.0);
        for t in &f.tensors {
            f.tensor_f32(&t.name).unwrap();
        }

        let t = tokenizer_from_gguf(&f).unwrap();
        assert_eq!(
            (t.add_bos, t.bos_id, &t.eos_ids[..]),
            (false, Some(1), &[2][..])
        );
        assert!(t.chat_template.unwrap_or_default().contains("<|im_start|>"));
        let enc = |s: &str| t.tokenizer.encode(s, true).unwrap().get_ids().to_vec();
        // Ids from transformers' GGUF conversion of this file.
        let chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>";
        assert_eq!(enc(chat), [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2]);
        let text = "<|im_start|>user\nHéllo, wörld! 12<|im_end|>";
        assert_eq!(t.tokenizer.decode(&enc(text), false).unwrap(), text);
        let fixture = format!("{MODELS}/../../tests/fixtures/smollm2_tokenizer_summary.json");
        let Ok(text) = std::fs::read_to_string(&fixture) else {
            return eprintln!("skipping transformers comparison: {fixture} not present");
        };
        let summary: Value = serde_json::from_str(&text).unwrap();
        let ids = |v: &Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
        for case in summary["tokenize_cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(enc(text), ids(&case["ids"]), "{text:?}");
            let plain = t.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(plain, ids(&case["ids_no_special"]), "{text:?}");
            let decoded = t.tokenizer.decode(&ids(&case["ids"]), false).unwrap();
            assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{text:?}");
        }
        let added: Value = serde_json::from_str(&t.tokenizer.to_string(false).unwrap()).unwrap();
        assert_eq!(added["added_tokens"], summary["added_tokens"]);
    }
}
