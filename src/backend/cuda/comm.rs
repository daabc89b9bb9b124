//! The collectives a CUDA step uses: all-reduce (sum) and all-gather of f32
//! device buffers, ordered after the work already queued on the backend's stream.
//! Two implementations:
//! - [`NcclStepComm`]: NCCL, one GPU per rank, joined on the backend's stream
//!   (`NcclComm::join_on`); the calls are captured into the decode graphs.
//! - [`HostStagedComm`]: stream sync → copy to the host → exchange through the
//!   in-process CPU collectives → copy back. N ranks can then run as N threads on
//!   ONE GPU (NCCL refuses two ranks on one device), which is what the sharding
//!   tests do. A host sync cannot be captured, so a backend using it runs its
//!   decode steps eagerly (no graphs).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::backend::collectives::cpu::CpuComm;
use crate::backend::collectives::nccl::NcclComm;
use crate::backend::collectives::{Collectives, CommError};

pub trait DeviceComm: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Whether the calls can be captured into a CUDA graph.
    fn capturable(&self) -> bool;
    /// `buf[..len]` = the sum over ranks of every rank's `buf[..len]`.
    fn all_reduce_sum(&self, stream: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, len: usize) -> Result<(), CommError>;
    /// `recv[r·len..(r+1)·len]` = rank r's `send[..len]`, in rank order.
    fn all_gather(&self, stream: &Arc<CudaStream>, send: &CudaSlice<f32>, len: usize, recv: &mut CudaSlice<f32>) -> Result<(), CommError>;
}

/// NCCL on the backend's stream: the `stream` arguments are not used, the
/// communicator already enqueues on the stream it was joined on.
pub struct NcclStepComm(NcclComm);

// SAFETY: the communicator is only reached through `&mut CudaBackend`, never
// concurrently; NCCL allows a communicator to be used from another thread when
// calls are not concurrent.
unsafe impl Send for NcclStepComm {}

impl NcclStepComm {
    /// `comm` must have been joined on the stream of the backend it is attached to.
    pub fn new(comm: NcclComm) -> Self {
        Self(comm)
    }
}

impl DeviceComm for NcclStepComm {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn capturable(&self) -> bool {
        true
    }
    fn all_reduce_sum(&self, _: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, len: usize) -> Result<(), CommError> {
        self.0.all_reduce_sum_prefix(buf, len)
    }
    fn all_gather(&self, _: &Arc<CudaStream>, send: &CudaSlice<f32>, len: usize, recv: &mut CudaSlice<f32>) -> Result<(), CommError> {
        self.0.all_gather_prefix(send, len, recv)
    }
}

/// Device buffers exchanged through the host and the in-process CPU collectives
/// (ranks are threads of this process, on one GPU or several).
pub struct HostStagedComm {
    cpu: CpuComm,
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CommError {
    move |e| CommError::Device(format!("host-staged {what}: {e:?}"))
}

impl HostStagedComm {
    /// One handle per rank of a world of `n`; move each into its rank's thread.
    pub fn world(n: usize) -> Vec<Self> {
        CpuComm::world(n).into_iter().map(|cpu| Self { cpu }).collect()
    }

    fn to_host(stream: &Arc<CudaStream>, buf: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, CommError> {
        if len > buf.len() {
            return Err(CommError::BadBuffer { op: "host-staged copy", got: buf.len(), want: len });
        }
        let mut host = vec![0f32; len];
        if len > 0 {
            stream.memcpy_dtoh(&buf.slice(0..len), &mut host).map_err(driver("copy to host"))?;
        }
        stream.synchronize().map_err(driver("synchronize"))?;
        Ok(host)
    }

    fn to_device(stream: &Arc<CudaStream>, host: &[f32], buf: &mut CudaSlice<f32>) -> Result<(), CommError> {
        if host.len() > buf.len() {
            return Err(CommError::BadBuffer { op: "host-staged copy", got: buf.len(), want: host.len() });
        }
        if !host.is_empty() {
            stream.memcpy_htod(host, &mut buf.slice_mut(0..host.len())).map_err(driver("copy to device"))?;
        }
        // `host` is freed when the caller returns: wait for the copy.
        stream.synchronize().map_err(driver("synchronize"))
    }
}

impl DeviceComm for HostStagedComm {
    fn rank(&self) -> usize {
        self.cpu.rank()
    }
    fn world(&self) -> usize {
        Collectives::world(&self.cpu)
    }
    fn capturable(&self) -> bool {
        false
    }
    fn all_reduce_sum(&self, stream: &Arc<CudaStream>, buf: &mut CudaSlice<f32>, len: usize) -> Result<(), CommError> {
        let mut host = Self::to_host(stream, buf, len)?;
        self.cpu.all_reduce_sum(&mut host)?;
        Self::to_device(stream, &host, buf)
    }
    fn all_gather(&self, stream: &Arc<CudaStream>, send: &CudaSlice<f32>, len: usize, recv: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let host = Self::to_host(stream, send, len)?;
        let mut all = vec![0f32; len * DeviceComm::world(self)];
        self.cpu.all_gather(&host, &mut all)?;
        Self::to_device(stream, &all, recv)
    }
}
