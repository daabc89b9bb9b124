// Bulk-copy forms of the batch-1 expert gate/up (moe_gate_up_q8_topk, kernels/moe_q8.cu), for
// bench/micro/gate_up_micro.cu only: after the block's top-k, the warps' weight rows come to
// shared memory by cp.async.bulk (kernels/common.cuh) and are summed from there, in the register
// kernel's order (the same int8 outputs, bit for bit). Included after kernels/moe_q8.cu (its
// dot_block_i8, gate_up_topk_pick, gate_up_act, gate_up_store). They were in the engine, opt-in,
// for sessions 20-21 and left it after the step A/B on the H100 (session 21, b1 ctx 128,
// graph-only ms, default / best bulk form: Qwen3-30B-A3B 2.554 / 2.624, gpt-oss-20b 2.131 /
// 2.126; bench/results/cuda_decode_h100.md, "Session 21"). tools/check_gate_up_bulk_layout.py
// checks their copy layout by address arithmetic.

// A lane's int8 activation blocks lane + 32 u (u < U; zeros past nb) and their scales, in
// registers for every row the warp takes.
template <int U>
__device__ __forceinline__ void x_blocks_lane(const signed char* __restrict__ xa, const float* __restrict__ da, int nb,
                                              int lane, int4 (&xr)[U][2], float (&dr)[U]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int b = u * 32 + lane;
        xr[u][0] = xr[u][1] = make_int4(0, 0, 0, 0);
        dr[u] = 0.f;
        if (b < nb) {
            xr[u][0] = LDG_ACT((const int4*)(xa + b * 32));
            xr[u][1] = LDG_ACT((const int4*)(xa + b * 32) + 1);
            dr[u] = LDG_ACT(da + b);
        }
    }
}
// moe_gate_up_q8_topk with each warp's weight rows brought to shared memory by bulk copies.
// The register kernel reads Qwen3-30B-A3B's 13.4 MB at ~1.2 TB/s alone, and issuing a warp's
// rows before using any did not help (session 18). Here, once the top-k is known, lane 0 of
// warp w copies the gate and up rows of the warp's PER = 32 / NW outputs and their scales
// with cp.async.bulk: a few instructions put all of them in flight. Each output has a slot
// (its two rows, then their scales) and an mbarrier, so a warp computes output t as soon as
// its rows are in. With S < PER slots the warp's outputs go through a ring: output t + S is
// copied into t's slot once t is done (less shared memory, so more blocks per SM: gpt-oss-20b's
// 360 blocks are 1.4 waves at 2 blocks per SM with every output in flight).
// The sums are row_dot<32, 2>'s, in its order, so the outputs equal moe_gate_up_q8_topk's bit
// for bit. Opt-in (KAIROS_CUDA_GATE_UP_BULK): written without a GPU (session 20); its first
// device call is bench/micro/gate_up_micro.cu, moe_q8::gate_up_topk_matches_separate_launches
// and the step A/B (bench/results/cuda_decode_h100.md, session 20).
// grid (I / 32, n * k), block 32 * NW (>= E); dynamic shared memory GU_BULK_SMEM(nb, NW, S)
// with nb = cols / 32 <= 32 * GU_BULK_U; blocks and scales 16-byte aligned. A row's scales
// need not be: they are copied as their enclosing 16-byte span (inside the buffer, whose size
// E * 2I * nb is a multiple of 16), into a piece GU_BULK_SPAN(nb) bytes long.
#define GU_BULK_U 3
#define GU_BULK_SPAN(nb) (((nb) + 15) / 16 * 16 + 16)
#define GU_BULK_SLOT(nb) (2 * (nb) * 16 + 2 * GU_BULK_SPAN(nb))
#define GU_BULK_SMEM(nb, NW, S) ((NW) * (S) * GU_BULK_SLOT(nb))
// global [p, p + n) as its enclosing 16-byte-aligned span, to dst (16-byte aligned), when
// issue; returns where p's byte lands
__device__ __forceinline__ const u8* bulk_span(u8* dst, const u8* p, u32 n, unsigned long long* bar, bool issue) {
    const unsigned long long a = (unsigned long long)p & ~15ull, e = ((unsigned long long)p + n + 15) & ~15ull;
    if (issue) bulk_copy_g2s(dst, (const void*)a, (u32)(e - a), bar);
    return dst + ((unsigned long long)p - a);
}
__device__ __forceinline__ u32 span_bytes(const u8* p, u32 n) {
    return (u32)((((unsigned long long)p + n + 15) & ~15ull) - ((unsigned long long)p & ~15ull));
}
// Output j's rows of expert e (blocks eb, scales es) into slot sl: the gate row, then the up
// row (act 1: rows 2j, 2j + 1, one copy; act 0: rows j and I + j), then the two rows' scales
// (act 1: one span; act 0: two). Lane 0 issues (with the barrier's byte count); every lane
// gets where the gate and up rows' scales landed.
__device__ __forceinline__ void gate_up_slot(u8* sl, const u8* eb, const u8* es, int j, int I, int nb, int act,
                                             unsigned long long* bar, bool issue, const u8*& sg, const u8*& su) {
    const u32 rb = (u32)nb * 16;
    const long long gr = act == 1 ? 2 * j : j, ur = act == 1 ? 2 * j + 1 : I + j;
    u8* ss = sl + 2 * rb;
    if (issue) {
        const u32 sbytes = act == 1 ? span_bytes(es + gr * nb, 2 * nb) : span_bytes(es + gr * nb, nb) + span_bytes(es + ur * nb, nb);
        mbar_expect_tx(bar, 2 * rb + sbytes);
        if (act == 1) {
            bulk_copy_g2s(sl, eb + gr * rb, 2 * rb, bar);
        } else {
            bulk_copy_g2s(sl, eb + gr * rb, rb, bar);
            bulk_copy_g2s(sl + rb, eb + ur * rb, rb, bar);
        }
    }
    if (act == 1) {
        sg = bulk_span(ss, es + gr * nb, 2 * nb, bar, issue);
        su = sg + nb;
    } else {
        sg = bulk_span(ss, es + gr * nb, nb, bar, issue);
        su = bulk_span(ss + GU_BULK_SPAN(nb), es + ur * nb, nb, bar, issue);
    }
}
// The biases of the warp's PER outputs from jw (lane 0 only; zeros without biases).
template <int PER>
__device__ __forceinline__ void gate_up_biases(const float* __restrict__ bias, long long e, int I, int jw, int act,
                                               bool issue, float (&bg)[PER], float (&bu)[PER]) {
#pragma unroll
    for (int t = 0; t < PER; t++) bg[t] = bu[t] = 0.f;
    if (issue && bias) {
#pragma unroll
        for (int t = 0; t < PER; t++) {
            const int j = jw + t;
            bg[t] = bias[e * 2 * I + (act == 1 ? 2 * j : j)];
            bu[t] = bias[e * 2 * I + (act == 1 ? 2 * j + 1 : I + j)];
        }
    }
}
// One row's sum from shared memory (blocks wr, scales sr), the lane's part, in row_dot<32, 2>'s order.
__device__ __forceinline__ float row_sum_smem(const uint4* wr, const u8* sr, int nb, int lane,
                                              const int4 (&xr)[GU_BULK_U][2], const float (&dr)[GU_BULK_U]) {
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < GU_BULK_U; u++) {
        const int b = u * 32 + lane;
        if (b < nb) acc += (float)dot_block_i8(wr[b], xr[u][0], xr[u][1]) * (0.5f * e8m0_q8(sr[b]) * dr[u]);
    }
    return acc;
}
template <int NW, int S>
__device__ void gate_up_q8_bulk_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, const float* logits, int E, int k, int renorm,
        int* ids, float* wout, const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad) {
    constexpr int PER = 32 / NW;
    static_assert(S >= 1 && S <= PER, "slots per warp");
    extern __shared__ __align__(128) unsigned char gu_smem[];
    __shared__ __align__(8) unsigned long long bar[NW][S];
    __shared__ float out[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, a = blockIdx.y, bx = blockIdx.x;
    const int nb = cols / 32;
    // the warp's barriers before the wait: nothing in them depends on the kernel before
    if (lane == 0) {
        for (int q = 0; q < S; q++) mbar_init(&bar[warp][q], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    const long long e = gate_up_topk_pick(logits, E, k, renorm, ids, wout);
    if (e < 0) {  // expert held by another rank (expert parallel): a zero activation
        if (lane < PER) out[warp * PER + lane] = 0.f;
        gate_up_store(out, aq, ad, a, I, bx);
        return;
    }
    const int jw = bx * 32 + warp * PER;  // the warp's first output
    u8* slots = gu_smem + (size_t)warp * S * GU_BULK_SLOT(nb);
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
    const bool issue = lane == 0;
    const u8 *sg[S], *su[S];  // where each slot's gate and up rows' scales landed
#pragma unroll
    for (int t = 0; t < S; t++) gate_up_slot(slots + t * GU_BULK_SLOT(nb), eb, es, jw + t, I, nb, act, &bar[warp][t], issue, sg[t], su[t]);
    // the biases while the rows fly (the register kernel loads them after its sums)
    float bg[PER], bu[PER];
    gate_up_biases<PER>(bias, e, I, jw, act, issue, bg, bu);
    // the lane's activation blocks lane + 32 i, also while the rows fly
    int4 xr[GU_BULK_U][2];
    float dr[GU_BULK_U];
    x_blocks_lane<GU_BULK_U>(xq + (long long)(a / k) * cols, xd + (long long)(a / k) * nb, nb, lane, xr, dr);
#pragma unroll
    for (int t = 0; t < PER; t++) {
        const int q = t % S;
        const u8* sl = slots + q * GU_BULK_SLOT(nb);
        mbar_wait(&bar[warp][q], (u32)(t / S) & 1u);
        const float g = warp_sum(row_sum_smem((const uint4*)sl, sg[q], nb, lane, xr, dr));
        const float u = warp_sum(row_sum_smem((const uint4*)(sl + (size_t)nb * 16), su[q], nb, lane, xr, dr));
        if (lane == 0) out[warp * PER + t] = gate_up_act(g + bg[t], u + bu[t], act, alpha, limit);
        if (t + S < PER) {  // the ring: output t + S into this slot, once every lane has read it
            __syncwarp();
            // the slot was read through the generic proxy; the copy writes through the async one
            if (issue) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            gate_up_slot((u8*)sl, eb, es, jw + t + S, I, nb, act, &bar[warp][q], issue, sg[q], su[q]);
        }
    }
    gate_up_store(out, aq, ad, a, I, bx);
}
// moe_gate_up_q8_topk_bulk<NW>[_r<S>]: NW warps, S slots per warp (default: every output)
#define GATE_UP_BULK_ENTRY(NAME, NW, S) \
extern "C" __global__ void __launch_bounds__(NW * 32) NAME(const u8* blocks, const u8* scales, \
        const signed char* xq, const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout, \
        const float* bias, int I, int cols, int act, float alpha, float limit, signed char* aq, float* ad) { \
    gate_up_q8_bulk_impl<NW, S>(blocks, scales, xq, xd, logits, E, k, renorm, ids, wout, bias, I, cols, act, alpha, limit, aq, ad); }
GATE_UP_BULK_ENTRY(moe_gate_up_q8_topk_bulk8, 8, 4)
GATE_UP_BULK_ENTRY(moe_gate_up_q8_topk_bulk8_r2, 8, 2)
GATE_UP_BULK_ENTRY(moe_gate_up_q8_topk_bulk16, 16, 2)

// The same with a warp's rows in a few large copies instead of a slot per output. A warp's
// PER outputs are consecutive, so its gate rows, its up rows and their scales are each one
// contiguous range (act 1, rows interleaved: one range of 2 PER rows and one of scales): lane 0
// issues 2 to 4 copies of up to PER KB for the warp, against 3 or 4 copies of 1 KB and less per
// output above, and the warp waits once. bench/micro/gate_up_micro.cu's "read bulk" floor, a
// block's rows in 2 copies, read Qwen3-30B-A3B's 13.4 MB in 6.3 us against the slot forms'
// 12.4-13.3 us (H100, session 21). Same sums, same order: equal to the register kernel's.
// Shared memory GU_RANGES_SMEM(nb, NW): per warp its 2 PER rows, then two scale spans.
#define GU_RANGES_WARP(nb, PER) (2 * (PER) * (nb) * 16 + 2 * GU_BULK_SPAN((PER) * (nb)))
#define GU_RANGES_SMEM(nb, NW) ((NW) * GU_RANGES_WARP(nb, 32 / (NW)))
// PICK false: ids[blockIdx.y] names the expert (no top-k); COMPUTE false: no sums, only the
// copies and the wait (diagnostic floors, outputs not meaningful).
template <int NW, bool PICK = true, bool COMPUTE = true>
__device__ void gate_up_q8_ranges_impl(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, const float* logits, int E, int k, int renorm,
        int* ids, float* wout, const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad) {
    constexpr int PER = 32 / NW;
    extern __shared__ __align__(128) unsigned char gu_smem[];
    __shared__ __align__(8) unsigned long long bar[NW];
    __shared__ float out[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, a = blockIdx.y, bx = blockIdx.x;
    const int nb = cols / 32;
    const u32 rb = (u32)nb * 16;
    if (lane == 0) {
        mbar_init(&bar[warp], 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    const long long e = PICK ? gate_up_topk_pick(logits, E, k, renorm, ids, wout) : ids[blockIdx.y];
    if (e < 0) {  // expert held by another rank (expert parallel): a zero activation
        if (lane < PER) out[warp * PER + lane] = 0.f;
        gate_up_store(out, aq, ad, a, I, bx);
        return;
    }
    const int jw = bx * 32 + warp * PER;  // the warp's first output
    u8* rows = gu_smem + (size_t)warp * GU_RANGES_WARP(nb, PER);
    u8* ss = rows + 2 * PER * rb;
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
    const bool issue = lane == 0;
    // act 1: rows 2 jw .. 2 jw + 2 PER (gate, up, gate, ...); act 0: gate rows jw .., up rows I + jw ..
    const long long g0 = act == 1 ? 2ll * jw : jw, u0 = act == 1 ? 2ll * jw + 1 : (long long)I + jw;
    const u8 *sg, *su;  // output 0's gate and up scales in shared memory
    if (issue) {
        const u32 sbytes = act == 1 ? span_bytes(es + g0 * nb, 2 * PER * nb)
                                    : span_bytes(es + g0 * nb, PER * nb) + span_bytes(es + u0 * nb, PER * nb);
        mbar_expect_tx(&bar[warp], 2 * PER * rb + sbytes);
        if (act == 1) {
            bulk_copy_g2s(rows, eb + g0 * rb, 2 * PER * rb, &bar[warp]);
        } else {
            bulk_copy_g2s(rows, eb + g0 * rb, PER * rb, &bar[warp]);
            bulk_copy_g2s(rows + PER * rb, eb + u0 * rb, PER * rb, &bar[warp]);
        }
    }
    if (act == 1) {
        sg = bulk_span(ss, es + g0 * nb, 2 * PER * nb, &bar[warp], issue);
        su = sg + nb;
    } else {
        sg = bulk_span(ss, es + g0 * nb, PER * nb, &bar[warp], issue);
        su = bulk_span(ss + GU_BULK_SPAN(PER * nb), es + u0 * nb, PER * nb, &bar[warp], issue);
    }
    // output t's rows and scales: act 1 every other row from 0 (gate) and 1 (up); act 0 rows t, PER + t
    const int rstep = act == 1 ? 2 : 1, uoff = act == 1 ? 1 : PER;
    float bg[PER], bu[PER];
    gate_up_biases<PER>(bias, e, I, jw, act, issue, bg, bu);
    int4 xr[GU_BULK_U][2];
    float dr[GU_BULK_U];
    x_blocks_lane<GU_BULK_U>(xq + (long long)(a / k) * cols, xd + (long long)(a / k) * nb, nb, lane, xr, dr);
    mbar_wait(&bar[warp], 0);
#pragma unroll
    for (int t = 0; t < (COMPUTE ? PER : 0); t++) {
        const size_t so = (size_t)t * rstep * nb;  // output t's scales past output 0's
        const float g = warp_sum(row_sum_smem((const uint4*)(rows + (size_t)t * rstep * rb), sg + so, nb, lane, xr, dr));
        const float u = warp_sum(row_sum_smem((const uint4*)(rows + (size_t)(t * rstep + uoff) * rb), su + so, nb, lane, xr, dr));
        if (lane == 0) out[warp * PER + t] = gate_up_act(g + bg[t], u + bu[t], act, alpha, limit);
    }
    if (!COMPUTE && lane < PER) out[warp * PER + lane] = (float)rows[lane * rb] + (float)sg[lane] + dr[0];
    gate_up_store(out, aq, ad, a, I, bx);
}
#define GATE_UP_RANGES_ENTRY(NAME, NW) \
extern "C" __global__ void __launch_bounds__(NW * 32) NAME(const u8* blocks, const u8* scales, \
        const signed char* xq, const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout, \
        const float* bias, int I, int cols, int act, float alpha, float limit, signed char* aq, float* ad) { \
    gate_up_q8_ranges_impl<NW>(blocks, scales, xq, xd, logits, E, k, renorm, ids, wout, bias, I, cols, act, alpha, limit, aq, ad); }
GATE_UP_RANGES_ENTRY(moe_gate_up_q8_topk_ranges8, 8)
GATE_UP_RANGES_ENTRY(moe_gate_up_q8_topk_ranges16, 16)
