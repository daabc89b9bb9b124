//! Every GPU test in one binary: each kernel against its CPU reference (poisoned
//! outputs, tolerances, timing sweeps printed), the CUDA backend against the CPU
//! backend on every family and on SmolLM2, DFlash on the GPU, device sampling,
//! sharded ranks and NCCL, and the decode benchmark (run only with
//! `KAIROS_BENCH_DECODE=1`).
//!
//! Build it here, without CUDA (cudarc loads the driver at run time):
//! `cargo test --release --features cuda --test cuda --no-run`, or
//! `scripts/device_build.sh`, which also builds the `kairos` binary for the
//! device machine; `scripts/device_suite.sh` runs it there. Without a CUDA
//! device every test prints a skip line and passes, unless `KAIROS_REQUIRE_CUDA=1`.
//! Run one family of tests by module: `cuda kernels::`, `cuda model::`, …
#![cfg(feature = "cuda")]

#[path = "../dflash_util/mod.rs"]
#[allow(dead_code)]
mod dflash_util;
#[macro_use]
mod support;
mod weights;

mod attention;
mod bench_decode;
mod dflash;
mod gemv;
mod kernels;
mod model;
mod moe_q8;
mod nccl;
mod nccl_model;
mod sample;
mod shard;
mod smollm2;
