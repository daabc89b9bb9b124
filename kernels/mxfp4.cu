// W4A16 GEMV with gpt-oss MXFP4 weights.
// blocks u8 [E?][rows, cols/32, 16] (low nibble = even element), E2M1 with sign bit 3
// scales u8 [E?][rows, cols/32] E8M0: 2^(s-127)
// Dense (mxfp4_gemv_{bf16x,f32x}_n{1..8}, expert_ids == null, grid.y = 1):
//   y f32 [n, rows] = x [n, cols] . W^T
// MoE (the _n1 entry, expert_ids != null): grid.y = n_assign; for assignment a:
//   e = expert_ids[a]; y[a, :] = W_e . x[a / x_div, :]   (weights [E, rows, ...])
// block 256 = 8 warps; each warp owns R rows (R = 2 when n >= 4, else 1), so a
// block covers 8*R rows. Lane = 4*bi + q: one 4-byte quarter (8 elements) of
// 32-element block bi of the current 8-block stride; x is loaded once per lane
// and used for all R rows. Dequantize in registers (E2M1 table in shared memory).

__device__ __forceinline__ float e8m0(u32 s) {
    return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23);
}

template <typename TX, int N, int R>
__device__ void mxfp4_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
                           const TX* __restrict__ x, float* __restrict__ y, int rows, int cols,
                           const int* __restrict__ expert_ids, int x_div) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) {
        u32 i = threadIdx.x & 7;
        // E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
        float mag = i < 2 ? 0.5f * i : (float)(1u << ((i >> 1) - 1)) * (1.f + 0.5f * (i & 1));
        lut[threadIdx.x] = (threadIdx.x & 8) ? -mag : mag;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, q = lane & 3;
    const int row0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
    const int nb = cols / 32;
    if (expert_ids) {
        int a = blockIdx.y;
        long long e = expert_ids[a];
        if (e < 0) {  // expert held by another rank (expert parallel): contributes zeros
            if (lane == 0)
                for (int r = 0; r < R; r++)
                    if (row0 + r < rows) y[(long long)a * rows + row0 + r] = 0.f;
            return;
        }
        blocks += e * rows * (long long)nb * 16;
        scales += e * rows * (long long)nb;
        x += (long long)(a / x_div) * cols;
        y += (long long)a * rows;
    }
    if (row0 >= rows) return;
    const u8* wrow[R];
    const u8* srow[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        int rr = min(row0 + r, rows - 1);  // clamp: duplicate work, never stored
        wrow[r] = blocks + (long long)rr * nb * 16;
        srow[r] = scales + (long long)rr * nb;
    }
    float acc[R][N];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < N; j++) acc[r][j] = 0.f;
    // all loads of up to 8 steps in flight for small n; 4 for larger n (registers)
    constexpr int UNR = N <= 2 ? 8 : 4;
#pragma unroll UNR
    for (int b = lane >> 2; b < nb; b += 8) {
        u32 wq[R];
        float sc[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            wq[r] = __ldg((const u32*)(wrow[r] + b * 16 + q * 4));
            sc[r] = e8m0(__ldg(srow[r] + b));
        }
        float w[R][8];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int k = 0; k < 4; k++) {
                u32 byte = (wq[r] >> (8 * k)) & 0xffu;
                w[r][2 * k] = lut[byte & 15u];
                w[r][2 * k + 1] = lut[byte >> 4];
            }
#pragma unroll
        for (int j = 0; j < N; j++) {
            float xv[8];
            load8(x + (long long)j * cols + b * 32 + q * 8, xv);
#pragma unroll
            for (int r = 0; r < R; r++) {
                float part = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) part += w[r][e] * xv[e];
                acc[r][j] += part * sc[r];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < N; j++) {
            float v = warp_sum(acc[r][j]);
            if (lane == 0 && row0 + r < rows) y[(long long)j * rows + row0 + r] = v;
        }
}
#define MX_ENTRY1(PFX, NN, RR) \
extern "C" __global__ void __launch_bounds__(256) PFX##_gemv_bf16x_n##NN(const u8* blocks, const u8* scales, const bf16_t* x, \
        float* y, int rows, int cols, const int* expert_ids, int x_div) { PDL_ENTRY(); \
    mxfp4_impl<bf16_t, NN, RR>(blocks, scales, x, y, rows, cols, expert_ids, x_div); } \
extern "C" __global__ void __launch_bounds__(256) PFX##_gemv_f32x_n##NN(const u8* blocks, const u8* scales, const float* x, \
        float* y, int rows, int cols, const int* expert_ids, int x_div) { PDL_ENTRY(); \
    mxfp4_impl<float, NN, RR>(blocks, scales, x, y, rows, cols, expert_ids, x_div); }
// (A variant decoding E2M1 with bit arithmetic instead of the shared-memory table
// measured up to 12% slower on most H100 shapes: see bench/results/cuda_kernels_h100.md.)
#define MX_ENTRY(NN, RR) MX_ENTRY1(mxfp4, NN, RR)
MX_ENTRY(1, 1) MX_ENTRY(2, 1) MX_ENTRY(3, 1) MX_ENTRY(4, 2) MX_ENTRY(5, 2) MX_ENTRY(6, 2) MX_ENTRY(7, 2) MX_ENTRY(8, 2)
