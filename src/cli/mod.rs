//! Command-line interface (DESIGN.md fixes the commands and flags).

mod eval;
mod bench;
mod bench_dflash;
mod bench_kafka;
mod generate;
mod inspect;
mod produce;
mod quantize;
mod run;
mod speculative;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kairos", version, about = "Real-time streaming inference: events in, verdicts out")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One completion from a model (HF folder or .gguf file).
    Generate(generate::GenerateArgs),
    /// Architecture, parameter counts, bytes per decode step, roofline.
    Inspect(inspect::InspectArgs),
    /// The main job: sources -> pipeline -> sinks (configs/*.toml).
    Run(run::RunArgs),
    /// Benchmarks (pipeline latency at offered rates).
    Bench(bench::BenchArgs),
    /// Built-in event generators into a Kafka topic.
    Produce(produce::ProduceArgs),
    /// Write a model with FP4 experts as an HF-style folder.
    Quantize(quantize::QuantizeArgs),
    /// Perplexity on a text file; with --quant, agreement and KL against the unquantized model.
    Eval(eval::EvalArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Run(a) => run::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Produce(a) => produce::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Eval(a) => eval::run(a),
    }
}

/// `--device cpu|cuda:K`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if s == "cuda" {
            return Ok(Device::Cuda(0));
        }
        match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(k)) => Ok(Device::Cuda(k)),
            _ => Err(format!("`{s}`: expected cpu, cuda or cuda:K")),
        }
    }
}

/// Builds the backend for `device` over loaded weights.
pub fn make_backend(
    device: Device,
    weights: std::sync::Arc<kairos::model::ModelWeights>,
) -> anyhow::Result<Box<dyn kairos::backend::Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(kairos::backend::cpu::CpuBackend::new(weights))),
        Device::Cuda(k) => {
            #[cfg(feature = "cuda")]
            {
                use kairos::backend::cuda::model::{CudaBackend, CudaBackendOptions};
                let b = CudaBackend::new(&weights, CudaBackendOptions { ordinal: k, ..Default::default() })
                    .map_err(|e| anyhow::anyhow!("--device cuda:{k}: {e}"))?;
                Ok(Box::new(b))
            }
            #[cfg(not(feature = "cuda"))]
            anyhow::bail!("--device cuda:{k}: this binary was built without CUDA; rebuild with `--features cuda`")
        }
    }
}
