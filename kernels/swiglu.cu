// swiglu: gu f32 [n, 2*I] = [gate | up] per row -> out [n, I] = silu(gate) * up
// swiglu_oai (gpt-oss): gu interleaved [g0,u0,g1,u1,...]; g = min(g, limit),
//   u = clamp(u, -limit, limit); out = (u + 1) * g * sigmoid(alpha * g)
// grid-stride over n*I elements; block 256.
#define GSTRIDE_ARGS blockIdx.x * (long long)blockDim.x + threadIdx.x, (long long)gridDim.x * blockDim.x
template <typename TO>
__device__ void swiglu_impl(const float* __restrict__ gu, TO* __restrict__ out, int n, int I, long long i0, long long step) {
    long long total = (long long)n * I;
    for (long long i = i0; i < total; i += step) {
        long long t = i / I, c = i % I;
        float g = gu[t * 2 * I + c], u = gu[t * 2 * I + I + c];
        st(out + i, g / (1.f + expf(-g)) * u);
    }
}
template <typename TO>
__device__ void swiglu_oai_impl(const float* __restrict__ gu, TO* __restrict__ out, int n, int I, float alpha, float limit,
                                long long i0, long long step) {
    long long total = (long long)n * I;
    for (long long i = i0; i < total; i += step) {
        long long t = i / I, c = i % I;
        float g = gu[t * 2 * I + 2 * c], u = gu[t * 2 * I + 2 * c + 1];
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        st(out + i, (u + 1.f) * (g / (1.f + expf(-alpha * g))));
    }
}
extern "C" __global__ void swiglu_f32(const float* gu, float* out, int n, int I) { PDL_ENTRY(); swiglu_impl(gu, out, n, I, GSTRIDE_ARGS); }
extern "C" __global__ void swiglu_bf16(const float* gu, bf16_t* out, int n, int I) { PDL_ENTRY(); swiglu_impl(gu, out, n, I, GSTRIDE_ARGS); }
extern "C" __global__ void swiglu_oai_f32(const float* gu, float* out, int n, int I, float alpha, float limit) { PDL_ENTRY();
    swiglu_oai_impl(gu, out, n, I, alpha, limit, GSTRIDE_ARGS);
}
extern "C" __global__ void swiglu_oai_bf16(const float* gu, bf16_t* out, int n, int I, float alpha, float limit) { PDL_ENTRY();
    swiglu_oai_impl(gu, out, n, I, alpha, limit, GSTRIDE_ARGS);
}
