// sample_top_p: temperature + nucleus (top-p) sampling on the device, one block of 1024
// threads per row, so only the chosen ids cross to the host (not [n, V] logits).
//   logits f32 [n, V]; temp, top_p, u f32 [n] (u uniform in [0, 1) from the host's seeded
//   RNG); ids i32 [n]. temp <= 0: greedy (first index of the maximum).
// Semantics (the CPU reference in tests/cuda_sample.rs is the same): p = softmax(logits /
// temp); the nucleus is the tokens in descending-p order up to and including the one where
// the running mass reaches top_p (ties at that boundary taken in index order); the token is
// the one where the running nucleus mass, in INDEX order, passes u * (nucleus mass).
// The boundary probability t* is found exactly by a radix select over the bits of p (4 rounds
// of 8 bits; p >= 0 so its bits order like the values), each round a shared histogram of mass.
// Cost: 7 passes over the row from L2 (~151k logits: tens of µs), vs copying 600 KB to the host.
#define SMP_THREADS 1024
#define SMP_WARPS (SMP_THREADS / 32)

__device__ __forceinline__ float smp_block_sum(float v, float* sh) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = (threadIdx.x < SMP_WARPS) ? sh[threadIdx.x] : 0.f;
    if (threadIdx.x < 32) t = warp_sum(t);
    if (threadIdx.x == 0) sh[32] = t;
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
// exclusive prefix sum over the block (thread order); also returns the total
__device__ __forceinline__ float smp_block_scan(float v, float* sh, float* total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    float x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (w == 0) {
        float s = lane < SMP_WARPS ? sh[lane] : 0.f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        sh[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    float before = (w > 0 ? sh[w - 1] : 0.f) + x - v;
    *total = sh[SMP_WARPS - 1];
    __syncthreads();
    return before;
}

// p of token i (NaN logits: 0)
__device__ __forceinline__ float smp_p(const float* l, int i, float mx, float inv_t, float inv_z) {
    float v = l[i];
    return v == v ? __expf((v - mx) * inv_t) * inv_z : 0.f;
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS) sample_top_p(const float* __restrict__ logits, int V,
        const float* __restrict__ temp, const float* __restrict__ top_p, const float* __restrict__ u,
        int* __restrict__ ids) { PDL_ENTRY();
    __shared__ float sh[33];
    __shared__ float hist[256];
    __shared__ u32 s_prefix;
    __shared__ float s_above;
    __shared__ unsigned long long s_best;
    const int row = blockIdx.x;
    const float* l = logits + (long long)row * V;
    const float T = temp[row];
    // 1. maximum (and its first index, for greedy rows)
    if (threadIdx.x == 0) s_best = 0ull;
    __syncthreads();
    unsigned long long best = 0ull;
    for (int i = threadIdx.x; i < V; i += SMP_THREADS) {
        float v = l[i];
        if (v == v) {
            u32 b = __float_as_uint(v);
            u32 o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
            unsigned long long k = ((unsigned long long)o << 32) | (0xffffffffu - (u32)i);
            best = k > best ? k : best;
        }
    }
    atomicMax(&s_best, best);
    __syncthreads();
    const int arg = (int)(0xffffffffu - (u32)(s_best & 0xffffffffull));
    if (!(T > 0.f)) {
        if (threadIdx.x == 0) ids[row] = arg;
        return;
    }
    const float mx = l[arg], inv_t = 1.f / T;
    // 2. normaliser
    float z = 0.f;
    for (int i = threadIdx.x; i < V; i += SMP_THREADS) {
        float v = l[i];
        z += v == v ? __expf((v - mx) * inv_t) : 0.f;
    }
    const float inv_z = 1.f / smp_block_sum(z, sh);
    // 3. the boundary probability t*: radix select on the bits of p, top byte first
    const float P = fminf(top_p[row], 1.f);
    if (threadIdx.x == 0) { s_prefix = 0u; s_above = 0.f; }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += SMP_THREADS) hist[b] = 0.f;
        __syncthreads();
        const u32 prefix = s_prefix;
        for (int i = threadIdx.x; i < V; i += SMP_THREADS) {
            float p = smp_p(l, i, mx, inv_t, inv_z);
            u32 bits = __float_as_uint(p);
            // shift + 8 == 32 on the first round: every token matches the empty prefix
            bool match = shift == 24 || (bits >> (shift + 8)) == prefix;
            if (match && p > 0.f) atomicAdd(&hist[(bits >> shift) & 255u], p);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float above = s_above;
            int chosen = -1, lowest = -1;
            for (int b = 255; b >= 0; b--) {
                if (hist[b] > 0.f) lowest = b;
                if (hist[b] > 0.f && above + hist[b] >= P) { chosen = b; break; }
                above += hist[b];
            }
            if (chosen < 0) {  // rounding left top_p out of reach: take everything that is left
                chosen = lowest < 0 ? 0 : lowest;
                above = s_above;
                for (int b = 255; b > chosen; b--) above += hist[b];
            }
            s_above = above;
            s_prefix = (prefix << 8) | (u32)chosen;
        }
        __syncthreads();
    }
    const float tstar = __uint_as_float(s_prefix);
    const float above = s_above;  // mass of the tokens with p > t*
    // ties at t*: the first m in index order, m the fewest that reach top_p
    int ties_total = 0;
    const int chunk = (V + SMP_THREADS - 1) / SMP_THREADS;
    const int lo = threadIdx.x * chunk, hi = min(V, lo + chunk);
    int my_ties = 0;
    for (int i = lo; i < hi; i++) my_ties += smp_p(l, i, mx, inv_t, inv_z) == tstar;
    float ties_f;
    const float ties_before = smp_block_scan((float)my_ties, sh, &ties_f);
    ties_total = (int)ties_f;
    int m = tstar > 0.f ? (int)ceilf((P - above) / tstar) : ties_total;
    m = max(1, min(m, ties_total));
    // 4. the token where the nucleus mass in index order passes u * mass
    float mine = 0.f;
    int tie_idx = (int)ties_before;
    for (int i = lo; i < hi; i++) {
        float p = smp_p(l, i, mx, inv_t, inv_z);
        if (p > tstar) mine += p;
        else if (p == tstar && tie_idx++ < m) mine += p;
    }
    float total;
    const float before = smp_block_scan(mine, sh, &total);
    const float target = fminf(u[row], 0.99999994f) * total;
    // the last non-empty range that starts at or before the target walks it. (Asking for
    // before <= target < before + mine instead left a row unwritten once in 20,000 draws on
    // the H100: the scan's next `before` can round above this thread's before + mine, so a
    // target in between was nobody's.) A target past the range's end takes its last token.
    __shared__ int s_walker;
    if (threadIdx.x == 0) s_walker = -1;
    __syncthreads();
    if (mine > 0.f && target >= before) atomicMax(&s_walker, (int)threadIdx.x);
    __syncthreads();
    if ((int)threadIdx.x == s_walker) {
        float acc = before;
        int pick = -1;
        tie_idx = (int)ties_before;
        for (int i = lo; i < hi; i++) {
            float p = smp_p(l, i, mx, inv_t, inv_z);
            bool in = p > tstar || (p == tstar && tie_idx++ < m);
            if (in) {
                pick = i;
                acc += p;
                if (acc > target) break;
            }
        }
        ids[row] = pick;
    }
}
