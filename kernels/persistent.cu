// The persistent decode step: ONE launch runs a whole decode step as a program of the
// ordinary kernels' bodies, ordered by completion counters instead of kernel boundaries.
// The host records the step's launches once per batch bucket (src/backend/cuda/persistent.rs)
// and uploads them as instructions; this module is compiled from common.cuh, the kernel
// sources whose bodies it calls, and this file, with KAIROS_PERSISTENT (coherent loads of
// activations, see common.cuh), PK_HEAD_DIM (64 or 128: the attention instantiated) and
// PK_MAX_N (rows per step: the GEMV instantiations).
//
// Why: at batch 1 a decode step of a MoE model is ~10 dependent small kernels per layer;
// each kernel boundary costs a launch, a ramp-up and a drain (measured ~50 us per layer of
// the Qwen3-30B-A3B shape against ~21 us of weight bytes). Here a boundary is a grid
// barrier (or a wait on the previous instruction's counter, before which GEMVs load their
// first weights), and every block may ask L2 for its share of the NEXT weight-reading
// instruction's weights before it runs the current one.
// MEASURED SLOWER than the CUDA graph of ordinary launches (H100, Qwen3-30B-A3B shape b1:
// 5.13 ms against 3.32; bench/results/cuda_decode_h100.md "persistent step"): each
// instruction costs 5-8 us even when tiny (a barrier round with 264 blocks is no cheaper
// than a graph kernel boundary), and the attention body spills at 128 registers. Opt-in
// (KAIROS_CUDA_PERSISTENT=1) as the base for fused per-layer instructions.
//
// Instruction layout (PK_WORDS u64 words):
//   w0 = op | block_size << 32    w1 = gx | gy << 32    w2 = gz | n_vblocks << 32
//   w3 = prefetch pointer (0: none)    w4 = prefetch bytes    w5.. = the kernel's arguments,
//   as its launch passed them (pointers, 4-byte scalars in the low half, i64).
// A virtual block is one block of the recorded launch (256 threads), or, for kernels
// launched with 32 / 128 threads, 8 warps' worth of their warps.
#define PK_WORDS 32
#ifndef PK_MAX_N
#define PK_MAX_N 8  // rows per step of the bucket this module runs
#endif
#ifndef PK_MIN_BLOCKS
#define PK_MIN_BLOCKS 2  // blocks per SM the registers are sized for (1 or 2)
#endif
#define PK_ARG0 5

// Op codes: src/backend/cuda/persistent.rs holds the same table (a unit test compares them).
#define PK_OP_EMBEDDING_GATHER_F32 0
#define PK_OP_RMSNORM_RESIDUAL 1
#define PK_OP_RMSNORM_RESIDUAL_F32OUT 2
#define PK_OP_RMSNORM_RESIDUAL_Q8 3
#define PK_OP_RMSNORM_MOE_BF16 4
#define PK_OP_RMSNORM_MOE_F32 5
#define PK_OP_ROPE_QK_KV 6
#define PK_OP_ATTENTION_SPLIT 7
#define PK_OP_MOE_ROUTER_TOPK 8
#define PK_OP_MOE_ROUTER_TOPK_512 9
#define PK_OP_MOE_GATE_UP_Q8 10
#define PK_OP_MXFP4_Q8_L32 11
#define PK_OP_MXFP4_Q8_L8 12
#define PK_OP_ARGMAX_PARTIAL 13
#define PK_OP_ARGMAX_FINAL 14
#define PK_OP_SWIGLU_BF16 15
#define PK_OP_SWIGLU_OAI_BF16 16
#define PK_OP_BF16_GEMV_BF16X 20
#define PK_OP_BF16_GEMV_F32X 30

#define PA(T, i) ((T)a[PK_ARG0 + (i)])
#define PI(i) ((int)(u32)a[PK_ARG0 + (i)])
#define PF(i) __uint_as_float((u32)a[PK_ARG0 + (i)])
#define PL(i) ((long long)a[PK_ARG0 + (i)])

#if PK_HEAD_DIM == 64
#define PK_ATTN attn_split_impl<2, 8>
#elif PK_HEAD_DIM == 128
#define PK_ATTN attn_split_impl<4, 8>
#else
#error "PK_HEAD_DIM must be 64 or 128"
#endif

#define PK_GEMV_CASE(NN, RR)                                                                                       \
    case PK_OP_BF16_GEMV_BF16X + NN - 1:                                                                           \
        gemv_impl<bf16_t, NN, RR>(PA(const bf16_t*, 0), PA(const bf16_t*, 1), PA(float*, 2), PI(3), PI(4),          \
                                  PA(const float*, 5), bx, wait);                                                  \
        break;                                                                                                     \
    case PK_OP_BF16_GEMV_F32X + NN - 1:                                                                            \
        gemv_impl<float, NN, RR>(PA(const bf16_t*, 0), PA(const float*, 1), PA(float*, 2), PI(3), PI(4),            \
                                 PA(const float*, 5), bx, wait);                                                   \
        break;

// Counter mode (KAIROS_CUDA_PK_SYNC=counters): waits until instruction `i - 1` has completed (`done[i - 1]`
// counts its finished virtual blocks): thread 0 polls with relaxed loads, an acquire fence
// makes the producers' writes visible, and the block proceeds together. Called by every
// thread of the block. Barrier mode (PK_BARRIER, the default): a no-op, the grid barrier
// after each instruction orders them.
struct PkWait {
    const unsigned* ctr;
    unsigned target;
    __device__ __forceinline__ void operator()() const {
        if (!ctr) return;
        if (threadIdx.x == 0) {
            unsigned v;
            do {
                asm volatile("ld.relaxed.gpu.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
            } while (v < target);
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
        }
        __syncthreads();
    }
};

// Grid-wide barrier (PK_BARRIER) on done[0], zeroed before the launch: generation i waits
// for (i + 1) * gridDim.x arrivals; release/acquire at GPU scope.
__device__ __forceinline__ void pk_grid_sync(unsigned* bar, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned v;
        asm volatile("atom.add.release.gpu.u32 %0, [%1], 1;" : "=r"(v) : "l"(bar) : "memory");
        v += 1;
        while (v < target) asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(bar) : "memory");
    }
    __syncthreads();
}

// Runs virtual block vb of instruction a (all 256 threads of the block call it) once
// `wait` says its inputs are ready; GEMVs load their first weights before waiting.
__device__ void pk_run(const unsigned long long* a, int vb, PkWait wait) {
    const int op = (int)(u32)a[0];
    const int gx = (int)(u32)a[1], gy = (int)(a[1] >> 32);
    const int bx = vb % gx, by = (vb / gx) % gy, bz = vb / (gx * gy);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (op < PK_OP_BF16_GEMV_BF16X) wait();
    switch (op) {
    case PK_OP_EMBEDDING_GATHER_F32:
        emb_impl(PA(const bf16_t*, 0), PA(const int*, 1), PA(float*, 2), PI(3), PI(4), vb);
        break;
    case PK_OP_RMSNORM_RESIDUAL:
        rms_row(PA(float*, 0), PA(const float*, 1), PA(const bf16_t*, 2), PA(bf16_t*, 3), PI(4), PF(5),
                (signed char*)nullptr, (float*)nullptr, vb);
        break;
    case PK_OP_RMSNORM_RESIDUAL_F32OUT:
        rms_row(PA(float*, 0), PA(const float*, 1), PA(const bf16_t*, 2), PA(float*, 3), PI(4), PF(5),
                (signed char*)nullptr, (float*)nullptr, vb);
        break;
    case PK_OP_RMSNORM_RESIDUAL_Q8:
        rms_row(PA(float*, 0), PA(const float*, 1), PA(const bf16_t*, 2), PA(bf16_t*, 3), PI(4), PF(5),
                PA(signed char*, 6), PA(float*, 7), vb);
        break;
    case PK_OP_RMSNORM_MOE_BF16:
        rms_moe_row(PA(float*, 0), PA(const float*, 1), PA(const float*, 2), PI(3), PA(const float*, 4),
                    PA(const int*, 5), PA(const bf16_t*, 6), PA(bf16_t*, 7), PI(8), PF(9), vb);
        break;
    case PK_OP_RMSNORM_MOE_F32:
        rms_moe_row(PA(float*, 0), PA(const float*, 1), PA(const float*, 2), PI(3), PA(const float*, 4),
                    PA(const int*, 5), PA(const bf16_t*, 6), PA(float*, 7), PI(8), PF(9), vb);
        break;
    case PK_OP_ROPE_QK_KV: {
        const int unit = vb * 8 + warp;
        if (unit < gx)
            rope_qk_kv_impl(PA(float*, 0), PA(const int*, 1), PA(const int*, 2), PA(const float*, 3),
                            PA(const bf16_t*, 4), PA(const bf16_t*, 5), PA(bf16_t*, 6), PA(bf16_t*, 7), PI(8), PI(9),
                            PI(10), PF(11), PF(12), PI(13), PI(14), PI(15), unit, lane);
        break;
    }
    case PK_OP_ATTENTION_SPLIT:
        PK_ATTN(PA(const float*, 0), PA(const bf16_t*, 1), PA(const bf16_t*, 2), PA(const int*, 3), PA(const int*, 4),
                PA(float*, 5), PA(float*, 6), PI(7), PI(8), PI(9), PI(10), PI(11), PF(12), PI(13), PI(14), PL(15),
                PA(const float*, 16), PA(float*, 17), PA(unsigned*, 18), bx, by, bz, NoWait(), AttnRope(), PI(19));
        break;
    case PK_OP_MOE_ROUTER_TOPK:  // launched with 4 warps per block, one token per warp
        router_topk_impl<8>(PA(const float*, 0), PA(int*, 1), PA(float*, 2), PI(3), PI(4), PI(5), PI(6), vb * 8 + warp,
                            lane);
        break;
    case PK_OP_MOE_ROUTER_TOPK_512:
        router_topk_impl<16>(PA(const float*, 0), PA(int*, 1), PA(float*, 2), PI(3), PI(4), PI(5), PI(6), vb * 8 + warp,
                             lane);
        break;
    case PK_OP_MOE_GATE_UP_Q8:
        gate_up_q8_impl(PA(const u8*, 0), PA(const u8*, 1), PA(const signed char*, 2), PA(const float*, 3),
                        PA(const int*, 4), PI(5), PA(const float*, 6), PI(7), PI(8), PI(9), PF(10), PF(11),
                        PA(signed char*, 12), PA(float*, 13), bx, by);
        break;
    case PK_OP_MXFP4_Q8_L32:
        mx_q8_impl<32, 2>(PA(const u8*, 0), PA(const u8*, 1), PA(const signed char*, 2), PA(const float*, 3),
                          PA(float*, 4), PI(5), PI(6), PA(const int*, 7), PI(8), bx, by);
        break;
    case PK_OP_MXFP4_Q8_L8:
        mx_q8_impl<8, 3>(PA(const u8*, 0), PA(const u8*, 1), PA(const signed char*, 2), PA(const float*, 3),
                         PA(float*, 4), PI(5), PI(6), PA(const int*, 7), PI(8), bx, by);
        break;
    case PK_OP_ARGMAX_PARTIAL:
        argmax_partial_impl(PA(const float*, 0), PA(unsigned long long*, 1), PI(2), gx, bx, by);
        break;
    case PK_OP_ARGMAX_FINAL: {  // launched with one warp per row
        const int row = vb * 8 + warp;
        if (row < gx) argmax_final_impl(PA(const unsigned long long*, 0), PA(int*, 1), PI(2), row, lane);
        break;
    }
    case PK_OP_SWIGLU_BF16:
        swiglu_impl(PA(const float*, 0), PA(bf16_t*, 1), PI(2), PI(3), (long long)vb * 256 + threadIdx.x,
                    (long long)gx * 256);
        break;
    case PK_OP_SWIGLU_OAI_BF16:
        swiglu_oai_impl(PA(const float*, 0), PA(bf16_t*, 1), PI(2), PI(3), PF(4), PF(5),
                        (long long)vb * 256 + threadIdx.x, (long long)gx * 256);
        break;
        // only the row counts of this module's bucket (PK_MAX_N): fewer registers and less code
        PK_GEMV_CASE(1, 1)
#if PK_MAX_N >= 2
        PK_GEMV_CASE(2, 1)
#endif
#if PK_MAX_N >= 3
        PK_GEMV_CASE(3, 1)
#endif
#if PK_MAX_N >= 4
        PK_GEMV_CASE(4, 2)
#endif
#if PK_MAX_N >= 5
        PK_GEMV_CASE(5, 2)
#endif
#if PK_MAX_N >= 6
        PK_GEMV_CASE(6, 2)
#endif
#if PK_MAX_N >= 7
        PK_GEMV_CASE(7, 2)
#endif
#if PK_MAX_N >= 8
        PK_GEMV_CASE(8, 2)
#endif
    default:
        break;  // the host only records ops of the table
    }
}

// This block's share of [p, p + bytes) into L2, one 128-byte line per thread per step.
__device__ __forceinline__ void pk_prefetch(unsigned long long p, unsigned long long bytes) {
    if (!p || !bytes) return;
    const unsigned long long lines = (bytes + 127) / 128;
    const unsigned long long per = (lines + gridDim.x - 1) / gridDim.x;
    const unsigned long long l0 = per * blockIdx.x, l1 = min(lines, l0 + per);
    for (unsigned long long l = l0 + threadIdx.x; l < l1; l += blockDim.x)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + l * 128));
}

__device__ __forceinline__ unsigned long long pk_clock() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
}

// grid: every SM's resident blocks (all co-resident: the waits need it); block 256.
// done u32 [n_instr], zeroed before the launch. PK_BARRIER: done[0] is a grid barrier's
// counter, passed after every instruction. Otherwise done[i] counts the finished virtual
// blocks of instruction i, and a virtual block of instruction i waits (PkWait) until
// instruction i - 1 is complete, which by induction means every earlier one is, so reads
// after writes and writes after reads are ordered as in the ordinary launch sequence;
// blocks with nothing to do in an instruction move on, and GEMVs load weights first.
// times (profiling, else null): block 0 stamps the start of each instruction and the end.
extern "C" __global__ void __launch_bounds__(256, PK_MIN_BLOCKS) persistent_step(const unsigned long long* __restrict__ prog, int n_instr,
                                                                     unsigned* done, unsigned long long* times) {
    __shared__ unsigned long long cur[PK_WORDS];
    // the program never changes: instruction i + 1 is read while i runs
    unsigned long long next = threadIdx.x < PK_WORDS ? prog[threadIdx.x] : 0ull;
    int prev_nvb = 0;
    for (int i = 0; i < n_instr; i++) {
        if (times && blockIdx.x == 0 && threadIdx.x == 0) times[i] = pk_clock();
        if (threadIdx.x < PK_WORDS) cur[threadIdx.x] = next;
        __syncthreads();
        if (threadIdx.x < PK_WORDS && i + 1 < n_instr) next = prog[(long long)(i + 1) * PK_WORDS + threadIdx.x];
#ifndef KAIROS_NO_PREFETCH
        pk_prefetch(cur[3], cur[4]);
#endif
        const int nvb = (int)(cur[2] >> 32);
#ifdef PK_BARRIER
        const PkWait wait{nullptr, 0u};
        for (int vb = blockIdx.x; vb < nvb; vb += gridDim.x) {
            pk_run(cur, vb, wait);
            __syncthreads();  // the bodies' shared memory is reused by the next virtual block
        }
        if (i + 1 < n_instr) pk_grid_sync(done, (unsigned)(i + 1) * gridDim.x);
#else
        const PkWait wait{i > 0 ? done + i - 1 : nullptr, i > 0 ? (unsigned)(prev_nvb) : 0u};
        for (int vb = blockIdx.x; vb < nvb; vb += gridDim.x) {
            pk_run(cur, vb, wait);
            __syncthreads();  // all of the block's writes issued; shared memory free for the next one
            if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(done + i) : "memory");
        }
        prev_nvb = nvb;
#endif
        __syncthreads();  // cur is rewritten next
    }
    if (times && blockIdx.x == 0 && threadIdx.x == 0) times[n_instr] = pk_clock();
}
