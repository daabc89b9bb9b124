// rmsnorm_residual: per row t:
//   if delta: residual[t] += delta[t]            (f32, updated in place)
//   out[t] = residual[t] * rsqrt(mean(residual[t]^2) + eps) * weight   (bf16 or f32)
// grid (n_rows), block 256.
template <typename TO>
__device__ void rms_impl(float* __restrict__ residual, const float* __restrict__ delta,
                         const bf16_t* __restrict__ w, TO* __restrict__ out, int hidden, float eps) {
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
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(out + base + i, r[i] * inv * bf2f(w[i]));
}
extern "C" __global__ void rmsnorm_residual(float* residual, const float* delta, const bf16_t* w, bf16_t* out, int hidden, float eps) {
    rms_impl(residual, delta, w, out, hidden, eps);
}
extern "C" __global__ void rmsnorm_residual_f32out(float* residual, const float* delta, const bf16_t* w, float* out, int hidden, float eps) {
    rms_impl(residual, delta, w, out, hidden, eps);
}
