// Decode attention (one new query token per sequence), GQA, split-K flash decoding.
// q       f32, sequence s's heads at q + s * q_stride: [n_q, D] (after RoPE); q_stride =
//         n_q*D for a packed q, (n_q + 2*n_kv)*D to read q straight out of the qkv buffer
// k/v     bf16 caches [slot][layer][kv_head][pos][D]
// slots   i32 [n_seq] cache slot of each sequence
// seq_lens i32 [n_seq] number of valid positions (the new token's k/v already written)
// window  > 0: attend only to positions >= len - window (sliding window); 0: all
// sinks   f32 [n_q] or null: a learned logit per head that joins the softmax denominator
// Pass 1 (attention_split_d{64,128,256}): grid (n_splits, n_kv * ceil(G/8), n_seq), block 128.
//   Each block: one kv head, up to 8 of its query heads, one chunk of positions.
//   Writes part_acc [n_seq, n_q, n_splits, D] (unnormalised) and part_ml [n_seq, n_q, n_splits, 2].
// Pass 2 (attention_reduce): grid (n_q, n_seq), block 128: out f32 [n_seq, n_q, D].
#define ATT_WARPS 4
#define MAXG 8

template <int EPL> __device__ __forceinline__ void ld_row(const bf16_t* p, float* o);
template <> __device__ __forceinline__ void ld_row<2>(const bf16_t* p, float* o) {
    u32 v = *(const u32*)p;
    o[0] = __uint_as_float(v << 16); o[1] = __uint_as_float(v & 0xffff0000u);
}
template <> __device__ __forceinline__ void ld_row<4>(const bf16_t* p, float* o) {
    uint2 v = *(const uint2*)p;
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
}
template <> __device__ __forceinline__ void ld_row<8>(const bf16_t* p, float* o) { unpack8(*(const uint4*)p, o); }

// Lane l holds dims [l*EPL, (l+1)*EPL) of q, k, v and the output (EPL = D/32);
// scores are warp-reduced. (A layout with D/8 lanes per position and 16-byte
// loads measured 10-30% slower on H100: 195 registers. See bench/results.)
template <int EPL>
__device__ void attn_split_impl(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                                const bf16_t* __restrict__ vc, const int* __restrict__ slots,
                                const int* __restrict__ seq_lens, float* __restrict__ part_acc,
                                float* __restrict__ part_ml, int n_q, int n_kv, int layer, int n_layers,
                                int max_pos, float scale, int window, int n_splits, long long q_stride) {
    constexpr int D = EPL * 32;
    constexpr int ATT_PU = EPL >= 8 ? 2 : 4;
    __shared__ float sm_m[ATT_WARPS][MAXG], sm_l[ATT_WARPS][MAXG];
    __shared__ float sm_acc[ATT_WARPS][MAXG][D];
    const int G = n_q / n_kv;
    const int groups = (G + MAXG - 1) / MAXG;
    const int split = blockIdx.x, kvh = blockIdx.y / groups, grp = blockIdx.y % groups, s = blockIdx.z;
    const int g0 = kvh * G + grp * MAXG;
    const int ng = min(MAXG, G - grp * MAXG);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int len = min(seq_lens[s], max_pos);
    int slot = slots[s];
    int lo = window > 0 ? max(0, len - window) : 0;
    int range = max(0, len - lo);
    // splits actually used: at least 32 positions each (the grid is sized for the longest
    // context a graph may see; short sequences leave the rest idle). attention_reduce
    // derives the same count.
    const int eff = min(n_splits, max(1, (range + 31) / 32));
    if (split >= eff) return;
    int chunk = (range + eff - 1) / eff;
    int start = lo + split * chunk, end = min(len, start + chunk);

    float qr[MAXG][EPL], acc[MAXG][EPL], m[MAXG], l[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = NEG_INF; l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            acc[g][e] = 0.f;
            qr[g][e] = g < ng ? q[(long long)s * q_stride + (long long)(g0 + g) * D + lane * EPL + e] * scale : 0.f;
        }
    }
    const long long base = (((long long)slot * n_layers + layer) * n_kv + kvh) * (long long)max_pos * D;
    // each warp takes ATT_PU consecutive positions per step: all their K/V loads
    // are issued before the first use, and one softmax correction covers them.
    for (int p0 = start + warp * ATT_PU; p0 < end; p0 += ATT_WARPS * ATT_PU) {
        float kf[ATT_PU][EPL], vf[ATT_PU][EPL];
#pragma unroll
        for (int u = 0; u < ATT_PU; u++) {
            int p = min(p0 + u, end - 1);  // clamp: loads stay in bounds, masked below
            ld_row<EPL>(kc + base + (long long)p * D + lane * EPL, kf[u]);
            ld_row<EPL>(vc + base + (long long)p * D + lane * EPL, vf[u]);
        }
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < ng) {
                float sc[ATT_PU];
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    float d = 0.f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) d += qr[g][e] * kf[u][e];
                    sc[u] = d;
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                    for (int u = 0; u < ATT_PU; u++) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
                float mn = m[g];
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    if (p0 + u >= end) sc[u] = NEG_INF;
                    mn = fmaxf(mn, sc[u]);
                }
                float corr = __expf(m[g] - mn);
                l[g] *= corr;
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[g][e] *= corr;
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    float pr = __expf(sc[u] - mn);
                    l[g] += pr;
#pragma unroll
                    for (int e = 0; e < EPL; e++) acc[g][e] += pr * vf[u][e];
                }
                m[g] = mn;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
#pragma unroll
        for (int e = 0; e < EPL; e++) sm_acc[warp][g][lane * EPL + e] = acc[g][e];
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) {
        int g = idx / D, d = idx % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w][g]);
        float L = 0.f, o = 0.f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) {
                float mw = sm_m[w][g];
                if (mw != NEG_INF) {
                    float f = __expf(mw - M);
                    L += sm_l[w][g] * f;
                    o += sm_acc[w][g][d] * f;
                }
            }
        }
        long long pi = ((long long)s * n_q + g0 + g) * n_splits + split;
        part_acc[pi * D + d] = o;
        if (d == 0) { part_ml[pi * 2] = M; part_ml[pi * 2 + 1] = L; }
    }
}

#define ATT_ARGS const float* q, const bf16_t* kc, const bf16_t* vc, const int* slots, const int* seq_lens, \
    float* part_acc, float* part_ml, int n_q, int n_kv, int layer, int n_layers, int max_pos, float scale, int window, int n_splits, \
    long long q_stride
#define ATT_PASS q, kc, vc, slots, seq_lens, part_acc, part_ml, n_q, n_kv, layer, n_layers, max_pos, scale, window, n_splits, q_stride
extern "C" __global__ void __launch_bounds__(128) attention_split_d64(ATT_ARGS) { PDL_ENTRY(); attn_split_impl<2>(ATT_PASS); }
extern "C" __global__ void __launch_bounds__(128) attention_split_d128(ATT_ARGS) { PDL_ENTRY(); attn_split_impl<4>(ATT_PASS); }
extern "C" __global__ void __launch_bounds__(128) attention_split_d256(ATT_ARGS) { PDL_ENTRY(); attn_split_impl<8>(ATT_PASS); }

// Pass 2: combine the splits. Split weights exp(m_i - M) go to shared memory once;
// the per-dimension sums then stream the partial outputs with loads in flight.
#define ATT_MAX_SPLITS 1024
extern "C" __global__ void __launch_bounds__(128) attention_reduce(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                            const float* __restrict__ sinks, float* __restrict__ out,
                                            int n_q, int n_splits_grid, int D,
                                            const int* __restrict__ seq_lens, int max_pos, int window) { PDL_ENTRY();
    __shared__ float sw[ATT_MAX_SPLITS];
    __shared__ float sh[33];
    int h = blockIdx.x, s = blockIdx.y;
    long long pb = ((long long)s * n_q + h) * n_splits_grid;
    // the splits pass 1 used (same rule as attn_split_impl)
    int len = min(seq_lens[s], max_pos);
    int lo = window > 0 ? max(0, len - window) : 0;
    int range = max(0, len - lo);
    const int n_splits = min(n_splits_grid, max(1, (range + 31) / 32));
    float M = NEG_INF;
    for (int i = threadIdx.x; i < n_splits; i += blockDim.x) M = fmaxf(M, part_ml[(pb + i) * 2]);
    M = warp_max(M);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = M;
    __syncthreads();
    M = NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) M = fmaxf(M, sh[w]);
    if (sinks) M = fmaxf(M, sinks[h]);
    __syncthreads();
    float dl = 0.f;
    for (int i = threadIdx.x; i < n_splits; i += blockDim.x) {
        float mi = part_ml[(pb + i) * 2];
        float w = (mi == NEG_INF) ? 0.f : __expf(mi - M);
        sw[i] = w;
        dl += w * part_ml[(pb + i) * 2 + 1];
    }
    float denom = block_sum(dl, sh);  // syncs: sw is visible after this
    if (sinks && M != NEG_INF) denom += __expf(sinks[h] - M);
    float inv = denom > 0.f ? 1.f / denom : 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
#pragma unroll 8
        for (int i = 0; i < n_splits; i++) o += part_acc[(pb + i) * D + d] * sw[i];
        out[((long long)s * n_q + h) * D + d] = o * inv;
    }
}
