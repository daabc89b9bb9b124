//! Text <-> token ids, special tokens and the model's own chat template
//! (rendered with minijinja, with Python string methods available).

use std::path::Path;

use serde_json::Value;

use super::ModelError;

pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation (generation_config.json, tokenizer config, GGUF metadata).
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::Format(format!("{}: not valid JSON: {e}", path.display())))
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl TextTokenizer {
    /// `tokenizer.json` + `tokenizer_config.json` + `generation_config.json` of an HF folder.
    pub fn from_hf_dir(dir: &Path, config: &Value) -> Result<Self, ModelError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{}: missing (kairos needs the fast-tokenizer file next to the weights)",
                tok_path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
                } else {
                    read_json(&dir.join("chat_template.json"))?
                        .and_then(|v| v.get("chat_template").and_then(Value::as_str).map(str::to_owned))
                }
            }
        };
        let bos_token = token_string(tc.get("bos_token"));
        let eos_token = token_string(tc.get("eos_token"));
        let gen = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let mut eos_ids = ids_of(gen.get("eos_token_id"));
        if eos_ids.is_empty() {
            eos_ids = ids_of(config.get("eos_token_id"));
        }
        if eos_ids.is_empty() {
            if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
                eos_ids.push(id);
            }
        }
        Ok(Self { inner, chat_template, bos_token, eos_token, eos_ids })
    }

    pub fn from_gguf(g: super::gguf_tokenizer::GgufTokenizer) -> Self {
        let tok = &g.tokenizer;
        let bos_token = g.bos_id.and_then(|i| tok.id_to_token(i));
        let eos_token = g.eos_ids.first().and_then(|&i| tok.id_to_token(i));
        Self { bos_token, eos_token, eos_ids: g.eos_ids, chat_template: g.chat_template, inner: g.tokenizer }
    }

    /// Plain text, with the special tokens the tokenizer adds by default (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, true).map_err(|e| ModelError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the model's chat template, as transformers' `apply_chat_template` does.
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::ChatTemplate("the model has no chat template; run without --chat".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Deterministic output matters more than the wall clock inside prompts.
            let _ = fmt;
            String::from("01 Jan 2026")
        });
        env.add_template("chat", template)
            .map_err(|e| ModelError::ChatTemplate(format!("cannot parse the model's template: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(format!("cannot load template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| ModelError::ChatTemplate(format!("cannot render: {e}")))
    }

    /// Chat prompt ids: the rendered template, tokenized without adding special tokens again.
    pub fn encode_chat(&self, user: &str) -> Result<Vec<u32>, ModelError> {
        let text = self.render_chat(&[ChatMessage { role: "user".into(), content: user.into() }], true)?;
        self.encode(&text, false)
    }
}

/// GPT-2's byte -> printable-char table inverted: the raw byte behind each
/// char of a byte-level BPE token.
fn byte_level_decoder() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::new();
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let ch = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        if let Some(c) = char::from_u32(ch) {
            map.insert(c, b as u8);
        }
    }
    map
}

impl TextTokenizer {
    /// The raw bytes each token id stands for (empty for special tokens), as
    /// constrained decoding needs them: byte-level BPE chars are mapped back
    /// to bytes, SentencePiece `▁` to a space and `<0xNN>` to the byte.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let n = self.inner.get_vocab_size(true);
        let specials: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let byte_level = self
            .inner
            .get_vocab(true)
            .keys()
            .any(|t| t.starts_with('Ġ') || t.contains('Ċ'));
        let inv = byte_level_decoder();
        (0..n as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return Vec::new();
                }
                let Some(tok) = self.inner.id_to_token(id) else { return Vec::new() };
                if byte_level {
                    let mut out = Vec::with_capacity(tok.len());
                    for c in tok.chars() {
                        match inv.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.to_string().as_bytes()),
                        }
                    }
                    out
                } else if let Some(hex) = tok.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
                    u8::from_str_radix(hex, 16).map(|b| vec![b]).unwrap_or_default()
                } else {
                    tok.replace('\u{2581}', " ").into_bytes()
                }
            })
            .collect()
    }
}
