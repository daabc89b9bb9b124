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
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <random>
#include "../../kernels/common.cuh"
#include "../../kernels/moe_q8.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1); } } while (0)

struct Shape { const char* name; int E, k, I, cols, act; };

int main() {
    cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaDeviceProp p; CK(cudaGetDeviceProperties(&p, 0));
    printf("device %s, %d SMs, L2 %d MB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
    std::mt19937 rng(7);
    const int NL = 96, REPS = 15;  // launches per graph (each its own experts), graph replays
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
        u8 *db, *ds; signed char *dx, *daq, *daq_ref; float *dd, *dad, *dad_ref; int* dids;
        CK(cudaMalloc(&db, bper)); CK(cudaMalloc(&ds, sper));
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
        cudaFree(db); cudaFree(ds); cudaFree(dx); cudaFree(dd); cudaFree(dids);
        cudaFree(daq); cudaFree(daq_ref); cudaFree(dad); cudaFree(dad_ref); cudaFree(dlg); cudaFree(dtw); cudaFree(dtid);
    }
    printf("done\n");
    return 0;
}
