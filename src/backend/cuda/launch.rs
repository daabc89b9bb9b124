//! Kernel launches through `cuLaunchKernelEx`, so that every launch can carry
//! the programmatic-stream-serialization attribute: programmatic dependent
//! launch (PDL, sm_90+). With it a kernel may start while the one before it
//! finishes; each kernel's first statement (`PDL_ENTRY()` in
//! `kernels/common.cuh`) waits until its predecessor has completed and its
//! writes are visible, so results are unchanged, but the launch latency and the
//! predecessor's tail overlap. Inside a captured CUDA graph the attribute
//! becomes a programmatic edge. `KAIROS_CUDA_PDL=0` turns it off (A/B).
//!
//! cudarc's launch builder cannot set launch attributes, so this module keeps
//! its own function handles and argument list; the argument API mirrors
//! cudarc's (`arg(&slice)`, `arg(&mut slice)`, `arg(&scalar)`).

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};

/// A kernel handle owned by its module (which lives as long as the context).
#[derive(Clone, Copy)]
pub(crate) struct RawFunction(pub(crate) sys::CUfunction);
// SAFETY: a CUfunction is a plain driver handle, valid on any thread once the
// context is current (launches bind it first).
unsafe impl Send for RawFunction {}
unsafe impl Sync for RawFunction {}

/// A loaded module, unloaded by `CudaContext`'s `Drop`.
pub(crate) struct RawModule(pub(crate) sys::CUmodule);
// SAFETY: as for `RawFunction`: a driver handle used with its context bound.
unsafe impl Send for RawModule {}
unsafe impl Sync for RawModule {}

/// Something passed to a kernel: device pointers and scalars, as the kernel's
/// parameter bytes (at most 8; little-endian, so 4-byte scalars sit in the low half).
pub trait KernelArg {
    fn bits(&self, stream: &CudaStream) -> u64;
}
impl<T> KernelArg for &CudaSlice<T> {
    fn bits(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.device_ptr(stream);
        p
    }
}
impl<T> KernelArg for &mut CudaSlice<T> {
    fn bits(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = (**self).device_ptr(stream);
        p
    }
}
macro_rules! scalar_arg {
    ($($t:ty => $e:expr),*) => {$(
        impl KernelArg for &$t {
            fn bits(&self, _: &CudaStream) -> u64 {
                let f: fn($t) -> u64 = $e;
                f(**self)
            }
        }
    )*};
}
scalar_arg!(i32 => |v| v as u32 as u64, u32 => |v| v as u64, f32 => |v| v.to_bits() as u64, i64 => |v| v as u64, u64 => |v| v);

const MAX_ARGS: usize = 32;

/// One launch being assembled; `launch` enqueues it on the context's stream.
pub struct Launch<'a> {
    stream: &'a CudaStream,
    func: RawFunction,
    pdl: bool,
    args: [u64; MAX_ARGS],
    n: usize,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: RawFunction, pdl: bool) -> Self {
        Self { stream, func, pdl, args: [0; MAX_ARGS], n: 0 }
    }

    pub fn arg<A: KernelArg>(&mut self, a: A) -> &mut Self {
        assert!(self.n < MAX_ARGS, "more than {MAX_ARGS} kernel arguments");
        self.args[self.n] = a.bits(self.stream);
        self.n += 1;
        self
    }

    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and
    /// type, and the buffers must be large enough for the grid (the typed
    /// wrappers in `kernels.rs` check the sizes).
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        let mut params: [*mut c_void; MAX_ARGS] = [std::ptr::null_mut(); MAX_ARGS];
        for (p, a) in params.iter_mut().zip(self.args.iter_mut()).take(self.n) {
            *p = a as *mut u64 as *mut c_void;
        }
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        sys::cuLaunchKernelEx(&config, self.func.0, params.as_mut_ptr(), std::ptr::null_mut()).result()
    }
}
