// One-row bf16 GEMVs whose weights stream through shared memory by bulk asynchronous
// copies (cp.async.bulk: Hopper's TMA engine without a tensor map), the first ones issued
// before the PDL wait. One block per SM owns a contiguous tile of rows and keeps up to
// ~200 KB of it in flight with a handful of instructions. For a large weight streamed once
// per step (an LM head) that is the copy bandwidth: Qwen3's 622 MB head in 205 us against
// 222 us for the register-path GEMV (H100, session 14). For the small per-layer weights it
// lost (+3% per Qwen3 step): a block that needs ~160 KB of shared memory cannot share an SM
// with the kernel before it, so nothing overlaps. The host sends only large weights here
// (CudaContext::gemv_bulk_min_bytes, 128 MiB).
//   y f32 [rows] (= or += with acc) x [cols] . W^T (+ bias f32 [rows] or null)
// W bf16 [rows, cols], cols % 8 == 0, cols <= 256 * PMAX; x bf16 or f32 (rounded to bf16
// as it is read, as every GEMV here). Block b owns rows [b * tile, min(rows, (b+1) * tile));
// the tile is cut into chunks of 8 rows (one per warp), held in a ring of `stages` chunk
// buffers in dynamic shared memory (stages * 8 * cols * 2 bytes); refills wait until every
// warp has read the buffer. Each lane sums columns lane*8 + 256p in increasing p, then the
// warp sums (warp_sum): the order of gemv_impl with one warp per row, so the results equal
// bf16_gemv_*_n1's (not the split-K kernels') bit for bit.
// grid ceil(rows / tile), block 256, dynamic shared memory stages * 8 * cols * 2 (the host
// sizes tile and stages: CudaContext::gemv_bulk_plan).

// 8 activations rounded to bf16, packed as in a weight chunk
__device__ __forceinline__ uint4 pack8_bf16(const float* v) {
    uint4 o;
    o.x = (u32)f2bf(v[0]) | ((u32)f2bf(v[1]) << 16);
    o.y = (u32)f2bf(v[2]) | ((u32)f2bf(v[3]) << 16);
    o.z = (u32)f2bf(v[4]) | ((u32)f2bf(v[5]) << 16);
    o.w = (u32)f2bf(v[6]) | ((u32)f2bf(v[7]) << 16);
    return o;
}
__device__ __forceinline__ uint4 load_x8(const bf16_t* p) { return LDG_ACT((const uint4*)p); }
__device__ __forceinline__ uint4 load_x8(const float* p) {
    float v[8];
    load8(p, v);
    return pack8_bf16(v);
}
// acc += the 8 products of a weight chunk and an activation chunk, in element order
__device__ __forceinline__ float dot8_acc(uint4 wq, uint4 xq, float acc) {
    float w[8], x[8];
    unpack8(wq, w);
    unpack8(xq, x);
#pragma unroll
    for (int e = 0; e < 8; e++) acc += w[e] * x[e];
    return acc;
}

#define BULK_MAX_STAGES 32
// rows per warp whose bias and accumulated value are loaded before the loop
#define BULK_PRE 8
// widest row (columns): 16 KB of static shared memory for the activation
#define BULK_X_MAX 8192
template <typename TX, int PMAX>
__device__ void gemv_bulk_impl(const bf16_t* __restrict__ W, const TX* __restrict__ x, float* __restrict__ y, int rows,
                               int cols, const float* __restrict__ bias, int acc_mode, int tile, int stages) {
    extern __shared__ __align__(128) unsigned char bulk_smem[];
    __shared__ __align__(8) unsigned long long bar[BULK_MAX_STAGES];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = blockIdx.x * tile, nrows = min(tile, rows - row0);
    const int nchunks = (nrows + 7) / 8, c8 = cols / 8;
    const u32 row_bytes = (u32)cols * 2, chunk_bytes = 8 * row_bytes;
    const char* wt = (const char*)(W + (long long)row0 * cols);
    auto issue = [&](int i) {  // chunk i of the tile into its ring buffer (thread 0)
        const u32 bytes = (u32)min(8, nrows - i * 8) * row_bytes;
        unsigned long long* b = &bar[i % stages];
        mbar_expect_tx(b, bytes);
        bulk_copy_g2s(bulk_smem + (size_t)(i % stages) * chunk_bytes, wt + (size_t)i * chunk_bytes, bytes, b);
    };
    // the weights never depend on the kernel before: barriers up and copies out first
    PDL_PRE();
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; s++) mbar_init(&bar[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int i = 0; i < min(stages, nchunks); i++) issue(i);
    }
    // the biases of this warp's first BULK_PRE rows (weights too) before the wait; the values
    // added to (acc) right after it: no dependent round trip at the end of a row
    float b0[BULK_PRE], y0[BULK_PRE];
#pragma unroll
    for (int j = 0; j < BULK_PRE; j++) {
        const int r = j * 8 + warp;
        b0[j] = bias && lane == 0 && r < nrows ? bias[row0 + r] : 0.f;
    }
    __syncthreads();  // the barriers are initialised before anyone waits on them
    PDL_POST();
#pragma unroll
    for (int j = 0; j < BULK_PRE; j++) {
        const int r = j * 8 + warp;
        y0[j] = acc_mode && lane == 0 && r < nrows ? y[row0 + r] : 0.f;
    }
    // the activation in shared memory: in registers (64 per thread at 4096 columns) it kept
    // the block from sharing an SM with the kernel before (H100, session 14: +12% per
    // Qwen3-30B-A3B step with every one-row GEMV here, +3% with the activation in shared memory)
    __shared__ uint4 xs[BULK_X_MAX / 8];
    for (int c = threadIdx.x; c < c8; c += blockDim.x) xs[c] = load_x8(x + c * 8);
    __syncthreads();
    for (int i = 0; i < nchunks; i++) {
        const int r = i * 8 + warp, s = i % stages;
        mbar_wait(&bar[s], (u32)(i / stages) & 1u);
        if (r < nrows) {
            const uint4* wr = (const uint4*)(bulk_smem + (size_t)s * chunk_bytes + (size_t)warp * row_bytes);
            float acc = 0.f;
#pragma unroll
            for (int p = 0; p < PMAX; p++) {
                const int c = lane + 32 * p;
                if (c < c8) acc = dot8_acc(wr[c], xs[c], acc);
            }
            acc = warp_sum(acc);
            if (lane == 0) {
                float bv = 0.f, yv = 0.f;  // chunk i's preloaded values (registers: unrolled pick)
#pragma unroll
                for (int j = 0; j < BULK_PRE; j++)
                    if (i == j) { bv = b0[j]; yv = y0[j]; }
                if (i >= BULK_PRE) {
                    bv = bias ? bias[row0 + r] : 0.f;
                    yv = acc_mode ? y[row0 + r] : 0.f;
                }
                const float o = acc + bv;
                y[row0 + r] = acc_mode ? yv + o : o;
            }
        }
        if (i + stages < nchunks) {
            __syncthreads();  // every warp has read buffer s
            if (threadIdx.x == 0) {
                // the buffer was read through the generic proxy; the copy writes through the async one
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                issue(i + stages);
            }
        }
    }
}
#define GEMV_BULK_ENTRY(P) \
extern "C" __global__ void __launch_bounds__(256, 1) bf16_gemv_bulk_bf16x_p##P(const bf16_t* W, const bf16_t* x, float* y, \
        int rows, int cols, const float* bias, int acc, int tile, int stages) { \
    gemv_bulk_impl<bf16_t, P>(W, x, y, rows, cols, bias, acc, tile, stages); } \
extern "C" __global__ void __launch_bounds__(256, 1) bf16_gemv_bulk_f32x_p##P(const bf16_t* W, const float* x, float* y, \
        int rows, int cols, const float* bias, int acc, int tile, int stages) { \
    gemv_bulk_impl<float, P>(W, x, y, rows, cols, bias, acc, tile, stages); }
GEMV_BULK_ENTRY(4) GEMV_BULK_ENTRY(8) GEMV_BULK_ENTRY(16) GEMV_BULK_ENTRY(32)
