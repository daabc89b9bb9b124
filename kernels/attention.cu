// Decode attention (one new query token per sequence), GQA, split-K flash decoding in ONE launch.
// q       f32, sequence s's heads at q + s * q_stride: [n_q, D] (after RoPE); q_stride =
//         n_q*D for a packed q, (n_q + 2*n_kv)*D to read q straight out of the qkv buffer
// k/v     bf16 caches [slot][layer][kv_head][pos][D]
// slots   i32 [n_seq] cache slot of each sequence
// seq_lens i32 [n_seq] number of valid positions (the new token's k/v already written)
// window  > 0: attend only to positions >= len - window (sliding window); 0: all
// sinks   f32 [n_q] or null: a learned logit per head that joins the softmax denominator
// attention_split_d{64,128,256}: grid (n_splits, n_kv * ceil(G/hpb), n_seq), block 32 * NW
// (NW = 8 warps for D <= 128, 4 for D = 256). Each block: one kv head, hpb (<= HG) of its
// query heads, one chunk of positions; it writes its partial (unnormalised) output to part_acc
// [n_seq, n_q, n_splits, D] and (max, sum) to part_ml [n_seq, n_q, n_splits, 2]. The block
// that finishes last for its (sequence, kv head, group) — counted on ctr — combines the
// splits and writes out f32 [n_seq, n_q, D]: no second launch (the reduce used to be one,
// ~3-6 us per layer at batch 1 on the H100).
// HG: most query heads per block (the register arrays), MAXG for the entries without a suffix,
// 1 for the _h1 entries. hpb, the launch's heads per block, is at most HG. Fewer heads per
// block shorten each warp's dependent chain (every head's scores are reduced one after the
// other) and free registers, at the price of more blocks reading the same K/V rows (from L2).
// On the H100, one head per block made Qwen3-30B-A3B's b1 step 5.9% faster at ctx 128 and
// 4.4% at 2048 (bench/results/cuda_decode_h100.md, session 12); the host's rule for it is
// CudaContext::attention_one_head_rows.
#ifndef MAXG
#define MAXG 8
#endif
#define ATT_RMAX 512
// fewest positions a split takes (the grid is sized for the longest context; shorter
// sequences use fewer splits, the rest of the blocks leave at once). 64 or 128 measured
// 3.5% / 6% slower per Qwen3-30B-A3B b1 step (ctx 128, H100) than 32 (bench/results,
// session 9). The host's grid sizing (`attention_splits`) assumes 32; it is only an
// upper bound, so a larger value here leaves more blocks idle, never wrong.
#ifndef ATT_MINPOS
#define ATT_MINPOS 32
#endif

template <int EPL> __device__ __forceinline__ void ld_row(const bf16_t* p, float* o);
template <> __device__ __forceinline__ void ld_row<2>(const bf16_t* p, float* o) {
    u32 v = *(const u32*)p;
    o[0] = __uint_as_float(v << 16); o[1] = __uint_as_float(v & 0xffff0000u);
}
template <> __device__ __forceinline__ void ld_row<4>(const bf16_t* p, float* o) {
    uint2 v = *(const uint2*)p;
    o[0] = __uint_as_float(v.x << 16); o[1] = __uint_as_float(v.x & 0xffff0000u);
    o[2] = __uint_as_float(v.y << 16); o[3] = __uint_as_float(v.y & 0xffff0000u);
}
template <> __device__ __forceinline__ void ld_row<8>(const bf16_t* p, float* o) { unpack8(*(const uint4*)p, o); }

// Lane l holds dims [l*EPL, (l+1)*EPL) of q, k, v and the output (EPL = D/32);
// scores are warp-reduced. (A layout with D/8 lanes per position and 16-byte
// loads measured 10-30% slower on H100: 195 registers. See bench/results.)
// Wait = PdlWait (-DATT_PRELOAD): in a step of one row, the first rows of the position loop
// are loaded before the PDL wait. Positions before len - 1 were written by earlier steps; the
// new token's (written by this step's RoPE kernel) is loaded again after the wait, and q is
// read after it.
// The RoPE fold of a step of ONE row (attention_rope_d*): q holds the raw q|k|v of the token
// (the q|k|v GEMV's output, before any norm or rotation), and each block computes what
// rope_qk_kv would have: its query heads normalised and rotated (into shared memory), and,
// in the block whose split holds the token's position, its kv head's k (rotated) and v,
// which it writes to the caches and reads back from shared memory. One launch fewer per layer.
struct AttnRope {
    const int* positions;
    const float* inv_freq;
    const bf16_t* q_norm;  // per-head RMSNorm weights [D] or null
    const bf16_t* k_norm;
    bf16_t* k_w;           // the caches, written at the token's position
    bf16_t* v_w;
    float eps, mscale;
};
// The factor that normalises one split's (m, l, acc) when it covers the whole context, with
// the head's sink (gpt-oss) as one more logit: acc * one_split_scale(..) is what the combine
// below gives for a single split.
__device__ __forceinline__ float one_split_scale(float m, float l, const float* sinks, int head) {
    const float sk = sinks ? sinks[head] : NEG_INF;
    const float Mx = fmaxf(m, sk);
    const float f = m == NEG_INF ? 0.f : __expf(m - Mx);
    float Lt = f * l;
    if (sinks && Mx != NEG_INF) Lt += __expf(sk - Mx);
    return Lt > 0.f ? f / Lt : 0.f;
}
// The last block of a (sequence, kv head, head group): combines the eff splits' partials
// of its ng heads g0 .. (other blocks' partials: read through L2) into out.
// sw: shared memory for HG * ATT_RMAX split weights; sm_inv: HG floats.
template <int D, int NW, int HG>
__device__ void att_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                            const float* __restrict__ sinks, float* __restrict__ out, float* sw, float* sm_inv,
                            int s, int n_q, int n_splits, int g0, int ng, int eff) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int g = warp; g < ng; g += NW) {
        const long long pb = ((long long)s * n_q + g0 + g) * n_splits;
        float M = NEG_INF;
        for (int i = lane; i < eff; i += 32) M = fmaxf(M, __ldcg(part_ml + (pb + i) * 2));
        M = warp_max(M);
        const float sk = sinks ? sinks[g0 + g] : NEG_INF;
        M = fmaxf(M, sk);
        float L = 0.f;
        for (int i = lane; i < eff; i += 32) {
            float mi = __ldcg(part_ml + (pb + i) * 2);
            float w = mi == NEG_INF ? 0.f : __expf(mi - M);
            sw[g * ATT_RMAX + i] = w;
            L += w * __ldcg(part_ml + (pb + i) * 2 + 1);
        }
        L = warp_sum(L);
        if (sinks && M != NEG_INF) L += __expf(sk - M);
        if (lane == 0) sm_inv[g] = L > 0.f ? 1.f / L : 0.f;
    }
    __syncthreads();
    // every (head, dim) output of the block at once, so the split loop's loads are all in flight
    constexpr int OPT = (HG * D + NW * 32 - 1) / (NW * 32);
    float o[OPT];
#pragma unroll
    for (int u = 0; u < OPT; u++) o[u] = 0.f;
#pragma unroll 4
    for (int i = 0; i < eff; i++) {
#pragma unroll
        for (int u = 0; u < OPT; u++) {
            const int idx = threadIdx.x + u * NW * 32, g = idx / D, d = idx % D;
            if (g < ng) o[u] += __ldcg(part_acc + (((long long)s * n_q + g0 + g) * n_splits + i) * D + d) * sw[g * ATT_RMAX + i];
        }
    }
#pragma unroll
    for (int u = 0; u < OPT; u++) {
        const int idx = threadIdx.x + u * NW * 32, g = idx / D, d = idx % D;
        if (g < ng) out[((long long)s * n_q + g0 + g) * D + d] = o[u] * sm_inv[g];
    }
}

template <int EPL, int NW, typename Wait = NoWait, bool ROPE = false, int HG = MAXG>
__device__ void attn_split_impl(const float* __restrict__ q, const bf16_t* __restrict__ kc,
                                const bf16_t* __restrict__ vc, const int* __restrict__ slots,
                                const int* __restrict__ seq_lens, float* __restrict__ part_acc,
                                float* __restrict__ part_ml, int n_q, int n_kv, int layer, int n_layers,
                                int max_pos, float scale, int window, int n_splits, long long q_stride,
                                const float* __restrict__ sinks, float* __restrict__ out, unsigned* __restrict__ ctr,
                                int bx, int by, int bz, Wait wait = Wait(), AttnRope rp = AttnRope(), int hpb = HG) {
    constexpr int D = EPL * 32;
    // positions per warp per step, all loaded before the first is used
    constexpr int ATT_PU = EPL >= 8 ? 2 : 4;
    // per-warp partials; reused by the combining block for the split weights
    __shared__ float sm_acc[NW * HG * D];
    __shared__ float sm_m[NW][HG], sm_l[NW][HG], sm_inv[HG];
    static_assert(NW * HG * D >= HG * ATT_RMAX, "split weights must fit in sm_acc");
    if (hpb < 1 || hpb > HG) __trap();  // the host sized the grid for heads this build lacks
    const int G = n_q / n_kv;
    const int groups = (G + hpb - 1) / hpb;
    const int split = bx, kvh = by / groups, grp = by % groups, s = bz;
    const int g0 = kvh * G + grp * hpb;
    const int ng = min(hpb, G - grp * hpb);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int len = min(seq_lens[s], max_pos);
    int slot = slots[s];
    int lo = window > 0 ? max(0, len - window) : 0;
    int range = max(0, len - lo);
    // splits actually used: at least ATT_MINPOS positions each (the grid is sized for the
    // longest context a graph may see; short sequences leave the rest idle, uncounted)
    const int eff = min(n_splits, max(1, (range + ATT_MINPOS - 1) / ATT_MINPOS));
    if (split >= eff) return;  // split 0 always stays, so the grid still waits on its predecessor
    int chunk = (range + eff - 1) / eff;
    int start = lo + split * chunk, end = min(len, start + chunk);
    const long long base = (((long long)slot * n_layers + layer) * n_kv + kvh) * (long long)max_pos * D;
    // ROPE: the rotated query heads (f32) and the token's k|v rows (bf16, as cached)
    __shared__ float sq[ROPE ? HG * D : 1];
    __shared__ __align__(16) bf16_t skv[ROPE ? 2 * D : 8];
    int newp = -1;  // the position whose k|v rows come from skv
    const int first = start + warp * ATT_PU;
    auto load_global = [&](int p0, float (&kf)[ATT_PU][EPL], float (&vf)[ATT_PU][EPL]) {
#pragma unroll
        for (int u = 0; u < ATT_PU; u++) {
            int p = min(p0 + u, end - 1);  // clamp: loads stay in bounds, masked below
            ld_row<EPL>(kc + base + (long long)p * D + lane * EPL, kf[u]);
            ld_row<EPL>(vc + base + (long long)p * D + lane * EPL, vf[u]);
        }
    };
    // the token's own rows come from shared memory (ROPE; newp is -1 until they are there)
    auto patch = [&](int p0, float (&kf)[ATT_PU][EPL], float (&vf)[ATT_PU][EPL]) {
#pragma unroll
        for (int u = 0; u < ATT_PU; u++)
            if (ROPE && min(p0 + u, end - 1) == newp) {
                ld_row<EPL>(skv + lane * EPL, kf[u]);
                ld_row<EPL>(skv + D + lane * EPL, vf[u]);
            }
    };
    // rows of the position loop's first step, loaded ahead (PRE: before the PDL wait;
    // ROPE_EARLY: before the RoPE work, the token's own row patched in after it)
    float kf0[ATT_PU][EPL], vf0[ATT_PU][EPL];  // unused (optimised out) otherwise
#ifdef ATT_ROPE_LATE
    constexpr bool ROPE_EARLY = false;
#else
    constexpr bool ROPE_EARLY = ROPE;
#endif
    if constexpr (ROPE) {
        const int pos = rp.positions[0];
        const bool store = slot >= 0 && pos >= 0 && pos < max_pos;
        const bool covers = store && pos >= start && pos < end;
        // as rope_qk_kv, the rows are cached even when no split attends to them
        const bool writes = store && grp == 0 && (covers || (split == 0 && !(pos >= lo && pos < len)));
        const float* row = q + (long long)s * q_stride;
        const float fpos = (float)pos;
        if (ROPE_EARLY && first < end) load_global(first, kf0, vf0);
        constexpr int half = D / 2;
        for (int task = warp; task <= ng; task += NW) {
            if (task < ng) {
                const float* x = row + (long long)(g0 + task) * D;
                const float inv = rope_head_inv(x, rp.q_norm, D, rp.eps, lane);
                for (int i = lane; i < half; i += 32) {
                    float ra, rb;
                    rope_pair(x, rp.q_norm, inv, i, half, fpos, rp.inv_freq, rp.mscale, ra, rb);
                    sq[task * D + i] = ra;
                    sq[task * D + i + half] = rb;
                }
            } else if (covers || writes) {
                const float* xk = row + (long long)(n_q + kvh) * D;
                const float* xv = row + (long long)(n_q + n_kv + kvh) * D;
                const float inv = rope_head_inv(xk, rp.k_norm, D, rp.eps, lane);
                const long long off = base + (long long)pos * D;
                for (int i = lane; i < half; i += 32) {
                    float ra, rb;
                    rope_pair(xk, rp.k_norm, inv, i, half, fpos, rp.inv_freq, rp.mscale, ra, rb);
                    const bf16_t ka = f2bf(ra), kb = f2bf(rb), va = f2bf(xv[i]), vb = f2bf(xv[i + half]);
                    skv[i] = ka; skv[i + half] = kb; skv[D + i] = va; skv[D + i + half] = vb;
                    if (writes) {
                        rp.k_w[off + i] = ka; rp.k_w[off + i + half] = kb;
                        rp.v_w[off + i] = va; rp.v_w[off + i + half] = vb;
                    }
                }
            }
        }
        __syncthreads();
        if (covers) newp = pos;
        if (ROPE_EARLY && first < end) patch(first, kf0, vf0);
    }
    // each warp's ATT_PU positions of a step, all loaded before the first is used
    auto load_rows = [&](int p0, float (&kf)[ATT_PU][EPL], float (&vf)[ATT_PU][EPL]) {
        load_global(p0, kf, vf);
        patch(p0, kf, vf);
    };
    constexpr bool PRE = WaitsInside<Wait>::value;
    static_assert(!(ROPE && PRE), "the RoPE fold loads its rows after the wait");
    if constexpr (PRE) {
        // in a step of several rows, rows may be tokens of one sequence (prefill, DFlash
        // verify): any position may be this step's, so those wait first
        const bool one_row = gridDim.z == 1;
        if (!one_row) wait();
        if (first < end) load_rows(first, kf0, vf0);
        if (one_row) {
            wait();
            // the new token's rows (position len - 1) come from this step: loaded again
            if (first < end && end == len && first + ATT_PU >= len) load_rows(first, kf0, vf0);
        }
    }

    float qr[HG][EPL], acc[HG][EPL], m[HG], l[HG];
#pragma unroll
    for (int g = 0; g < HG; g++) {
        m[g] = NEG_INF; l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; e++) {
            acc[g][e] = 0.f;
            qr[g][e] = g < ng ? (ROPE ? sq[g * D + lane * EPL + e] : q[(long long)s * q_stride + (long long)(g0 + g) * D + lane * EPL + e]) * scale
                              : 0.f;
        }
    }
    for (int p0 = first; p0 < end; p0 += NW * ATT_PU) {
        float kf[ATT_PU][EPL], vf[ATT_PU][EPL];
        if ((PRE || ROPE_EARLY) && p0 == first) {
#pragma unroll
            for (int u = 0; u < ATT_PU; u++)
#pragma unroll
                for (int e = 0; e < EPL; e++) { kf[u][e] = kf0[u][e]; vf[u][e] = vf0[u][e]; }
        } else {
            load_rows(p0, kf, vf);
        }
#pragma unroll
        for (int g = 0; g < HG; g++) {
            if (g < ng) {
                float sc[ATT_PU];
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    float d = 0.f;
#pragma unroll
                    for (int e = 0; e < EPL; e++) d += qr[g][e] * kf[u][e];
                    sc[u] = d;
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                    for (int u = 0; u < ATT_PU; u++) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
                float mn = m[g];
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    if (p0 + u >= end) sc[u] = NEG_INF;
                    mn = fmaxf(mn, sc[u]);
                }
                float corr = __expf(m[g] - mn);
                l[g] *= corr;
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[g][e] *= corr;
#pragma unroll
                for (int u = 0; u < ATT_PU; u++) {
                    float pr = __expf(sc[u] - mn);
                    l[g] += pr;
#pragma unroll
                    for (int e = 0; e < EPL; e++) acc[g][e] += pr * vf[u][e];
                }
                m[g] = mn;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < HG; g++) {
#pragma unroll
        for (int e = 0; e < EPL; e++) sm_acc[(warp * HG + g) * D + lane * EPL + e] = acc[g][e];
        if (lane == 0) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
    }
    __syncthreads();
    // this block's partial: the warps' (m, l, acc) merged
    for (int idx = threadIdx.x; idx < ng * D; idx += blockDim.x) {
        int g = idx / D, d = idx % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w][g]);
        float L = 0.f, o = 0.f;
        if (M != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NW; w++) {
                float mw = sm_m[w][g];
                if (mw != NEG_INF) {
                    float f = __expf(mw - M);
                    L += sm_l[w][g] * f;
                    o += sm_acc[(w * HG + g) * D + d] * f;
                }
            }
        }
        if (eff == 1) {
            // one split covers the context: normalise here (as the combine below would)
            out[((long long)s * n_q + g0 + g) * D + d] = o * one_split_scale(M, L, sinks, g0 + g);
            continue;
        }
        long long pi = ((long long)s * n_q + g0 + g) * n_splits + split;
        part_acc[pi * D + d] = o;
        if (d == 0) { part_ml[pi * 2] = M; part_ml[pi * 2 + 1] = L; }
    }
    if (eff == 1) return;
    if (!last_block(ctr + ((long long)s * n_kv + kvh) * groups + grp, (unsigned)eff)) return;
    att_combine<D, NW, HG>(part_acc, part_ml, sinks, out, sm_acc, sm_inv, s, n_q, n_splits, g0, ng, eff);
}

#define ATT_ARGS const float* q, const bf16_t* kc, const bf16_t* vc, const int* slots, const int* seq_lens, \
    float* part_acc, float* part_ml, int n_q, int n_kv, int layer, int n_layers, int max_pos, float scale, int window, int n_splits, \
    long long q_stride, const float* sinks, float* out, unsigned* ctr, int hpb
#define ATT_PASS q, kc, vc, slots, seq_lens, part_acc, part_ml, n_q, n_kv, layer, n_layers, max_pos, scale, window, n_splits, q_stride, \
    sinks, out, ctr, blockIdx.x, blockIdx.y, blockIdx.z
#ifdef ATT_PRELOAD
#define ATT_CALL(EPL, NW, HG) PDL_PRE(); attn_split_impl<EPL, NW, PdlWait, false, HG>(ATT_PASS, PdlWait(), AttnRope(), hpb);
#else
#define ATT_CALL(EPL, NW, HG) PDL_ENTRY(); attn_split_impl<EPL, NW, NoWait, false, HG>(ATT_PASS, NoWait(), AttnRope(), hpb);
#endif
// attention_<KIND>_d{64,128,256}<SFX>: 8 warps for D <= 128, 4 for D = 256 (shared memory)
#define ATT_ENTRIES(KIND, ARGS, CALL, SFX, HG) \
    extern "C" __global__ void __launch_bounds__(256) attention_##KIND##_d64##SFX(ARGS) { CALL(2, 8, HG) } \
    extern "C" __global__ void __launch_bounds__(256) attention_##KIND##_d128##SFX(ARGS) { CALL(4, 8, HG) } \
    extern "C" __global__ void __launch_bounds__(128) attention_##KIND##_d256##SFX(ARGS) { CALL(8, 4, HG) }
ATT_ENTRIES(split, ATT_ARGS, ATT_CALL, , MAXG)
ATT_ENTRIES(split, ATT_ARGS, ATT_CALL, _h1, 1)
ATT_ENTRIES(split, ATT_ARGS, ATT_CALL, _h2, 2)
ATT_ENTRIES(split, ATT_ARGS, ATT_CALL, _h4, 4)

// The RoPE fold (steps of ONE row, grid z = 1): q = the raw q|k|v row, see AttnRope.
#define ATT_ROPE_ARGS ATT_ARGS, const int* positions, const float* inv_freq, const bf16_t* q_norm, const bf16_t* k_norm, \
    bf16_t* k_w, bf16_t* v_w, float eps, float mscale
#define ATT_ROPE_CALL(EPL, NW, HG) PDL_ENTRY(); \
    attn_split_impl<EPL, NW, NoWait, true, HG>(ATT_PASS, NoWait(), AttnRope{positions, inv_freq, q_norm, k_norm, k_w, v_w, eps, mscale}, hpb);
ATT_ENTRIES(rope, ATT_ROPE_ARGS, ATT_ROPE_CALL, , MAXG)
ATT_ENTRIES(rope, ATT_ROPE_ARGS, ATT_ROPE_CALL, _h1, 1)
ATT_ENTRIES(rope, ATT_ROPE_ARGS, ATT_ROPE_CALL, _h2, 2)
ATT_ENTRIES(rope, ATT_ROPE_ARGS, ATT_ROPE_CALL, _h4, 4)

// ---- Decode attention from shared-memory tiles (A/B: KAIROS_CUDA_ATT_TILE) ----
// The split kernel above is a chain of dependent round trips: each warp loads ATT_PU positions'
// rows, reduces their scores, then loads the next ones (Qwen3-30B-A3B b1: ~7 us per layer at
// ctx 128, ~16 at 2048, for 0.26 / 4 MB of K/V). Here a block copies a whole sub-tile of
// TILE_P positions' K and V rows to shared memory at once (cp.async, 16 bytes per copy, all in
// flight: one round trip per sub-tile, and the next sub-tile's copies fly while this one is
// computed), and one block takes ALL the query heads of its kv head, so each K/V byte is read
// once. Same arguments, workspace, splits and partial format as attention_split_*; the last
// block combines (att_combine).
//   grid (n_splits, n_kv, n_seq), block 256; dynamic shared memory 2 * TILE_P * D * 4 bytes
//   (two buffers of K|V rows); G = n_q / n_kv <= 8 (the host checks).
//   scores  thread t: position t % TILE_P of the sub-tile, heads t / TILE_P and + 4; K rows are
//           stored XOR-swizzled in 16-byte units so a quarter-warp's 8 positions hit distinct banks
//   softmax warp g: head g's running max and sum (online, as the split kernel)
//   P . V   warp g: head g; lane: dims lane * EPL ..
#define TILE_P 64
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"((u32)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

template <int D>
__device__ void attn_tile_impl(const float* __restrict__ q, const bf16_t* __restrict__ kc, const bf16_t* __restrict__ vc,
                               const int* __restrict__ slots, const int* __restrict__ seq_lens, float* __restrict__ part_acc,
                               float* __restrict__ part_ml, int n_q, int n_kv, int layer, int n_layers, int max_pos,
                               float scale, int window, int n_splits, long long q_stride, const float* __restrict__ sinks,
                               float* __restrict__ out, unsigned* __restrict__ ctr) {
    constexpr int NW = 8, HG = 8, EPL = D / 32, C16 = D / 8;  // C16: 16-byte chunks per row
    static_assert(C16 >= 8, "the swizzle permutes 8 chunks");
    extern __shared__ __align__(16) unsigned char tile_smem[];
    __shared__ float sq[HG * D];          // q * scale, f32
    __shared__ float ss[HG][TILE_P];      // scores, then probabilities
    __shared__ float sm_inv[HG];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int split = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int G = n_q / n_kv, g0 = kvh * G, ng = min(G, HG);
    PDL_ENTRY();
    const int len = min(seq_lens[s], max_pos), slot = slots[s];
    const int lo = window > 0 ? max(0, len - window) : 0, range = max(0, len - lo);
    const int eff = min(n_splits, max(1, (range + ATT_MINPOS - 1) / ATT_MINPOS));
    if (split >= eff) return;
    const int chunk = (range + eff - 1) / eff;
    const int start = lo + split * chunk, end = min(len, start + chunk);
    const long long base = (((long long)slot * n_layers + layer) * n_kv + kvh) * (long long)max_pos * D;
    // buffer b: K rows at b * 2 * TILE_P * D, V rows TILE_P * D after them (bf16 elements)
    bf16_t* const tiles = (bf16_t*)tile_smem;
    // sub-tile at position p0 into buffer b: K rows swizzled, V rows as they are
    auto issue = [&](int p0, int b) {
        const int n = min(TILE_P, end - p0);
        bf16_t* sk = tiles + b * 2 * TILE_P * D;
        bf16_t* sv = sk + TILE_P * D;
        for (int i = threadIdx.x; i < n * C16; i += blockDim.x) {
            const int r = i / C16, c = i % C16;
            const long long src = base + (long long)(p0 + r) * D + c * 8;
            cp_async16(sk + r * D + ((c ^ (r & 7)) * 8), kc + src);
            cp_async16(sv + r * D + c * 8, vc + src);
        }
        cp_async_commit();
    };
    if (start < end) issue(start, 0);
    for (int i = threadIdx.x; i < ng * D; i += blockDim.x) sq[i] = q[(long long)s * q_stride + (long long)g0 * D + i] * scale;
    float acc[EPL], m = NEG_INF, l = 0.f;  // warp g's head g: dims lane * EPL ..
#pragma unroll
    for (int e = 0; e < EPL; e++) acc[e] = 0.f;
    const int p = threadIdx.x % TILE_P, hq = threadIdx.x / TILE_P;
    int b = 0;
    for (int p0 = start; p0 < end; p0 += TILE_P, b ^= 1) {
        const int n = min(TILE_P, end - p0);
        if (p0 + TILE_P < end) {
            issue(p0 + TILE_P, b ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // the sub-tile (every thread's copies) and sq are in shared memory
        const bf16_t* sk = tiles + b * 2 * TILE_P * D;
        const bf16_t* sv = sk + TILE_P * D;
        float sc[2] = {0.f, 0.f};
        if (p < n) {
            const uint4* krow = (const uint4*)(sk + p * D);
#pragma unroll
            for (int c = 0; c < C16; c++) {
                float kf[8];
                unpack8(krow[c ^ (p & 7)], kf);
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    const float* qg = sq + (hq + 4 * j) * D + c * 8;
#pragma unroll
                    for (int e = 0; e < 8; e++) sc[j] += qg[e] * kf[e];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 2; j++)
            if (hq + 4 * j < ng) ss[hq + 4 * j][p] = p < n ? sc[j] : NEG_INF;
        __syncthreads();
        if (warp < ng) {
            float mx = NEG_INF;
            for (int i = lane; i < n; i += 32) mx = fmaxf(mx, ss[warp][i]);
            const float mn = fmaxf(m, warp_max(mx));
            const float corr = m == NEG_INF ? 0.f : __expf(m - mn);
            float sum = 0.f;
            for (int i = lane; i < n; i += 32) {
                const float pr = __expf(ss[warp][i] - mn);
                ss[warp][i] = pr;
                sum += pr;
            }
            l = l * corr + warp_sum(sum);
            m = mn;
            __syncwarp();
#pragma unroll
            for (int e = 0; e < EPL; e++) acc[e] *= corr;
#pragma unroll 4
            for (int i = 0; i < n; i++) {
                float vf[EPL];
                ld_row<EPL>(sv + i * D + lane * EPL, vf);
                const float pr = ss[warp][i];
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[e] += pr * vf[e];
            }
        }
        __syncthreads();  // buffer b and ss are free for the next sub-tile
    }
    if (eff == 1) {
        if (warp < ng) {
            const float sc = one_split_scale(m, l, sinks, g0 + warp);
#pragma unroll
            for (int e = 0; e < EPL; e++) out[((long long)s * n_q + g0 + warp) * D + lane * EPL + e] = acc[e] * sc;
        }
        return;
    }
    if (warp < ng) {
        const long long pi = ((long long)s * n_q + g0 + warp) * n_splits + split;
#pragma unroll
        for (int e = 0; e < EPL; e++) part_acc[pi * D + lane * EPL + e] = acc[e];
        if (lane == 0) { part_ml[pi * 2] = m; part_ml[pi * 2 + 1] = l; }
    }
    if (!last_block(ctr + (long long)s * n_kv + kvh, (unsigned)eff)) return;
    att_combine<D, NW, HG>(part_acc, part_ml, sinks, out, (float*)tile_smem, sm_inv, s, n_q, n_splits, g0, ng, eff);
}
#define ATT_TILE_ARGS const float* q, const bf16_t* kc, const bf16_t* vc, const int* slots, const int* seq_lens, \
    float* part_acc, float* part_ml, int n_q, int n_kv, int layer, int n_layers, int max_pos, float scale, int window, int n_splits, \
    long long q_stride, const float* sinks, float* out, unsigned* ctr
#define ATT_TILE_PASS q, kc, vc, slots, seq_lens, part_acc, part_ml, n_q, n_kv, layer, n_layers, max_pos, scale, window, n_splits, \
    q_stride, sinks, out, ctr
extern "C" __global__ void __launch_bounds__(256) attention_tile_d64(ATT_TILE_ARGS) { attn_tile_impl<64>(ATT_TILE_PASS); }
extern "C" __global__ void __launch_bounds__(256) attention_tile_d128(ATT_TILE_ARGS) { attn_tile_impl<128>(ATT_TILE_PASS); }
