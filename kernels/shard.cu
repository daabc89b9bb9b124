// Kernels of one rank of a model sharded over several GPUs (src/backend/cuda/model/shard.rs).
// The single-GPU step never launches these.

// Vocabulary-split embedding: this rank holds rows [v0, v0 + vlen) of the table, bf16
// [vlen, hidden]. out f32 [n, hidden]: the row of ids[t] when it is this rank's, else
// zeros (another rank's row; the all-reduce that follows completes every row).
// grid (n), block 256.
extern "C" __global__ void embedding_vocab_range(const bf16_t* __restrict__ table, const int* __restrict__ ids,
        float* __restrict__ out, int hidden, int v0, int vlen) { PDL_ENTRY();
    const int t = blockIdx.x;
    const int id = ids[t] - v0;
    const bool mine = id >= 0 && id < vlen;
    float* o = out + (long long)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = mine ? bf2f(table[(long long)id * hidden + i]) : 0.f;
}

// Expert parallel: global expert ids [n] -> index among this rank's experts [e0, e0 + elen),
// or -1 when another rank holds the expert (the expert kernels write zeros for -1).
// grid (ceil(n / 256)), block 256.
extern "C" __global__ void moe_local_ids(const int* __restrict__ ids, int* __restrict__ local, int n, int e0, int elen) {
    PDL_ENTRY();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const int e = ids[i] - e0;
        local[i] = (e >= 0 && e < elen) ? e : -1;
    }
}

// Logits in full vocabulary order from the all-gather of every rank's lm_head rows.
// gathered f32 [ranks][rows * chunk]: rank s's part holds rows x width_s values, packed
// (row stride width_s = min(chunk, vocab - s * chunk), the length of its vocabulary range).
// logits f32 [rows, vocab]. Grid-stride loop, block 256.
extern "C" __global__ void vocab_assemble(const float* __restrict__ gathered, float* __restrict__ logits,
        int rows, int vocab, int chunk) { PDL_ENTRY();
    const long long total = (long long)rows * vocab;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / vocab), j = (int)(i % vocab);
        const int s = j / chunk, width = min(chunk, vocab - s * chunk);
        logits[i] = gathered[(long long)s * rows * chunk + (long long)r * width + (j - s * chunk)];
    }
}
