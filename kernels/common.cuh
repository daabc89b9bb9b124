// Shared helpers, prepended to every kernels/*.cu source by the host before
// NVRTC compiles it (no #include, so no include path is needed).
// bf16 is carried as raw u16 bits.
typedef unsigned short bf16_t;
// The persistent decode kernel (persistent.cu) is compiled from these same sources with
// KAIROS_PERSISTENT defined. There, data written earlier in the same launch (by other
// blocks, behind a grid barrier) must not be read through the non-coherent read-only
// path: `__restrict__` (which lets the compiler emit ld.global.nc) is dropped and
// LDG_ACT is a plain (coherent, L1-cached) load: the barrier's acquire at GPU scope
// invalidates the SM's L1. (Through L2 only, every warp of a GEMV re-read the whole
// input vector from L2: the o_proj phase ran 6x slower.) Weights keep their read-only loads.
#ifdef KAIROS_PERSISTENT
#define __restrict__
#define LDG_ACT(p) (*(p))
#else
#define LDG_ACT(p) __ldg(p)
#endif
typedef unsigned int u32;
typedef unsigned char u8;

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(bf16_t v) { return __uint_as_float(((u32)v) << 16); }
// round-to-nearest-even; NaN stays NaN
__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return bf2f(v); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16_t* p, float v) { *p = f2bf(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// sum over the whole block (blockDim.x multiple of 32, <= 1024); all threads get it
__device__ __forceinline__ float block_sum(float v, float* sh /*[33]*/) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? sh[lane] : 0.f;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    float r = sh[32];
    __syncthreads();
    return r;
}
// unpack 8 bf16 held in a uint4
__device__ __forceinline__ void unpack8(const uint4 v, float* o) {
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
    o[4] = __uint_as_float(v.z << 16); o[5] = __uint_as_float(v.z & 0xffff0000u);
    o[6] = __uint_as_float(v.w << 16); o[7] = __uint_as_float(v.w & 0xffff0000u);
}
// load 8 consecutive activations (bf16 or f32) as f32; p 16-byte aligned
__device__ __forceinline__ void load8(const bf16_t* p, float* o) { unpack8(LDG_ACT((const uint4*)p), o); }
__device__ __forceinline__ void load8(const float* p, float* o) {
    float4 a = LDG_ACT((const float4*)p), b = LDG_ACT((const float4*)p + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
// Programmatic dependent launch (sm_90+): the host launches every kernel with the
// PDL attribute (src/backend/cuda/launch.rs), so a kernel may start before its
// predecessor ends. PDL_ENTRY(), the first statement of every kernel, lets the next
// kernel be scheduled and then waits until the predecessor has completed and its
// writes are visible. Without the attribute both instructions are no-ops.
// Kernels that load something independent of their predecessor (weights) first split it:
// PDL_PRE(), the independent loads, PDL_POST().
// `#pragma unroll N` with N a macro (a tuning define): NVRTC expands macros in a pragma, nvcc
// (bench/micro) does not, _Pragma works for both
#define KAIROS_PRAGMA(x) _Pragma(#x)
#define UNROLL_BY(n) KAIROS_PRAGMA(unroll n)
// -DPDL_LATE: the dependent is let go only after this kernel's own wait, so at most one
// grid waits ahead of the running one (by default single-wave grids let theirs go at once,
// and a chain of them can be resident, waiting, together).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define PDL_TRIGGER() do { } while (0)
#define PDL_WAIT() do { } while (0)
#endif
#ifdef PDL_LATE
#define PDL_PRE() do { } while (0)
#define PDL_POST() do { PDL_WAIT(); PDL_TRIGGER(); } while (0)
#else
#define PDL_PRE() PDL_TRIGGER()
#define PDL_POST() PDL_WAIT()
#endif
#define PDL_ENTRY() do { PDL_PRE(); PDL_POST(); } while (0)
// The PDL wait as a functor, for kernel bodies that load their weights first and take
// their wait as a parameter (the persistent step passes its own).
struct PdlWait {
    __device__ __forceinline__ void operator()() const { PDL_POST(); }
};
// A body given NoWait was waited for before it began (PDL_ENTRY, or the persistent step).
struct NoWait {
    __device__ __forceinline__ void operator()() const {}
};
template <typename W> struct WaitsInside { static const bool value = true; };
template <> struct WaitsInside<NoWait> { static const bool value = false; };
// Ask L2 for `bytes` at p, one 128-byte line per lane of the warp per step: kernels
// whose weights do not depend on their predecessor issue this before PDL_WAIT(), so
// the weight stream starts while the predecessor finishes (-DKAIROS_NO_PREFETCH: off).
__device__ __forceinline__ void prefetch_l2_warp(const void* p, long long bytes) {
#ifndef KAIROS_NO_PREFETCH
    const char* c = (const char*)p;
    for (long long off = (long long)(threadIdx.x & 31) * 128; off < bytes; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" :: "l"(c + off));
#endif
}

// ---- RoPE (rope_qk_kv, and attention_rope_* in the fold of one-row steps) ----
// The per-head RMSNorm factor of head x [D] (1 without a norm weight): each lane sums dims
// lane, lane + 32, ... then the warp sums (the same order wherever it is computed).
__device__ __forceinline__ float rope_head_inv(const float* x, const bf16_t* nw, int D, float eps, int lane) {
    if (!nw) return 1.f;
    float ss = 0.f;
    for (int i = lane; i < D; i += 32) ss += x[i] * x[i];
    ss = warp_sum(ss);
    return rsqrtf(ss / (float)D + eps);
}
// Dims i and i + D/2 of head x after the norm (when nw) and neox rotate-half RoPE at `pos`.
__device__ __forceinline__ void rope_pair(const float* x, const bf16_t* nw, float inv, int i, int half, float pos,
                                          const float* inv_freq, float mscale, float& ra, float& rb) {
    float a = x[i], b = x[i + half];
    if (nw) { a = a * inv * bf2f(nw[i]); b = b * inv * bf2f(nw[i + half]); }
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    c *= mscale; s *= mscale;
    ra = a * c - b * s;
    rb = b * c + a * s;
}

// ---- Last block of a grid ----
// A kernel can finish with work that needs all of its blocks' output (attention's split
// combine): each block counts itself done on `ctr`, and the block that finishes last does
// it. Every counted block must call last_block (no early return before it). The last block
// resets the counter, so the next launch (or graph replay) finds it at 0. Data other blocks
// wrote is read with __ldcg (through L2) afterwards.
// (Measured on the H100: folding the post-attention rmsnorm, the router top-k and the MoE
// combine + rmsnorm into the last block of the GEMV before each was 8-10% SLOWER per decode
// step than separate launches: the serial tail adds an atomic round trip and two dependent
// load rounds after the whole grid, more than a graph launch costs. Not used for those.)
__device__ __forceinline__ bool last_block(unsigned* ctr, unsigned total) {
    __shared__ unsigned s_last;
    __syncthreads();  // all of this block's stores are issued
    if (threadIdx.x == 0) {
        __threadfence();  // ... and visible device-wide before we count ourselves done
        unsigned prev = atomicAdd(ctr, 1u);
        s_last = prev + 1 == total;
        if (s_last) { *ctr = 0u; __threadfence(); }
    }
    __syncthreads();
    return s_last != 0u;
}

// 8 consecutive values (16/32-byte aligned): f32 loads (plain or through L2), stores
__device__ __forceinline__ void ld8f(const float* p, float* o) {
    float4 a = *(const float4*)p, b = *((const float4*)p + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void ld8f_cg(const float* p, float* o) {
    float4 a = __ldcg((const float4*)p), b = __ldcg((const float4*)p + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
__device__ __forceinline__ void st8(float* p, const float* v) {
    *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
    *((float4*)p + 1) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void st8(bf16_t* p, const float* v) {
    uint4 u;
    u.x = (u32)f2bf(v[0]) | ((u32)f2bf(v[1]) << 16); u.y = (u32)f2bf(v[2]) | ((u32)f2bf(v[3]) << 16);
    u.z = (u32)f2bf(v[4]) | ((u32)f2bf(v[5]) << 16); u.w = (u32)f2bf(v[6]) | ((u32)f2bf(v[7]) << 16);
    *(uint4*)p = u;
}

// The normalisation half of a row (shared by rms_row and rms_moe_row): v[c][8] holds this
// thread's residual values, chunk c = elements [i8*8, i8*8+8), i8 = threadIdx.x + c*blockDim.x.
// With xq, a 32-block is 4 consecutive threads' chunks (hidden % 32 == 0).
#define RMS_MAXC 4
template <typename TO>
__device__ __forceinline__ void rms_out8(float (&v)[RMS_MAXC][8], float ss, int per, int n8, long long base,
                                         const bf16_t* __restrict__ w, TO* __restrict__ out, int hidden, float eps,
                                         signed char* __restrict__ xq, float* __restrict__ xd, float* sh) {
    ss = block_sum(ss, sh);
    const float inv = rsqrtf(ss / (float)hidden + eps);
#pragma unroll
    for (int c = 0; c < RMS_MAXC; c++) {
        if (c >= per) break;  // block-uniform
        const int i8 = threadIdx.x + c * blockDim.x;
        const bool ok = i8 < n8;
        float o[8];
        if (ok) {
            float wv[8];
            unpack8(*(const uint4*)(w + i8 * 8), wv);
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = v[c][e] * inv * wv[e];
            st8(out + base + i8 * 8, o);
        }
        if (xq) {  // every lane joins the shuffles
            float m = 0.f;
            if (ok)
#pragma unroll
                for (int e = 0; e < 8; e++) m = fmaxf(m, fabsf(o[e]));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float d = m / 127.f;
            if (ok) {
                u32 q[2] = {0u, 0u};
#pragma unroll
                for (int e = 0; e < 8; e++)
                    q[e / 4] |= ((u32)(u8)(signed char)__float2int_rn(d > 0.f ? o[e] / d : 0.f)) << (8 * (e % 4));
                *(uint2*)(xq + base + i8 * 8) = make_uint2(q[0], q[1]);
                if ((i8 & 3) == 0) xd[base / 32 + i8 / 4] = d;
            }
        }
    }
}

// One row t of rmsnorm_residual: residual[t] += delta[t] (when delta); out[t] =
// rmsnorm(residual[t]) * w (bf16 or f32); with xq, out also as int8 per 32-block
// (xq i8 [*, hidden], xd f32 [*, hidden/32]; hidden % 32 == 0). All threads of the block.
// Each thread keeps up to RMS_MAXC chunks of 8 in registers with all their loads in
// flight at once (a load-use loop per element is latency-bound for few rows).
template <typename TO>
__device__ void rms_row(float* __restrict__ residual, const float* __restrict__ delta,
                        const bf16_t* __restrict__ w, TO* __restrict__ out, int hidden, float eps,
                        signed char* __restrict__ xq, float* __restrict__ xd, int t) {
    __shared__ float sh[33];
    const long long base = (long long)t * hidden;
    float* r = residual + base;
    const int n8 = hidden / 8, per = (n8 + blockDim.x - 1) / blockDim.x;
    if ((hidden & 7) == 0 && per <= RMS_MAXC) {
        float v[RMS_MAXC][8];
        float ss = 0.f;
#pragma unroll
        for (int c = 0; c < RMS_MAXC; c++) {
            const int i8 = threadIdx.x + c * blockDim.x;
            if (c < per && i8 < n8) {
                ld8f(r + i8 * 8, v[c]);
                if (delta) {
                    float d[8];
                    ld8f_cg(delta + base + i8 * 8, d);
#pragma unroll
                    for (int e = 0; e < 8; e++) v[c][e] += d[e];
                    st8(r + i8 * 8, v[c]);
                }
#pragma unroll
                for (int e = 0; e < 8; e++) ss += v[c][e] * v[c][e];
            }
        }
        rms_out8(v, ss, per, n8, base, w, out, hidden, eps, xq, xd, sh);
        return;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i];
        if (delta) { v += __ldcg(delta + base + i); r[i] = v; }
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i] * inv * bf2f(w[i]);
        st(out + base + i, v);
        if (xq) {  // a warp holds 32 consecutive elements: one quantization block
            float d = warp_max(fabsf(v)) / 127.f;
            xq[base + i] = (signed char)__float2int_rn(d > 0.f ? v / d : 0.f);
            if ((i & 31) == 0) xd[base / 32 + i / 32] = d;
        }
    }
}

// One row t of the MoE combine fused into the next rmsnorm:
//   residual[t] += sum_r wk[t, r] * (y[t*k + r] + ebias[ids[t*k + r]])   (summed in r order;
//   ebias [E, hidden] optional: gpt-oss expert down biases)
//   out[t] = rmsnorm(residual[t]) * w (bf16 or f32). All threads of the block.
template <typename TO>
__device__ void rms_moe_row(float* __restrict__ residual, const float* __restrict__ y, const float* __restrict__ wk,
                            int k, const float* __restrict__ ebias, const int* __restrict__ ids,
                            const bf16_t* __restrict__ w, TO* __restrict__ out, int hidden, float eps, int t) {
    __shared__ float sh[33];
    const long long base = (long long)t * hidden;
    float* r = residual + base;
    const int n8 = hidden / 8, per = (n8 + blockDim.x - 1) / blockDim.x;
    if ((hidden & 7) == 0 && per <= RMS_MAXC) {
        float v[RMS_MAXC][8];
        float ss = 0.f;
#pragma unroll
        for (int c = 0; c < RMS_MAXC; c++) {
            const int i8 = threadIdx.x + c * blockDim.x;
            if (c < per && i8 < n8) {
                float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
                for (int j = 0; j < k; j++) {
                    const long long a = (long long)t * k + j;
                    float yv[8];
                    ld8f_cg(y + a * hidden + i8 * 8, yv);
                    if (ebias) {
                        float bv[8];
                        ld8f(ebias + (long long)ids[a] * hidden + i8 * 8, bv);
#pragma unroll
                        for (int e = 0; e < 8; e++) yv[e] += bv[e];
                    }
                    const float wj = __ldcg(wk + a);
#pragma unroll
                    for (int e = 0; e < 8; e++) s[e] += wj * yv[e];
                }
                ld8f(r + i8 * 8, v[c]);
#pragma unroll
                for (int e = 0; e < 8; e++) { v[c][e] += s[e]; ss += v[c][e] * v[c][e]; }
                st8(r + i8 * 8, v[c]);
            }
        }
        rms_out8(v, ss, per, n8, base, w, out, hidden, eps, (signed char*)nullptr, (float*)nullptr, sh);
        return;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float s = 0.f;
#pragma unroll 8
        for (int j = 0; j < k; j++) {
            long long a = (long long)t * k + j;
            float yv = __ldcg(y + a * hidden + i);
            if (ebias) yv += ebias[(long long)ids[a] * hidden + i];
            s += __ldcg(wk + a) * yv;
        }
        float v = r[i] + s;
        r[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(out + base + i, r[i] * inv * bf2f(w[i]));
}

// ---- MoE router top-k (moe_router_topk, and redone per block by moe_gate_up_q8_topk) ----
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

// The router top-k of one token by ranking, all threads of the block (blockDim.x >= E,
// E <= 512, k <= 32): thread i holds logit i; its rank is the number of logits above it
// (equal ones: lower index first), so rank r is router_topk_impl's r-th pick (softmax is
// monotonic). s_ids[r] = the r-th expert; with `weights`, s_w[r] = its softmax weight over
// all E (renormalised over the k when renorm). The sums run in another order than
// router_topk_impl's: weights agree to float rounding, ids exactly.
// CG: the logits are read through L2 (__ldcg), for a reader that runs before its PDL wait
template <bool CG = false>
__device__ __forceinline__ void router_rank_topk(const float* __restrict__ lg, int E, int k, int renorm, bool weights,
                                                 int* s_ids, float* s_w) {
    __shared__ float s_lg[512];
    __shared__ float s_red[33];
    const int i = threadIdx.x, nw = blockDim.x >> 5;
    const float v = i < E ? (CG ? __ldcg(lg + i) : lg[i]) : NEG_INF;
    s_lg[i] = v;
    __syncthreads();
    int rank = 0;
    if (i < E) {
#pragma unroll 8
        for (int j = 0; j < E; j++) {
            const float u = s_lg[j];
            rank += (u > v) | ((u == v) & (j < i));
        }
        if (rank < k) s_ids[rank] = i;
    }
    if (weights) {  // block-uniform
        float mx = warp_max(v);
        if ((i & 31) == 0) s_red[i >> 5] = mx;
        __syncthreads();
        mx = s_red[0];
        for (int w = 1; w < nw; w++) mx = fmaxf(mx, s_red[w]);
        __syncthreads();
        const float ex = i < E ? expf(v - mx) : 0.f;
        const float sum = block_sum(ex, s_red);
        if (i < E && rank < k) s_w[rank] = ex / sum;
        __syncthreads();
        if (renorm && i < 32) {  // warp 0 whole (k <= 32)
            float sel = 0.f;
            for (int q = 0; q < k; q++) sel += s_w[q];
            const float p = i < k ? s_w[i] / sel : 0.f;
            __syncwarp();
            if (i < k) s_w[i] = p;
        }
    }
    __syncthreads();
}

// ---- Bulk asynchronous copies (cp.async.bulk: Hopper's TMA engine without a tensor map) ----
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
// one arrival that also expects `bytes` of asynchronous copies on the barrier's current phase
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, u32 parity) {
    asm volatile(
        "{\n .reg .pred p;\n"
        "WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n"
        :: "r"(smem_u32(bar)), "r"(parity) : "memory");
}
// global -> shared, `bytes` (% 16 == 0, both addresses 16-byte aligned), completing on `bar`
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, u32 bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
