//! Collectives between the ranks of one sharded model: one interface, two
//! implementations — in-process CPU ranks ([`cpu::CpuComm`], threads sharing
//! buffers behind barriers) and NCCL (`nccl::NcclComm`, feature `cuda`, one
//! thread and one stream per GPU). `Buf` is what a rank's data lives in:
//! `[f32]` on the CPU, a `CudaSlice<f32>` on a GPU.
//!
//! Every call is collective: all ranks of the world make the same calls in
//! the same order with matching sizes.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod nccl;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    #[error("{op}: rank {rank} gave {got} values where rank 0 gave {want}")]
    SizeMismatch { op: &'static str, rank: usize, got: usize, want: usize },
    #[error("{op}: buffer of {got} values, expected {want}")]
    BadBuffer { op: &'static str, got: usize, want: usize },
    #[error("broadcast root {root} is outside a world of {world}")]
    BadRoot { root: usize, world: usize },
    #[error("{0}")]
    Device(String),
}

pub trait Collectives {
    type Buf: ?Sized;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Elementwise sum over ranks, in rank order (the same bits on every rank).
    fn all_reduce_sum(&self, buf: &mut Self::Buf) -> Result<(), CommError>;
    /// `recv` = every rank's `send`, in rank order (`recv.len() == world * send.len()`).
    fn all_gather(&self, send: &Self::Buf, recv: &mut Self::Buf) -> Result<(), CommError>;
    /// `send` holds `send_counts[d]` values for each destination `d`, in order;
    /// `recv` gets `recv_counts[s]` values from each source `s`, in order
    /// (dispatch of token rows to expert owners, and the combine back).
    fn all_to_all(&self, send: &Self::Buf, send_counts: &[usize], recv: &mut Self::Buf, recv_counts: &[usize]) -> Result<(), CommError>;
    /// Every rank's `buf` becomes rank `root`'s.
    fn broadcast(&self, buf: &mut Self::Buf, root: usize) -> Result<(), CommError>;
}
