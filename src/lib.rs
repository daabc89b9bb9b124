//! kairos: a real-time streaming inference engine.
//!
//! Data flow: connectors → pipeline → scheduler → engine → backend → kernels.
//! Layers here, bottom up: `quant` (weight formats), `model` (configs,
//! checkpoints, tokenizer), `backend` (CPU reference, CUDA), `engine`
//! (sampling, generation, constrained decoding).

pub mod backend;
pub mod bench;
pub mod engine;
pub mod model;
pub mod quant;
pub mod pipeline;
pub mod scheduler;
