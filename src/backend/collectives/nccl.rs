//! Collectives over NCCL (cudarc): one communicator per GPU, each driven by
//! its own thread with its own stream (`NcclComm::join` in every rank's
//! thread with one shared [`Id`]). Calls are enqueued on the rank's stream;
//! the caller synchronises the stream before reading results on the host.
//! All-to-all with per-peer counts is a group of sends and receives.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};

use super::{Collectives, CommError};

pub struct NcclComm {
    comm: Comm,
}

fn dev<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> CommError + '_ {
    move |e| CommError::Device(format!("{what}: {e:?}"))
}

/// Whether the NCCL library can be loaded (cudarc looks for `libnccl.so`, not `libnccl.so.2`).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// A fresh id for one world; hand a copy to every rank's thread.
pub fn new_id() -> Result<Id, CommError> {
    if !nccl_available() {
        return Err(CommError::Device(
            "NCCL library not found: cudarc loads `libnccl.so`; link it to libnccl.so.2 in a folder on LD_LIBRARY_PATH".into(),
        ));
    }
    Id::new().map_err(dev("ncclGetUniqueId"))
}

impl NcclComm {
    /// Joins the world `id` as `rank` of `world` on GPU `ordinal`, with a new stream.
    /// Every rank must call this concurrently (each from its own thread).
    pub fn join(ordinal: usize, rank: usize, world: usize, id: Id) -> Result<Self, CommError> {
        let ctx = CudaContext::new(ordinal).map_err(dev("open device"))?;
        let stream = ctx.new_stream().map_err(dev("new stream"))?;
        let comm = Comm::from_rank(stream, rank, world, id).map_err(dev("ncclCommInitRank"))?;
        Ok(Self { comm })
    }

    /// Joins the world `id` as `rank` of `world` on an existing stream (a
    /// `CudaBackend`'s), so its collectives are ordered with that stream's kernels
    /// and can be captured into the backend's decode graphs.
    pub fn join_on(stream: Arc<CudaStream>, rank: usize, world: usize, id: Id) -> Result<Self, CommError> {
        let comm = Comm::from_rank(stream, rank, world, id).map_err(dev("ncclCommInitRank"))?;
        Ok(Self { comm })
    }

    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// In-place sum over ranks of the first `len` values of `buf` (the rows a step uses).
    pub fn all_reduce_sum_prefix(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<(), CommError> {
        if len > buf.len() {
            return Err(CommError::BadBuffer { op: "all_reduce_sum", got: buf.len(), want: len });
        }
        self.comm.all_reduce_in_place(&mut buf.slice_mut(0..len), &ReduceOp::Sum).map_err(dev("ncclAllReduce"))?;
        Ok(())
    }

    /// `recv[r·len..(r+1)·len]` = rank r's `send[..len]`, in rank order.
    pub fn all_gather_prefix(&self, send: &CudaSlice<f32>, len: usize, recv: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let want = len * self.world();
        if len > send.len() {
            return Err(CommError::BadBuffer { op: "all_gather send", got: send.len(), want: len });
        }
        if recv.len() < want {
            return Err(CommError::BadBuffer { op: "all_gather recv", got: recv.len(), want });
        }
        self.comm.all_gather(&send.slice(0..len), &mut recv.slice_mut(0..want)).map_err(dev("ncclAllGather"))?;
        Ok(())
    }
}

impl Collectives for NcclComm {
    type Buf = CudaSlice<f32>;

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>) -> Result<(), CommError> {
        self.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map_err(dev("ncclAllReduce"))?;
        Ok(())
    }

    fn all_gather(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<(), CommError> {
        let want = send.len() * self.world();
        if recv.len() != want {
            return Err(CommError::BadBuffer { op: "all_gather", got: recv.len(), want });
        }
        self.comm.all_gather(send, recv).map_err(dev("ncclAllGather"))?;
        Ok(())
    }

    fn all_to_all(&self, send: &CudaSlice<f32>, send_counts: &[usize], recv: &mut CudaSlice<f32>, recv_counts: &[usize]) -> Result<(), CommError> {
        let world = self.world();
        let (sent, want) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        if send_counts.len() != world || sent != send.len() {
            return Err(CommError::BadBuffer { op: "all_to_all send", got: send.len(), want: sent });
        }
        if recv_counts.len() != world || want != recv.len() {
            return Err(CommError::BadBuffer { op: "all_to_all recv", got: recv.len(), want });
        }
        group_start().map_err(dev("ncclGroupStart"))?;
        let mut result = Ok(());
        let (mut s_at, mut r_at) = (0, 0);
        for peer in 0..world {
            let (sc, rc) = (send_counts[peer], recv_counts[peer]);
            if sc > 0 && result.is_ok() {
                result = self.comm.send(&send.slice(s_at..s_at + sc), peer as i32).map_err(dev("ncclSend"));
            }
            if rc > 0 && result.is_ok() {
                result = self.comm.recv(&mut recv.slice_mut(r_at..r_at + rc), peer as i32).map(|_| ()).map_err(dev("ncclRecv"));
            }
            s_at += sc;
            r_at += rc;
        }
        // Close the group even after an error so NCCL's group depth stays balanced.
        let end = group_end().map(|_| ()).map_err(dev("ncclGroupEnd"));
        result.and(end)
    }

    fn broadcast(&self, buf: &mut CudaSlice<f32>, root: usize) -> Result<(), CommError> {
        let world = self.world();
        if root >= world {
            return Err(CommError::BadRoot { root, world });
        }
        self.comm.broadcast_in_place(buf, root as i32).map_err(dev("ncclBroadcast"))?;
        Ok(())
    }
}
