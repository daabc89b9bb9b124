// moe_router_topk: one warp per token runs router_topk_impl (common.cuh). grid (ceil(n/4)), block 128.
extern "C" __global__ void moe_router_topk(const float* logits, int* ids, float* wout, int n, int E, int k, int renorm) {
    PDL_ENTRY();
    router_topk_impl<8>(logits, ids, wout, n, E, k, renorm, blockIdx.x * 4 + (threadIdx.x >> 5), threadIdx.x & 31);
}
// moe_router_topk_rank: the same picks by ranking (router_rank_topk), one block per token,
// E <= 256: no dependent arg-max rounds. grid (n), block 256.
extern "C" __global__ void __launch_bounds__(256) moe_router_topk_rank(const float* logits, int* ids, float* wout, int n,
                                                                      int E, int k, int renorm) {
    PDL_ENTRY();
    __shared__ int s_ids[32];
    __shared__ float s_w[32];
    const int t = blockIdx.x;
    router_rank_topk(logits + (long long)t * E, E, k, renorm, true, s_ids, s_w);
    if (threadIdx.x < k) {
        ids[(long long)t * k + threadIdx.x] = s_ids[threadIdx.x];
        wout[(long long)t * k + threadIdx.x] = s_w[threadIdx.x];
    }
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
