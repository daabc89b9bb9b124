// Micro-benchmark of the MoE expert gate/up GEMV at batch 1 (kernels/moe_q8.cu), alone,
// with the experts' weights cold (each launch picks k random experts of E; the expert set
// is far larger than L2). Why: at batch 1 this kernel cannot load a byte before the router
// is done (its experts are unknown), so all of its time is on the step's critical path,
// yet it reads at ~1/3 of the copy bandwidth (session 8 ncu: 26% of DRAM, 37% of warp
// time waiting on L1TEX). The kernels timed:
//   shipped        moe_gate_up_q8 (256 threads: 8 warps x 4 outputs; per output its gate row,
//                  then its up row), and the step's moe_gate_up_q8_topk at 256 / 512 threads
//   topk lfR_uU T  moe_gate_up_q8_topk_lfR_uU: every warp issues the loads of R rows (R/2
//                  outputs' gate + up) before it uses any, its lane's activation blocks in
//                  registers (gate_up_q8_body_lf)
// Each one's int8 activation output must equal moe_gate_up_q8's bit for bit (same sums in the
// same order). Build + run on the device:
//   nvcc -O3 -arch=sm_90 -o /tmp/gum bench/micro/gate_up_micro.cu && /tmp/gum
// Session 18 (H100 80GB HBM3; bench/results/cuda_gate_up_micro_h100_s18.txt): Qwen3 shape
// shipped topk 512 11.31 us, lf4_u2 256 11.03 us (-2.5%); gpt-oss shipped topk 256 21.76 us,
// lf4_u3 256 20.21 us (-7.1%); R = 8 slower than R = 4. All at 1.0-1.8 TB/s of ~3 TB/s: the
// per-row round trips are not what holds the kernel back. In the step the lf forms lost
// (Qwen3 +3.1%), so they live only here.
// Session 20 added (run in session 21, H100: bench/results/cuda_gate_up_micro_h100_s21.txt):
//   read regs U    floor 1: the shipped grid reads the same bytes with U 16-byte loads per
//                  thread in flight, no arithmetic
//   read bulk      floor 2: the same blocks copy their bytes to shared memory in one go
//   bulk NW [r2]   moe_gate_up_q8_topk_bulkNW[_r2] (gate_up_bulk.cuh): after the top-k,
//                  lane 0 of every warp copies the warp's rows to shared memory (all of the
//                  block's bytes in flight after a few instructions; r2: 2 outputs at a time,
//                  a ring), then the warp computes from there
// Session 21 found the floors far apart (Qwen3: regs U4 8.5 us, bulk 6.3 us) and the bulk forms
// no faster than shipped (12.4-13.3 us), and added:
//   ranges NW      moe_gate_up_q8_topk_rangesNW: a warp's rows in 2-4 large copies, not 3-4
//                  small ones per output, and one wait (as slow: 13.1 us)
//   ranges 8, ...  the ranges form taken apart: the launch's ids instead of the top-k, and/or
//                  no sums (only the copies, the wait and the store): where its time goes
//   topk fine 8/block  moe_gate_up_q8_topk_fine (gate_up_fine.cuh): a warp per output, 8 per
//                  block, 4x the blocks; the int8 block of 32 finished by the last of its 4
//                  (lf: a lane's gate and up blocks loaded before any is used)
// Session 21 on the H100 (cuda_gate_up_micro_h100_s21_{a,c,d}.txt), Qwen3 / gpt-oss us: shipped
// topk 512 11.3 / 22.0; no bulk, ranges or fine form beats it by more than noise, and none wins
// a decode step (bench/results/cuda_decode_h100.md, "Session 21"). Taken apart, the ranges form
// spends 6.2 / 13.7 us on its bytes, 1.0-1.4 on the top-k and 5.8 / 10.6 on the sums.
// Built with -DE2M1_PN every kernel here sums with kernels/moe_q8.cu's E2M1_PN dot (the same
// integers, fewer instructions: tools/check_e2m1_pn.py); build both and compare the two runs.
// Usage: /tmp/gum [launches per graph, default 96]
#include "harness.cuh"
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include "../../kernels/common.cuh"
#include "../../kernels/moe_q8.cu"
#include "gate_up_bulk.cuh"
#include "gate_up_fine.cuh"

// ---- The loads-first form, as measured in session 18 (it was in kernels/moe_q8.cu for that
// call, opt-in, and was removed after it: in the decode step it made Qwen3-30B-A3B b1 3.1%
// slower and gpt-oss-20b 0.4% faster; bench/results/cuda_decode_h100.md, session 18).
// (gate_up_act and gate_up_store are kernels/moe_q8.cu's.)
// gate_up_q8_body with every warp's weight loads issued before any is used: R rows (the gate
// and up rows of R/2 outputs) of U 16-byte blocks per lane (cols <= U * 1024), and this lane's
// activation blocks held in registers for all of them. The sums are row_dot's, in its order,
// so the results are bit-equal. The shipped body waits one DRAM round trip per row: at batch 1
// a warp's 4-8 rows are 4-8 dependent round trips.
// Needs (32 / warps per block) % (R / 2) == 0.
template <int R, int U>
__device__ void gate_up_q8_body_lf(const u8* __restrict__ blocks, const u8* __restrict__ scales,
        const signed char* __restrict__ xq, const float* __restrict__ xd, long long e, int x_div,
        const float* __restrict__ bias, int I, int cols, int act, float alpha, float limit,
        signed char* __restrict__ aq, float* __restrict__ ad, int bx, int by) {
    __shared__ float out[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, a = by;
    const int nb = cols / 32, per = 32 / (blockDim.x >> 5);
    if (e < 0 || nb > U * 32) {  // another rank's expert, or rows too long for U
        gate_up_q8_body(blocks, scales, xq, xd, e, x_div, bias, I, cols, act, alpha, limit, aq, ad, bx, by);
        return;
    }
    const signed char* xa = xq + (long long)(a / x_div) * cols;
    const float* da = xd + (long long)(a / x_div) * nb;
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
    int4 xr[U][2];
    float dr[U];
    x_blocks_lane<U>(xa, da, nb, lane, xr, dr);
    for (int t0 = 0; t0 < per; t0 += R / 2) {
        uint4 w[R][U];
        u32 s[R][U];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int j = bx * 32 + warp * per + t0 + r / 2;
            const long long row = (r & 1) == 0 ? (act == 1 ? 2 * j : j) : (act == 1 ? 2 * j + 1 : I + j);
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int b = u * 32 + lane;
                w[r][u] = b < nb ? ld_stream16(eb + (row * nb + b) * 16) : make_uint4(0, 0, 0, 0);
                s[r][u] = b < nb ? (u32)__ldg(es + row * nb + b) : 127u;
            }
        }
#pragma unroll
        for (int r = 0; r < R; r += 2) {
            float acc[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                acc[h] = 0.f;
#pragma unroll
                for (int u = 0; u < U; u++) {
                    if (u * 32 + lane < nb) {
                        const uint4 q = w[r + h][u];
                        int lo, hi, d = 0;
                        e2m1x8_to_i8(q.x, lo, hi); d = __dp4a(lo, xr[u][0].x, d); d = __dp4a(hi, xr[u][0].y, d);
                        e2m1x8_to_i8(q.y, lo, hi); d = __dp4a(lo, xr[u][0].z, d); d = __dp4a(hi, xr[u][0].w, d);
                        e2m1x8_to_i8(q.z, lo, hi); d = __dp4a(lo, xr[u][1].x, d); d = __dp4a(hi, xr[u][1].y, d);
                        e2m1x8_to_i8(q.w, lo, hi); d = __dp4a(lo, xr[u][1].z, d); d = __dp4a(hi, xr[u][1].w, d);
                        acc[h] += (float)d * (0.5f * e8m0_q8(s[r + h][u]) * dr[u]);
                    }
                }
            }
            const int j = bx * 32 + warp * per + t0 + r / 2;
            const int gr = act == 1 ? 2 * j : j, ur = act == 1 ? 2 * j + 1 : I + j;
            float g = warp_sum(acc[0]), u = warp_sum(acc[1]);
            if (lane == 0) {
                if (bias) { g += bias[e * 2 * I + gr]; u += bias[e * 2 * I + ur]; }
                out[j - bx * 32] = gate_up_act(g, u, act, alpha, limit);
            }
        }
    }
    gate_up_store(out, aq, ad, a, I, bx);
}
// moe_gate_up_q8_topk with gate_up_q8_body_lf<R, U> as its body
template <int R, int U>
__device__ void gate_up_q8_topk_impl(const u8* blocks, const u8* scales,
        const signed char* xq, const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout,
        const float* bias, int I, int cols, int act, float alpha, float limit, signed char* aq, float* ad) {
    const int e = gate_up_topk_pick(logits, E, k, renorm, ids, wout);
    gate_up_q8_body_lf<R, U>(blocks, scales, xq, xd, e, k, bias, I, cols, act, alpha, limit, aq, ad, blockIdx.x, blockIdx.y);
}
#define GU_TOPK_ARGS const u8* blocks, const u8* scales, const signed char* xq, const float* xd, const float* logits, \
    int E, int k, int renorm, int* ids, float* wout, const float* bias, int I, int cols, int act, float alpha, float limit, \
    signed char* aq, float* ad
#define GU_TOPK_PASS blocks, scales, xq, xd, logits, E, k, renorm, ids, wout, bias, I, cols, act, alpha, limit, aq, ad
// loads first (gate_up_q8_body_lf): R rows in flight per warp, cols <= 1024 U; block 256
__global__ void __launch_bounds__(256) moe_gate_up_q8_topk_lf4_u2(GU_TOPK_ARGS) { gate_up_q8_topk_impl<4, 2>(GU_TOPK_PASS); }
__global__ void __launch_bounds__(256) moe_gate_up_q8_topk_lf8_u2(GU_TOPK_ARGS) { gate_up_q8_topk_impl<8, 2>(GU_TOPK_PASS); }
__global__ void __launch_bounds__(256) moe_gate_up_q8_topk_lf4_u3(GU_TOPK_ARGS) { gate_up_q8_topk_impl<4, 3>(GU_TOPK_PASS); }

// The byte ranges block (bx, a) of a gate/up launch reads: its 32 outputs' gate and up rows
// (act 0: rows j and I + j, two ranges; act 1: rows 2j, 2j + 1, one range) and their scales.
struct GuRanges {
    const u8* w[2];
    const u8* s[2];
    u32 wbytes, sbytes;  // per range
    int nr;              // ranges (1 or 2)
};
__device__ __forceinline__ GuRanges gu_ranges(const u8* blocks, const u8* scales, long long e, int I, int nb, int act,
                                              int j0) {
    GuRanges r;
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
    if (act == 1) {
        r.nr = 1;
        r.w[0] = r.w[1] = eb + (long long)2 * j0 * nb * 16;
        r.s[0] = r.s[1] = es + (long long)2 * j0 * nb;
        r.wbytes = (u32)(2 * 32 * nb * 16);
        r.sbytes = (u32)(2 * 32 * nb);
    } else {
        r.nr = 2;
        r.w[0] = eb + (long long)j0 * nb * 16;
        r.w[1] = eb + (long long)(I + j0) * nb * 16;
        r.s[0] = es + (long long)j0 * nb;
        r.s[1] = es + (long long)(I + j0) * nb;
        r.wbytes = (u32)(32 * nb * 16);
        r.sbytes = (u32)(32 * nb);
    }
    return r;
}

// floor 1: register loads, U 16-byte loads per thread in flight, XOR-folded
template <int U>
__global__ void __launch_bounds__(256) read_regs(const u8* blocks, const u8* scales, const int* ids, int I, int cols,
                                                 int act, u32* sink) {
    const int nb = cols / 32;
    const GuRanges r = gu_ranges(blocks, scales, ids[blockIdx.y], I, nb, act, blockIdx.x * 32);
    u32 x = 0;
    for (int q = 0; q < r.nr; q++) {
        const uint4* w = (const uint4*)r.w[q];
        const int n16 = r.wbytes / 16;
        for (int i0 = threadIdx.x; i0 < n16; i0 += 256 * U) {
            uint4 v[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = i0 + u * 256;
                v[u] = i < n16 ? ld_stream16(w + i) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; u++) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
        for (int i = threadIdx.x; i < (int)r.sbytes / 4; i += 256) x ^= __ldg((const u32*)r.s[q] + i);
    }
    x = __reduce_xor_sync(0xffffffffu, x);
    if ((threadIdx.x & 31) == 0) atomicXor(sink + blockIdx.y, x);
}

// floor 2: the block's ranges copied to shared memory by thread 0, one copy each
__global__ void __launch_bounds__(256) read_bulk(const u8* blocks, const u8* scales, const int* ids, int I, int cols,
                                                 int act, u32* sink) {
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ __align__(8) unsigned long long bar;
    const int nb = cols / 32;
    const GuRanges r = gu_ranges(blocks, scales, ids[blockIdx.y], I, nb, act, blockIdx.x * 32);
    if (threadIdx.x == 0) {
        mbar_init(&bar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        mbar_expect_tx(&bar, r.nr * (r.wbytes + r.sbytes));
        for (int q = 0; q < r.nr; q++) {
            bulk_copy_g2s(smem + q * r.wbytes, r.w[q], r.wbytes, &bar);
            bulk_copy_g2s(smem + r.nr * r.wbytes + q * r.sbytes, r.s[q], r.sbytes, &bar);
        }
    }
    __syncthreads();
    mbar_wait(&bar, 0);
    if (threadIdx.x < 32) {
        u32 x = ((const u32*)smem)[threadIdx.x] ^ ((const u32*)(smem + r.nr * r.wbytes))[threadIdx.x];
        x = __reduce_xor_sync(0xffffffffu, x);
        if (threadIdx.x == 0) atomicXor(sink + blockIdx.y, x);
    }
}

// kernels/moe_q8.cu's bulk gate/up with 32 warps (one output each), here only
GATE_UP_BULK_ENTRY(moe_gate_up_q8_topk_bulk32, 32, 1)
GATE_UP_RANGES_ENTRY(moe_gate_up_q8_topk_ranges32, 32)
// the ranges form taken apart: without the top-k (the launch's ids), without the sums, neither
#define GATE_UP_RANGES_DIAG(NAME, PICK, COMPUTE) \
extern "C" __global__ void __launch_bounds__(256) NAME(const u8* blocks, const u8* scales, \
        const signed char* xq, const float* xd, const float* logits, int E, int k, int renorm, int* ids, float* wout, \
        const float* bias, int I, int cols, int act, float alpha, float limit, signed char* aq, float* ad) { \
    gate_up_q8_ranges_impl<8, PICK, COMPUTE>(blocks, scales, xq, xd, logits, E, k, renorm, ids, wout, bias, I, cols, act, alpha, limit, aq, ad); }
GATE_UP_RANGES_DIAG(ranges8_ids, false, true)
GATE_UP_RANGES_DIAG(ranges8_pick_nosum, true, false)
GATE_UP_RANGES_DIAG(ranges8_ids_nosum, false, false)

struct Shape { const char* name; int E, k, I, cols, act; };

int main(int argc, char** argv) {
    const int NL = argc > 1 ? atoi(argv[1]) : 96, REPS = 15;  // launches per graph (each its own experts), replays
    cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
    printf("device %s, %d SMs, L2 %d MB, %d launches per graph\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20, NL);
    std::mt19937 rng(7);
    Shape shapes[] = {{"qwen3-30b-a3b", 128, 8, 768, 2048, 0}, {"gpt-oss-20b", 32, 4, 2880, 2880, 1}};
    for (const Shape& sh : shapes) {
        const int nb = sh.cols / 32;
        const size_t bper = (size_t)sh.E * 2 * sh.I * nb * 16, sper = (size_t)sh.E * 2 * sh.I * nb;
        std::vector<u8> hb(bper), hs(sper);
        for (auto& v : hb) v = rng() & 0xff;
        for (auto& v : hs) v = 118 + rng() % 12;
        std::vector<signed char> hx(sh.cols);
        for (auto& v : hx) v = (signed char)((int)(rng() % 255) - 127);
        std::vector<float> hd(nb);
        for (auto& v : hd) v = 0.01f + (rng() % 100) * 1e-4f;
        std::vector<int> hids((size_t)NL * sh.k);
        for (int l = 0; l < NL; l++) {
            std::vector<int> perm(sh.E);
            for (int e = 0; e < sh.E; e++) perm[e] = e;
            std::shuffle(perm.begin(), perm.end(), rng);
            for (int j = 0; j < sh.k; j++) hids[(size_t)l * sh.k + j] = perm[j];
        }
        u8 *db, *ds; signed char *dx, *daq, *daq_ref; float *dd, *dad, *dad_ref; int* dids; u32* sink;
        CK(cudaMalloc(&db, bper)); CK(cudaMalloc(&ds, sper)); CK(cudaMalloc(&sink, sh.k * 4));
        CK(cudaMalloc(&dx, sh.cols)); CK(cudaMalloc(&dd, nb * 4)); CK(cudaMalloc(&dids, hids.size() * 4));
        const size_t na = (size_t)sh.k * sh.I;
        CK(cudaMalloc(&daq, na)); CK(cudaMalloc(&daq_ref, na)); CK(cudaMalloc(&dad, na / 32 * 4)); CK(cudaMalloc(&dad_ref, na / 32 * 4));
        CK(cudaMemcpy(db, hb.data(), bper, cudaMemcpyHostToDevice)); CK(cudaMemcpy(ds, hs.data(), sper, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dx, hx.data(), sh.cols, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dd, hd.data(), nb * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dids, hids.data(), hids.size() * 4, cudaMemcpyHostToDevice));
        std::vector<float> hlg((size_t)NL * sh.E);
        for (int l = 0; l < NL; l++) {
            for (int e = 0; e < sh.E; e++) hlg[(size_t)l * sh.E + e] = -1.f - (rng() % 1000) * 1e-3f;
            for (int j = 0; j < sh.k; j++) hlg[(size_t)l * sh.E + hids[(size_t)l * sh.k + j]] = 10.f - j;
        }
        float *dlg, *dtw; int* dtid;
        CK(cudaMalloc(&dlg, hlg.size() * 4)); CK(cudaMalloc(&dtw, sh.k * 4)); CK(cudaMalloc(&dtid, sh.k * 4));
        CK(cudaMemcpy(dlg, hlg.data(), hlg.size() * 4, cudaMemcpyHostToDevice));
        const double mb = (double)sh.k * 2 * sh.I * nb * 17 / 1e6;  // bytes one launch reads
        printf("%s: E %d, top-%d, %d x %d per expert (gate+up), %.1f MB per launch\n", sh.name, sh.E, sh.k, 2 * sh.I, sh.cols, mb);
        const float alpha = 1.702f, limit = 7.f;
        auto shipped = [&](int threads, int l, signed char* aq, float* ad) {
            moe_gate_up_q8<<<dim3(sh.I / 32, sh.k), threads, 0, s>>>(db, ds, dx, dd, dids + l * sh.k, sh.k, nullptr, sh.I,
                                                                   sh.cols, sh.act, alpha, limit, aq, ad);
        };
        auto time_us = [&](auto launch) { return graph_time_us(s, NL, REPS, launch); };
        shipped(256, 0, daq_ref, dad_ref);
        CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
        std::vector<signed char> ref_q(na); std::vector<float> ref_d(na / 32);
        CK(cudaMemcpy(ref_q.data(), daq_ref, na, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(ref_d.data(), dad_ref, na / 32 * 4, cudaMemcpyDeviceToHost));
        auto report = [&](const char* what, auto launch) {
            CK(cudaMemset(daq, 0x55, na)); CK(cudaMemset(dad, 0xff, na / 32 * 4));
            launch(0); CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
            std::vector<signed char> q(na); std::vector<float> d(na / 32);
            CK(cudaMemcpy(q.data(), daq, na, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(d.data(), dad, na / 32 * 4, cudaMemcpyDeviceToHost));
            size_t bad = 0;
            for (size_t i = 0; i < na; i++) bad += q[i] != ref_q[i];
            for (size_t i = 0; i < na / 32; i++) bad += d[i] != ref_d[i];
            const float us = time_us(launch);
            printf("  %-22s %8.2f us  %6.0f GB/s  %s\n", what, us, mb / us * 1e3, bad ? "MISMATCH" : "equal");
            if (bad) printf("    %zu outputs differ from the shipped kernel\n", bad);
        };
        report("shipped 256", [&](int l) { shipped(256, l, daq, dad); });
        // the batch-1 kernel of the step: ranks the router logits itself (made so that its
        // top-k are this launch's ids, in order)
        for (int th : {256, 512}) {
            char name[64]; snprintf(name, sizeof name, "shipped topk %d", th);
            report(name, [&](int l) {
                moe_gate_up_q8_topk<<<dim3(sh.I / 32, sh.k), th, 0, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1,
                    dtid, dtw, nullptr, sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
            });
        }
        {  // 8 outputs per block (session 21): 4x the blocks, an int8 block finished by its 4th
            float* daf; unsigned* dgc;
            CK(cudaMalloc(&daf, na * 4)); CK(cudaMalloc(&dgc, na / 32 * 8)); CK(cudaMemset(dgc, 0, na / 32 * 8));
            report("topk fine 8/block", [&](int l) {
                moe_gate_up_q8_topk_fine<<<dim3(sh.I / 8, sh.k), 256, 0, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1,
                    dtid, dtw, nullptr, sh.I, sh.cols, sh.act, alpha, limit, daq, dad, daf, dgc);
            });
            report("topk fine 8/block lf", [&](int l) {
                moe_gate_up_q8_topk_fine_lf<<<dim3(sh.I / 8, sh.k), 256, 0, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k,
                    1, dtid, dtw, nullptr, sh.I, sh.cols, sh.act, alpha, limit, daq, dad, daf, dgc);
            });
            cudaFree(daf); cudaFree(dgc);
        }
        // the loads-first entries (gate_up_q8_body_lf), at 256 and 128 threads
        auto lf = [&](const char* what, int threads, auto kernel) {
            report(what, [&](int l) {
                kernel<<<dim3(sh.I / 32, sh.k), threads, 0, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1,
                    dtid, dtw, nullptr, sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
            });
        };
        if (nb <= 64) {
            lf("topk lf4_u2 256", 256, moe_gate_up_q8_topk_lf4_u2);
            lf("topk lf4_u2 128", 128, moe_gate_up_q8_topk_lf4_u2);
            lf("topk lf8_u2 256", 256, moe_gate_up_q8_topk_lf8_u2);
            lf("topk lf8_u2 128", 128, moe_gate_up_q8_topk_lf8_u2);
        }
        if (nb <= 96) {
            lf("topk lf4_u3 256", 256, moe_gate_up_q8_topk_lf4_u3);
            lf("topk lf4_u3 128", 128, moe_gate_up_q8_topk_lf4_u3);
        }
        // the floors: the same blocks' bytes, no arithmetic, no output
        const dim3 grid(sh.I / 32, sh.k);
        auto floor = [&](const char* what, auto launch) {
            launch(0); CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
            const float us = time_us(launch);
            printf("  %-22s %8.2f us  %6.0f GB/s  (floor)\n", what, us, mb / us * 1e3);
        };
        floor("read regs U4", [&](int l) { read_regs<4><<<grid, 256, 0, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        floor("read regs U8", [&](int l) { read_regs<8><<<grid, 256, 0, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        const int smem = 64 * nb * 17;
        CK(cudaFuncSetAttribute(read_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        floor("read bulk", [&](int l) { read_bulk<<<grid, 256, smem, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        // the bulk-copy gate/up (gate_up_bulk.cuh): 8 warps with a slot per output or a ring of
        // 2, 16 and 32 warps
        auto bulk = [&](const char* what, int nw, int slots, auto kernel) {
            const int gsmem = GU_BULK_SMEM(nb, nw, slots);
            CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gsmem));
            report(what, [&](int l) {
                kernel<<<grid, nw * 32, gsmem, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1, dtid, dtw, nullptr,
                                                  sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
            });
        };
        bulk("topk bulk 8 warps", 8, 4, moe_gate_up_q8_topk_bulk8);
        bulk("topk bulk 8 warps r2", 8, 2, moe_gate_up_q8_topk_bulk8_r2);
        bulk("topk bulk 16 warps", 16, 2, moe_gate_up_q8_topk_bulk16);
        bulk("topk bulk 32 warps", 32, 1, moe_gate_up_q8_topk_bulk32);
        auto ranges = [&](const char* what, int nw, auto kernel) {
            const int gsmem = GU_RANGES_SMEM(nb, nw);
            CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gsmem));
            report(what, [&](int l) {
                kernel<<<grid, nw * 32, gsmem, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1, dtid, dtw, nullptr,
                                                  sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
            });
        };
        ranges("topk ranges 8 warps", 8, moe_gate_up_q8_topk_ranges8);
        ranges("topk ranges 16 warps", 16, moe_gate_up_q8_topk_ranges16);
        ranges("topk ranges 32 warps", 32, moe_gate_up_q8_topk_ranges32);
        {  // the ranges form taken apart (8 warps): where its time goes
            const int gsmem = GU_RANGES_SMEM(nb, 8);
            // ids: the launch's experts given (no top-k); sums: its outputs are checked
            auto diag = [&](const char* what, bool ids, bool sums, auto kernel) {
                CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gsmem));
                auto launch = [&](int l) {
                    kernel<<<grid, 256, gsmem, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1, ids ? dids + l * sh.k : dtid,
                                                    dtw, nullptr, sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
                };
                if (sums) report(what, launch);
                else floor(what, launch);
            };
            diag("ranges 8, ids, sums", true, true, ranges8_ids);
            diag("ranges 8, top-k, no sums", false, false, ranges8_pick_nosum);
            diag("ranges 8, ids, no sums", true, false, ranges8_ids_nosum);
        }
        cudaFree(db); cudaFree(ds); cudaFree(dx); cudaFree(dd); cudaFree(dids); cudaFree(sink);
        cudaFree(daq); cudaFree(daq_ref); cudaFree(dad); cudaFree(dad_ref); cudaFree(dlg); cudaFree(dtw); cudaFree(dtid);
    }
    printf("done\n");
    return 0;
}
