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

/// A launch recorded instead of enqueued (see `CudaContext::start_recording`): the
/// persistent decode step (`persistent.rs`) replays a recorded step as one kernel.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub args: Vec<u64>,
}

/// Where launches go while a step is being recorded (`None`: launched as usual).
pub(crate) type Recorder = std::sync::Mutex<Option<Vec<Recorded>>>;

/// One launch being assembled; `launch` enqueues it on the context's stream.
pub struct Launch<'a> {
    stream: &'a CudaStream,
    func: RawFunction,
    pdl: bool,
    cooperative: bool,
    /// never enqueued (`KAIROS_CUDA_SKIP`, profiling by ablation)
    skipped: bool,
    rec: Option<(&'a Recorder, String)>,
    args: [u64; MAX_ARGS],
    n: usize,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: RawFunction, pdl: bool) -> Self {
        Self { stream, func, pdl, cooperative: false, skipped: false, rec: None, args: [0; MAX_ARGS], n: 0 }
    }

    /// While `rec` is recording, this launch is recorded there (as `name`) instead.
    pub(crate) fn recorded_by(mut self, rec: &'a Recorder, name: &str) -> Self {
        if rec.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            self.rec = Some((rec, name.to_string()));
        }
        self
    }

    /// `launch` does nothing (see `LaunchProbe` in mod.rs).
    pub(crate) fn skipped(mut self, skip: bool) -> Self {
        self.skipped = skip;
        self
    }

    /// All blocks co-resident (grid-wide barriers inside the kernel).
    pub(crate) fn cooperative(&mut self) -> &mut Self {
        self.cooperative = true;
        self
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
        if self.skipped {
            return Ok(());
        }
        if let Some((rec, name)) = &self.rec {
            let mut g = rec.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = g.as_mut() {
                v.push(Recorded {
                    name: name.clone(),
                    grid: cfg.grid_dim,
                    block: cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2,
                    args: self.args[..self.n].to_vec(),
                });
                return Ok(());
            }
        }
        let mut params: [*mut c_void; MAX_ARGS] = [std::ptr::null_mut(); MAX_ARGS];
        for (p, a) in params.iter_mut().zip(self.args.iter_mut()).take(self.n) {
            *p = a as *mut u64 as *mut c_void;
        }
        let mut attrs: [sys::CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut n_attrs = 0;
        if self.pdl {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if self.cooperative {
            attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[n_attrs].value.cooperative = 1;
            n_attrs += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs as u32,
        };
        sys::cuLaunchKernelEx(&config, self.func.0, params.as_mut_ptr(), std::ptr::null_mut()).result()
    }
}

/// Where a decode step's time goes, measured inside the CUDA graph: a kernel's marginal
/// cost is the step time with it minus the step time without it (HOPPER.md's method;
/// serialising profilers miss what PDL overlaps). For benchmarks only: a skipped kernel
/// leaves its outputs stale, so the results are wrong.
/// - `KAIROS_CUDA_SKIP=name,name`: those kernels (exact names) are never enqueued.
/// - `KAIROS_CUDA_LAUNCH_LOG=1`: each kernel name is printed to stderr the first time it
///   is launched (to pick names to skip).
#[derive(Default)]
pub(crate) struct LaunchProbe {
    skip: Vec<String>,
    log: Option<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl LaunchProbe {
    pub(crate) fn from_env() -> Self {
        let skip = std::env::var("KAIROS_CUDA_SKIP").unwrap_or_default();
        Self::new(&skip, super::env_flag("KAIROS_CUDA_LAUNCH_LOG") == Some(true))
    }

    /// `skip`: comma-separated exact kernel names.
    fn new(skip: &str, log: bool) -> Self {
        let skip = skip.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        Self { skip, log: log.then(Default::default) }
    }

    /// Whether `name` is skipped; logs it first if it is new.
    pub(crate) fn skips(&self, name: &str) -> bool {
        let skip = self.skip.iter().any(|s| s == name);
        if let Some(seen) = &self.log {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.insert(name.to_string()) {
                tracing::warn!("first launch of kernel {name} (skipped: {skip})");
            }
        }
        skip
    }
}

#[cfg(test)]
mod tests {
    use super::LaunchProbe;

    #[test]
    fn launch_probe_skips_exact_names_only() {
        let p = LaunchProbe::new(" attention_split_d128, bf16_gemv_f32x_n1 ,", true);
        assert!(p.skips("attention_split_d128"));
        assert!(p.skips("bf16_gemv_f32x_n1"));
        assert!(!p.skips("bf16_gemv_f32x_n1_ks4"), "a prefix must not match");
        assert!(!p.skips("rope_qk"));
        assert_eq!(p.log.as_ref().map(|s| s.lock().map_or(0, |s| s.len())), Some(4));
        assert!(!LaunchProbe::new("", false).skips(""), "nothing skipped by default");
    }
}
