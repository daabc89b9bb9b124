//! The forward loop over a backend: sampling, generation, constrained decoding.

pub mod calibrate;
pub mod constrained;
pub mod eval;
pub mod generate;
pub mod sampling;
pub mod speculative;
