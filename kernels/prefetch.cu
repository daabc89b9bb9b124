// Stand-alone L2 prefetch of up to three regions (pointer, bytes), each block queueing its
// share of each (l2_prefetch_share, common.cuh). Launched on the decode step's side stream
// or before a stretch of latency-bound kernels, so the GEMV after them reads its weights
// from L2. grid: any (one block per SM), block 32 * k.
extern "C" __global__ void l2_prefetch(const char* a, unsigned long long na, const char* b, unsigned long long nb,
                                       const char* c, unsigned long long nc) {
    PDL_ENTRY();
    l2_prefetch_share(a, na, blockIdx.x, gridDim.x);
    l2_prefetch_share(b, nb, blockIdx.x, gridDim.x);
    l2_prefetch_share(c, nc, blockIdx.x, gridDim.x);
}
