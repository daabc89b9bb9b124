// embedding_gather: out[t, :] = table[ids[t], :]   (table bf16 [vocab, hidden])
// grid (n_tokens), block 256. Out-of-range ids give a zero row.
template <typename TO>
__device__ void emb_impl(const bf16_t* __restrict__ table, const int* __restrict__ ids,
                         TO* __restrict__ out, int hidden, int vocab, int t) {
    int id = ids[t];
    TO* o = out + (long long)t * hidden;
    if (id < 0 || id >= vocab) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(o + i, 0.f);
        return;
    }
    const bf16_t* row = table + (long long)id * hidden;
    if ((hidden & 7) == 0) {
        for (int c = threadIdx.x; c < hidden / 8; c += blockDim.x) {
            float v[8];
            load8(row + c * 8, v);
#pragma unroll
            for (int e = 0; e < 8; e++) st(o + c * 8 + e, v[e]);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(o + i, bf2f(row[i]));
    }
}
extern "C" __global__ void embedding_gather_f32(const bf16_t* table, const int* ids, float* out, int hidden, int vocab) { PDL_ENTRY();
    emb_impl(table, ids, out, hidden, vocab, blockIdx.x);
}
extern "C" __global__ void embedding_gather_bf16(const bf16_t* table, const int* ids, bf16_t* out, int hidden, int vocab) { PDL_ENTRY();
    emb_impl(table, ids, out, hidden, vocab, blockIdx.x);
}
