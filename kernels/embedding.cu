// embedding.cu: row gather (token embedding) and its backward, a deterministic scatter-add.
//
// ids [N] (i32), table [V, D], y [N, D]. An id outside [0, V) is not read: its row is zero and the
// smallest such token index is recorded in *bad (initialised to N by the host) so that the host
// can return an error naming it.
#include "common.cuh"

struct EmbeddingParams {
    const int32_t* ids;
    const float* table;  // forward: [V, D]
    float* y;            // forward: [N, D]
    const float* dy;     // backward: [N, D]
    float* dtable;       // backward: [V, D], zeroed by the host (rows no token uses stay 0)
    int32_t* bad;
    uint32_t n;
    uint32_t v;
    uint32_t d;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(EmbeddingParams, 64);

// grid-stride over N·D elements
extern "C" __global__ void embedding_fwd_f32(EmbeddingParams p) {
    const uint64_t total = (uint64_t)p.n * p.d;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t tok = i / p.d, col = i % p.d;
        const int32_t id = p.ids[tok];
        if (id < 0 || (uint32_t)id >= p.v) {
            p.y[i] = 0.f;
            if (col == 0) atomicMin(p.bad, (int32_t)tok);
            continue;
        }
        p.y[i] = p.table[(uint64_t)id * p.d + col];
    }
}

// A block per token n (grid = N, block = 128). The first token of each id sums, in token order,
// the dy rows of every token with that id and writes the row: no atomics, the same bits on every
// run. O(N²) id comparisons per column block, which is small for token counts (B·L ≤ a few
// thousand).
extern "C" __global__ void embedding_bwd_f32(EmbeddingParams p) {
    const uint32_t tok = blockIdx.x;
    const int32_t id = p.ids[tok];
    if (id < 0 || (uint32_t)id >= p.v) return;  // reported by the forward
    for (uint32_t e = 0; e < tok; ++e)
        if (p.ids[e] == id) return;  // an earlier token of this id writes the row
    for (uint32_t col = threadIdx.x; col < p.d; col += blockDim.x) {
        float s = 0.f;
        for (uint32_t e = tok; e < p.n; ++e)
            if (p.ids[e] == id) s += p.dy[(uint64_t)e * p.d + col];
        p.dtable[(uint64_t)id * p.d + col] = s;
    }
}
