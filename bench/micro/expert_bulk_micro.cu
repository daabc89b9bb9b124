// Micro-benchmark: the batch-1 MoE expert gate/up with its weights brought on chip by bulk
// copies (cp.async.bulk, Hopper's TMA without a tensor map) instead of register loads.
// Why: the step's gate/up (moe_gate_up_q8_topk, kernels/moe_q8.cu) cannot load a byte before
// the router is done, so all of it is on the critical path, and it reads at ~1/3 of the copy
// bandwidth (session 18: 11.3 us for Qwen3's 13.4 MB). Loading a warp's rows first did not
// help (session 18), so how many bytes are in flight per warp is not the limit. Here:
//   read regs U    floor 1: the same blocks read the same bytes with U 16-byte loads per
//                  thread in flight, no arithmetic
//   read bulk      floor 2: the same blocks copy their bytes to shared memory in one go
//   bulk NW        moe_gate_up_q8_topk_bulkNW (kernels/moe_q8.cu): every warp's lane 0 copies
//                  the warp's rows to shared memory right after the top-k (a few
//                  instructions, all of the block's bytes in flight at once), then the warp
//                  computes from there; NW warps per block
// bulk NW's int8 output must equal the shipped kernel's bit for bit (same sums, same order).
// The kernels run without PDL, each launch with k random experts of E (cold weights), in a
// CUDA graph of NL launches. Build + run on the device:
//   nvcc -O3 -arch=sm_90 -o /tmp/ebm bench/micro/expert_bulk_micro.cu && /tmp/ebm
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include "../../kernels/common.cuh"
#include "../../kernels/moe_q8.cu"
#include "../../kernels/gemv_bulk.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)

// The byte ranges block (bx, a) of a gate/up launch reads: its 32 outputs' gate and up rows
// (act 0: rows j and I + j, two ranges; act 1: rows 2j, 2j + 1, one range) and their scales.
struct GuRanges {
    const u8* w[2];
    const u8* s[2];
    u32 wbytes, sbytes;  // per range
    int nr;              // ranges (1 or 2)
};
__device__ __forceinline__ GuRanges gu_ranges(const u8* blocks, const u8* scales, long long e, int I, int nb, int act,
                                              int j0, int rows) {
    GuRanges r;
    const u8* eb = blocks + e * 2 * I * (long long)nb * 16;
    const u8* es = scales + e * 2 * I * (long long)nb;
    if (act == 1) {
        r.nr = 1;
        r.w[0] = r.w[1] = eb + (long long)2 * j0 * nb * 16;
        r.s[0] = r.s[1] = es + (long long)2 * j0 * nb;
        r.wbytes = (u32)(2 * rows * nb * 16);
        r.sbytes = (u32)(2 * rows * nb);
    } else {
        r.nr = 2;
        r.w[0] = eb + (long long)j0 * nb * 16;
        r.w[1] = eb + (long long)(I + j0) * nb * 16;
        r.s[0] = es + (long long)j0 * nb;
        r.s[1] = es + (long long)(I + j0) * nb;
        r.wbytes = (u32)(rows * nb * 16);
        r.sbytes = (u32)(rows * nb);
    }
    return r;
}

// floor 1: register loads, U 16-byte loads per thread in flight, XOR-folded
template <int U>
__global__ void __launch_bounds__(256) read_regs(const u8* blocks, const u8* scales, const int* ids, int I, int cols,
                                                 int act, u32* sink) {
    const int nb = cols / 32;
    const GuRanges r = gu_ranges(blocks, scales, ids[blockIdx.y], I, nb, act, blockIdx.x * 32, 32);
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
    const GuRanges r = gu_ranges(blocks, scales, ids[blockIdx.y], I, nb, act, blockIdx.x * 32, 32);
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

// kernels/moe_q8.cu's bulk gate/up with 32 warps (4 KB of rows per warp copy), here only
GATE_UP_BULK_ENTRY(32)

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
        std::vector<float> hlg((size_t)NL * sh.E);
        for (int l = 0; l < NL; l++) {
            std::vector<int> perm(sh.E);
            for (int e = 0; e < sh.E; e++) perm[e] = e;
            std::shuffle(perm.begin(), perm.end(), rng);
            for (int e = 0; e < sh.E; e++) hlg[(size_t)l * sh.E + e] = -1.f - (rng() % 1000) * 1e-3f;
            for (int j = 0; j < sh.k; j++) {
                hids[(size_t)l * sh.k + j] = perm[j];
                hlg[(size_t)l * sh.E + perm[j]] = 10.f - j;  // the top-k are this launch's ids, in order
            }
        }
        u8 *db, *ds; signed char *dx, *daq, *daq_ref; float *dd, *dad, *dad_ref, *dlg, *dtw; int *dids, *dtid; u32* sink;
        CK(cudaMalloc(&db, bper)); CK(cudaMalloc(&ds, sper));
        CK(cudaMalloc(&dx, sh.cols)); CK(cudaMalloc(&dd, nb * 4)); CK(cudaMalloc(&dids, hids.size() * 4));
        const size_t na = (size_t)sh.k * sh.I;
        CK(cudaMalloc(&daq, na)); CK(cudaMalloc(&daq_ref, na)); CK(cudaMalloc(&dad, na / 32 * 4)); CK(cudaMalloc(&dad_ref, na / 32 * 4));
        CK(cudaMalloc(&dlg, hlg.size() * 4)); CK(cudaMalloc(&dtw, sh.k * 4)); CK(cudaMalloc(&dtid, sh.k * 4));
        CK(cudaMalloc(&sink, sh.k * 4));
        CK(cudaMemcpy(db, hb.data(), bper, cudaMemcpyHostToDevice)); CK(cudaMemcpy(ds, hs.data(), sper, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dx, hx.data(), sh.cols, cudaMemcpyHostToDevice)); CK(cudaMemcpy(dd, hd.data(), nb * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dids, hids.data(), hids.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dlg, hlg.data(), hlg.size() * 4, cudaMemcpyHostToDevice));
        const double mb = (double)sh.k * 2 * sh.I * nb * 17 / 1e6;  // bytes one launch reads
        printf("%s: E %d, top-%d, %d x %d per expert (gate+up), %.1f MB per launch\n", sh.name, sh.E, sh.k, 2 * sh.I, sh.cols, mb);
        const float alpha = 1.702f, limit = 7.f;
        const dim3 grid(sh.I / 32, sh.k);
        auto time_us = [&](auto launch) {
            cudaGraph_t g; cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            for (int l = 0; l < NL; l++) launch(l);
            CK(cudaStreamEndCapture(s, &g)); CK(cudaGraphInstantiate(&ge, g, 0));
            cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
            std::vector<float> t;
            for (int r = 0; r < REPS; r++) {
                CK(cudaEventRecord(a, s)); CK(cudaGraphLaunch(ge, s)); CK(cudaEventRecord(b, s)); CK(cudaEventSynchronize(b));
                float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms * 1e3f / NL);
            }
            std::sort(t.begin(), t.end());
            CK(cudaGraphExecDestroy(ge)); CK(cudaGraphDestroy(g));
            return t[t.size() / 2];
        };
        auto shipped = [&](int threads, int l, signed char* aq, float* ad) {
            moe_gate_up_q8_topk<<<grid, threads, 0, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1, dtid, dtw,
                                                       nullptr, sh.I, sh.cols, sh.act, alpha, limit, aq, ad);
        };
        shipped(256, 0, daq_ref, dad_ref);
        CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
        std::vector<signed char> ref_q(na); std::vector<float> ref_d(na / 32);
        CK(cudaMemcpy(ref_q.data(), daq_ref, na, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(ref_d.data(), dad_ref, na / 32 * 4, cudaMemcpyDeviceToHost));
        // check: outputs against the shipped kernel's (poisoned first); floors: no outputs
        auto report = [&](const char* what, bool check, auto launch) {
            CK(cudaMemset(daq, 0x55, na)); CK(cudaMemset(dad, 0xff, na / 32 * 4));
            launch(0); CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
            size_t bad = 0;
            if (check) {
                std::vector<signed char> q(na); std::vector<float> d(na / 32);
                CK(cudaMemcpy(q.data(), daq, na, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(d.data(), dad, na / 32 * 4, cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < na; i++) bad += q[i] != ref_q[i];
                for (size_t i = 0; i < na / 32; i++) bad += d[i] != ref_d[i];
            }
            const float us = time_us(launch);
            printf("  %-22s %8.2f us  %6.0f GB/s  %s\n", what, us, mb / us * 1e3, !check ? "(floor)" : bad ? "MISMATCH" : "equal");
            if (bad) printf("    %zu outputs differ from the shipped kernel\n", bad);
        };
        for (int th : {256, 512}) {
            char name[64]; snprintf(name, sizeof name, "shipped topk %d", th);
            report(name, true, [&](int l) { shipped(th, l, daq, dad); });
        }
        report("read regs U4", false, [&](int l) { read_regs<4><<<grid, 256, 0, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        report("read regs U8", false, [&](int l) { read_regs<8><<<grid, 256, 0, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        const int smem = 64 * nb * 17;
        CK(cudaFuncSetAttribute(read_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        report("read bulk", false, [&](int l) { read_bulk<<<grid, 256, smem, s>>>(db, ds, dids + l * sh.k, sh.I, sh.cols, sh.act, sink); });
        auto bulk = [&](const char* what, int nw, auto kernel) {
            const int gsmem = GU_BULK_SMEM(nb, nw);
            CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, gsmem));
            report(what, true, [&](int l) {
                kernel<<<grid, nw * 32, gsmem, s>>>(db, ds, dx, dd, dlg + (size_t)l * sh.E, sh.E, sh.k, 1, dtid, dtw, nullptr,
                                                  sh.I, sh.cols, sh.act, alpha, limit, daq, dad);
            });
        };
        bulk("bulk 8 warps", 8, moe_gate_up_q8_topk_bulk8);
        bulk("bulk 16 warps", 16, moe_gate_up_q8_topk_bulk16);
        bulk("bulk 32 warps", 32, moe_gate_up_q8_topk_bulk32);
        cudaFree(db); cudaFree(ds); cudaFree(dx); cudaFree(dd); cudaFree(dids); cudaFree(sink);
        cudaFree(daq); cudaFree(daq_ref); cudaFree(dad); cudaFree(dad_ref); cudaFree(dlg); cudaFree(dtw); cudaFree(dtid);
    }
    printf("done\n");
    return 0;
}
