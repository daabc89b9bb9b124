// L2 prefetch of weights the next kernels will read (sm_90: cp.async.bulk.prefetch.L2).
// At batch 1 the GEMVs are latency-bound (ncu: q|k|v at 38% of DRAM bandwidth, o-proj 17%)
// while RoPE and attention leave DRAM idle. Launched before such a stretch, this kernel has
// each thread queue a bulk prefetch of one chunk of up to three regions and exit; the copy
// engine fills L2 meanwhile, and the GEMV that follows reads its weights from L2.
// A hint only: nothing waits for it, and a line evicted before use is read again from DRAM.
// regions: (a, na), (b, nb), (c, nc) in bytes; pointers 16-byte aligned, sizes rounded down
// to 16. grid: any; chunk: bytes per prefetch (a multiple of 16).
extern "C" __global__ void l2_prefetch(const char* a, unsigned long long na, const char* b, unsigned long long nb,
                                       const char* c, unsigned long long nc, unsigned chunk) {
    PDL_ENTRY();
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long ca = (na + chunk - 1) / chunk, cb = (nb + chunk - 1) / chunk;
    const unsigned long long total = ca + cb + (nc + chunk - 1) / chunk;
    for (unsigned long long i = tid; i < total; i += stride) {
        const char* base;
        unsigned long long len, j;
        if (i < ca) { base = a; len = na; j = i; }
        else if (i < ca + cb) { base = b; len = nb; j = i - ca; }
        else { base = c; len = nc; j = i - ca - cb; }
        const unsigned long long off = j * chunk;
        unsigned sz = (unsigned)min((unsigned long long)chunk, len - off) & ~15u;
        if (sz == 0) continue;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + off), "r"(sz) : "memory");
    }
}
