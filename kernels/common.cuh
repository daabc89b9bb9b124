// Shared helpers, prepended to every kernels/*.cu source by the host before
// NVRTC compiles it (no #include, so no include path is needed).
// bf16 is carried as raw u16 bits.
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned char u8;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((u32)v) << 16); }
// round-to-nearest-even; NaN stays NaN
__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return bf2f(v); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16_t* p, float v) { *p = f2bf(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// sum over the whole block (blockDim.x multiple of 32, <= 1024); all threads get it
__device__ __forceinline__ float block_sum(float v, float* sh /*[33]*/) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
// unpack 8 bf16 held in a uint4
__device__ __forceinline__ void unpack8(const uint4 v, float* o) {
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
    o[4] = __uint_as_float(v.z << 16); o[5] = __uint_as_float(v.z & 0xffff0000u);
    o[6] = __uint_as_float(v.w << 16); o[7] = __uint_as_float(v.w & 0xffff0000u);
}
// load 8 consecutive activations (bf16 or f32) as f32; p 16-byte aligned
__device__ __forceinline__ void load8(const bf16_t* p, float* o) { unpack8(__ldg((const uint4*)p), o); }
__device__ __forceinline__ void load8(const float* p, float* o) {
    float4 a = __ldg((const float4*)p), b = __ldg((const float4*)p + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
// Programmatic dependent launch (sm_90+): the host launches every kernel with the
// PDL attribute (src/backend/cuda/launch.rs), so a kernel may start before its
// predecessor ends. PDL_ENTRY(), the first statement of every kernel, lets the next
// kernel be scheduled and then waits until the predecessor has completed and its
// writes are visible. Without the attribute both instructions are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY() asm volatile("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;" ::: "memory")
#else
#define PDL_ENTRY() do { } while (0)
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define PDL_TRIGGER() do { } while (0)
#define PDL_WAIT() do { } while (0)
#endif
// Ask L2 for `bytes` at p, one 128-byte line per lane of the warp per step: kernels
// whose weights do not depend on their predecessor issue this before PDL_WAIT(), so
// the weight stream starts while the predecessor finishes (-DKAIROS_NO_PREFETCH: off).
__device__ __forceinline__ void prefetch_l2_warp(const void* p, long long bytes) {
#ifndef KAIROS_NO_PREFETCH
    const char* c = (const char*)p;
    for (long long off = (long long)(threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" :: "l"(c + off));
#endif
}
