//! `kairos generate`: one completion, as text or as one JSON object.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use kairos::engine::generate::{generate, GenerateRequest};
use kairos::engine::sampling::SamplingParams;

use super::{make_backend, Device};

#[derive(Args)]
pub struct GenerateArgs {
    /// HF model folder (config.json + *.safetensors + tokenizer.json) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy and deterministic.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Print one JSON object (prompt_ids, output_ids, text, tokens_per_s).
    #[arg(long)]
    json: bool,
    /// With --json: the K highest raw logits of every generated step.
    #[arg(long, default_value_t = 0)]
    top_logits: usize,
    /// Quantize at load, e.g. experts=mxfp4 or experts=nvfp4,dense=fp8[,scale=mse].
    #[arg(long)]
    quant: Option<kairos::model::quantize::QuantSpec>,
    /// Shard over simulated CPU ranks: attention tensor parallel (1 or the rank count).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Shard over simulated CPU ranks: expert-parallel degree (divides the rank count).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Simulated CPU ranks (default: the larger of --tp and --ep).
    #[arg(long)]
    ranks: Option<usize>,
}

/// Name, tokenizer and backend: one device, or a model sharded over simulated CPU ranks.
fn open_backend(a: &GenerateArgs) -> anyhow::Result<(String, kairos::model::TextTokenizer, Box<dyn kairos::backend::Backend>)> {
    if a.tp == 1 && a.ep == 1 && a.ranks.is_none() {
        let model = super::quantize::load_with_quant(&a.model, a.quant.as_ref())?;
        let backend = make_backend(a.device, Arc::new(model.weights))?;
        return Ok((model.name, model.tokenizer, backend));
    }
    if a.device != Device::Cpu || a.quant.is_some() {
        anyhow::bail!("--tp/--ep/--ranks shard over simulated CPU ranks: use --device cpu and no --quant");
    }
    let plan = kairos::model::shard::ShardPlan::new(a.tp, a.ep, a.ranks)?;
    let ck = kairos::model::shard::open_checkpoint(&a.model)?;
    let backend = kairos::backend::sharded::ShardedCpuBackend::load(&ck.config, ck.source.as_ref(), plan)?;
    Ok((ck.name, ck.tokenizer, Box::new(backend)))
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        anyhow::bail!("--temperature must be a finite number >= 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let (name, tokenizer, mut backend) = open_backend(&a)?;
    let tok = &tokenizer;
    let prompt_ids = if a.chat { tok.encode_chat(&a.prompt)? } else { tok.encode(&a.prompt, true)? };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let eos_ids = tok.eos_ids.clone();
    let req = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        eos_ids,
        top_logits: a.top_logits,
    };
    let out = generate(backend.as_mut(), &req)?;
    let text = model_text(&tokenizer, &out.output_ids)?;
    if a.json {
        let mut v = serde_json::json!({
            "model": name,
            "prompt_ids": prompt_ids,
            "output_ids": out.output_ids,
            "text": text,
            "tokens_per_s": out.tokens_per_s,
            "prefill_s": out.prefill_s,
            "decode_s": out.decode_s,
            "device": backend.name(),
        });
        if a.top_logits > 0 {
            v["top_logits"] = serde_json::to_value(&out.top_logits)?;
        }
        println!("{v}");
    } else {
        println!("{text}");
        eprintln!("[{} tokens, {:.1} tok/s decode, prefill {:.3}s]", out.output_ids.len(), out.tokens_per_s, out.prefill_s);
    }
    Ok(())
}

fn model_text(tok: &kairos::model::TextTokenizer, ids: &[u32]) -> anyhow::Result<String> {
    Ok(tok.decode(ids)?)
}
