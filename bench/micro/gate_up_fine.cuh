// The one-row expert gate/up with 8 outputs per block, for bench/micro/gate_up_micro.cu only.
// It was in kernels/moe_q8.cu, opt-in, during session 21 and left it after the step A/B on the
// H100 (b1 ctx 128, graph-only ms, 32 outputs per block / this / _lf: Qwen3-30B-A3B 2.562 /
// 2.666 / 2.748, gpt-oss-20b 2.135 / 2.153 / 2.180; bench/results/cuda_decode_h100.md, "Session
// 21"). Included after kernels/moe_q8.cu (row_dot, dot_block, gate_up_topk_pick, gate_up_act).

// moe_gate_up_q8_topk with 8 outputs per block instead of 32 (a warp per output), so 4x the
// blocks: the register kernel's 192 blocks of Qwen3-30B-A3B b1 sit 1 or 2 to an SM, and the
// SMs with 2 set the pace, while many small blocks spread evenly (bench/micro/decode_micro.cu's
// plain expert GEMV, 1536 blocks of 8 rows, reads the same gate+up bytes in 7.4 us against the
// fused kernel's 11.4 on the H100, session 21). An output's int8 block of 32 now spans 4
// blocks: each adds its max |v| to gmax (atomicMax on the float bits, |v| >= 0) and its values
// to af; the 4th to arrive (cnt) quantizes the 32 values as gate_up_store does (the same max,
// the same d, so the same bytes) and zeroes gmax / cnt for the next launch.
// grid (I / 8, n_assign), block 256; af f32 [n_assign, I], gcnt u32 [2 * n_assign * I / 32]
// (max, count per 32-block), zero before the first launch and left zero by every launch.
// _lf: for rows of up to 96 blocks, a lane's gate and up blocks are all loaded before any is
// used (one round trip, not two), summed in row_dot<32, 2>'s order.
template <bool LF>
__device__ void gate_up_fine_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, const float* logits, int E, int k, int renorm,
        int* ids, float* wout, const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad, float* af, unsigned* gcnt) {
    const int e = gate_up_topk_pick(logits, E, k, renorm, ids, wout);
    __shared__ float out[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, a = blockIdx.y;
    const int nb = cols / 32, j = blockIdx.x * 8 + warp;
    float v = 0.f;  // an expert held by another rank (e < 0): a zero activation
    if (e >= 0) {
        const signed char* xa = xq + (long long)(a / k) * cols;
        const float* da = xd + (long long)(a / k) * nb;
        const u8* eb = blocks + (long long)e * 2 * I * nb * 16;
        const u8* es = scales + (long long)e * 2 * I * nb;
        const int gr = act == 1 ? 2 * j : j, ur = act == 1 ? 2 * j + 1 : I + j;
        const u8 *gw = eb + (long long)gr * nb * 16, *uw = eb + (long long)ur * nb * 16;
        const u8 *gs = es + (long long)gr * nb, *us = es + (long long)ur * nb;
        float g = 0.f, u = 0.f;
        if (LF && nb <= 96) {
            uint4 wg[3], wu[3];
            u32 sg[3], su[3];
#pragma unroll
            for (int t = 0; t < 3; t++) {
                const int b = t * 32 + lane;
                if (b < nb) {
                    wg[t] = ld_stream16(gw + b * 16);
                    wu[t] = ld_stream16(uw + b * 16);
                    sg[t] = __ldg(gs + b);
                    su[t] = __ldg(us + b);
                }
            }
#pragma unroll
            for (int t = 0; t < 3; t++) {
                const int b = t * 32 + lane;
                if (b < nb) {
                    g += (float)dot_block(wg[t], xa + b * 32) * (0.5f * e8m0_q8(sg[t]) * LDG_ACT(da + b));
                    u += (float)dot_block(wu[t], xa + b * 32) * (0.5f * e8m0_q8(su[t]) * LDG_ACT(da + b));
                }
            }
        } else {
            g = row_dot<32, 2>(gw, gs, nb, xa, da, lane);
            u = row_dot<32, 2>(uw, us, nb, xa, da, lane);
        }
        g = warp_sum(g);
        u = warp_sum(u);
        if (bias) { g += bias[(long long)e * 2 * I + gr]; u += bias[(long long)e * 2 * I + ur]; }
        v = gate_up_act(g, u, act, alpha, limit);
    }
    if (lane == 0) out[warp] = v;
    __syncthreads();
    if (warp != 0) return;
    const long long q = (long long)a * (I / 32) + (blockIdx.x >> 2);  // the output's 32-block
    unsigned* gm = gcnt + 2 * q;
    const float x = lane < 8 ? out[lane] : 0.f;
    const float m = warp_max(fabsf(x));
    if (lane < 8) af[(long long)a * I + blockIdx.x * 8 + lane] = x;
    __syncwarp();
    unsigned prior = 0;
    if (lane == 0) {
        atomicMax(gm, __float_as_uint(m));
        __threadfence();  // af and the max before the count
        prior = atomicAdd(gm + 1, 1u);
    }
    if (__shfl_sync(0xffffffffu, prior, 0) != 3) return;
    // the 4th block of the 32: every block's af and max are visible
    unsigned mb = 0;
    if (lane == 0) {
        __threadfence();
        mb = atomicExch(gm, 0u);
        gm[1] = 0u;
    }
    __syncwarp();  // the loads below after lane 0's fence
    const float d = __uint_as_float(__shfl_sync(0xffffffffu, mb, 0)) / 127.f;
    const float y = __ldcg(af + (long long)a * I + (blockIdx.x >> 2) * 32 + lane);
    aq[(long long)a * I + (blockIdx.x >> 2) * 32 + lane] = (signed char)__float2int_rn(d > 0.f ? y / d : 0.f);
    if (lane == 0) ad[q] = d;
}
#define GATE_UP_FINE_ENTRY(NAME, LF) \
extern "C" __global__ void __launch_bounds__(256) NAME(const u8* blocks, const u8* scales, const signed char* xq, \
        const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout, const float* bias, int I, \
        int cols, int act, float alpha, float limit, signed char* aq, float* ad, float* af, unsigned* gcnt) { \
    gate_up_fine_impl<LF>(blocks, scales, xq, xd, logits, E, k, renorm, ids, wout, bias, I, cols, act, alpha, limit, aq, ad, \
                          af, gcnt); }
GATE_UP_FINE_ENTRY(moe_gate_up_q8_topk_fine, false)
GATE_UP_FINE_ENTRY(moe_gate_up_q8_topk_fine_lf, true)
