//! `kairos eval`: perplexity on a text file (sliding window), and with
//! `--quant` the quantized model next to the unquantized one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kairos::engine::eval::{evaluate, EvalOptions};
use kairos::model::quantize::{apply_quant_calibrated, QuantSpec};

use super::quantize::{calibrate, load_with_quant, CalibArgs};
use super::{make_backend, Device};

#[derive(Args)]
pub struct EvalArgs {
    /// HF model folder or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Quantize (e.g. experts=mxfp4,dense=fp8) and compare with the unquantized model.
    #[arg(long)]
    quant: Option<QuantSpec>,
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Upcycle a dense model into E identical experts with top-K routing (E,K):
    /// an MoE with the dense model's logits.
    #[arg(long)]
    upcycle: Option<kairos::model::upcycle::Upcycle>,
    /// Tokens per window (context of the last scored token).
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Step between windows (default: window / 2).
    #[arg(long)]
    stride: Option<usize>,
    /// Score at most this many tokens of the text (from its start).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    calib: CalibArgs,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading --text {}", a.text.display()))?;
    let model = load_with_quant(&a.model, None, a.upcycle)?;
    let mut tokens = model.tokenizer.encode(&text, true)?;
    if let Some(m) = a.max_tokens {
        tokens.truncate(m);
    }
    let stride = a.stride.unwrap_or((a.window / 2).max(1));
    let opts = EvalOptions { window: a.window, stride };
    let name = model.name.clone();
    let (weights, tokenizer) = (model.weights, model.tokenizer);
    let t = Instant::now();
    let (res, device) = match &a.quant {
        None => {
            let mut b = make_backend(a.device, Arc::new(weights))?;
            (evaluate(b.as_mut(), None, &tokens, opts)?, b.name())
        }
        Some(spec) => {
            // The reference is loaded again rather than cloned: weights are not Clone.
            let weights = Arc::new(weights);
            let calib = calibrate(&weights, &tokenizer, spec, &a.calib)?;
            let mut qw = load_with_quant(&a.model, None, a.upcycle)?.weights;
            let tq = Instant::now();
            apply_quant_calibrated(&mut qw, spec, calib.as_ref()).with_context(|| format!("--quant {spec}"))?;
            drop(calib);
            eprintln!("[quantized with {spec} in {:.2}s]", tq.elapsed().as_secs_f64());
            let mut q = make_backend(a.device, Arc::new(qw))?;
            let mut r = make_backend(a.device, weights)?;
            (evaluate(q.as_mut(), Some(r.as_mut()), &tokens, opts)?, q.name())
        }
    };
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::json!({
            "model": name, "text": a.text.display().to_string(), "device": device,
            "perplexity": res.perplexity, "nll": res.nll, "tokens_scored": res.tokens_scored,
            "windows": res.windows, "window": a.window, "stride": stride, "seconds": secs,
        });
        if let Some(spec) = &a.quant {
            v["quant"] = serde_json::json!(spec.to_string());
            v["perplexity_ref"] = serde_json::json!(res.perplexity_ref);
            v["top1_agreement"] = serde_json::json!(res.top1_agreement);
            v["kl"] = serde_json::json!(res.kl);
        }
        println!("{v}");
        return Ok(());
    }
    println!("model {name}  tokens scored {}  windows {} (window {}, stride {stride})  {secs:.1}s", res.tokens_scored, res.windows, a.window);
    println!("perplexity      {:.4}", res.perplexity);
    if let (Some(spec), Some(pr), Some(ag), Some(kl)) = (&a.quant, res.perplexity_ref, res.top1_agreement, res.kl) {
        println!("perplexity_ref  {pr:.4}  (unquantized; ratio {:.4})", res.perplexity / pr);
        println!("top1_agreement  {ag:.4}   kl {kl:.5} nats/token   quant {spec}");
    }
    Ok(())
}
