//! The forward loop over a backend: sampling, generation, constrained decoding.

pub mod constrained;
pub mod generate;
pub mod sampling;
