//! `kairos inspect`: what a model is and what a decode step costs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use kairos::model::accounting::{kv_step_bytes, precision_mix, ParamCounts};
use kairos::model::config::ModelConfig;
use kairos::model::gguf::GgufFile;
use kairos::model::load::{gguf_config, read_hf_config};
use kairos::model::shard::cost::{rank_cost, RankCost};
use kairos::model::shard::ShardPlan;

#[derive(Args)]
pub struct InspectArgs {
    /// HF folder, a config.json file, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Memory bandwidth for the roofline, GB/s (H100 copy bandwidth measured: 2840).
    #[arg(long, alias = "bandwidth", default_value_t = 2840.0)]
    bandwidth_gbs: f64,
    /// Tensor-parallel degree of attention (1 or the number of GPUs): adds per-GPU bytes and roofline.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Expert-parallel degree (divides the number of GPUs).
    #[arg(long, default_value_t = 1)]
    ep: usize,
    /// Number of GPUs (default: the larger of --tp and --ep).
    #[arg(long)]
    gpus: Option<usize>,
    /// Context length for the KV-cache term.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Also load the weights and report the measured resident bytes.
    #[arg(long)]
    load: bool,
    /// With --load: quantize at load (e.g. experts=mxfp4,dense=fp8) before measuring.
    #[arg(long)]
    quant: Option<kairos::model::quantize::QuantSpec>,
    /// Upcycle a dense model into E identical experts with top-K routing (E,K).
    #[arg(long)]
    upcycle: Option<kairos::model::upcycle::Upcycle>,
    #[arg(long)]
    json: bool,
}

fn read_config(path: &Path) -> anyhow::Result<ModelConfig> {
    if path.is_dir() {
        return Ok(read_hf_config(path)?.1);
    }
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        return Ok(ModelConfig::from_hf_json(&v)?);
    }
    let f = GgufFile::open(path)?;
    Ok(gguf_config(&f)?.1)
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let c = read_config(&a.model)?;
    let c = match a.upcycle {
        Some(u) => u.config(&c)?,
        None => c,
    };
    let p = ParamCounts::from_config(&c);
    let mixes = [("f32", "f32"), ("bf16", "bf16"), ("mxfp4", "bf16"), ("nvfp4", "bf16"), ("mxfp4", "fp8")];
    let kv = kv_step_bytes(&c, a.context, 2);
    let rows: Vec<_> = mixes.iter().map(|(e, d)| precision_mix(&c, &p, e, d)).collect();
    let plan = ShardPlan::new(a.tp, a.ep, a.gpus)?;
    let sharded: Vec<RankCost> = if plan.ranks > 1 {
        mixes.iter().map(|(e, d)| rank_cost(&c, &plan, e, d, a.context)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let measured = if a.load {
        let m = super::quantize::load_with_quant(&a.model, a.quant.as_ref(), a.upcycle)?;
        Some(resident_bytes(&m.weights))
    } else {
        None
    };
    if a.json {
        let v = serde_json::json!({
            "architecture": c.arch.name(),
            "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "vocab": c.vocab_size,
            "moe": c.moe.as_ref().map(|m| serde_json::json!({"experts": m.num_experts, "top_k": m.top_k, "expert_width": m.expert_intermediate})),
            "params": p, "params_total": p.total(), "params_active": p.active(),
            "kv_bytes_per_step": kv, "context": a.context, "bandwidth_gbs": a.bandwidth_gbs,
            "mixes": rows.iter().map(|r| serde_json::json!({
                "name": r.name, "resident_bytes": r.resident_bytes, "step_bytes": r.step_bytes,
                "roofline_tokens_per_s": a.bandwidth_gbs * 1e9 / (r.step_bytes + kv) as f64,
            })).collect::<Vec<_>>(),
            "measured_resident_bytes": measured,
            "plan": {"gpus": plan.ranks, "tp": plan.tp, "ep": plan.ep},
            "per_gpu": sharded.iter().map(|r| serde_json::json!({
                "experts": r.experts_format, "dense": r.dense_format, "resident_bytes": r.resident_bytes,
                "step_bytes_mean": r.step_bytes_mean, "step_bytes_busiest": r.step_bytes_busiest,
                "experts_per_gpu_mean": r.experts_per_group_mean, "experts_per_gpu_busiest": r.experts_per_group_busiest,
                "roofline_tokens_per_s": a.bandwidth_gbs * 1e9 / r.step_bytes_busiest as f64,
            })).collect::<Vec<_>>(),
            "measured_quant": a.quant.map(|q| q.to_string()),
        });
        println!("{v}");
        return Ok(());
    }
    println!("architecture   {}", c.arch.name());
    println!("layers         {}   hidden {}   heads {} / kv {} x {}   vocab {}", c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size);
    if let Some(m) = &c.moe {
        println!("experts        {} top-{} width {}", m.num_experts, m.top_k, m.expert_intermediate);
    }
    println!("parameters     {:.3} B total, {:.3} B active per token", p.total() as f64 / 1e9, p.active() as f64 / 1e9);
    println!("  embedding {}  lm_head {}  attention {}  dense mlp {}  experts {} (active {})  router {}  norms {}",
        p.embedding, p.lm_head, p.attention, p.dense_mlp, p.experts_total, p.experts_active, p.router, p.norms);
    println!("kv cache read per step at context {}: {:.1} MB (bf16)", a.context, kv as f64 / 1e6);
    println!("{:<28} {:>14} {:>16} {:>22}", "precision mix", "resident MB", "step MB (b=1)", format!("roofline tok/s @{:.0}GB/s", a.bandwidth_gbs));
    for r in &rows {
        println!("{:<28} {:>14.1} {:>16.2} {:>22.0}", r.name, r.resident_bytes as f64 / 1e6, r.step_bytes as f64 / 1e6,
            a.bandwidth_gbs * 1e9 / (r.step_bytes + kv) as f64);
    }
    if !sharded.is_empty() {
        print_sharded(&plan, &sharded, a.bandwidth_gbs);
    }
    if let Some(m) = measured {
        match &a.quant {
            Some(q) => println!("measured resident (loaded, --quant {q}): {:.1} MB", m as f64 / 1e6),
            None => println!("measured resident (as loaded): {:.1} MB", m as f64 / 1e6),
        }
    }
    Ok(())
}

fn print_sharded(plan: &ShardPlan, rows: &[RankCost], bw: f64) {
    println!("per GPU: {} GPUs, attention tp={}, experts ep={} (each expert split over {} GPUs), vocabulary split {} ways",
        plan.ranks, plan.tp, plan.ep, plan.expert_split(), plan.ranks);
    if let Some(r) = rows.first() {
        println!("  chosen experts per MoE layer on one GPU group (batch 1): mean {:.2}, busiest {:.2} (expected max)",
            r.experts_per_group_mean, r.experts_per_group_busiest);
    }
    println!("{:<28} {:>14} {:>14} {:>16} {:>22}", "precision mix", "resident GB", "step MB mean", "step MB busiest",
        format!("roofline tok/s @{bw:.0}GB/s"));
    for r in rows {
        println!("{:<28} {:>14.2} {:>14.1} {:>16.1} {:>22.0}", format!("experts={},dense={}", r.experts_format, r.dense_format),
            r.resident_bytes as f64 / 1e9, r.step_bytes_mean as f64 / 1e6, r.step_bytes_busiest as f64 / 1e6,
            bw * 1e9 / r.step_bytes_busiest as f64);
    }
    println!("  (roofline: bandwidth / bytes of the busiest GPU incl. KV; collectives not counted)");
}

/// Bytes the loaded weights occupy, counted from the tensors themselves.
pub fn resident_bytes(w: &kairos::model::ModelWeights) -> u64 {
    kairos::model::accounting::measured_resident_bytes(w)
}
