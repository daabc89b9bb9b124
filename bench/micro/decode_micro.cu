// Micro-benchmark of the batch-1 decode building blocks on Hopper (nvcc, standalone):
//   1. bf16 GEMV: the shipped kernel (kernels/gemv.cu) vs a deeper-unrolled variant
//   2. MXFP4 expert GEMV: the shipped kernel (kernels/mxfp4.cu, f32 math, shared LUT)
//      vs an int8 path (activations quantized to int8 per 32-block, E2M1 decoded to
//      int8 with byte permutes, dp4a)
//   3. a Qwen3-30B-A3B-shaped layer chain (12 kernels x 48 layers) in one CUDA graph,
//      plain vs programmatic dependent launch (PDL), where each GEMV issues its first
//      weight loads before waiting on the previous kernel.
// Every timed kernel is checked against a host reference on random data first.
// Build + run on the device:  nvcc -O3 -arch=sm_90 -o /tmp/dm bench/micro/decode_micro.cu && /tmp/dm
#include "harness.cuh"
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>
#include "../../kernels/common.cuh"
#include "../../kernels/gemv.cu"
#include "../../kernels/mxfp4.cu"


__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" :::); }
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// ---------------------------------------------------------------- bf16 GEMV v1
// warp per row, U 16-byte loads per lane issued before any use; with PDL the first
// chunk of weights is loaded before waiting on the producer of x.
template <int U, bool PDL>
__global__ void __launch_bounds__(256) gemv_v1(const bf16_t* __restrict__ W, const bf16_t* __restrict__ x,
                                               float* __restrict__ y, int rows, int cols) {
    if (PDL) pdl_launch();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int c8 = cols / 8;
    const uint4* wr = (const uint4*)(W + (long long)min(row, rows - 1) * cols);
    float acc = 0.f;
    bool waited = !PDL;
    for (int base = 0; base < c8; base += 32 * U) {
        uint4 w[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + u * 32 + lane;
            w[u] = i < c8 ? ld_stream(wr + i) : make_uint4(0, 0, 0, 0);
        }
        if (!waited) { pdl_wait(); waited = true; }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + u * 32 + lane;
            if (i < c8) {
                float wf[8], xv[8];
                unpack8(w[u], wf);
                load8(x + i * 8, xv);
#pragma unroll
                for (int e = 0; e < 8; e++) acc += wf[e] * xv[e];
            }
        }
    }
    if (!waited) pdl_wait();
    acc = warp_sum(acc);
    if (lane == 0 && row < rows) y[row] = acc;
}

// ---------------------------------------------------------------- int8 activations
// xq i8 [cols], xd f32 [cols/32]: per 32-block scale d = max|x|/127
template <bool PDL>
__global__ void quantize_q8(const bf16_t* __restrict__ x, signed char* __restrict__ xq, float* __restrict__ xd, int cols) {
    if (PDL) { pdl_launch(); pdl_wait(); }
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per element; 32 lanes = one block
    float v = i < cols ? bf2f(x[i]) : 0.f;
    float m = warp_max(fabsf(v));
    float d = m / 127.f;
    if (i < cols) {
        xq[i] = (signed char)__float2int_rn(d > 0.f ? v / d : 0.f);
        if ((threadIdx.x & 31) == 0) xd[i / 32] = d;
    }
}

// E2M1 doubled as int8: 0,1,2,3,4,6,8,12 and negatives
__device__ __forceinline__ void e2m1x8_to_i8(u32 q, int& lo4, int& hi4) {
    const u32 T0 = 0x03020100u, T1 = 0x0C080604u, T2 = 0xFDFEFF00u, T3 = 0xF4F8FAFCu;
    const u32 selidx = 0x32103210u | ((q & 0x88888888u) >> 1);
    u32 a = q & 0x7777u, b = (q >> 16) & 0x7777u;
    u32 pl = __byte_perm(T0, T1, a), nl = __byte_perm(T2, T3, a);
    u32 ph = __byte_perm(T0, T1, b), nh = __byte_perm(T2, T3, b);
    lo4 = (int)__byte_perm(pl, nl, selidx);
    hi4 = (int)__byte_perm(ph, nh, selidx >> 16);
}

// MXFP4 expert GEMV, int8 activations: grid (ceil(rows/(8*RPW)), n_assign), block 256.
// LPR lanes per row (RPW = 32/LPR rows per warp); lane owns 16-byte weight blocks
// b = (lane % LPR) + u*LPR of its row. Rows of assignment a use expert ids[a].
template <int LPR, int U, bool PDL>
__global__ void __launch_bounds__(256) mx_q8(const u8* __restrict__ blocks, const u8* __restrict__ scales,
                                            const signed char* __restrict__ xq, const float* __restrict__ xd,
                                            float* __restrict__ y, int rows, int cols, const int* __restrict__ ids, int x_div) {
    if (PDL) pdl_launch();
    constexpr int RPW = 32 / LPR;
    const int lane = threadIdx.x & 31, sub = lane % LPR;
    const int row = (blockIdx.x * 8 + (threadIdx.x >> 5)) * RPW + lane / LPR;
    const int nb = cols / 32;
    const int a = blockIdx.y;
    if (PDL) pdl_wait();  // expert ids come from the router
    const long long e = ids[a];
    const u8* wrow = blocks + (e * rows + min(row, rows - 1)) * (long long)nb * 16;
    const u8* srow = scales + (e * rows + min(row, rows - 1)) * (long long)nb;
    const signed char* xa = xq + (long long)(a / x_div) * cols;
    const float* da = xd + (long long)(a / x_div) * nb;
    float acc = 0.f;
    for (int base = 0; base < nb; base += LPR * U) {
        uint4 w[U];
        u32 s[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            w[u] = b < nb ? ld_stream(wrow + b * 16) : make_uint4(0, 0, 0, 0);
            s[u] = b < nb ? srow[b] : 127u;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            if (b < nb) {
                const int4* xv = (const int4*)(xa + b * 32);
                int4 x0 = __ldg(xv), x1 = __ldg(xv + 1);
                int lo, hi, dot = 0;
                e2m1x8_to_i8(w[u].x, lo, hi); dot = __dp4a(lo, x0.x, dot); dot = __dp4a(hi, x0.y, dot);
                e2m1x8_to_i8(w[u].y, lo, hi); dot = __dp4a(lo, x0.z, dot); dot = __dp4a(hi, x0.w, dot);
                e2m1x8_to_i8(w[u].z, lo, hi); dot = __dp4a(lo, x1.x, dot); dot = __dp4a(hi, x1.y, dot);
                e2m1x8_to_i8(w[u].w, lo, hi); dot = __dp4a(lo, x1.z, dot); dot = __dp4a(hi, x1.w, dot);
                acc += (float)dot * (0.5f * e8m0(s[u]) * __ldg(da + b));
            }
        }
    }
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (sub == 0 && row < rows) y[(long long)a * rows + row] = acc;
}

// ---------------------------------------------------------------- tiny kernels for the chain
template <bool PDL>
__global__ void tiny(const float* __restrict__ in, float* __restrict__ out, int n) {
    if (PDL) { pdl_launch(); pdl_wait(); }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = in[i] * 0.5f + 1.f;
}
template <bool PDL>
__global__ void to_bf16(const float* __restrict__ in, bf16_t* __restrict__ out, int n) {
    if (PDL) { pdl_launch(); pdl_wait(); }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = f2bf(in[i] * 1e-3f);
}

// ---------------------------------------------------------------- host side
static unsigned long long rng = 88172645463325252ull;
static u32 rnd() { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (u32)rng; }
static float frnd() { return (rnd() >> 8) * (1.f / 16777216.f) * 2.f - 1.f; }
static bf16_t h_f2bf(float f) { u32 u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (bf16_t)(u >> 16); }
static float h_bf2f(bf16_t b) { u32 u = (u32)b << 16; float f; memcpy(&f, &u, 4); return f; }
static float h_e2m1(u32 c) { static const float m[8] = {0, .5f, 1, 1.5f, 2, 3, 4, 6}; return (c & 8) ? -m[c & 7] : m[c & 7]; }

template <typename... KArgs, typename... Args>
static void lk(bool pdl, dim3 g, dim3 b, cudaStream_t s, void (*k)(KArgs...), Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = g; cfg.blockDim = b; cfg.dynamicSmemBytes = 0; cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at; cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, k, (KArgs)args...));
}

struct Timer {
    cudaEvent_t a, b;
    Timer() { cudaEventCreate(&a); cudaEventCreate(&b); }
    template <typename F> float median_us(cudaStream_t s, F f, int reps, int per) {
        std::vector<float> t;
        for (int r = 0; r < reps; r++) {
            cudaEventRecord(a, s); f(); cudaEventRecord(b, s); CK(cudaEventSynchronize(b));
            float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms * 1000.f / per);
        }
        std::sort(t.begin(), t.end());
        return t[t.size() / 2];
    }
};

template <typename F>
static float graph_us(cudaStream_t s, F body, int per, int reps = 15) {
    cudaGraph_t g; cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    body();
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    CK(cudaGraphLaunch(ge, s)); CK(cudaStreamSynchronize(s));
    Timer t;
    float us = t.median_us(s, [&] { CK(cudaGraphLaunch(ge, s)); }, reps, per);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
    return us;
}

static double rel_err(const std::vector<float>& a, const std::vector<double>& ref) {
    double n = 0, d = 0;
    for (size_t i = 0; i < a.size(); i++) { n += (a[i] - ref[i]) * (a[i] - ref[i]); d += ref[i] * ref[i]; }
    return sqrt(n / (d + 1e-30));
}

int main() {
    cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
    printf("device %s, %d SMs, L2 %d MB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
    // copy bandwidth
    {
        size_t n = 1ull << 30; void *a, *b; CK(cudaMalloc(&a, n)); CK(cudaMalloc(&b, n));
        Timer t; float us = t.median_us(s, [&] { cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s); }, 9, 1);
        printf("copy 1 GiB d2d: %.0f GB/s (read+write)\n", 2.0 * n / us / 1e3);
        cudaFree(a); cudaFree(b);
    }
    const int L = 48;
    // ---------------- bf16 GEMV at Qwen3 shapes, x bf16, 48 weight copies per shape
    struct Shape { const char* name; int rows, cols, copies; };
    Shape shapes[] = {{"qkv 5120x2048", 5120, 2048, L}, {"o 2048x4096", 2048, 4096, L}, {"router 128x2048", 128, 2048, L},
                      {"lm_head 151936x2048", 151936, 2048, 2}};
    bf16_t* dx; float* dy; CK(cudaMalloc(&dx, 8192 * 2)); CK(cudaMalloc(&dy, 151936 * 4 * 2));
    std::vector<bf16_t> hx(8192); for (auto& v : hx) v = h_f2bf(frnd());
    CK(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    for (auto& sh : shapes) {
        size_t per = (size_t)sh.rows * sh.cols;
        std::vector<bf16_t> hw(per); for (auto& v : hw) v = h_f2bf(frnd());
        bf16_t* dw; CK(cudaMalloc(&dw, per * 2 * sh.copies));
        for (int c = 0; c < sh.copies; c++) CK(cudaMemcpy(dw + per * c, hw.data(), per * 2, cudaMemcpyHostToDevice));
        std::vector<double> ref(sh.rows);
        for (int r = 0; r < sh.rows; r++) { double a = 0; for (int c = 0; c < sh.cols; c++) a += (double)h_bf2f(hw[(size_t)r * sh.cols + c]) * h_bf2f(hx[c]); ref[r] = a; }
        auto check = [&](const char* what) {
            std::vector<float> out(sh.rows); CK(cudaMemcpy(out.data(), dy, sh.rows * 4, cudaMemcpyDeviceToHost));
            double e = rel_err(out, ref);
            if (!(e < 1e-4)) { printf("  %s WRONG rel err %.3g\n", what, e); exit(1); }
        };
        dim3 g((sh.rows + 7) / 8), b(256);
        double mb = per * 2 / 1e6;
        auto run = [&](const char* what, auto body) {
            CK(cudaMemset(dy, 0xff, sh.rows * 4)); body(0); CK(cudaStreamSynchronize(s)); CK(cudaGetLastError()); check(what);
            float us = graph_us(s, [&] { for (int c = 0; c < sh.copies; c++) body(c); }, sh.copies);
            printf("  %-24s %-26s %8.2f us  %6.0f GB/s\n", sh.name, what, us, mb / us * 1e3);
        };
        run("v0 shipped", [&](int c) { lk(false, g, b, s, bf16_gemv_bf16x_n1, dw + per * c, dx, dy, sh.rows, sh.cols, (const float*)nullptr); });
        run("v1 U=8", [&](int c) { lk(false, g, b, s, gemv_v1<8, false>, dw + per * c, dx, dy, sh.rows, sh.cols); });
        run("v1 U=16", [&](int c) { lk(false, g, b, s, gemv_v1<16, false>, dw + per * c, dx, dy, sh.rows, sh.cols); });
        run("v1 U=8 PDL", [&](int c) { lk(true, g, b, s, gemv_v1<8, true>, dw + per * c, dx, dy, sh.rows, sh.cols); });
        run("v1 U=16 PDL", [&](int c) { lk(true, g, b, s, gemv_v1<16, true>, dw + per * c, dx, dy, sh.rows, sh.cols); });
        CK(cudaFree(dw));
    }
    // ---------------- MXFP4 experts (128 experts, top-8), gate_up 1536x2048 and down 2048x768
    const int E = 128, K = 8, H = 2048, I = 768, LM = 8;  // LM layer copies
    struct MShape { const char* name; int rows, cols, xdiv; };
    MShape ms[] = {{"moe gate_up 8x1536x2048", 2 * I, H, K}, {"moe down 8x2048x768", H, I, 1}};
    int* dids; CK(cudaMalloc(&dids, LM * K * 4));
    std::vector<int> hids(LM * K);
    for (int l = 0; l < LM; l++) for (int k = 0; k < K; k++) { int e; bool dup; do { e = rnd() % E; dup = false; for (int j = 0; j < k; j++) dup |= hids[l * K + j] == e; } while (dup); hids[l * K + k] = e; }
    CK(cudaMemcpy(dids, hids.data(), hids.size() * 4, cudaMemcpyHostToDevice));
    for (auto& sh : ms) {
        int nb = sh.cols / 32; size_t bper = (size_t)E * sh.rows * nb * 16, sper = (size_t)E * sh.rows * nb;
        std::vector<u8> hb(bper), hs(sper);
        for (auto& v : hb) v = rnd() & 0xff;
        for (auto& v : hs) v = 118 + rnd() % 12;
        u8 *db, *ds; CK(cudaMalloc(&db, bper * LM)); CK(cudaMalloc(&ds, sper * LM));
        for (int l = 0; l < LM; l++) { CK(cudaMemcpy(db + bper * l, hb.data(), bper, cudaMemcpyHostToDevice)); CK(cudaMemcpy(ds + sper * l, hs.data(), sper, cudaMemcpyHostToDevice)); }
        int nx = K / sh.xdiv;  // distinct activation rows
        std::vector<bf16_t> hxa((size_t)nx * sh.cols); for (auto& v : hxa) v = h_f2bf(frnd());
        bf16_t* dxa; CK(cudaMalloc(&dxa, hxa.size() * 2)); CK(cudaMemcpy(dxa, hxa.data(), hxa.size() * 2, cudaMemcpyHostToDevice));
        signed char* dxq; float* dxd; CK(cudaMalloc(&dxq, hxa.size())); CK(cudaMalloc(&dxd, hxa.size() / 32 * 4));
        float* dye; CK(cudaMalloc(&dye, (size_t)K * sh.rows * 4));
        std::vector<double> ref((size_t)K * sh.rows);
        for (int a = 0; a < K; a++) { int e = hids[a]; const bf16_t* xr = &hxa[(size_t)(a / sh.xdiv) * sh.cols];
            for (int r = 0; r < sh.rows; r++) { double acc = 0; size_t rb = ((size_t)e * sh.rows + r) * nb;
                for (int bk = 0; bk < nb; bk++) { double sc = ldexp(1.0, (int)hs[rb + bk] - 127);
                    for (int j = 0; j < 16; j++) { u8 byte = hb[(rb + bk) * 16 + j]; acc += sc * (h_e2m1(byte & 15) * h_bf2f(xr[bk * 32 + 2 * j]) + h_e2m1(byte >> 4) * h_bf2f(xr[bk * 32 + 2 * j + 1])); } }
                ref[(size_t)a * sh.rows + r] = acc; } }
        double mb = (double)K * sh.rows * nb * 17 / 1e6;
        auto run = [&](const char* what, double tol, auto body) {
            CK(cudaMemset(dye, 0xff, (size_t)K * sh.rows * 4)); body(0); CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
            std::vector<float> out((size_t)K * sh.rows); CK(cudaMemcpy(out.data(), dye, out.size() * 4, cudaMemcpyDeviceToHost));
            double e = rel_err(out, ref);
            if (!(e < tol)) { printf("  %s WRONG rel err %.3g\n", what, e); exit(1); }
            float us = graph_us(s, [&] { for (int l = 0; l < L; l++) body(l % LM); }, L);
            printf("  %-24s %-26s %8.2f us  %6.0f GB/s  (rel err %.1e)\n", sh.name, what, us, mb / us * 1e3, e);
        };
        auto q8 = [&](bool pdl) { lk(pdl, dim3((hxa.size() + 255) / 256), dim3(256), s, quantize_q8<false>, dxa, dxq, dxd, (int)hxa.size()); };
        run("v0 shipped", 1e-5, [&](int l) { lk(false, dim3((sh.rows + 7) / 8, K), dim3(256), s, mxfp4_gemv_bf16x_n1, db + bper * l, ds + sper * l, dxa, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
        q8(false); CK(cudaStreamSynchronize(s));
        if (sh.cols == H) {
            run("q8 LPR32 U2", 2e-2, [&](int l) { lk(false, dim3((sh.rows + 7) / 8, K), dim3(256), s, mx_q8<32, 2, false>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
            run("q8 LPR16 U4", 2e-2, [&](int l) { lk(false, dim3((sh.rows + 15) / 16, K), dim3(256), s, mx_q8<16, 4, false>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
            run("q8 LPR16 U4 PDL", 2e-2, [&](int l) { lk(true, dim3((sh.rows + 15) / 16, K), dim3(256), s, mx_q8<16, 4, true>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
        } else {
            run("q8 LPR8 U3", 2e-2, [&](int l) { lk(false, dim3((sh.rows + 31) / 32, K), dim3(256), s, mx_q8<8, 3, false>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
            run("q8 LPR4 U6", 2e-2, [&](int l) { lk(false, dim3((sh.rows + 63) / 64, K), dim3(256), s, mx_q8<4, 6, false>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
            run("q8 LPR8 U3 PDL", 2e-2, [&](int l) { lk(true, dim3((sh.rows + 31) / 32, K), dim3(256), s, mx_q8<8, 3, true>, db + bper * l, ds + sper * l, dxq, dxd, dye, sh.rows, sh.cols, dids + l * K, sh.xdiv); });
        }
        CK(cudaFree(db)); CK(cudaFree(ds)); CK(cudaFree(dxa)); CK(cudaFree(dxq)); CK(cudaFree(dxd)); CK(cudaFree(dye));
    }
    // ---------------- layer chain: 12 kernels per layer x 48, weights distinct per layer
    {
        size_t qkv = 5120ull * 2048, o = 2048ull * 4096, rt = 128ull * 2048;
        bf16_t *wq, *wo, *wr; CK(cudaMalloc(&wq, qkv * 2 * L)); CK(cudaMalloc(&wo, o * 2 * L)); CK(cudaMalloc(&wr, rt * 2 * L));
        CK(cudaMemset(wq, 0x3c, qkv * 2 * L)); CK(cudaMemset(wo, 0x3c, o * 2 * L)); CK(cudaMemset(wr, 0x3c, rt * 2 * L));
        int nb1 = H / 32, nb2 = I / 32; size_t b1 = (size_t)E * 2 * I * nb1 * 16, b2 = (size_t)E * H * nb2 * 16;
        u8 *gb, *gs, *db2, *ds2; CK(cudaMalloc(&gb, b1 * LM)); CK(cudaMalloc(&gs, b1 / 16 * LM)); CK(cudaMalloc(&db2, b2 * LM)); CK(cudaMalloc(&ds2, b2 / 16 * LM));
        CK(cudaMemset(gb, 0x21, b1 * LM)); CK(cudaMemset(gs, 120, b1 / 16 * LM)); CK(cudaMemset(db2, 0x21, b2 * LM)); CK(cudaMemset(ds2, 120, b2 / 16 * LM));
        float *f1, *f2, *yq; bf16_t* xb; signed char* xq; float* xd;
        CK(cudaMalloc(&f1, 8 * 5120 * 4)); CK(cudaMalloc(&f2, 8 * 5120 * 4)); CK(cudaMalloc(&yq, 8 * 5120 * 4));
        CK(cudaMalloc(&xb, 8 * 4096 * 2)); CK(cudaMalloc(&xq, 8 * 4096)); CK(cudaMalloc(&xd, 8 * 128 * 4));
        CK(cudaMemset(f1, 0, 8 * 5120 * 4)); CK(cudaMemset(xb, 0, 8 * 4096 * 2));
        double bytes = L * ((qkv + o + rt) * 2.0 + K * (2.0 * I * H + (double)H * I) * 17 / 32);
        auto chain = [&](bool pdl, bool v1) {
            for (int l = 0; l < L; l++) {
                int m = l % LM;
                lk(pdl, dim3(1), dim3(1024), s, pdl ? to_bf16<true> : to_bf16<false>, f1, xb, 2048);           // rmsnorm
                if (v1) lk(pdl, dim3(640), dim3(256), s, pdl ? gemv_v1<8, true> : gemv_v1<8, false>, wq + qkv * l, xb, f2, 5120, 2048);
                else lk(false, dim3(640), dim3(256), s, bf16_gemv_bf16x_n1, wq + qkv * l, xb, f2, 5120, 2048, (const float*)nullptr);
                lk(pdl, dim3(40), dim3(32), s, pdl ? tiny<true> : tiny<false>, f2, f1, 5120);                   // rope + kv
                lk(pdl, dim3(32), dim3(128), s, pdl ? tiny<true> : tiny<false>, f1, f2, 4096);                  // attention split
                lk(pdl, dim3(32), dim3(128), s, pdl ? to_bf16<true> : to_bf16<false>, f2, xb, 4096);            // attention reduce
                if (v1) lk(pdl, dim3(256), dim3(256), s, pdl ? gemv_v1<16, true> : gemv_v1<16, false>, wo + o * l, xb, f1, 2048, 4096);
                else lk(false, dim3(256), dim3(256), s, bf16_gemv_bf16x_n1, wo + o * l, xb, f1, 2048, 4096, (const float*)nullptr);
                lk(pdl, dim3(1), dim3(1024), s, pdl ? to_bf16<true> : to_bf16<false>, f1, xb, 2048);           // rmsnorm
                if (v1) lk(pdl, dim3(16), dim3(256), s, pdl ? gemv_v1<8, true> : gemv_v1<8, false>, wr + rt * l, xb, f2, 128, 2048);
                else lk(false, dim3(16), dim3(256), s, bf16_gemv_bf16x_n1, wr + rt * l, xb, f2, 128, 2048, (const float*)nullptr);
                lk(pdl, dim3(1), dim3(128), s, pdl ? tiny<true> : tiny<false>, f2, f1, 128);                    // top-k
                if (v1) {
                    lk(pdl, dim3(8), dim3(256), s, quantize_q8<true>, xb, xq, xd, 2048);
                    lk(pdl, dim3(96, K), dim3(256), s, pdl ? mx_q8<16, 4, true> : mx_q8<16, 4, false>, gb + b1 * m, gs + b1 / 16 * m, xq, xd, yq, 2 * I, H, dids, K);
                    lk(pdl, dim3(K * 3), dim3(256), s, quantize_q8<true>, xb, xq, xd, K * I);                   // swiglu -> q8
                    lk(pdl, dim3(64, K), dim3(256), s, pdl ? mx_q8<8, 3, true> : mx_q8<8, 3, false>, db2 + b2 * m, ds2 + b2 / 16 * m, xq, xd, yq, H, I, dids, 1);
                } else {
                    lk(false, dim3(192, K), dim3(256), s, mxfp4_gemv_bf16x_n1, gb + b1 * m, gs + b1 / 16 * m, xb, yq, 2 * I, H, dids, K);
                    lk(false, dim3(K * 3), dim3(256), s, to_bf16<false>, yq, xb, K * I);                          // swiglu
                    lk(false, dim3(256, K), dim3(256), s, mxfp4_gemv_bf16x_n1, db2 + b2 * m, ds2 + b2 / 16 * m, xb, yq, H, I, dids, 1);
                }
            }
        };
        for (int v = 0; v < 2; v++)
            for (int pdl = 0; pdl < 2; pdl++) {
                if (!v && pdl) continue;
                float us = graph_us(s, [&] { chain(pdl, v); }, 1, 11);
                printf("chain 48 layers, %s%s: %.1f us per step, %.1f us per layer, weights %.0f MB -> %.0f GB/s\n",
                       v ? "v1 kernels" : "v0 kernels", pdl ? " + PDL" : "", us, us / L, bytes / 1e6, bytes / us / 1e3);
            }
    }
    CK(cudaGetLastError());
    printf("done\n");
    return 0;
}
