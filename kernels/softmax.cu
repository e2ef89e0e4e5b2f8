// softmax.cu: softmax and log-softmax over the last axis, forward and backward (f32).
//
// A row is handled by blockDim.x threads (32: a warp per row, blockDim.y rows per block, for rows up
// to about a thousand; 256 with blockDim.y == 1 for longer rows). Forward makes two passes over the
// row: an online max-and-sum (one read), then the write; the max is subtracted so that outliers do
// not overflow. A row that is entirely -inf gives NaN, as in PyTorch.
#include "common.cuh"

// x, y: [rows, cols]; log != 0 selects log-softmax.
struct SoftmaxParams {
    const float* x;
    float* y;
    uint32_t rows;
    uint32_t cols;
    uint32_t log;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(SoftmaxParams, 32);

// Merges two (max, sum of exp(x - max)) pairs; a part with max == -inf contributes nothing.
__device__ __forceinline__ void online_merge(float& m, float& s, float om, float os) {
    const float nm = fmaxf(m, om);
    if (nm == -RECLMIS_INF) return;
    s = (m == -RECLMIS_INF ? 0.f : s * expf(m - nm)) + (om == -RECLMIS_INF ? 0.f : os * expf(om - nm));
    m = nm;
}

__device__ __forceinline__ void row_reduce(float& m, float& s, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, om, os);
    }
    if (blockDim.x > 32) {  // several warps share the row: combine through shared memory
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        if (lane == 0) scratch[2 * warp] = m, scratch[2 * warp + 1] = s;
        __syncthreads();
        m = -RECLMIS_INF;
        s = 0.f;
        for (int w = 0; w < nw; ++w) online_merge(m, s, scratch[2 * w], scratch[2 * w + 1]);
    }
}

extern "C" __global__ void softmax_fwd_f32(SoftmaxParams p) {
    __shared__ float scratch[64];
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < p.rows;
    const float* x = p.x + (uint64_t)(active ? row : 0) * p.cols;
    float m = -RECLMIS_INF, s = 0.f;
    for (uint32_t j = threadIdx.x; active && j < p.cols; j += blockDim.x) {
        const float v = x[j];
        if (v > m) {
            s = (m == -RECLMIS_INF ? 0.f : s * expf(m - v)) + 1.f;
            m = v;
        } else if (v == v) {
            s += v == -RECLMIS_INF ? 0.f : expf(v - m);
        } else {
            m = v;  // NaN poisons the row, as it should
            s = v;
        }
    }
    row_reduce(m, s, scratch);
    if (!active) return;
    float* y = p.y + (uint64_t)row * p.cols;
    if (p.log) {
        const float lse = m + logf(s);
        for (uint32_t j = threadIdx.x; j < p.cols; j += blockDim.x) y[j] = x[j] - lse;
    } else {
        const float inv = 1.f / s;
        for (uint32_t j = threadIdx.x; j < p.cols; j += blockDim.x) y[j] = expf(x[j] - m) * inv;
    }
}

// y: forward output, dy, dx: [rows, cols].
// softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy).
struct SoftmaxBwdParams {
    const float* y;
    const float* dy;
    float* dx;
    uint32_t rows;
    uint32_t cols;
    uint32_t log;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(SoftmaxBwdParams, 40);

extern "C" __global__ void softmax_bwd_f32(SoftmaxBwdParams p) {
    __shared__ float scratch[32];
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < p.rows;
    const uint64_t off = (uint64_t)(active ? row : 0) * p.cols;
    const float *y = p.y + off, *dy = p.dy + off;
    float s = 0.f;
    for (uint32_t j = threadIdx.x; active && j < p.cols; j += blockDim.x) s += p.log ? dy[j] : dy[j] * y[j];
    s = blockDim.x > 32 ? block_sum(s, scratch) : warp_sum(s);
    if (!active) return;
    float* dx = p.dx + off;
    for (uint32_t j = threadIdx.x; j < p.cols; j += blockDim.x)
        dx[j] = p.log ? dy[j] - expf(y[j]) * s : y[j] * (dy[j] - s);
}
