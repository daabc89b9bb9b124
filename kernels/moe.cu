// moe_router_topk: logits f32 [n, E] -> softmax -> top-k (ties: lowest index) ->
// (renorm != 0: weights / sum of the k selected). ids i32 [n, k], weights f32 [n, k].
// E <= 256, k <= E. grid (ceil(n/4)), block 128: one warp per token.
extern "C" __global__ void moe_router_topk(const float* __restrict__ logits, int* __restrict__ ids,
                                           float* __restrict__ wout, int n, int E, int k, int renorm) { PDL_ENTRY();
    int t = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (t >= n) return;
    topk_row(logits + (long long)t * E, ids + (long long)t * k, wout + (long long)t * k, E, k, renorm);
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
