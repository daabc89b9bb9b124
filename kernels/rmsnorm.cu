// rmsnorm_residual: per row t:
//   if delta: residual[t] += delta[t]            (f32, updated in place)
//   out[t] = residual[t] * rsqrt(mean(residual[t]^2) + eps) * weight   (bf16 or f32)
// rmsnorm_residual_q8 also writes out as int8 per 32-block (xq, xd as in moe_q8.cu;
// needs hidden % 32 == 0): the input of the int8 expert GEMVs.
// grid (n_rows), block 256 (or 1024 for few rows).
template <typename TO>
__device__ void rms_impl(float* __restrict__ residual, const float* __restrict__ delta,
                         const bf16_t* __restrict__ w, TO* __restrict__ out, int hidden, float eps,
                         signed char* __restrict__ xq = nullptr, float* __restrict__ xd = nullptr) {
    __shared__ float sh[33];
    long long base = (long long)blockIdx.x * hidden;
    float* r = residual + base;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i];
        if (delta) { v += delta[base + i]; r[i] = v; }
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i] * inv * bf2f(w[i]);
        st(out + base + i, v);
        if (xq) {  // a warp holds 32 consecutive elements: one quantization block
            float d = warp_max(fabsf(v)) / 127.f;
            xq[base + i] = (signed char)__float2int_rn(d > 0.f ? v / d : 0.f);
            if ((i & 31) == 0) xd[base / 32 + i / 32] = d;
        }
    }
}
extern "C" __global__ void rmsnorm_residual(float* residual, const float* delta, const bf16_t* w, bf16_t* out, int hidden, float eps) { PDL_ENTRY();
    rms_impl(residual, delta, w, out, hidden, eps);
}
extern "C" __global__ void rmsnorm_residual_q8(float* residual, const float* delta, const bf16_t* w, bf16_t* out,
                                                int hidden, float eps, signed char* xq, float* xd) { PDL_ENTRY();
    rms_impl(residual, delta, w, out, hidden, eps, xq, xd);
}
extern "C" __global__ void rmsnorm_residual_f32out(float* residual, const float* delta, const bf16_t* w, float* out, int hidden, float eps) { PDL_ENTRY();
    rms_impl(residual, delta, w, out, hidden, eps);
}
