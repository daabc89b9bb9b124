// Dense bf16 GEMV: y f32 [n, rows] = x [n, cols] . W^T, W bf16 [rows, cols], n = 1..8.
// x is bf16 or f32; f32 inputs are rounded to bf16 as they are read, exactly as the cuBLAS
// GEMM (src/backend/cuda/gemm.rs) takes them for steps of 9+ rows: a row then gets the same
// products whichever path its step takes (decode vs DFlash verify), up to summation order.
// Entry points bf16_gemv_{bf16x,f32x}_n{1..8} (n compiled in).
// bias f32 [rows] or null is added to every output row.
// block 256 = 8 warps; each warp owns R rows (R = 2 when n >= 4, else 1), so a
// block covers 8*R rows; each x load serves all R rows. 16-byte weight loads
// when cols % 8 == 0, a scalar path otherwise.

// 8 activations rounded to bf16 precision (a no-op for bf16 inputs)
__device__ __forceinline__ void load8_bf16(const bf16_t* p, float* o) { load8(p, o); }
__device__ __forceinline__ void load8_bf16(const float* p, float* o) {
    load8(p, o);
#pragma unroll
    for (int e = 0; e < 8; e++) o[e] = bf2f(f2bf(o[e]));
}
// NoWait (common.cuh): ordinary launches wait (PDL) before the body, and preload nothing
// (registers: occupancy).
template <typename W, int R> struct GemvPre { static const int chunks = R == 1 ? 8 : 4; };
template <int R> struct GemvPre<NoWait, R> { static const int chunks = 0; };
// `wait()` is called once by every thread before x is read: the persistent step passes
// its dependency wait, so the first PRE 16-byte weight chunks of each lane's rows are
// already loaded (in registers) when the input becomes ready.
// NW warps per block (0: blockDim.x / 32).
template <typename TX, int N, int R, typename Wait = NoWait, bool ACC = false, int NW = 8>
__device__ void gemv_impl(const bf16_t* __restrict__ W, const TX* __restrict__ x, float* __restrict__ y,
                          int rows, int cols, const float* __restrict__ bias, int bx, Wait wait = Wait()) {
    constexpr int PRE = GemvPre<Wait, R>::chunks;
    const int lane = threadIdx.x & 31;
    const int row0 = (bx * (NW > 0 ? NW : (int)(blockDim.x >> 5)) + (threadIdx.x >> 5)) * R;
    const bf16_t* wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) wr[r] = W + (long long)min(row0 + r, rows - 1) * cols;  // clamped: never stored
    const bool vec = (cols & 7) == 0;
    const int c8 = cols / 8;
    uint4 pre[PRE > 0 ? PRE : 1][R];
#pragma unroll
    for (int p = 0; p < PRE; p++)
#pragma unroll
        for (int r = 0; r < R; r++)
            pre[p][r] = vec && row0 < rows && lane + 32 * p < c8 ? __ldg((const uint4*)(wr[r] + (lane + 32 * p) * 8))
                                                                 : make_uint4(0, 0, 0, 0);
    wait();
    if (row0 >= rows) return;
    float acc[R][N], y0[ACC ? R : 1][ACC ? N : 1];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < N; j++) acc[r][j] = 0.f;
    // ACC: the values added to are loaded now, not after the reduction (a dependent round trip)
    if (ACC && lane == 0)
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int j = 0; j < N; j++)
                y0[ACC ? r : 0][ACC ? j : 0] = row0 + r < rows ? y[(long long)j * rows + row0 + r] : 0.f;
    if (vec) {
        // the preloaded chunks first (the same order as the loop below)
#pragma unroll
        for (int p = 0; p < PRE; p++) {
            const int c = lane + 32 * p;
            if (c < c8) {
                float w[R][8];
#pragma unroll
                for (int r = 0; r < R; r++) unpack8(pre[p][r], w[r]);
#pragma unroll
                for (int j = 0; j < N; j++) {
                    float xv[8];
                    load8_bf16(x + (long long)j * cols + c * 8, xv);
#pragma unroll
                    for (int r = 0; r < R; r++)
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[r][j] += w[r][e] * xv[e];
                }
            }
        }
        // 16-byte weight chunks per lane in flight: 8 for one row per warp (a 4 KB row in
        // one round trip: on the H100 gpt-oss-20b b1 -2.9%, b4 -5.6%, Qwen3 b1 -0.7%),
        // 4 for two (8 made SmolLM2 b4 7.6% slower: registers)
        constexpr int GU = R == 1 ? 8 : 4;
#pragma unroll GU
        for (int c = lane + 32 * PRE; c < c8; c += 32) {
            float w[R][8];
#pragma unroll
            for (int r = 0; r < R; r++) unpack8(__ldg((const uint4*)(wr[r] + c * 8)), w[r]);
#pragma unroll
            for (int j = 0; j < N; j++) {
                float xv[8];
                load8_bf16(x + (long long)j * cols + c * 8, xv);
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][j] += w[r][e] * xv[e];
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
#pragma unroll
            for (int j = 0; j < N; j++) {
                float xv = bf2f(f2bf(to_f(x[(long long)j * cols + c])));
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][j] += bf2f(wr[r][c]) * xv;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < N; j++) {
            float v = warp_sum(acc[r][j]);
            if (lane == 0 && row0 + r < rows) {
                const float o = v + (bias ? bias[row0 + r] : 0.f);
                y[(long long)j * rows + row0 + r] = ACC ? y0[ACC ? r : 0][ACC ? j : 0] + o : o;
            }
        }
}
// The weights never depend on the previous kernel: each warp asks L2 for its rows
// before waiting on it (PDL), so the weight stream overlaps the predecessor's tail.
template <int R>
__device__ __forceinline__ void gemv_pdl_entry(const bf16_t* W, int rows, int cols) {
    PDL_PRE();
    const int row0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
    if (row0 < rows) prefetch_l2_warp(W + (long long)row0 * cols, (long long)min(R, rows - row0) * cols * 2);
    PDL_POST();
}
// -DGEMV_PRELOAD: instead of the L2 prefetch, each lane loads its first weight chunks into
// registers before the PDL wait (gemv_impl's Wait = PdlWait), as the persistent step does.
#ifdef GEMV_PRELOAD
#define GEMV_CALL(TX, NN, RR, ACC) \
    PDL_PRE(); gemv_impl<TX, NN, RR, PdlWait, ACC>(W, x, y, rows, cols, bias, blockIdx.x, PdlWait());
#else
#define GEMV_CALL(TX, NN, RR, ACC) \
    gemv_pdl_entry<RR>(W, rows, cols); gemv_impl<TX, NN, RR, NoWait, ACC>(W, x, y, rows, cols, bias, blockIdx.x);
#endif
#define GEMV_ENTRY(NN, RR) \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_bf16x_n##NN(const bf16_t* W, const bf16_t* x, float* y, int rows, int cols, \
        const float* bias) { \
    GEMV_CALL(bf16_t, NN, RR, false) } \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_f32x_n##NN(const bf16_t* W, const float* x, float* y, int rows, int cols, \
        const float* bias) { \
    GEMV_CALL(float, NN, RR, false) }
GEMV_ENTRY(1, 1) GEMV_ENTRY(2, 1) GEMV_ENTRY(3, 1) GEMV_ENTRY(4, 2) GEMV_ENTRY(5, 2) GEMV_ENTRY(6, 2) GEMV_ENTRY(7, 2) GEMV_ENTRY(8, 2)
// bf16_gemv_f32x_acc_n*: y += x . W^T (+ bias), y read and written by the owner of the row.
// The o-projection of a decode step adds itself to the residual stream this way, so the
// norm after it has nothing to add (router_norm_q8 normalises the residual in every block).
#define GEMV_ACC_ENTRY(NN, RR) \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_f32x_acc_n##NN(const bf16_t* W, const float* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_CALL(float, NN, RR, true) } \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_bf16x_acc_n##NN(const bf16_t* W, const bf16_t* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_CALL(bf16_t, NN, RR, true) }
GEMV_ACC_ENTRY(1, 1) GEMV_ACC_ENTRY(2, 1) GEMV_ACC_ENTRY(3, 1) GEMV_ACC_ENTRY(4, 2) GEMV_ACC_ENTRY(5, 2) GEMV_ACC_ENTRY(6, 2)
GEMV_ACC_ENTRY(7, 2) GEMV_ACC_ENTRY(8, 2)

// Split-K GEMV for one input row (decode at batch 1) on matrices with few rows: KS warps
// of a block share an output row, each summing every KS-th 512-byte segment of it, and
// their partial sums meet in shared memory in warp order (deterministic). With one warp
// per row, Qwen3's o_proj (2048 rows) puts ~16 warps on an SM and a router (128 rows) 128
// warps on the whole GPU: too few loads in flight to stream the weights. cols % 8 == 0.
// Entry points bf16_gemv_k{2,4,8}_{bf16x,f32x}; the host picks KS (CudaContext::gemv_split).
// 16-byte chunks per lane in flight (KAIROS_NVRTC_DEFINES=GEMV_SPLIT_UNROLL=8 for A/B: on the
// H100 8 changed nothing for the Qwen3 / gpt-oss shapes and made SmolLM2 b1 1% slower)
#ifndef GEMV_SPLIT_UNROLL
#define GEMV_SPLIT_UNROLL 4
#endif
// Wait: as gemv_impl's (PdlWait: the first SPLIT_PRE chunks of each lane are loaded before it).
#ifndef GEMV_SPLIT_PRE
#define GEMV_SPLIT_PRE 4
#endif
// acc += the 8 weights of 16-byte chunk c (in wq) . x's chunk c
template <typename TX>
__device__ __forceinline__ void split_chunk(uint4 wq, const TX* __restrict__ x, int c, float& acc) {
    float w[8], xv[8];
    unpack8(wq, w);
    load8_bf16(x + c * 8, xv);
#pragma unroll
    for (int e = 0; e < 8; e++) acc += w[e] * xv[e];
}
template <typename TX, int KS, bool ACC = false, typename Wait = NoWait, int NW = 8>
__device__ void gemv_split_impl(const bf16_t* __restrict__ W, const TX* __restrict__ x, float* __restrict__ y,
                                int rows, int cols, const float* __restrict__ bias, int bx, Wait wait = Wait()) {
    constexpr int PRE = GemvPre<Wait, 1>::chunks > 0 ? GEMV_SPLIT_PRE : 0;
    __shared__ float part[NW > 0 ? NW : 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = bx * ((NW > 0 ? NW : (int)(blockDim.x >> 5)) / KS) + warp / KS, k = warp % KS;
    const int c8 = cols / 8;
    const bf16_t* wr = W + (long long)min(row, rows - 1) * cols;
    uint4 pre[PRE > 0 ? PRE : 1];
#pragma unroll
    for (int p = 0; p < PRE; p++) {
        const int c = k * 32 + lane + p * 32 * KS;
        pre[p] = row < rows && c < c8 ? __ldg((const uint4*)(wr + c * 8)) : make_uint4(0, 0, 0, 0);
    }
    wait();
    float acc = 0.f;
    // ACC: the value added to is loaded now, not after the reduction
    const float y0 = ACC && k == 0 && lane == 0 && row < rows ? y[row] : 0.f;
    if (row < rows) {
        // the preloaded chunks first, in the loop's order
#pragma unroll
        for (int p = 0; p < PRE; p++) {
            const int c = k * 32 + lane + p * 32 * KS;
            if (c < c8) split_chunk(pre[p], x, c, acc);
        }
        UNROLL_BY(GEMV_SPLIT_UNROLL)
        for (int c = k * 32 + lane + PRE * 32 * KS; c < c8; c += 32 * KS) split_chunk(__ldg((const uint4*)(wr + c * 8)), x, c, acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (k == 0 && lane == 0 && row < rows) {
        float v = 0.f;
#pragma unroll
        for (int i = 0; i < KS; i++) v += part[warp + i];
        const float o = v + (bias ? bias[row] : 0.f);
        y[row] = ACC ? y0 + o : o;
    }
}
// As gemv_pdl_entry: each warp asks L2 for its share of its row before the PDL wait.
template <int KS>
__device__ __forceinline__ void gemv_split_pdl_entry(const bf16_t* W, int rows, int cols) {
    PDL_PRE();
    const int warp = threadIdx.x >> 5, row = blockIdx.x * (8 / KS) + warp / KS, k = warp % KS;
    const long long bytes = (long long)cols * 2 / KS;
    if (row < rows) prefetch_l2_warp((const char*)(W + (long long)row * cols) + k * bytes, bytes);
    PDL_POST();
}
#ifdef GEMV_PRELOAD
#define GEMV_SPLIT_CALL(TX, KS, ACC) PDL_PRE(); gemv_split_impl<TX, KS, ACC, PdlWait>(W, x, y, rows, cols, bias, blockIdx.x, PdlWait());
#else
#define GEMV_SPLIT_CALL(TX, KS, ACC) gemv_split_pdl_entry<KS>(W, rows, cols); gemv_split_impl<TX, KS, ACC>(W, x, y, rows, cols, bias, blockIdx.x);
#endif
#define GEMV_SPLIT_ENTRY(KS) \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_k##KS##_bf16x(const bf16_t* W, const bf16_t* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_SPLIT_CALL(bf16_t, KS, false) } \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_k##KS##_f32x(const bf16_t* W, const float* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_SPLIT_CALL(float, KS, false) }
GEMV_SPLIT_ENTRY(2) GEMV_SPLIT_ENTRY(4) GEMV_SPLIT_ENTRY(8)
#define GEMV_SPLIT_ACC_ENTRY(KS) \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_k##KS##_f32x_acc(const bf16_t* W, const float* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_SPLIT_CALL(float, KS, true) } \
extern "C" __global__ void __launch_bounds__(256) bf16_gemv_k##KS##_bf16x_acc(const bf16_t* W, const bf16_t* x, float* y, int rows, \
        int cols, const float* bias) { \
    GEMV_SPLIT_CALL(bf16_t, KS, true) }
GEMV_SPLIT_ACC_ENTRY(2) GEMV_SPLIT_ACC_ENTRY(4) GEMV_SPLIT_ACC_ENTRY(8)

// ---- One-row GEMVs that normalise their input themselves (the decode fold) ----
// x = bf16(rmsnorm(residual) * ln) is computed by every block, into shared memory, right after
// the PDL wait (the weights' first chunks are already in registers): the residual is complete
// when the kernel before (the MoE down GEMV with its combine, or an accumulating down / o-proj
// GEMV) ends, so no rmsnorm launch sits between them. The sum of squares runs in the order of
// rms_row / rms_moe_row in a block of 1024 threads (the separate launch at < 64 rows), so the
// results equal the separate launches' bit for bit. cols % 8 == 0, cols <= GEMV_NORM_MAX;
// block 256 or 512 (warps per row KS, rows per block blockDim / 32 / KS).
#define GEMV_NORM_MAX 8192
// blocks of 512 threads per SM the registers are sized for (2: 54 registers, no spill; 3: 40)
#ifndef GEMV_NORM_MINB
#define GEMV_NORM_MINB 2
#endif
struct sbf16_t { bf16_t v; };  // an activation in shared memory: plain loads, never __ldg
__device__ __forceinline__ void load8_bf16(const sbf16_t* p, float* o) { unpack8(*(const uint4*)p, o); }
__device__ __forceinline__ float to_f(sbf16_t v) { return bf2f(v.v); }
struct NormWait {
    const float* x;
    const bf16_t* ln;
    bf16_t* xs;
    int hidden;
    float eps;
    // Nothing is held in registers across the barriers (the first version kept the row and
    // the norm weights there: 88 registers, one 512-thread block per SM); the second pass
    // reads the row again, from L1.
    __device__ __forceinline__ void operator()() const {
        __shared__ float sh[33];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        const int n8 = hidden / 8, virt = 1024 / blockDim.x;  // virtual 1024-thread block
        PDL_POST();
        // thread i plays virtual threads i + j * blockDim.x (n8 <= 1024: one chunk each),
        // of virtual warp (warp + j * nw)
        for (int j = 0; j < virt; j++) {
            const int i8 = threadIdx.x + j * blockDim.x;
            float ss = 0.f;
            if (i8 < n8) {
                float v[8];
                load8(x + i8 * 8, v);
#pragma unroll
                for (int e = 0; e < 8; e++) ss += v[e] * v[e];
            }
            ss = warp_sum(ss);
            if (lane == 0) sh[warp + j * nw] = ss;
        }
        __syncthreads();
        if (warp == 0) {
            const float t = warp_sum(sh[lane]);
            if (lane == 0) sh[32] = t;
        }
        __syncthreads();
        const float inv = rsqrtf(sh[32] / (float)hidden + eps);
        for (int i8 = threadIdx.x; i8 < n8; i8 += blockDim.x) {
            float v[8], w[8], o[8];
            load8(x + i8 * 8, v);
            unpack8(__ldg((const uint4*)(ln + i8 * 8)), w);
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = v[e] * inv * w[e];
            st8(xs + i8 * 8, o);
        }
        __syncthreads();
    }
};
#define GEMV_NORM_ARGS const bf16_t* W, const float* x, float* y, int rows, int cols, const float* bias, const bf16_t* ln, float eps
// The grid is at most a few blocks per SM (the host sizes it), each normalising the row once
// and then taking row tiles bx = blockIdx.x, + gridDim.x, ...: one block per row tile (up to
// ten waves of them for Qwen3's q|k|v) measured 18% slower per Qwen3-30B-A3B step on the H100.
extern "C" __global__ void __launch_bounds__(512, GEMV_NORM_MINB) bf16_gemv_norm_n1(GEMV_NORM_ARGS) {
    __shared__ __align__(16) bf16_t xs[GEMV_NORM_MAX];
    PDL_PRE();
    const int tiles = (rows + (blockDim.x >> 5) - 1) / (blockDim.x >> 5);
    gemv_impl<sbf16_t, 1, 1, NormWait, false, 0>(W, (const sbf16_t*)xs, y, rows, cols, bias, blockIdx.x,
                                                 NormWait{x, ln, xs, cols, eps});
    for (int bx = blockIdx.x + gridDim.x; bx < tiles; bx += gridDim.x)
        gemv_impl<sbf16_t, 1, 1, NoWait, false, 0>(W, (const sbf16_t*)xs, y, rows, cols, bias, bx);
}
#define GEMV_NORM_ENTRY(KS) \
extern "C" __global__ void __launch_bounds__(512, GEMV_NORM_MINB) bf16_gemv_norm_k##KS(GEMV_NORM_ARGS) { \
    __shared__ __align__(16) bf16_t xs[GEMV_NORM_MAX]; \
    PDL_PRE(); \
    const int tiles = (rows + (blockDim.x >> 5) / KS - 1) / ((blockDim.x >> 5) / KS); \
    gemv_split_impl<sbf16_t, KS, false, NormWait, 0>(W, (const sbf16_t*)xs, y, rows, cols, bias, blockIdx.x, \
                                                     NormWait{x, ln, xs, cols, eps}); \
    for (int bx = blockIdx.x + gridDim.x; bx < tiles; bx += gridDim.x) { \
        __syncthreads(); /* the tile before has read its partial sums */ \
        gemv_split_impl<sbf16_t, KS, false, NoWait, 0>(W, (const sbf16_t*)xs, y, rows, cols, bias, bx); \
    } }
GEMV_NORM_ENTRY(2) GEMV_NORM_ENTRY(4) GEMV_NORM_ENTRY(8)
