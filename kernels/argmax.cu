// argmax: logits f32 [n, V] -> ids i32 [n] (greedy; ties: lowest index; NaN ignored).
// Two passes over a u64 scratch [n, parts] of keys (orderable float bits << 32 | ~index):
// argmax_partial grid (parts, n), block 256; argmax_final grid (n), block 32.
// argmax_partial_masked takes m of the rows (rows i32 [m], the logits row of each) and reads
// only the tokens each one's bitset allows (a verdict grammar's allowed set): mask u32 [m, W],
// bit i % 32 of word i / 32 = token i, W * 32 >= V; grid (parts, m), keys and argmax_final's
// output compact [m]. A row with no allowed value keeps key 0, and argmax_final writes id 0.
__device__ __forceinline__ unsigned long long amax_key(float v, u32 i) {
    u32 u = __float_as_uint(v);
    u32 o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)o << 32) | (0xffffffffu - i);
}
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long t = __shfl_xor_sync(0xffffffffu, k, o);
        k = t > k ? t : k;
    }
    return k;
}
// block 256
__device__ void argmax_partial_impl(const float* __restrict__ logits, unsigned long long* __restrict__ keys, int V,
                                    int parts, int part, int row, const u32* __restrict__ mask = nullptr, int W = 0,
                                    int logits_row = -1) {
    __shared__ unsigned long long sk[8];
    int chunk = (V + parts - 1) / parts;
    int lo = part * chunk, hi = min(V, lo + chunk);
    const float* lg = logits + (long long)(logits_row < 0 ? row : logits_row) * V;
    const u32* mrow = mask ? mask + (long long)row * W : nullptr;
    unsigned long long best = 0;
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float v = lg[i];
        if (v == v && (!mrow || ((mrow[i >> 5] >> (i & 31)) & 1u))) {
            unsigned long long k = amax_key(v, (u32)i);
            best = k > best ? k : best;
        }
    }
    best = warp_max_u64(best);
    if ((threadIdx.x & 31) == 0) sk[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        unsigned long long k = threadIdx.x < (blockDim.x >> 5) ? sk[threadIdx.x] : 0ull;
        k = warp_max_u64(k);
        if (threadIdx.x == 0) keys[(long long)row * parts + part] = k;
    }
}
extern "C" __global__ void argmax_partial(const float* logits, unsigned long long* keys, int V) { PDL_ENTRY();
    argmax_partial_impl(logits, keys, V, gridDim.x, blockIdx.x, blockIdx.y);
}
extern "C" __global__ void argmax_partial_masked(const float* logits, unsigned long long* keys, int V, const u32* mask,
                                                 int W, const int* rows) { PDL_ENTRY();
    argmax_partial_impl(logits, keys, V, gridDim.x, blockIdx.x, blockIdx.y, mask, W, rows[blockIdx.y]);
}
// one warp per row
__device__ void argmax_final_impl(const unsigned long long* __restrict__ keys, int* __restrict__ out, int parts, int row, int lane) {
    unsigned long long best = 0;
    for (int i = lane; i < parts; i += 32) {
        unsigned long long k = keys[(long long)row * parts + i];
        best = k > best ? k : best;
    }
    best = warp_max_u64(best);
    if (lane == 0) out[row] = best == 0 ? 0 : (int)(0xffffffffu - (u32)(best & 0xffffffffull));
}
extern "C" __global__ void argmax_final(const unsigned long long* keys, int* out, int parts) { PDL_ENTRY();
    argmax_final_impl(keys, out, parts, blockIdx.x, threadIdx.x);
}
