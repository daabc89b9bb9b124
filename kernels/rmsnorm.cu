// rmsnorm_residual: per row t:
//   if delta: residual[t] += delta[t]            (f32, updated in place)
//   out[t] = residual[t] * rsqrt(mean(residual[t]^2) + eps) * weight   (bf16 or f32)
// rmsnorm_residual_q8 also writes out as int8 per 32-block (xq, xd as in moe_q8.cu;
// needs hidden % 32 == 0): the input of the int8 expert GEMVs.
// grid (n_rows), block 256 (or 1024 for few rows).
// (the row itself is rms_row in common.cuh)
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_residual(float* residual, const float* delta, const bf16_t* w, bf16_t* out, int hidden, float eps) { PDL_ENTRY();
    rms_row(residual, delta, w, out, hidden, eps, (signed char*)nullptr, (float*)nullptr, blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_residual_q8(float* residual, const float* delta, const bf16_t* w, bf16_t* out,
                                                int hidden, float eps, signed char* xq, float* xd) { PDL_ENTRY();
    rms_row(residual, delta, w, out, hidden, eps, xq, xd, blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_residual_f32out(float* residual, const float* delta, const bf16_t* w, float* out, int hidden, float eps) { PDL_ENTRY();
    rms_row(residual, delta, w, out, hidden, eps, (signed char*)nullptr, (float*)nullptr, blockIdx.x);
}
