//! Benchmarks behind `kairos bench …`: each returns a report (printable table
//! and JSON); the CLI only parses flags and prints.

#[cfg(feature = "cuda")]
pub mod decode;
#[cfg(feature = "cuda")]
pub mod decode_ranks;
pub mod dflash;
