//! `kairos generate`: one completion, as text or as one JSON object.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use kairos::engine::generate::{generate, GenerateRequest};
use kairos::engine::sampling::SamplingParams;
use kairos::engine::speculative::{generate_speculative, CostModel, SpecOptions, SpecStats};
use kairos::model::dflash::DFlashWeights;

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
    /// Upcycle a dense model into E identical experts with top-K routing (E,K):
    /// an MoE whose logits are the dense model's (with --quant, its experts' format).
    #[arg(long)]
    upcycle: Option<kairos::model::upcycle::Upcycle>,
    /// DFlash drafter folder (config.json + model.safetensors): speculative decoding.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// With --draft: block size B (default: the drafter's).
    #[arg(long)]
    block_size: Option<usize>,
    /// With --draft: choose B per step (up to --block-size) from acceptance and measured step cost.
    #[arg(long)]
    adaptive: bool,
    /// Shard over ranks: attention tensor parallel (1 or the rank count).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Shard over ranks: expert-parallel degree (divides the rank count).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Ranks (default: the larger of --tp and --ep): simulated CPU ranks with --device cpu;
    /// with --device cuda:K, GPUs 0..N over NCCL when N GPUs are visible, else N ranks on GPU K.
    #[arg(long)]
    ranks: Option<usize>,
}

/// A model sharded over ranks (CPU threads, or GPUs): name, tokenizer, backend.
fn open_sharded(a: &GenerateArgs) -> anyhow::Result<(String, kairos::model::TextTokenizer, Box<dyn kairos::backend::Backend>)> {
    if a.quant.is_some() || a.draft.is_some() {
        anyhow::bail!("--tp/--ep/--ranks shard the checkpoint as stored: no --quant and no --draft");
    }
    let plan = kairos::model::shard::ShardPlan::new(a.tp, a.ep, a.ranks)?;
    let ck = kairos::model::shard::open_checkpoint_with(&a.model, a.upcycle)?;
    let backend: Box<dyn kairos::backend::Backend> = match a.device {
        Device::Cpu => Box::new(kairos::backend::sharded::ShardedCpuBackend::load(&ck.config, ck.source.as_ref(), plan)?),
        Device::Cuda(k) => cuda_sharded(&ck, plan, k)?,
    };
    Ok((ck.name, ck.tokenizer, backend))
}

/// Rank r on GPU r over NCCL when there are enough GPUs (and NCCL), else every rank
/// on GPU `k` with host-staged collectives (no decode graphs; a functional check).
#[cfg(feature = "cuda")]
fn cuda_sharded(ck: &kairos::model::shard::OpenCheckpoint, plan: kairos::model::shard::ShardPlan, k: usize) -> anyhow::Result<Box<dyn kairos::backend::Backend>> {
    use kairos::backend::cuda::model::CudaBackendOptions;
    use kairos::backend::cuda::sharded::ShardedCudaBackend;
    anyhow::ensure!(kairos::backend::cuda::device_available(), "--device cuda:{k}: no CUDA device found");
    let visible = kairos::backend::cuda::device_count();
    let opts = CudaBackendOptions { ordinal: k, ..Default::default() };
    let b = if visible >= plan.ranks && kairos::backend::collectives::nccl::nccl_available() {
        eprintln!("[{} ranks on GPUs 0..{} over NCCL]", plan.ranks, plan.ranks);
        ShardedCudaBackend::load_nccl(&ck.config, ck.source.as_ref(), plan, opts)?
    } else {
        eprintln!("[{} ranks on GPU {k} with host-staged collectives: {visible} GPUs visible or no NCCL]", plan.ranks);
        ShardedCudaBackend::load_one_gpu(&ck.config, ck.source.as_ref(), plan, opts)?
    };
    Ok(Box::new(b))
}

#[cfg(not(feature = "cuda"))]
fn cuda_sharded(_: &kairos::model::shard::OpenCheckpoint, _: kairos::model::shard::ShardPlan, k: usize) -> anyhow::Result<Box<dyn kairos::backend::Backend>> {
    anyhow::bail!("--device cuda:{k}: this binary was built without CUDA; rebuild with `--features cuda`")
}

/// The block-size chooser's prior cost model for a target on a device
/// (measured step costs replace it as soon as they exist).
pub fn cost_model(c: &kairos::model::ModelConfig, device: Device) -> CostModel {
    // A GPU step is bound by reading weights (extra block tokens are nearly free);
    // on the CPU a few rows share each weight load too, but less well.
    let per_token = if matches!(device, Device::Cpu) { 0.15 } else { 0.03 };
    match &c.moe {
        Some(m) => CostModel { per_token, moe_share: 0.8, experts: Some((m.num_experts, m.top_k)) },
        None => CostModel::dense(per_token),
    }
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        anyhow::bail!("--temperature must be a finite number >= 0, got {}", a.temperature);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    let sharded = a.tp != 1 || a.ep != 1 || a.ranks.is_some();
    // One device: the whole model (the drafter reuses its embedding and lm_head).
    // With --draft the drafter runs on the target's device (GPU drafter for cuda:K).
    let (name, tokenizer, mut backend, target_cfg, drafter) = if sharded {
        let (name, tokenizer, backend) = open_sharded(&a)?;
        (name, tokenizer, backend, None, None)
    } else {
        let model = super::quantize::load_with_quant(&a.model, a.quant.as_ref(), a.upcycle)?;
        let cfg = model.weights.config.clone();
        let weights = Arc::new(model.weights);
        let (backend, drafter) = match &a.draft {
            Some(d) => {
                let draft = DFlashWeights::load(d, &cfg).map_err(|e| anyhow::anyhow!("--draft {}: {e}", d.display()))?;
                let block = a.block_size.unwrap_or(draft.config.block_size).max(1);
                let (backend, drafter) = super::speculative::open(a.device, weights, draft, None)?;
                (backend, Some((drafter, block)))
            }
            None => (make_backend(a.device, weights)?, None),
        };
        (model.name, model.tokenizer, backend, Some(cfg), drafter)
    };
    let tok = &tokenizer;
    let prompt_ids = if a.chat { tok.encode_chat(&a.prompt)? } else { tok.encode(&a.prompt, true)? };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let eos_ids = tok.eos_ids.clone();
    if drafter.is_some() && a.top_logits > 0 {
        anyhow::bail!("--top-logits is not recorded with --draft; drop one of them");
    }
    if drafter.is_none() && (a.block_size.is_some() || a.adaptive) {
        anyhow::bail!("--block-size and --adaptive need --draft PATH");
    }
    let adaptive = match &target_cfg {
        Some(c) if a.adaptive => Some(cost_model(c, a.device)),
        _ => None,
    };
    let req = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        eos_ids,
        top_logits: a.top_logits,
    };
    let mut spec: Option<(SpecStats, usize)> = None;
    let out = match drafter {
        Some((mut drafter, block)) => {
            let opts = SpecOptions { block_size: block, adaptive };
            let mut r = generate_speculative(backend.as_mut(), drafter.as_mut(), std::slice::from_ref(&req), None, &opts)?;
            spec = Some((r.stats, block));
            r.outputs.remove(0)
        }
        None => generate(backend.as_mut(), &req)?,
    };

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
        if let Some((st, block)) = &spec {
            v["dflash"] = serde_json::json!({
                "block_size": block,
                "adaptive": a.adaptive,
                "mean_accepted_len": st.mean_accepted_len(),
                "verify_steps": st.steps,
                "drafted": st.drafted,
                "accepted": st.accepted,
                "draft_s": st.draft_s,
                "verify_s": st.verify_s,
            });
        }
        println!("{v}");
    } else {
        println!("{text}");
        eprintln!("[{} tokens, {:.1} tok/s decode, prefill {:.3}s]", out.output_ids.len(), out.tokens_per_s, out.prefill_s);
        if let Some((st, block)) = &spec {
            eprintln!("[dflash: block {block}, tau {:.2} tokens per verify step over {} steps]", st.mean_accepted_len(), st.steps);
        }
    }
    Ok(())
}

fn model_text(tok: &kairos::model::TextTokenizer, ids: &[u32]) -> anyhow::Result<String> {
    Ok(tok.decode(ids)?)
}
