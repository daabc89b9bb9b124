// MXFP4 expert GEMVs with int8 activations: the decode path for MoE layers.
// Activations are quantized per 32-element block, q = round(x / d), d = max|x| / 127:
//   xq i8 [rows_x, cols], xd f32 [rows_x, cols / 32].
// E2M1 codes are turned into doubled int8 values (0,1,2,3,4,6,8,12 and negatives) with
// byte permutes and summed with dp4a; each 32-block's integer dot is scaled once by
// 0.5 * 2^(s-127) * d. Per weight this is ~1.6 integer instructions, against ~3.5 for a
// shared-memory table with f32 math: at batch 1 that table path is issue-bound well under
// the memory bandwidth (bench/micro/decode_micro.cu measured 1.6-1.8x on an H100).
// Weights: blocks u8 [E, rows, cols/32, 16] (low nibble = even element), scales u8 E8M0
// [E, rows, cols/32]; assignment a uses expert ids[a] and activation row a / x_div.

__device__ __forceinline__ float e8m0_q8(u32 s) {
    return s == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(s << 23);
}
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// 8 E2M1 codes (element i in nibble i) -> two words of 4 doubled int8 values
__device__ __forceinline__ void e2m1x8_to_i8(u32 q, int& lo4, int& hi4) {
    const u32 T0 = 0x03020100u, T1 = 0x0C080604u, T2 = 0xFDFEFF00u, T3 = 0xF4F8FAFCu;
    const u32 sel = 0x32103210u | ((q & 0x88888888u) >> 1);  // byte i from the negative word when its sign is set
    const u32 a = q & 0x7777u, b = (q >> 16) & 0x7777u;
    lo4 = (int)__byte_perm(__byte_perm(T0, T1, a), __byte_perm(T2, T3, a), sel);
    hi4 = (int)__byte_perm(__byte_perm(T0, T1, b), __byte_perm(T2, T3, b), sel >> 16);
}
#ifdef E2M1_PN
// -DE2M1_PN (KAIROS_NVRTC_DEFINES, for A/B; written in session 21, not yet timed): 8 codes as
// their positive and negative parts, 4 byte permutes and 3 logic ops per 8 codes instead of 6
// and ~5, with 4 dp4a instead of 2. prmt's sign-replicate mode (bit 3 of a selector nibble, the
// code's sign) turns a table byte m (< 128) into 0, so the table read with the codes gives m
// where the sign is clear and with the signs flipped m where it is set: w = pos - neg. The
// integer sum is exact either way, so the result is the same int (tools/check_e2m1_pn.py checks
// the byte arithmetic for every code).
// prmt.b32 in its generic mode, spelled out: PTX defines bit 3 of each selector nibble as
// "replicate the selected byte's sign" (CUDA documents __byte_perm with 3-bit selectors only)
__device__ __forceinline__ int prmt_signed(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return (int)r;
}
__device__ __forceinline__ int dot_word_pn(u32 q, int xlo, int xhi, int d, int& n) {
    const u32 T0 = 0x03020100u, T1 = 0x0C080604u, qn = q ^ 0x88888888u;
    d = __dp4a(prmt_signed(T0, T1, q), xlo, d);
    n = __dp4a(prmt_signed(T0, T1, qn), xlo, n);
    d = __dp4a(prmt_signed(T0, T1, q >> 16), xhi, d);
    n = __dp4a(prmt_signed(T0, T1, qn >> 16), xhi, n);
    return d;
}
__device__ __forceinline__ int dot_block_i8(uint4 w, int4 x0, int4 x1) {
    int d = 0, n = 0;
    d = dot_word_pn(w.x, x0.x, x0.y, d, n);
    d = dot_word_pn(w.y, x0.z, x0.w, d, n);
    d = dot_word_pn(w.z, x1.x, x1.y, d, n);
    d = dot_word_pn(w.w, x1.z, x1.w, d, n);
    return d - n;
}
#else
// integer dot of one 32-weight block with 32 int8 activations held in x0, x1
__device__ __forceinline__ int dot_block_i8(uint4 w, int4 x0, int4 x1) {
    int lo, hi, d = 0;
    e2m1x8_to_i8(w.x, lo, hi); d = __dp4a(lo, x0.x, d); d = __dp4a(hi, x0.y, d);
    e2m1x8_to_i8(w.y, lo, hi); d = __dp4a(lo, x0.z, d); d = __dp4a(hi, x0.w, d);
    e2m1x8_to_i8(w.z, lo, hi); d = __dp4a(lo, x1.x, d); d = __dp4a(hi, x1.y, d);
    e2m1x8_to_i8(w.w, lo, hi); d = __dp4a(lo, x1.z, d); d = __dp4a(hi, x1.w, d);
    return d;
}
#endif
// the same with the activations read from xq (32-byte aligned)
__device__ __forceinline__ int dot_block(uint4 w, const signed char* __restrict__ xq) {
    const int4* xv = (const int4*)xq;
    return dot_block_i8(w, LDG_ACT(xv), LDG_ACT(xv + 1));
}
// Blocks of 32 weights per lane in flight in the warp-per-row kernels (LPR 32): 2 covers a
// row of up to 2048 columns (Qwen3's 64 blocks) in one round trip; gpt-oss-20b's 2880-column
// rows (90 blocks) take two at 2 and one at 3, with the same sums in the same order (a lane adds
// blocks sub, sub + 32, ... either way), so the result is bit for bit the same.
// KAIROS_NVRTC_DEFINES=MX_ROW_U=3 for A/B (session 22, not yet timed).
#ifndef MX_ROW_U
#define MX_ROW_U 2
#endif
// One row's dot product, spread over LPR lanes (lane `sub` takes blocks sub, sub+LPR, ...),
// U blocks per lane loaded before any is used. Returns the partial sum of this lane.
template <int LPR, int U>
__device__ __forceinline__ float row_dot(const u8* __restrict__ wrow, const u8* __restrict__ srow, int nb,
                                         const signed char* __restrict__ xq, const float* __restrict__ xd, int sub) {
    float acc = 0.f;
    for (int base = 0; base < nb; base += LPR * U) {
        uint4 w[U];
        u32 s[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            w[u] = b < nb ? ld_stream16(wrow + b * 16) : make_uint4(0, 0, 0, 0);
            s[u] = b < nb ? (u32)__ldg(srow + b) : 127u;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            if (b < nb) acc += (float)dot_block(w[u], xq + b * 32) * (0.5f * e8m0_q8(s[u]) * LDG_ACT(xd + b));
        }
    }
    return acc;
}

// row_dot whose first U blocks per lane are loaded before wait() (the same sums in the
// same order, so the same result).
template <int LPR, int U, typename Wait>
__device__ __forceinline__ float row_dot_pre(const u8* __restrict__ wrow, const u8* __restrict__ srow, int nb,
                                             const signed char* __restrict__ xq, const float* __restrict__ xd, int sub,
                                             Wait wait) {
    uint4 w[U];
    u32 s[U];
    auto load = [&](int base) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            w[u] = b < nb ? ld_stream16(wrow + b * 16) : make_uint4(0, 0, 0, 0);
            s[u] = b < nb ? (u32)__ldg(srow + b) : 127u;
        }
    };
    load(0);
    wait();
    float acc = 0.f;
    for (int base = 0; base < nb; base += LPR * U) {
        if (base > 0) load(base);
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            if (b < nb) acc += (float)dot_block(w[u], xq + b * 32) * (0.5f * e8m0_q8(s[u]) * LDG_ACT(xd + b));
        }
    }
    return acc;
}

// y f32 [n_assign, rows]: grid (ceil(rows / (8 * 32/LPR)), n_assign), block 256.
template <int LPR, int U>
__device__ void mx_q8_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales, const signed char* __restrict__ xq,
                           const float* __restrict__ xd, float* __restrict__ y, int rows, int cols,
                           const int* __restrict__ ids, int x_div, int bx, int by) {
    const int lane = threadIdx.x & 31, sub = lane % LPR;
    const int row = (bx * 8 + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
    const int nb = cols / 32, a = by;
    const long long e = ids[a];
    if (e < 0) {  // expert held by another rank (expert parallel): contributes zeros
        if (sub == 0 && row < rows) y[(long long)a * rows + row] = 0.f;
        return;
    }
    const long long r = e * rows + min(row, rows - 1);  // clamped rows: computed, never stored
    float acc = row_dot<LPR, U>(blocks + r * nb * 16, scales + r * nb, nb, xq + (long long)(a / x_div) * cols,
                                xd + (long long)(a / x_div) * nb, sub);
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (sub == 0 && row < rows) y[(long long)a * rows + row] = acc;
}
// long rows (cols >= 1536): a warp per row; short rows: 8 lanes per row
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_l32(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const int* ids, int x_div) { PDL_ENTRY();
    mx_q8_impl<32, MX_ROW_U>(blocks, scales, xq, xd, y, rows, cols, ids, x_div, blockIdx.x, blockIdx.y);
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_l8(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const int* ids, int x_div) { PDL_ENTRY();
    mx_q8_impl<8, 3>(blocks, scales, xq, xd, y, rows, cols, ids, x_div, blockIdx.x, blockIdx.y);
}

// mxfp4_q8_l{32,8} that picks its assignment's expert itself (rank a % k of token a / k's
// router logits f32 [n, E], as moe_gate_up_q8_topk picks; E <= 256, k <= 32):
// nothing it needs before its weights comes from its predecessor, so under PDL it ranks and
// loads its first weights while the gate/up kernel still runs, then waits for the
// activations. The logits come from the kernel BEFORE that predecessor, and
// moe_gate_up_q8_topk lets this kernel go only after its own wait, i.e. once they are
// complete; they are read through L2, never a stale L1 line. grid as mxfp4_q8_l*, block 256.
template <int LPR, int U>
__device__ void mx_q8_rank_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
                                const signed char* __restrict__ xq, const float* __restrict__ xd, float* __restrict__ y,
                                int rows, int cols, const float* __restrict__ logits, int E, int k, int x_div) {
    __shared__ int s_ids[32];
    __shared__ float s_w[32];
    PDL_PRE();
    const int a = blockIdx.y;
    router_rank_topk<true>(logits + (long long)(a / k) * E, E, k, 0, false, s_ids, s_w);
    const long long e = s_ids[a % k];
    const int lane = threadIdx.x & 31, sub = lane % LPR;
    const int row = (blockIdx.x * 8 + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
    const int nb = cols / 32;
    const long long r = e * rows + min(row, rows - 1);  // clamped rows: computed, never stored
    float acc = row_dot_pre<LPR, U>(blocks + r * nb * 16, scales + r * nb, nb, xq + (long long)(a / x_div) * cols,
                                    xd + (long long)(a / x_div) * nb, sub, PdlWait());
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (sub == 0 && row < rows) y[(long long)a * rows + row] = acc;
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_rank_l32(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const float* logits, int E, int k, int x_div) {
    mx_q8_rank_impl<32, MX_ROW_U>(blocks, scales, xq, xd, y, rows, cols, logits, E, k, x_div);
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_rank_l8(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const float* logits, int E, int k, int x_div) {
    mx_q8_rank_impl<8, 3>(blocks, scales, xq, xd, y, rows, cols, logits, E, k, x_div);
}

// The folded MoE block's expert down GEMV for a step of ONE row, with the combine:
//   residual[row] += sum_r w[r] * (W[e_r] . act_r + ebias[e_r, row])   (r in order, as rms_moe_row)
// so the residual is complete when the next layer's q|k|v GEMV normalises it itself
// (bf16_gemv_norm_*): no combine + rmsnorm launch between them. Warp w takes pick w % k of the
// block's row group w / k (32/LPR rows per warp), so a block holds all k picks of its rows and
// sums them in shared memory. Experts: ranked from `logits` [E] before the PDL wait (as
// mx_q8_rank_impl; E <= blockDim.x <= 256) or, with logits null, read from ids [k] after it.
// Weights wk [k] (moe_gate_up_q8_topk's). ebias [E, rows] or null.
// grid ceil(rows / (G * 32/LPR)), block 32 * k * G (the host picks G).
template <int LPR, int U>
__device__ void mx_q8_combine_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
                                   const signed char* __restrict__ xq, const float* __restrict__ xd,
                                   float* __restrict__ residual, int rows, int cols, const float* __restrict__ logits,
                                   const int* __restrict__ ids, const float* __restrict__ wk,
                                   const float* __restrict__ ebias, int E, int k) {
    constexpr int RPW = 32 / LPR;
    __shared__ int s_ids[32];
    __shared__ float s_w[32];
    __shared__ float s_y[32][32];
    PDL_PRE();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane % LPR;
    const int r = warp % k, g = warp / k, rpb = (blockDim.x >> 5) / k * RPW;
    const int row = blockIdx.x * rpb + g * RPW + lane / LPR;
    const int nb = cols / 32;
    float acc = 0.f;
    if (logits) {
        router_rank_topk<true>(logits, E, k, 0, false, s_ids, s_w);
        const long long e = s_ids[r];
        const long long wr = e * rows + min(row, rows - 1);  // clamped rows: computed, never stored
        acc = row_dot_pre<LPR, U>(blocks + wr * nb * 16, scales + wr * nb, nb, xq + (long long)r * cols,
                                  xd + (long long)r * nb, sub, PdlWait());
    } else {
        PDL_POST();
        if (threadIdx.x < k) s_ids[threadIdx.x] = ids[threadIdx.x];
        __syncthreads();
        const long long e = s_ids[r];
        if (e >= 0) {  // < 0: another rank's expert, zeros
            const long long wr = e * rows + min(row, rows - 1);
            acc = row_dot<LPR, U>(blocks + wr * nb * 16, scales + wr * nb, nb, xq + (long long)r * cols,
                                  xd + (long long)r * nb, sub);
        }
    }
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (sub == 0) s_y[r][g * RPW + lane / LPR] = acc;
    __syncthreads();
    const int t = threadIdx.x, rr = blockIdx.x * rpb + t;
    if (t < rpb && rr < rows) {
        float s = 0.f;
        for (int j = 0; j < k; j++) {
            float yv = s_y[j][t];
            if (ebias && s_ids[j] >= 0) yv += ebias[(long long)s_ids[j] * rows + rr];
            s += __ldcg(wk + j) * yv;
        }
        residual[rr] += s;
    }
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_combine_l32(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* residual, int rows, int cols, const float* logits, const int* ids, const float* wk,
        const float* ebias, int E, int k) {
    mx_q8_combine_impl<32, MX_ROW_U>(blocks, scales, xq, xd, residual, rows, cols, logits, ids, wk, ebias, E, k);
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_combine_l8(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* residual, int rows, int cols, const float* logits, const int* ids, const float* wk,
        const float* ebias, int E, int k) {
    mx_q8_combine_impl<8, 3>(blocks, scales, xq, xd, residual, rows, cols, logits, ids, wk, ebias, E, k);
}

// Expert gate/up GEMV fused with the gated activation, writing the activation in int8.
// Fused rows per expert: act 0 (SiLU-GLU): gate = row j, up = row I + j;
//                        act 1 (gpt-oss):  gate = row 2j, up = row 2j + 1, with
//   g = min(g, limit), u = clamp(u, -limit, limit), out = (u + 1) * g * sigmoid(alpha * g).
// bias f32 [E, 2I] (rows as fused) or null. Out: aq i8 [n_assign, I], ad f32 [n_assign, I/32].
// grid (I / 32, n_assign), block 256 (512, 1024): 8 (16, 32) warps x 4 (2, 1) outputs = one
// 32-block of the activation.
// The gated activation of one output from its gate and up sums (biases added).
__device__ __forceinline__ float gate_up_act(float g, float u, int act, float alpha, float limit) {
    if (act == 1) {
        g = fminf(g, limit);
        u = fminf(fmaxf(u, -limit), limit);
        return (u + 1.f) * (g / (1.f + expf(-alpha * g)));
    }
    return g / (1.f + expf(-g)) * u;
}
// The block's 32 outputs (shared memory) as int8 32-block bx of assignment a's activation.
__device__ __forceinline__ void gate_up_store(const float* out, signed char* __restrict__ aq, float* __restrict__ ad,
                                              int a, int I, int bx) {
    __syncthreads();
    if ((threadIdx.x >> 5) == 0) {
        const int lane = threadIdx.x & 31;
        const float v = out[lane];
        const float d = warp_max(fabsf(v)) / 127.f;
        aq[(long long)a * I + bx * 32 + lane] = (signed char)__float2int_rn(d > 0.f ? v / d : 0.f);
        if (lane == 0) ad[(long long)a * (I / 32) + bx] = d;
    }
}
// gate_up_q8_body: assignment a (= by) with its expert e already known.
__device__ void gate_up_q8_body(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, long long e, int x_div,
        const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad, int bx, int by) {
    __shared__ float out[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, a = by;
    const int nb = cols / 32;
    // 8, 16 or 32 warps share the block's 32 outputs (more warps: more loads in flight)
    const int per = 32 / (blockDim.x >> 5);
    if (e < 0) {  // expert held by another rank (expert parallel): a zero activation
        if (warp == 0) {
            aq[(long long)a * I + bx * 32 + lane] = 0;
            if (lane == 0) ad[(long long)a * (I / 32) + bx] = 0.f;
        }
        return;
    }
    const signed char* xa = xq + (long long)(a / x_div) * cols;
    const float* da = xd + (long long)(a / x_div) * nb;
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
#pragma unroll 2
    for (int t = 0; t < per; t++) {
        const int j = bx * 32 + warp * per + t;
        const int gr = act == 1 ? 2 * j : j, ur = act == 1 ? 2 * j + 1 : I + j;
        float g = row_dot<32, MX_ROW_U>(eb + (long long)gr * nb * 16, es + (long long)gr * nb, nb, xa, da, lane);
        float u = row_dot<32, MX_ROW_U>(eb + (long long)ur * nb * 16, es + (long long)ur * nb, nb, xa, da, lane);
        g = warp_sum(g);
        u = warp_sum(u);
        if (lane == 0) {
            if (bias) { g += bias[e * 2 * I + gr]; u += bias[e * 2 * I + ur]; }
            out[warp * per + t] = gate_up_act(g, u, act, alpha, limit);
        }
    }
    gate_up_store(out, aq, ad, a, I, bx);
}
__device__ void gate_up_q8_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, const int* __restrict__ ids, int x_div,
        const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad, int bx, int by) {
    gate_up_q8_body(blocks, scales, xq, xd, ids[by], x_div, bias, I, cols, act, alpha, limit, aq, ad, bx, by);
}
extern "C" __global__ void __launch_bounds__(256) moe_gate_up_q8(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, const int* ids, int x_div, const float* bias, int I, int cols, int act, float alpha, float limit,
        signed char* aq, float* ad) { PDL_ENTRY();
    gate_up_q8_impl(blocks, scales, xq, xd, ids, x_div, bias, I, cols, act, alpha, limit, aq, ad, blockIdx.x, blockIdx.y);
}

// ---- The MoE block of a decode step of up to 8 rows in three launches ----
// The post-attention rmsnorm (+ int8 blocks) and the router top-k were two launches of
// their own, each a short dependent kernel between two GEMVs. Here every block that needs
// them redoes them (a few KB read from L2, no serial tail): router_norm_q8 normalises
// the residual itself, and moe_gate_up_q8_topk picks its experts itself.

// router_norm_q8: per row t < n (n <= 8) of the residual x f32 [n, H] (the o-projection
// already added, see bf16_gemv_*_acc):
//   h = x[t] * rsqrt(mean(x[t]^2) + eps) * ln         (as rmsnorm_residual_q8)
//   logits[t, e] = bf16(h) . Wr[e] (+ bias[e])         (as the bf16 router GEMV)
//   xq/xd = h as int8 32-blocks (each block's warps write a share of them).
// One router row per block, its 8 warps splitting the row; H % 32 == 0.
// grid (E), block 256.
#define RN_MAX_N 8
#define RN_PRE 4
// acc[t] += the 8 router weights of chunk c . bf16(rmsnorm(x[t]) of that chunk), t < n
__device__ __forceinline__ void rn_dot(uint4 wq, const float* __restrict__ x, const bf16_t* __restrict__ ln,
                                       const float* s_inv, int n, int H, int c, float (&acc)[RN_MAX_N]) {
    float w[8], lw[8];
    unpack8(wq, w);
    unpack8(__ldg((const uint4*)(ln + c * 8)), lw);
#pragma unroll
    for (int t = 0; t < RN_MAX_N; t++) {
        if (t < n) {
            float v[8];
            load8(x + (long long)t * H + c * 8, v);
            const float inv = s_inv[t];
#pragma unroll
            for (int i = 0; i < 8; i++) acc[t] += w[i] * bf2f(f2bf(v[i] * inv * lw[i]));
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) router_norm_q8(const float* __restrict__ x, const bf16_t* __restrict__ ln,
        const bf16_t* __restrict__ Wr, const float* __restrict__ bias, float* __restrict__ logits,
        signed char* __restrict__ xq, float* __restrict__ xd, int n, int H, int E, float eps) {
    __shared__ float s_part[RN_MAX_N][8];
    __shared__ float s_inv[RN_MAX_N];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, e = blockIdx.x;
    const int c8 = H / 8;
    const bf16_t* wr = Wr + (long long)e * H;
    // the router row does not depend on the previous kernel: its loads go first
    PDL_PRE();
    uint4 pre[RN_PRE];
#pragma unroll
    for (int p = 0; p < RN_PRE; p++) {
        const int c = threadIdx.x + 256 * p;
        pre[p] = c < c8 ? __ldg((const uint4*)(wr + c * 8)) : make_uint4(0, 0, 0, 0);
    }
    PDL_POST();
    // sum of squares of every row: this thread's 8-chunks, then warps in order
    for (int t = 0; t < n; t++) {
        float ss = 0.f;
        for (int c = threadIdx.x; c < c8; c += 256) {
            float v[8];
            load8(x + (long long)t * H + c * 8, v);
#pragma unroll
            for (int i = 0; i < 8; i++) ss += v[i] * v[i];
        }
        ss = warp_sum(ss);
        if (lane == 0) s_part[t][warp] = ss;
    }
    __syncthreads();
    if (threadIdx.x < n) {
        float ss = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) ss += s_part[threadIdx.x][w];
        s_inv[threadIdx.x] = rsqrtf(ss / (float)H + eps);
    }
    __syncthreads();
    float acc[RN_MAX_N];
#pragma unroll
    for (int t = 0; t < RN_MAX_N; t++) acc[t] = 0.f;
#pragma unroll
    for (int p = 0; p < RN_PRE; p++) {
        const int c = threadIdx.x + 256 * p;
        if (c < c8) rn_dot(pre[p], x, ln, s_inv, n, H, c, acc);
    }
    for (int c = threadIdx.x + 256 * RN_PRE; c < c8; c += 256) rn_dot(__ldg((const uint4*)(wr + c * 8)), x, ln, s_inv, n, H, c, acc);
    __syncthreads();  // s_part is reused
#pragma unroll
    for (int t = 0; t < RN_MAX_N; t++) {
        if (t < n) {
            const float v = warp_sum(acc[t]);
            if (lane == 0) s_part[t][warp] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < n) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) v += s_part[threadIdx.x][w];
        logits[(long long)threadIdx.x * E + e] = v + (bias ? bias[e] : 0.f);
    }
    // int8 blocks of h: warp-sized 32-blocks q = blockIdx.x * 8 + warp, + 8 * gridDim.x, ...
    const int qpr = H / 32;
    for (int q = blockIdx.x * 8 + warp; q < n * qpr; q += gridDim.x * 8) {
        const int t = q / qpr, i = (q % qpr) * 32 + lane;
        const float o = LDG_ACT(x + (long long)t * H + i) * s_inv[t] * bf2f(ln[i]);
        const float d = warp_max(fabsf(o)) / 127.f;
        xq[(long long)t * H + i] = (signed char)__float2int_rn(d > 0.f ? o / d : 0.f);
        if (lane == 0) xd[(long long)t * qpr + q % qpr] = d;
    }
}

// moe_gate_up_q8 that picks its own expert: every block ranks its token's (t = a / k)
// router logits f32 [n, E] (router_rank_topk, common.cuh; E <= 256) -- ~E shared-memory
// reads per thread instead of k dependent warp arg-max rounds (which cost ~3.6 us per
// layer inside this kernel on the H100). Blocks of row tile 0 also store the pick and its
// weight in ids / wout [n*k] for the down GEMV and the combine. k <= 32, x_div = k.
// grid (I / 32, n * k), block 256 or 512.
// The PDL hand-over and the pick of assignment a = blockIdx.y: its expert (returned), stored
// with its weight in ids / wout by the block of row tile 0.
__device__ __forceinline__ int gate_up_topk_pick(const float* logits, int E, int k, int renorm, int* ids, float* wout) {
    // the dependent is let go only after the wait, whatever PDL_LATE says: mxfp4_q8_rank_*
    // reads the router logits before its own wait
    PDL_WAIT();
    PDL_TRIGGER();
    __shared__ int s_ids[32];
    __shared__ float s_w[32];
    const int a = blockIdx.y, t = a / k, r = a % k;
    // only row tile 0 stores the weights: the other blocks skip the softmax
    router_rank_topk(logits + (long long)t * E, E, k, renorm, blockIdx.x == 0, s_ids, s_w);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ids[a] = s_ids[r];
        wout[a] = s_w[r];
    }
    return s_ids[r];
}
extern "C" __global__ void __launch_bounds__(512) moe_gate_up_q8_topk(const u8* blocks, const u8* scales,
        const signed char* xq, const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout,
        const float* bias, int I, int cols, int act, float alpha, float limit, signed char* aq, float* ad) {
    const int e = gate_up_topk_pick(logits, E, k, renorm, ids, wout);
    gate_up_q8_body(blocks, scales, xq, xd, e, k, bias, I, cols, act, alpha, limit, aq, ad, blockIdx.x, blockIdx.y);
}

// ---- Grouped expert GEMVs (steps of many rows) ----
// The kernels above read an expert's weights once per ASSIGNMENT; with many rows per step
// (batch 16+, prefill) several assignments share an expert, so these read each expert's
// weights once per step and apply them to all of its assignments (up to GM at a time from
// registers). moe_group lists the assignments of every expert; the grouped kernels take a
// block per (row tile, expert). Per assignment and row the sums run in the same order as
// row_dot's, so the results equal the ungrouped kernels'.
#define GM 4
#define GROUP_MAX_ASSIGN 4096

// ids i32 [n_assign] (< 0: skipped) -> off i32 [E + 1] (expert e's assignments are
// list[off[e] .. off[e + 1]], in increasing order), list i32 [n_assign].
// One block of 1024 threads; E <= 512, n_assign <= GROUP_MAX_ASSIGN.
extern "C" __global__ void __launch_bounds__(1024) moe_group(const int* __restrict__ ids, int n_assign, int E,
                                                             int* __restrict__ off, int* __restrict__ list) { PDL_ENTRY();
    __shared__ int start[513];
    __shared__ int sid[GROUP_MAX_ASSIGN];
    for (int e = threadIdx.x; e <= E; e += blockDim.x) start[e] = 0;
    for (int a = threadIdx.x; a < n_assign; a += blockDim.x) sid[a] = ids[a];
    __syncthreads();
    for (int a = threadIdx.x; a < n_assign; a += blockDim.x)
        if (sid[a] >= 0 && sid[a] < E) atomicAdd(&start[sid[a]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int e = 0; e < E; e++) {
            const int c = start[e];
            start[e] = s;
            off[e] = s;
            s += c;
        }
        off[E] = s;
    }
    __syncthreads();
    for (int a = threadIdx.x; a < n_assign; a += blockDim.x) {
        const int e = sid[a];
        if (e < 0 || e >= E) continue;
        int r = 0;
        for (int b = 0; b < a; b++) r += sid[b] == e;
        list[start[e] + r] = a;
    }
}

// row_dot for up to GM activation rows at once: acc[m] for activation row xr[m] (m < mn).
template <int LPR, int U>
__device__ __forceinline__ void row_dot_m(const u8* __restrict__ wrow, const u8* __restrict__ srow, int nb,
                                          const signed char* __restrict__ xq, const float* __restrict__ xd,
                                          const int* xr, int mn, int sub, float (&acc)[GM]) {
#pragma unroll
    for (int m = 0; m < GM; m++) acc[m] = 0.f;
    for (int base = 0; base < nb; base += LPR * U) {
        uint4 w[U];
        u32 s[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            w[u] = b < nb ? ld_stream16(wrow + b * 16) : make_uint4(0, 0, 0, 0);
            s[u] = b < nb ? (u32)__ldg(srow + b) : 127u;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = base + u * LPR + sub;
            if (b < nb) {
                const float ws = 0.5f * e8m0_q8(s[u]);
#pragma unroll
                for (int m = 0; m < GM; m++)
                    if (m < mn) {
                        const long long x0 = (long long)xr[m] * nb;
                        acc[m] += (float)dot_block(w[u], xq + (x0 + b) * 32) * (ws * LDG_ACT(xd + x0 + b));
                    }
            }
        }
    }
}

// mxfp4_q8_l{32,8} grouped: y f32 [n_assign, rows]; grid (ceil(rows / (8 * 32/LPR)), E), block 256.
template <int LPR, int U>
__device__ void mx_q8_grouped_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
                                   const signed char* __restrict__ xq, const float* __restrict__ xd,
                                   float* __restrict__ y, int rows, int cols, const int* __restrict__ off,
                                   const int* __restrict__ list, int x_div, int bx, int e) {
    const int a0 = off[e], na = off[e + 1] - a0;
    if (na <= 0) return;
    const int lane = threadIdx.x & 31, sub = lane % LPR;
    const int row = (bx * 8 + (threadIdx.x >> 5)) * (32 / LPR) + lane / LPR;
    const int nb = cols / 32;
    const long long r = (long long)e * rows + min(row, rows - 1);  // clamped rows: computed, never stored
    for (int c0 = 0; c0 < na; c0 += GM) {
        const int mn = min(GM, na - c0);
        int xr[GM], as[GM];
#pragma unroll
        for (int m = 0; m < GM; m++) {
            as[m] = m < mn ? list[a0 + c0 + m] : 0;
            xr[m] = as[m] / x_div;
        }
        float acc[GM];
        row_dot_m<LPR, U>(blocks + r * nb * 16, scales + r * nb, nb, xq, xd, xr, mn, sub, acc);
#pragma unroll
        for (int m = 0; m < GM; m++) {
            float v = acc[m];
#pragma unroll
            for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (m < mn && sub == 0 && row < rows) y[(long long)as[m] * rows + row] = v;
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_grouped_l32(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const int* off, const int* list, int x_div) { PDL_ENTRY();
    mx_q8_grouped_impl<32, 2>(blocks, scales, xq, xd, y, rows, cols, off, list, x_div, blockIdx.x, blockIdx.y);
}
extern "C" __global__ void __launch_bounds__(256) mxfp4_q8_grouped_l8(const u8* blocks, const u8* scales, const signed char* xq,
        const float* xd, float* y, int rows, int cols, const int* off, const int* list, int x_div) { PDL_ENTRY();
    mx_q8_grouped_impl<8, 3>(blocks, scales, xq, xd, y, rows, cols, off, list, x_div, blockIdx.x, blockIdx.y);
}

// moe_gate_up_q8 grouped: grid (I / 32, E), block 256; same outputs as moe_gate_up_q8.
extern "C" __global__ void __launch_bounds__(256) moe_gate_up_q8_grouped(const u8* __restrict__ blocks,
        const u8* __restrict__ scales, const signed char* __restrict__ xq, const float* __restrict__ xd,
        const int* __restrict__ off, const int* __restrict__ list, int x_div, const float* __restrict__ bias, int I,
        int cols, int act, float alpha, float limit, signed char* __restrict__ aq, float* __restrict__ ad) { PDL_ENTRY();
    __shared__ float out[GM][32];
    const int e = blockIdx.y, bx = blockIdx.x;
    const int a0 = off[e], na = off[e + 1] - a0;
    if (na <= 0) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nb = cols / 32;
    const u8* eb = blocks + (long long)e * 2 * I * (long long)nb * 16;
    const u8* es = scales + (long long)e * 2 * I * (long long)nb;
    for (int c0 = 0; c0 < na; c0 += GM) {
        const int mn = min(GM, na - c0);
        int xr[GM];
#pragma unroll
        for (int m = 0; m < GM; m++) xr[m] = m < mn ? list[a0 + c0 + m] / x_div : 0;
#pragma unroll 2
        for (int t = 0; t < 4; t++) {
            const int j = bx * 32 + warp * 4 + t;
            const int gr = act == 1 ? 2 * j : j, ur = act == 1 ? 2 * j + 1 : I + j;
            float g[GM], u[GM];
            row_dot_m<32, 2>(eb + (long long)gr * nb * 16, es + (long long)gr * nb, nb, xq, xd, xr, mn, lane, g);
            row_dot_m<32, 2>(eb + (long long)ur * nb * 16, es + (long long)ur * nb, nb, xq, xd, xr, mn, lane, u);
#pragma unroll
            for (int m = 0; m < GM; m++) {
                float gm = warp_sum(g[m]), um = warp_sum(u[m]);
                if (lane == 0 && m < mn) {
                    if (bias) { gm += bias[(long long)e * 2 * I + gr]; um += bias[(long long)e * 2 * I + ur]; }
                    float v;
                    if (act == 1) {
                        gm = fminf(gm, limit);
                        um = fminf(fmaxf(um, -limit), limit);
                        v = (um + 1.f) * (gm / (1.f + expf(-alpha * gm)));
                    } else {
                        v = gm / (1.f + expf(-gm)) * um;
                    }
                    out[m][warp * 4 + t] = v;
                }
            }
        }
        __syncthreads();
        if (warp < mn) {  // warp m quantizes assignment m's 32 outputs (GM <= 8 warps)
            const int a = list[a0 + c0 + warp];
            float v = out[warp][lane];
            float d = warp_max(fabsf(v)) / 127.f;
            long long o = (long long)a * I + bx * 32 + lane;
            aq[o] = (signed char)__float2int_rn(d > 0.f ? v / d : 0.f);
            if (lane == 0) ad[(long long)a * (I / 32) + bx] = d;
        }
        __syncthreads();
    }
}
