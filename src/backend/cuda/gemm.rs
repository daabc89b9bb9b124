//! Dense bf16 matmuls on tensor cores through cuBLAS, for steps of more than 8
//! rows (prefill chunks, decode batches of 16-64). The custom GEMVs read each
//! weight once per launch of up to 8 rows, so a 64-row step read every dense
//! weight 8 times; one cuBLAS GEMM reads it once. Activations go in as bf16
//! (f32 inputs — attention output, final norm — are rounded to bf16 first, as
//! the weights are bf16 anyway), accumulation and output are f32.
//! A fixed workspace keeps the calls capturable in the decode CUDA graphs.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::{CudaContext, CudaError};

/// Rows from which a step's dense weights go through cuBLAS instead of the GEMVs.
pub const GEMM_MIN_ROWS: usize = 9;
/// cuBLAS workspace (graph capture needs one set up front).
const WORKSPACE_BYTES: usize = 32 << 20;

pub struct BlasGemm {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    /// bf16 copy of an f32 input [max_rows, max_cols]
    xb: CudaSlice<u16>,
    max_elems: usize,
}

// SAFETY: used only through `&mut CudaBackend` (one thread at a time); the handle is
// bound to the backend's stream.
unsafe impl Send for BlasGemm {}

fn blas_err(e: blas::CublasError) -> CudaError {
    CudaError::Shape(format!("cuBLAS: {e:?}"))
}

impl BlasGemm {
    /// A cuBLAS handle on `stream` with its own workspace, or `None` (with the reason)
    /// when libcublas cannot be loaded: the caller then stays on the GEMVs.
    pub fn new(stream: &Arc<CudaStream>, max_rows: usize, max_cols: usize) -> Result<Self, String> {
        let s = stream.clone();
        let blas = std::panic::catch_unwind(move || CudaBlas::new(s))
            .map_err(|_| "libcublas could not be loaded".to_string())?
            .map_err(|e| format!("cublasCreate: {e:?}"))?;
        let mut ws = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| format!("{e:?}"))?;
        {
            let (p, _g) = ws.device_ptr_mut(stream);
            // SAFETY: the workspace outlives the handle (both owned by self).
            unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), p as *mut c_void, WORKSPACE_BYTES) }
                .result()
                .map_err(|e| format!("cublasSetWorkspace: {e:?}"))?;
        }
        // split-K reductions in f32 too (cuBLAS may otherwise reduce bf16 GEMMs in lower
        // precision), so a GEMM row matches the GEMV's f32 accumulation closely
        unsafe { sys::cublasSetMathMode(*blas.handle(), sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION) }
            .result()
            .map_err(|e| format!("cublasSetMathMode: {e:?}"))?;
        let max_elems = (max_rows * max_cols).max(1);
        let xb = stream.alloc_zeros::<u16>(max_elems).map_err(|e| format!("{e:?}"))?;
        Ok(Self { blas, _workspace: ws, xb, max_elems })
    }

    /// y f32 [n, rows] = x [n, cols] . W^T, W bf16 [rows, cols] row-major; x and y raw
    /// device pointers, x bf16 when `x_bf16` (else f32, rounded to bf16 on the way).
    /// Elements of the bf16 staging buffer for f32 inputs: a GEMM of more grows it,
    /// which moves it, so CUDA graphs captured before must be dropped.
    pub fn staging_len(&self) -> usize {
        self.max_elems
    }

    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &mut self,
        cx: &CudaContext,
        w: &CudaSlice<u16>,
        x: u64,
        x_bf16: bool,
        y: u64,
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Result<(), CudaError> {
        if w.len() < rows * cols {
            return Err(CudaError::Shape(format!("gemm: weight has {} elements, needs {}", w.len(), rows * cols)));
        }
        let st = cx.stream.clone();
        let xb = if x_bf16 {
            x
        } else {
            if n * cols > self.max_elems {
                // grows only outside graph capture: a backend sizes it up front for its
                // largest step; the DFlash drafter (eager) grows it with its context
                self.xb = st.alloc_zeros::<u16>(n * cols)?;
                self.max_elems = n * cols;
            }
            let total = (n * cols) as i64;
            let mut b = cx.launch("f32_to_bf16");
            b.arg(&x).arg(&mut self.xb).arg(&total);
            let blocks = (n * cols).div_ceil(256).clamp(1, cx.sm_count as usize * 8);
            unsafe { b.launch(super::kernels::grid(blocks, 1, 1, 256)) }?;
            let (p, _g) = self.xb.device_ptr(&st);
            p
        };
        let (wp, _g) = w.device_ptr(&st);
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: Y' [rows, n] = op(W') [rows, cols] . X' [cols, n], where the
        // row-major W [rows, cols] is the column-major W' [cols, rows] (so op = T).
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                n as i32,
                cols as i32,
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                sys::cudaDataType_t::CUDA_R_16BF,
                cols as i32,
                xb as *const c_void,
                sys::cudaDataType_t::CUDA_R_16BF,
                cols as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                sys::cudaDataType_t::CUDA_R_32F,
                rows as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }
}
