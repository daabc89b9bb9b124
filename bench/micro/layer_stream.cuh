// The layer of bench/micro/layer_stream_micro.cu: its shape, its phases' shares and chunks,
// and the arithmetic that the persistent kernel and the reference kernels both run (so the
// two agree bit for bit). Included by that file only, after kernels/common.cuh,
// kernels/moe_q8.cu and kernels/gemv_bulk.cu.
#pragma once
#ifndef CW
#define CW 8  // consumer warps per block (warp 0 is the loader)
#endif
constexpr int HID = 2048, NQ = 32, NKV = 4, HD = 128, QKV = (NQ + 2 * NKV) * HD, ODIM = NQ * HD;
constexpr int NE = 128, TOPK = 8, INTER = 768;
constexpr int GU_NB = HID / 32, D_NB = INTER / 32;
constexpr int GU_REC = (GU_NB * 17 + 15) / 16 * 16, D_REC = (D_NB * 17 + 15) / 16 * 16;  // 1088, 416
#ifndef STAGE_KB
#define STAGE_KB 16  // ring stage (one bulk copy of whole rows at most)
#endif
constexpr int STAGE = STAGE_KB * 1024;
constexpr int MAX_STAGES = 192 / STAGE_KB;
constexpr int BARRIERS = 6;  // grid barriers per layer
constexpr int STAMPS = 10;   // time stamps per layer (block 0): start, norm, B1, B2, B3, norm+quant, B4, B5, act quant, B6
constexpr int DMAX = 32;     // most down outputs a block owns
enum { PH_QKV, PH_O, PH_R, PH_GU, PH_D };
enum { FULL = 0, STREAM = 1, SYNC = 2, FIXED = 3, DRAIN = 4 };

struct Net {
    const bf16_t *wqkv, *wo, *wr, *kc, *vc;
    const u8 *wgu, *wd;
    int layers, ctx;
    int pack;  // chunks of several segments (see Chunk)
    float *resid, *qkv, *attn, *aml, *attn_out, *logits, *act;  // attn: NQ * NSPLIT partial outputs of HD
    unsigned* waits;  // [10]: S.cnt summed over blocks and launches
    unsigned* hctr;  // per query head: split blocks done (grows across layers and launches)
    unsigned* ctr;
    unsigned long long* stamps;  // [layers][STAMPS], block 0
};

// ---- arithmetic shared by the persistent kernel and the reference kernels ----
__device__ __forceinline__ void csync() { asm volatile("bar.sync 1, %0;" :: "r"(CW * 32) : "memory"); }
// A GEMV's input, rounded to bf16 as every engine GEMV reads it, packed 8 to a 16-byte piece
// in shared memory: a lane reads its pieces lane + 32p next to its neighbours' (no bank
// conflicts), 16 bytes per 16 bytes of weights. (f32 x read per row, 32 bytes per 16 bytes of
// weights with 2-way conflicts, made the dense phases shared-memory bound: ~3 us of consumer
// time per 160 KB share, session 19 call 4, where 98% of the chunks were already loaded when a
// warp came to them. x in registers spilled: 64 registers for a 4096-wide row.)
__device__ __forceinline__ void pack_x(const float* x, uint4* xb, int c8, int t) {
    for (int c = t; c < c8; c += CW * 32) {
        const float4 a = ((const float4*)x)[2 * c], b = ((const float4*)x)[2 * c + 1];
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        xb[c] = pack8_bf16(v);
    }
    csync();
}
// one warp's dot of a bf16 row (c8 16-byte pieces) with packed bf16 x
__device__ __forceinline__ float dot_bf16(const uint4* w, const uint4* xb, int c8, int lane) {
    float acc = 0.f;
#pragma unroll 4
    for (int c = lane; c < c8; c += 32) {
        float wf[8], xf[8];
        unpack8(w[c], wf);
        unpack8(xb[c], xf);
#pragma unroll
        for (int e = 0; e < 8; e++) acc += wf[e] * xf[e];
    }
    return warp_sum(acc);
}
// An expert GEMV's int8 input in registers: lane's 32-blocks lane + 32i (NBL of them).
template <int NBL> struct XQ { int4 x[NBL][2]; float d[NBL]; };
template <int NBL>
__device__ __forceinline__ void load_xq(const signed char* xq, const float* xd, int nb, XQ<NBL>& r, int lane) {
#pragma unroll
    for (int i = 0; i < NBL; i++) {
        const int b = lane + 32 * i;
        r.x[i][0] = b < nb ? ((const int4*)(xq + b * 32))[0] : make_int4(0, 0, 0, 0);
        r.x[i][1] = b < nb ? ((const int4*)(xq + b * 32))[1] : make_int4(0, 0, 0, 0);
        r.d[i] = b < nb ? xd[b] : 0.f;
    }
}
// dot_fp4 (below) with its input in registers: the same sums in the same order
template <int NBL>
__device__ __forceinline__ float dot_fp4_xq(const u8* rec, int nb, const XQ<NBL>& r, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < NBL; i++) {
        const int b = lane + 32 * i;
        if (b < nb) {
            const int d = dot_block_i8(*(const uint4*)(rec + b * 16), r.x[i][0], r.x[i][1]);
            acc += (float)d * (0.5f * e8m0_q8(rec[nb * 16 + b]) * r.d[i]);
        }
    }
    return warp_sum(acc);
}
// one warp's dot of an MXFP4 record (nb blocks) with int8 x (xq, per-block scales xd)
__device__ __forceinline__ float dot_fp4(const u8* rec, int nb, const signed char* xq, const float* xd, int lane) {
    float acc = 0.f;
    for (int b = lane; b < nb; b += 32) {
        const uint4 w = *(const uint4*)(rec + b * 16);
        const int4 x0 = ((const int4*)(xq + b * 32))[0], x1 = ((const int4*)(xq + b * 32))[1];
        const int d = dot_block_i8(w, x0, x1);
        acc += (float)d * (0.5f * e8m0_q8(rec[nb * 16 + b]) * xd[b]);
    }
    return warp_sum(acc);
}
// sum / max over the CW consumer warps (t = consumer thread index); red: CW floats
__device__ __forceinline__ float c_sum(float v, float* red, int t) {
    v = warp_sum(v);
    if ((t & 31) == 0) red[t >> 5] = v;
    csync();
    float s = 0.f;
    for (int w = 0; w < CW; w++) s += red[w];
    csync();
    return s;
}
__device__ __forceinline__ float c_max(float v, float* red, int t) {
    v = warp_max(v);
    if ((t & 31) == 0) red[t >> 5] = v;
    csync();
    float s = NEG_INF;
    for (int w = 0; w < CW; w++) s = fmaxf(s, red[w]);
    csync();
    return s;
}
// int8 of one 32-block held by 4 lanes (lanes 4j..4j+3), 8 values each; e0: the first of
// the 8 elements. Every lane of the warp must call it (the max is a shuffle).
__device__ __forceinline__ void quant8(const float (&v)[8], bool valid, signed char* xq, float* xd, int e0, int lane) {
    float m = 0.f;
    for (int i = 0; i < 8; i++) m = fmaxf(m, fabsf(v[i]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    const float d = m / 127.f;
    if (!valid) return;
    u32 q[2] = {0u, 0u};
    for (int i = 0; i < 8; i++) q[i / 4] |= ((u32)(u8)(signed char)__float2int_rn(d > 0.f ? v[i] / d : 0.f)) << (8 * (i % 4));
    *(uint2*)(xq + e0) = make_uint2(q[0], q[1]);
    if ((lane & 3) == 0) xd[e0 / 32] = d;
}
// out = resid / rms(resid) (no norm weight) and, with xq, its int8 form; resid read through
// L2 (written by other blocks). One group of 8 per thread (HID / 8 <= CW * 32). (A warp per
// 32-block, one shuffle reduction each, made norm + quantization ~3 us: session 19 call 2.)
__device__ void norm_quant(const float* resid, float* out, signed char* xq, float* xd, float* red, int t) {
    static_assert(HID / 8 <= CW * 32, "one group of 8 per thread");
    const bool valid = t < HID / 8;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (valid) ld8f_cg(resid + 8 * t, v);
    float ss = 0.f;
    for (int i = 0; i < 8; i++) ss += v[i] * v[i];
    const float inv = rsqrtf(c_sum(ss, red, t) / HID + 1e-6f);
    for (int i = 0; i < 8; i++) v[i] *= inv;
    if (valid) st8(out + 8 * t, v);
    if (xq && (t >> 5) * 32 < HID / 8) quant8(v, valid, xq, xd, 8 * t, t & 31);
    csync();
}
// int8 of n f32 values in global memory (written by other blocks: read through L2)
__device__ void act_quant(const float* x, int n, signed char* xq, float* xd, int t) {
    for (int g0 = t - (t & 31); g0 < n / 8; g0 += CW * 32) {
        const int g = g0 + (t & 31);
        const bool valid = g < n / 8;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (valid) ld8f_cg(x + 8 * g, v);
        quant8(v, valid, xq, xd, 8 * g, t & 31);
    }
    csync();
}
// top-8 of NE logits and their softmax weights, by one warp (every lane gets them)
__device__ void topk8(const float* logits, int* ids, float* wts, int lane) {
    float v[NE / 32];
    for (int i = 0; i < NE / 32; i++) v[i] = __ldcg(logits + lane + 32 * i);
    float top[TOPK];
    for (int k = 0; k < TOPK; k++) {
        float bv = NEG_INF; int bi = NE;
        for (int i = 0; i < NE / 32; i++)
            if (v[i] > bv) { bv = v[i]; bi = lane + 32 * i; }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        top[k] = bv;
        ids[k] = bi;
        if ((bi & 31) == lane) v[bi >> 5] = NEG_INF;
    }
    float s = 0.f;
    for (int k = 0; k < TOPK; k++) s += expf(top[k] - top[0]);
    for (int k = 0; k < TOPK; k++) wts[k] = expf(top[k] - top[0]) / s;
}
__device__ __forceinline__ void fixed_experts(int l, int* ids, float* wts) {
    for (int k = 0; k < TOPK; k++) { ids[k] = (l * 37 + k * 13) % NE; wts[k] = 1.f / TOPK; }
}
// One query head over positions [p0, p1): unnormalised output o (HD floats) and its (max, sum)
// into ml; q f32 (HD), K/V bf16 [ctx][HD] of its kv head. One thread per position for the
// scores, warps over positions for the output. qs: HD floats, sc: p1 - p0, part: CW x HD.
__device__ void attend_part(const float* q, const bf16_t* K, const bf16_t* V, int p0, int p1, float* o_out, float* ml,
                            float* qs, float* sc, float* part, float* red, int t) {
    const int lane = t & 31, w = t >> 5;
    if (t < HD) qs[t] = __ldcg(q + t);
    csync();
    float m = NEG_INF;
    for (int p = p0 + t; p < p1; p += CW * 32) {
        const uint4* k = (const uint4*)(K + (long long)p * HD);
        float s = 0.f;
#pragma unroll 4
        for (int c = 0; c < HD / 8; c++) {
            float kf[8];
            unpack8(k[c], kf);
            for (int e = 0; e < 8; e++) s += qs[c * 8 + e] * kf[e];
        }
        s *= 0.08838834764831845f;
        sc[p - p0] = s;
        m = fmaxf(m, s);
    }
    m = c_max(m, red, t);
    float l = 0.f;
    for (int p = p0 + t; p < p1; p += CW * 32) { const float e = expf(sc[p - p0] - m); sc[p - p0] = e; l += e; }
    l = c_sum(l, red, t);
    float o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int p = p0 + w; p < p1; p += CW) {
        const uint2 v = *(const uint2*)(V + (long long)p * HD + lane * 4);
        const float e = sc[p - p0];
        o[0] += e * bf2f(v.x & 0xffff); o[1] += e * bf2f(v.x >> 16); o[2] += e * bf2f(v.y & 0xffff); o[3] += e * bf2f(v.y >> 16);
    }
    for (int i = 0; i < 4; i++) part[w * HD + lane * 4 + i] = o[i];
    csync();
    if (t < HD) {
        float s = 0.f;
        for (int i = 0; i < CW; i++) s += part[i * HD + t];
        o_out[t] = s;
    }
    if (t == 0) { ml[0] = m; ml[1] = l; }
    csync();
}
// Head h's output (HD floats) from its NSPLIT partial results: ao (NQ * NSPLIT x HD), aml
// ((max, sum) per partial). Run by the last of the head's split blocks to finish. (Every block
// combining all heads while loading the o-projection's input cost ~2.5 us: session 19 call 2.)
constexpr int NSPLIT = 4;
__device__ void combine_head(const float* ao, const float* aml, float* out, int h, int t) {
    if (t >= HD) return;
    float M = NEG_INF, ml[2 * NSPLIT];
    for (int s = 0; s < 2 * NSPLIT; s++) ml[s] = __ldcg(aml + h * NSPLIT * 2 + s);
    for (int s = 0; s < NSPLIT; s++) M = fmaxf(M, ml[2 * s]);
    float L = 0.f, o = 0.f;
    for (int s = 0; s < NSPLIT; s++) {
        const float f = ml[2 * s + 1] > 0.f ? expf(ml[2 * s] - M) : 0.f;
        L += ml[2 * s + 1] * f;
        o += __ldcg(ao + (h * NSPLIT + s) * HD + t) * f;
    }
    out[h * HD + t] = o / L;
}
__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

// ---- the block's share of each phase, and its chunks (loader and consumers walk the same) ----
__device__ __forceinline__ void split(int n, int G, int b, int& u0, int& u1) {
    u0 = (int)((long long)n * b / G); u1 = (int)((long long)n * (b + 1) / G);
}
__device__ __forceinline__ int unit_bytes(int ph) {
    return ph == PH_QKV || ph == PH_R ? HID * 2 : ph == PH_O ? ODIM * 2 : ph == PH_GU ? 2 * GU_REC : D_REC;
}
__device__ __forceinline__ void phase_range(int ph, int b, int G, int& u0, int& u1) {
    if (ph == PH_QKV) split(QKV, G, b, u0, u1);
    else if (ph == PH_O) split(HID, G, b, u0, u1);
    else if (ph == PH_R) split(NE, G, b, u0, u1);
    else if (ph == PH_GU) split(TOPK * INTER, G, b, u0, u1);
    else { split(HID / 2, G, b, u0, u1); u0 *= 2; u1 *= 2; }  // down: pairs (16-byte aligned scale rows)
}
// A chunk: n units from f0 on, in up to MAX_SEG contiguous segments (one bulk copy each)
// packed back to back in one stage. With net.pack = 0 a chunk is one segment, so a stage
// may hold little (a down chunk is one expert's ~16 rows, 6.6 KB of a 16 KB stage).
constexpr int MAX_SEG = 4;
struct Chunk { const char* src[MAX_SEG]; u32 bytes[MAX_SEG]; int nseg, f0, n; };
// The segment at unit f of the block's share of phase ph (layer l): its source and how many
// units it may hold (up to a boundary: another expert's rows follow).
__device__ __forceinline__ const char* unit_src(const Net& net, int l, int ph, int u0, int u1, const int* ids, int f, int& run) {
    const int ub = unit_bytes(ph);
    if (ph == PH_QKV) { run = u1 - u0 - f; return (const char*)net.wqkv + ((long long)l * QKV + u0 + f) * ub; }
    if (ph == PH_O) { run = u1 - u0 - f; return (const char*)net.wo + ((long long)l * HID + u0 + f) * ub; }
    if (ph == PH_R) { run = u1 - u0 - f; return (const char*)net.wr + ((long long)l * NE + u0 + f) * ub; }
    if (ph == PH_GU) {
        const int g = u0 + f, k = g / INTER, j = g % INTER;
        run = min(u1 - g, INTER - j);
        return (const char*)net.wgu + (((long long)l * NE + ids[k]) * 2 * INTER + 2 * j) * GU_REC;
    }
    const int nb = u1 - u0, k = f / nb, o = u0 + f % nb;
    run = nb - f % nb;
    return (const char*)net.wd + (((long long)l * NE + ids[k]) * HID + o) * D_REC;
}
// the chunk starting at unit f of the block's share of phase ph; advances f (SRC: fill in the
// segments' sources, which only the loader needs)
template <bool SRC = false>
__device__ bool next_chunk(const Net& net, int l, int ph, int u0, int u1, const int* ids, int& f, Chunk& c) {
    const int total = ph == PH_D ? TOPK * (u1 - u0) : u1 - u0;
    if (f >= total) return false;
    const int ub = unit_bytes(ph), upc = STAGE / ub, maxseg = net.pack ? MAX_SEG : 1;
    c.f0 = f; c.n = 0; c.nseg = 0;
    while (c.nseg < maxseg && c.n < upc && f < total) {
        int run;
        const char* src = unit_src(net, l, ph, u0, u1, ids, f, run);
        const int n = min(run, upc - c.n);
        if (SRC) { c.src[c.nseg] = src; c.bytes[c.nseg] = (u32)(n * ub); }
        c.nseg++;
        c.n += n; f += n;
    }
    return true;
}
