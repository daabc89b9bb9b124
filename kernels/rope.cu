// rope_qk: in place on the f32 qkv buffer [n_tokens, (n_q + 2*n_kv) * D] laid out
// per token as [q heads | k heads | v heads]. For each q and k head: optional
// per-head RMSNorm (Qwen3 q_norm/k_norm, weight bf16 [D]), then neox/HF
// rotate-half RoPE with angle = positions[t] * inv_freq[i] (i < D/2), cos/sin
// multiplied by mscale (1 unless YaRN).
// grid (n_tokens * (n_q + n_kv)), block 32 (one warp per head).
extern "C" __global__ void rope_qk(float* __restrict__ qkv, const int* __restrict__ positions,
                                   const float* __restrict__ inv_freq,
                                   const bf16_t* __restrict__ q_norm, const bf16_t* __restrict__ k_norm,
                                   int n_q, int n_kv, int D, float eps, float mscale) { PDL_ENTRY();
    int nh = n_q + n_kv;
    int t = blockIdx.x / nh, h = blockIdx.x % nh;
    int lane = threadIdx.x;
    float* x = qkv + (long long)t * (n_q + 2 * n_kv) * D + (long long)h * D;
    const bf16_t* nw = h < n_q ? q_norm : k_norm;
    int half = D / 2;
    float inv = 1.f;
    if (nw) {
        float ss = 0.f;
        for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
        ss = warp_sum(ss);
        inv = rsqrtf(ss / (float)D + eps);
    }
    float pos = (float)positions[t];
    for (int i = lane; i < half; i += 32) {
        float a = x[i], b = x[i + half];
        if (nw) { a = a * inv * bf2f(nw[i]); b = b * inv * bf2f(nw[i + half]); }
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        c *= mscale; s *= mscale;
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}

// kv_cache_write: copy k and v of each token from qkv (f32) into the bf16 caches
// laid out [slot][layer][kv_head][pos][D]. grid (n_tokens, n_kv), block 64.
// Tokens with pos outside [0, max_pos) or slot < 0 are skipped.
extern "C" __global__ void kv_cache_write(const float* __restrict__ qkv, bf16_t* __restrict__ k_cache,
                                          bf16_t* __restrict__ v_cache, const int* __restrict__ slots,
                                          const int* __restrict__ positions, int n_q, int n_kv, int D,
                                          int layer, int n_layers, int max_pos) { PDL_ENTRY();
    int t = blockIdx.x, h = blockIdx.y;
    int slot = slots[t], pos = positions[t];
    if (slot < 0 || pos < 0 || pos >= max_pos) return;
    const float* row = qkv + (long long)t * (n_q + 2 * n_kv) * D;
    const float* k = row + (long long)(n_q + h) * D;
    const float* v = row + (long long)(n_q + n_kv + h) * D;
    long long off = ((((long long)slot * n_layers + layer) * n_kv + h) * max_pos + pos) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        k_cache[off + d] = f2bf(k[d]);
        v_cache[off + d] = f2bf(v[d]);
    }
}
