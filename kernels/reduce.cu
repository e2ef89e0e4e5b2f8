// reduce.cu: sum, mean and max (with argmax) over one axis, and their backward (f32).
//
// The host views the input as [outer, n, inner] and reduces n. Two forward shapes: the axis is the
// last one (inner == 1: a warp per row reads it coalesced) or not (a thread per output column walks
// n with stride inner, coalesced across neighbouring threads).
#include "common.cuh"

#define REDUCE_SUM 0
#define REDUCE_MEAN 1
#define REDUCE_MAX 2

// x: [outer, n, inner], y: [outer, inner], idx: [outer, inner] (argmax, written for max only)
struct ReduceParams {
    const float* x;
    float* y;
    int32_t* idx;
    uint32_t outer;
    uint32_t n;
    uint32_t inner;
    uint32_t op;
};
RECLMIS_PARAMS_SIZE(ReduceParams, 40);

// One warp per row; blockDim = (32, rows per block).
extern "C" __global__ void reduce_last_fwd_f32(ReduceParams p) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    const int lane = threadIdx.x;
    const bool active = row < p.outer;  // no early return: the whole warp joins the shuffles
    const float* x = p.x + (uint64_t)(active ? row : 0) * p.n;
    if (p.op == REDUCE_MAX) {
        float best = -RECLMIS_INF;
        int32_t bi = 0x7fffffff;
        for (uint32_t j = lane; active && j < p.n; j += 32)
            if (max_better(x[j], (int32_t)j, best, bi)) best = x[j], bi = (int32_t)j;
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (max_better(ob, oi, best, bi)) best = ob, bi = oi;
        }
        if (active && lane == 0) {
            p.y[row] = best;
            p.idx[row] = bi;
        }
    } else {
        float s = 0.f;
        for (uint32_t j = lane; active && j < p.n; j += 32) s += x[j];
        s = warp_sum(s);
        if (active && lane == 0) p.y[row] = p.op == REDUCE_MEAN ? s / (float)p.n : s;
    }
}

// One thread per (outer, inner) output.
extern "C" __global__ void reduce_mid_fwd_f32(ReduceParams p) {
    const uint64_t total = (uint64_t)p.outer * p.inner;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t o = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const uint64_t b = o / p.inner, c = o % p.inner;
        const float* x = p.x + b * p.n * p.inner + c;
        if (p.op == REDUCE_MAX) {
            float best = -RECLMIS_INF;
            int32_t bi = 0x7fffffff;
            for (uint32_t j = 0; j < p.n; ++j) {
                const float v = x[(uint64_t)j * p.inner];
                if (max_better(v, (int32_t)j, best, bi)) best = v, bi = (int32_t)j;
            }
            p.y[o] = best;
            p.idx[o] = bi;
        } else {
            float s = 0.f;
            for (uint32_t j = 0; j < p.n; ++j) s += x[(uint64_t)j * p.inner];
            p.y[o] = p.op == REDUCE_MEAN ? s / (float)p.n : s;
        }
    }
}

// dy: [outer, inner], idx: [outer, inner] (max only), dx: [outer, n, inner]
// sum: dx = dy broadcast; mean: dy / n; max: dy at the argmax, 0 elsewhere.
struct ReduceBwdParams {
    const float* dy;
    const int32_t* idx;
    float* dx;
    uint32_t outer;
    uint32_t n;
    uint32_t inner;
    uint32_t op;
};
RECLMIS_PARAMS_SIZE(ReduceBwdParams, 40);

extern "C" __global__ void reduce_bwd_f32(ReduceBwdParams p) {
    const uint64_t total = (uint64_t)p.outer * p.n * p.inner;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const uint64_t c = i % p.inner, j = (i / p.inner) % p.n, b = i / ((uint64_t)p.inner * p.n);
        const uint64_t o = b * p.inner + c;
        float g = p.dy[o];
        if (p.op == REDUCE_MEAN) g /= (float)p.n;
        if (p.op == REDUCE_MAX && (uint32_t)p.idx[o] != j) g = 0.f;
        p.dx[i] = g;
    }
}
