// Glue kernels of the CUDA model forward (src/backend/cuda/model.rs).

// Decode/prefill attention for any head_dim D <= 256 (the split kernels take 64/128/256 only):
// one block (4 warps) per (query head, query row); lane l holds dims l, l+32, ...
// Same arguments and semantics as attention_decode: row s reads q at q + s*q_stride,
// attends to positions [lo, seq_lens[s]) of slot slots[s], lo = len - window when window > 0,
// sinks optional. Rows with seq_len 0 produce zeros. grid (n_q, n_rows), block 128.
extern "C" __global__ void __launch_bounds__(128) attention_generic(
    const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
    const int* __restrict__ slots, const int* __restrict__ seq_lens, const float* __restrict__ sinks,
    float* __restrict__ out, int n_q, int n_kv, int D, int layer, int n_layers, int max_pos,
    float scale, int window, long long q_stride) { PDL_ENTRY();
    __shared__ float sm_m[4], sm_l[4];
    __shared__ float sm_acc[4][256];
    const int h = blockIdx.x, s = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int G = n_q / n_kv, kvh = h / G;
    const int len = min(seq_lens[s], max_pos);
    const int lo = window > 0 ? max(0, len - window) : 0;
    float qv[8], acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int d = lane + 32 * e;
        qv[e] = d < D ? q[(long long)s * q_stride + (long long)h * D + d] * scale : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    if (len > lo) {
        const long long base = (((long long)slots[s] * n_layers + layer) * n_kv + kvh) * (long long)max_pos * D;
        for (int p = lo + warp; p < len; p += 4) {
            const bf16_t* kr = kc + base + (long long)p * D;
            const bf16_t* vr = vc + base + (long long)p * D;
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                int d = lane + 32 * e;
                if (d < D) dot += qv[e] * bf2f(kr[d]);
            }
            dot = warp_sum(dot);
            float mn = fmaxf(m, dot);
            float corr = expf(m - mn);
            float pr = expf(dot - mn);
            l = l * corr + pr;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                int d = lane + 32 * e;
                acc[e] = acc[e] * corr + (d < D ? pr * bf2f(vr[d]) : 0.f);
            }
            m = mn;
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int d = lane + 32 * e;
        if (d < 256) sm_acc[warp][d] = acc[e];
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < 4; w++) M = fmaxf(M, sm_m[w]);
    if (sinks) M = fmaxf(M, sinks[h]);
    float L = 0.f;
    if (M != NEG_INF) {
        for (int w = 0; w < 4; w++)
            if (sm_m[w] != NEG_INF) L += sm_l[w] * expf(sm_m[w] - M);
        if (sinks) L += expf(sinks[h] - M);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
        if (M != NEG_INF)
            for (int w = 0; w < 4; w++)
                if (sm_m[w] != NEG_INF) o += sm_acc[w][d] * expf(sm_m[w] - M);
        out[((long long)s * n_q + h) * D + d] = L > 0.f ? o / L : 0.f;
    }
}

__device__ __forceinline__ unsigned int hash_u32(unsigned long long x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (unsigned int)x;
}

// p[i] = bf16(offset + scale * u), u uniform in [-sqrt(3), sqrt(3)) (unit variance). Random
// weights for benchmarks, made on the device.
extern "C" __global__ void fill_random_bf16(bf16_t* __restrict__ p, long long n, unsigned long long seed,
                                            float scale, float offset) { PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float u = (hash_u32(seed * 0x9e3779b97f4a7c15ULL + (unsigned long long)i) >> 8) * (1.f / 16777216.f);
        p[i] = f2bf(offset + scale * (u * 2.f - 1.f) * 1.7320508f);
    }
}

// p[i] = lo + hash % range (MXFP4 blocks: lo 0, range 256; E8M0 scales: a narrow range).
extern "C" __global__ void fill_random_u8(u8* __restrict__ p, long long n, unsigned long long seed, int lo, int range) { PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        p[i] = (u8)(lo + (int)(hash_u32(seed * 0x9e3779b97f4a7c15ULL + (unsigned long long)i) % (unsigned)range));
}

// rope_qk and kv_cache_write in one launch (same math as both): qkv f32 [n_tokens, (n_q + 2 n_kv) * D]
// per token [q | k | v]; q and k heads get the optional per-head RMSNorm and RoPE in place; the
// rotated k heads and the v heads are written to the bf16 caches [slot][layer][kv_head][pos][D]
// (skipped for slot < 0 or pos outside [0, max_pos)). grid (n_tokens * (n_q + 2 n_kv)), block 32.
// one warp per (token, head): unit = t * (n_q + 2 n_kv) + h
__device__ void rope_qk_kv_impl(float* __restrict__ qkv, const int* __restrict__ positions,
                                const int* __restrict__ slots, const float* __restrict__ inv_freq,
                                const bf16_t* __restrict__ q_norm, const bf16_t* __restrict__ k_norm,
                                bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                int n_q, int n_kv, int D, float eps, float mscale,
                                int layer, int n_layers, int max_pos, int unit, int lane) {
    const int nh = n_q + 2 * n_kv;
    const int t = unit / nh, h = unit % nh;
    float* x = qkv + (long long)t * nh * D + (long long)h * D;
    const int slot = slots[t], p = positions[t];
    const bool store = slot >= 0 && p >= 0 && p < max_pos;
    if (h >= n_q + n_kv) {
        if (!store) return;
        long long off = ((((long long)slot * n_layers + layer) * n_kv + (h - n_q - n_kv)) * max_pos + p) * D;
        for (int d = lane; d < D; d += 32) v_cache[off + d] = f2bf(x[d]);
        return;
    }
    const bool is_k = h >= n_q;
    const bf16_t* nw = is_k ? k_norm : q_norm;
    long long koff = is_k ? ((((long long)slot * n_layers + layer) * n_kv + (h - n_q)) * max_pos + p) * D : 0;
    const int half = D / 2;
    const float inv = rope_head_inv(x, nw, D, eps, lane);
    const float pos = (float)p;
    for (int i = lane; i < half; i += 32) {
        float ra, rb;
        rope_pair(x, nw, inv, i, half, pos, inv_freq, mscale, ra, rb);
        x[i] = ra;
        x[i + half] = rb;
        if (is_k && store) { k_cache[koff + i] = f2bf(ra); k_cache[koff + i + half] = f2bf(rb); }
    }
}
extern "C" __global__ void rope_qk_kv(float* __restrict__ qkv, const int* __restrict__ positions,
                                      const int* __restrict__ slots, const float* __restrict__ inv_freq,
                                      const bf16_t* __restrict__ q_norm, const bf16_t* __restrict__ k_norm,
                                      bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                      int n_q, int n_kv, int D, float eps, float mscale,
                                      int layer, int n_layers, int max_pos) { PDL_ENTRY();
    rope_qk_kv_impl(qkv, positions, slots, inv_freq, q_norm, k_norm, k_cache, v_cache, n_q, n_kv, D, eps, mscale, layer,
                    n_layers, max_pos, blockIdx.x, threadIdx.x);
}

// moe_combine (+ the experts' down biases) fused into the next rmsnorm_residual: per row t,
//   residual[t] += sum_r w[t, r] * (y[t*k + r] + ebias[ids[t*k + r]])   (summed in r order)
//   out[t] = rmsnorm(residual[t]) * weight       (bf16 or f32). ebias [E, hidden] or null.
//   grid (n_rows), block 256 or 1024.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_moe_bf16(float* residual, const float* y, const float* wk, int k,
        const float* ebias, const int* ids, const bf16_t* w, bf16_t* out, int hidden, float eps) { PDL_ENTRY();
    rms_moe_row(residual, y, wk, k, ebias, ids, w, out, hidden, eps, blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_moe_f32(float* residual, const float* y, const float* wk, int k,
        const float* ebias, const int* ids, const bf16_t* w, float* out, int hidden, float eps) { PDL_ENTRY();
    rms_moe_row(residual, y, wk, k, ebias, ids, w, out, hidden, eps, blockIdx.x);
}

// y f32 [n_assign, cols] += bias f32 [E, cols] at row ids[a] (gpt-oss expert biases).
// grid-stride, block 256.
extern "C" __global__ void add_expert_bias(float* __restrict__ y, const float* __restrict__ bias,
                                           const int* __restrict__ ids, int n_assign, int cols) { PDL_ENTRY();
    long long total = (long long)n_assign * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        long long a = i / cols, c = i % cols;
        const int e = ids[a];
        if (e >= 0) y[i] += bias[(long long)e * cols + c];  // -1: another rank's expert
    }
}

// y bf16 [n] = x f32 [n] (round to nearest even): inputs of the cuBLAS GEMMs. grid-stride.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, long long n) { PDL_ENTRY();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i]);
}

// y f32 [n, cols] += b f32 [cols] (biases after a cuBLAS GEMM; the GEMVs add their own).
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ b, int n, int cols) { PDL_ENTRY();
    long long total = (long long)n * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % cols];
}
