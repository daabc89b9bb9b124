//! `kairos bench dflash`: τ and tokens/s with and without a DFlash drafter on
//! verdict prompts (pipeline configs with generator sources) and chat prompts;
//! `--export-prompts FILE` writes the same prompts as training JSONL instead.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use kairos::bench::dflash::{self, BenchOptions, PromptSet};
use kairos::model::dflash::DFlashWeights;
use kairos::pipeline::config::PipelineConfig;

use super::Device;

#[derive(Args)]
pub struct DflashBench {
    /// Target model (HF folder or .gguf).
    #[arg(long)]
    model: PathBuf,
    /// Drafter folder (config.json + model.safetensors); required unless --export-prompts.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Pipeline configs whose events become verdict prompts: PATH uses the config's
    /// generator source, PATH=KIND (fraud, market, agent) that generator.
    #[arg(long, value_delimiter = ',', default_value = "configs/fraud.toml=fraud,configs/trading.toml")]
    configs: Vec<String>,
    /// Verdict prompts per config.
    #[arg(long, default_value_t = 8)]
    verdicts: usize,
    /// General chat prompts.
    #[arg(long, default_value_t = 8)]
    chats: usize,
    /// Seed of the event generators (training export and bench use different seeds).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Block size (default: the drafter's).
    #[arg(long)]
    block_size: Option<usize>,
    /// Choose the block size per step (up to --block-size) from acceptance and measured step cost.
    #[arg(long)]
    adaptive: bool,
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Upcycle a dense target into E identical experts with top-K routing (E,K):
    /// an MoE target with the dense model's outputs, so the dense drafter serves it.
    #[arg(long)]
    upcycle: Option<kairos::model::upcycle::Upcycle>,
    /// Quantize the target at load (e.g. experts=mxfp4).
    #[arg(long)]
    quant: Option<kairos::model::quantize::QuantSpec>,
    /// CUDA rows per step: a verify step of up to this many rows (all sequences'
    /// blocks together) replays one CUDA graph; larger ones run eagerly in micro-batches.
    #[arg(long)]
    max_step_tokens: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the prompt sets as JSONL (tools/train_dflash.py gen --prompts) and exit.
    #[arg(long)]
    export_prompts: Option<PathBuf>,
}

pub fn run(a: DflashBench) -> anyhow::Result<()> {
    let model = super::quantize::load_with_quant(&a.model, a.quant.as_ref(), a.upcycle)?;
    let tok = &model.tokenizer;
    let mut sets: Vec<PromptSet> = Vec::new();
    for spec in &a.configs {
        let (path, kind) = match spec.split_once('=') {
            Some((p, k)) => (PathBuf::from(p), Some(k)),
            None => (PathBuf::from(spec), None),
        };
        let cfg = PipelineConfig::load(&path).with_context(|| format!("reading {}", path.display()))?;
        sets.push(dflash::verdict_set(&cfg, kind, tok, a.verdicts, a.seed).with_context(|| spec.clone())?);
    }
    if a.chats > 0 {
        sets.push(dflash::chat_set(tok, a.chats)?);
    }
    if let Some(p) = &a.export_prompts {
        std::fs::write(p, dflash::export_jsonl(&sets)).with_context(|| format!("writing {}", p.display()))?;
        let n: usize = sets.iter().map(|s| s.texts.len()).sum();
        eprintln!("wrote {n} prompts to {}", p.display());
        return Ok(());
    }
    let draft_dir = a.draft.as_ref().context("--draft DIR is required (or --export-prompts FILE)")?;
    let draft = DFlashWeights::load(draft_dir, &model.weights.config)
        .with_context(|| format!("loading drafter {}", draft_dir.display()))?;
    let block = a.block_size.unwrap_or(draft.config.block_size).max(1);
    let eos = tok.eos_ids.clone();
    let adaptive = a.adaptive.then(|| super::generate::cost_model(&model.weights.config, a.device));
    let weights = Arc::new(model.weights);
    let (mut backend, mut drafter) = super::speculative::open(a.device, weights, draft, a.max_step_tokens)?;
    let opts = BenchOptions { batches: a.batches.clone(), max_new_tokens: a.max_new_tokens, block_size: block, adaptive };
    let (rows, identical) = dflash::run(backend.as_mut(), drafter.as_mut(), &sets, &eos, &opts)?;
    print!("{}", dflash::table(&rows));
    println!("greedy outputs identical with and without the drafter: {identical}");
    if let Some(out) = a.out {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "draft": draft_dir.display().to_string(),
            "device": backend.name(),
            "upcycle": a.upcycle.map(|u| u.to_string()),
            "quant": a.quant.as_ref().map(|q| q.to_string()),
            "block_size": block,
            "adaptive": a.adaptive,
            "max_step_tokens": a.max_step_tokens,
            "max_new_tokens": a.max_new_tokens,
            "identical_greedy_outputs": identical,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "rows": rows,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
