// moe_router_topk: logits f32 [n, E] -> softmax -> top-k (ties: lowest index) ->
// (renorm != 0: weights / sum of the k selected). ids i32 [n, k], weights f32 [n, k].
// E <= 32 * RT_PER_LANE (moe_router_topk: 256; moe_router_topk_512: 512, e.g. 384 experts
// of Kimi-K2), k <= E. grid (ceil(n/4)), block 128: one warp per token.
template <int RT_PER_LANE>
__device__ void router_topk_impl(const float* __restrict__ logits, int* __restrict__ ids,
                                 float* __restrict__ wout, int n, int E, int k, int renorm, int t, int lane) {
    if (t >= n) return;
    const float* lg = logits + (long long)t * E;
    float v[RT_PER_LANE];
    float mx = NEG_INF;
#pragma unroll
    for (int i = 0; i < RT_PER_LANE; i++) {
        int e = lane + 32 * i;
        v[i] = e < E ? lg[e] : NEG_INF;
        mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < RT_PER_LANE; i++) sum += (lane + 32 * i < E) ? expf(v[i] - mx) : 0.f;
    sum = warp_sum(sum);
    float sel_sum = 0.f;
    for (int r = 0; r < k; r++) {
        float bv = NEG_INF; int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < RT_PER_LANE; i++) {
            int e = lane + 32 * i;
            if (e < E && (v[i] > bv || (v[i] == bv && e < bi))) { bv = v[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
#pragma unroll
        for (int i = 0; i < RT_PER_LANE; i++) if (lane + 32 * i == bi) v[i] = NEG_INF;
        float p = expf(bv - mx) / sum;
        sel_sum += p;
        if (lane == 0) { ids[(long long)t * k + r] = bi; wout[(long long)t * k + r] = p; }
    }
    if (renorm) {
        __syncwarp();
        for (int r = lane; r < k; r += 32) wout[(long long)t * k + r] /= sel_sum;
    }
}
extern "C" __global__ void moe_router_topk(const float* logits, int* ids, float* wout, int n, int E, int k, int renorm) {
    PDL_ENTRY();
    router_topk_impl<8>(logits, ids, wout, n, E, k, renorm, blockIdx.x * 4 + (threadIdx.x >> 5), threadIdx.x & 31);
}
extern "C" __global__ void moe_router_topk_512(const float* logits, int* ids, float* wout, int n, int E, int k, int renorm) {
    PDL_ENTRY();
    router_topk_impl<16>(logits, ids, wout, n, E, k, renorm, blockIdx.x * 4 + (threadIdx.x >> 5), threadIdx.x & 31);
}

// moe_combine: out f32 [n, H] = sum_r w[t, r] * y[t*k + r, :]  (y f32 [n*k, H])
// grid (n), block 256.
extern "C" __global__ void moe_combine(const float* __restrict__ y, const float* __restrict__ w,
                                       float* __restrict__ out, int k, int H) { PDL_ENTRY();
    int t = blockIdx.x;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float s = 0.f;
        for (int r = 0; r < k; r++) s += w[(long long)t * k + r] * y[((long long)t * k + r) * H + c];
        out[(long long)t * H + c] = s;
    }
}
