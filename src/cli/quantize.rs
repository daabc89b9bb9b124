//! `kairos quantize`: write a model with FP4 experts (and optional FP8/bf16
//! attention) as an HF-style folder that every `--model` flag accepts.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kairos::model::gguf::GgufFile;
use kairos::model::load::{gguf_config, read_hf_config};
use kairos::model::quantize::save::save_model;
use kairos::model::quantize::{apply_quant, QuantSpec};
use kairos::model::{load_model, LoadedModel};

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
}

/// Loads `path` and, with a spec, quantizes it; prints the time taken to stderr.
pub fn load_with_quant(path: &Path, spec: Option<&QuantSpec>) -> anyhow::Result<LoadedModel> {
    let mut m = load_model(path).with_context(|| format!("loading {}", path.display()))?;
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
    text.push_str(&format!(",scale={}", a.scale));
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
    let model = load_with_quant(&a.model, Some(&spec))?;
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
