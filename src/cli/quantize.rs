//! `kairos quantize`: write a model with FP4 experts (and optional FP8/bf16
//! attention) as an HF-style folder that every `--model` flag accepts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kairos::engine::calibrate::collect_mlp_hessians;
use kairos::model::family::ModelWeights;
use kairos::model::gguf::GgufFile;
use kairos::model::load::{gguf_config, read_hf_config};
use kairos::model::quantize::calibration::Calibration;
use kairos::model::quantize::save::save_model;
use kairos::model::quantize::{apply_quant, apply_quant_calibrated, QuantMethod, QuantSpec};
use kairos::model::tokenizer::TextTokenizer;
use kairos::model::upcycle::Upcycle;
use kairos::model::{load_model_with, LoadedModel};

/// Calibration text for `method=gptq` (shared by `quantize` and `eval`).
#[derive(Args, Clone)]
pub struct CalibArgs {
    /// UTF-8 calibration text(s) for method=gptq, concatenated in order (repeatable; use
    /// different texts than the evaluation one).
    #[arg(long)]
    pub calib: Vec<PathBuf>,
    /// Calibrate on at most this many tokens of --calib (from its start).
    #[arg(long, default_value_t = 4096)]
    pub calib_tokens: usize,
    /// Calibration tokens per forward pass (independent windows).
    #[arg(long, default_value_t = 512)]
    pub calib_window: usize,
}

/// The GPTQ Hessians for `spec` (None unless `method=gptq`), from the unquantized `weights`.
pub fn calibrate(weights: &Arc<ModelWeights>, tokenizer: &TextTokenizer, spec: &QuantSpec, a: &CalibArgs) -> anyhow::Result<Option<Calibration>> {
    if spec.method != QuantMethod::Gptq {
        return Ok(None);
    }
    if a.calib.is_empty() {
        anyhow::bail!("method=gptq needs a calibration text: --calib FILE");
    }
    let mut text = String::new();
    for path in &a.calib {
        text.push_str(&std::fs::read_to_string(path).with_context(|| format!("reading --calib {}", path.display()))?);
        text.push_str("\n\n");
    }
    let mut tokens = tokenizer.encode(&text, true)?;
    tokens.truncate(a.calib_tokens);
    let t = Instant::now();
    let c = collect_mlp_hessians(Arc::clone(weights), &tokens, a.calib_window).context("calibration forward pass")?;
    let names: Vec<String> = a.calib.iter().map(|p| p.display().to_string()).collect();
    eprintln!("[calibrated on {} tokens of {} in {:.1}s]", c.samples(), names.join(" + "), t.elapsed().as_secs_f64());
    Ok(Some(c))
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Source: HF folder or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (created; files in it are overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Format of the experts (dense models: the MLP weights): mxfp4 or nvfp4.
    #[arg(long)]
    experts: String,
    /// Attention projections in bf16 or fp8 (embeddings/lm_head then bf16).
    #[arg(long)]
    dense: Option<String>,
    /// Block scale rule: spec or mse.
    #[arg(long, default_value = "spec")]
    scale: String,
    /// FP4 rounding: rtn (round-to-nearest) or gptq (needs --calib).
    #[arg(long, default_value = "rtn")]
    method: String,
    /// Keep down_proj in fp8 or bf16 instead of the experts' FP4 format.
    #[arg(long)]
    down: Option<String>,
    #[command(flatten)]
    calib: CalibArgs,
}

/// Loads `path` (upcycled to MoE with `upcycle`) and, with a spec, quantizes it;
/// prints the time taken to stderr.
pub fn load_with_quant(path: &Path, spec: Option<&QuantSpec>, upcycle: Option<Upcycle>) -> anyhow::Result<LoadedModel> {
    let mut m = load_model_with(path, upcycle).with_context(|| match upcycle {
        Some(u) => format!("loading {} upcycled to {u}", path.display()),
        None => format!("loading {}", path.display()),
    })?;
    if let Some(s) = spec {
        let t = Instant::now();
        apply_quant(&mut m.weights, s).with_context(|| format!("--quant {s}"))?;
        eprintln!("[quantized {} with {s} in {:.2}s]", m.name, t.elapsed().as_secs_f64());
    }
    Ok(m)
}

pub fn run(a: QuantizeArgs) -> anyhow::Result<()> {
    let mut text = format!("experts={}", a.experts);
    if let Some(d) = &a.dense {
        text.push_str(&format!(",dense={d}"));
    }
    text.push_str(&format!(",scale={},method={}", a.scale, a.method));
    if let Some(d) = &a.down {
        text.push_str(&format!(",down={d}"));
    }
    let spec: QuantSpec = text.parse()?;
    if a.out.exists() && a.out.canonicalize().ok() == a.model.canonicalize().ok() {
        anyhow::bail!("--out {} is the source model; choose another folder", a.out.display());
    }
    let source_config = if a.model.is_dir() {
        read_hf_config(&a.model)?.0
    } else {
        let f = GgufFile::open(&a.model).with_context(|| format!("reading {}", a.model.display()))?;
        gguf_config(&f)?.0
    };
    let mut model = load_with_quant(&a.model, None, None)?;
    let weights = Arc::new(model.weights);
    let calib = calibrate(&weights, &model.tokenizer, &spec, &a.calib)?;
    model.weights = Arc::try_unwrap(weights).map_err(|_| anyhow::anyhow!("calibration still holds the weights"))?;
    let t = Instant::now();
    apply_quant_calibrated(&mut model.weights, &spec, calib.as_ref()).with_context(|| format!("quantizing with {spec}"))?;
    eprintln!("[quantized {} with {spec} in {:.2}s]", model.name, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let bytes = save_model(&a.out, &model, &a.model, &source_config, &spec)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "[wrote {} ({:.1} MB of tensors) in {:.2}s]",
        a.out.display(),
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
