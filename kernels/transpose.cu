// transpose.cu: permutations of a tensor's dims (f32).
//
// Swapping the last two dims is the common case (attention heads, GEMM operands): a 32x32 tile goes
// through shared memory so that both the read and the write are coalesced. Any other permutation
// uses a gather with the strides computed on the host.
#include "common.cuh"

// x: [batch, rows, cols] -> y: [batch, cols, rows]
struct TransposeParams {
    const float* x;
    float* y;
    uint32_t batch;
    uint32_t rows;
    uint32_t cols;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(TransposeParams, 32);

// blockDim = (32, 8); grid = (ceil(cols/32), ceil(rows/32), batch)
extern "C" __global__ void transpose_fwd_f32(TransposeParams p) {
    __shared__ float tile[32][33];  // +1 column: the column reads hit 32 different banks
    const uint64_t base = (uint64_t)blockIdx.z * p.rows * p.cols;
    const uint32_t c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (uint32_t k = threadIdx.y; k < 32; k += blockDim.y) {
        const uint32_t r = r0 + k, c = c0 + threadIdx.x;
        if (r < p.rows && c < p.cols) tile[k][threadIdx.x] = p.x[base + (uint64_t)r * p.cols + c];
    }
    __syncthreads();
    for (uint32_t k = threadIdx.y; k < 32; k += blockDim.y) {
        const uint32_t c = c0 + k, r = r0 + threadIdx.x;
        if (r < p.rows && c < p.cols) p.y[base + (uint64_t)c * p.rows + r] = tile[threadIdx.x][k];
    }
}

#define PERMUTE_MAX_RANK 6

// y: out_shape (contiguous, [n] elements); y[coords] = x[sum_d coords[d] * in_strides[d]], where
// in_strides are x's strides reordered by the permutation.
struct PermuteParams {
    const float* x;
    float* y;
    uint64_t n;
    uint32_t rank;
    uint32_t pad;
    uint32_t out_shape[PERMUTE_MAX_RANK];
    uint32_t in_strides[PERMUTE_MAX_RANK];
};
RECLMIS_PARAMS_SIZE(PermuteParams, 80);

extern "C" __global__ void permute_fwd_f32(PermuteParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        uint64_t rem = i, src = 0;
#pragma unroll  // constant indices keep the param arrays out of local memory
        for (int d = PERMUTE_MAX_RANK - 1; d >= 0; --d) {
            if (d < (int)p.rank) {
                src += (rem % p.out_shape[d]) * p.in_strides[d];
                rem /= p.out_shape[d];
            }
        }
        p.y[i] = p.x[src];
    }
}

// Narrow along one dim. x: [outer, n_in, inner] -> y: [outer, n_out, inner].
// Forward (pad = 0): y[o, j, i] = x[o, start + j, i] with n_out = len.
// Backward (pad = 1): the gradient of a narrow, y[o, k, i] = x[o, k - start, i] where
// start <= k < start + len, else 0 (x is dy [outer, len, inner], n_out is the full dim).
struct NarrowParams {
    const float* x;
    float* y;
    uint64_t n;  // elements of y
    uint32_t n_in;
    uint32_t n_out;
    uint32_t inner;
    uint32_t start;
    uint32_t pad;
    uint32_t reserved;
};
RECLMIS_PARAMS_SIZE(NarrowParams, 48);

extern "C" __global__ void narrow_fwd_f32(NarrowParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint64_t in = i % p.inner, rest = i / p.inner;
        const uint32_t k = (uint32_t)(rest % p.n_out);
        const uint64_t o = rest / p.n_out;
        if (p.pad) {
            const bool inside = k >= p.start && k - p.start < p.n_in;
            p.y[i] = inside ? p.x[(o * p.n_in + (k - p.start)) * p.inner + in] : 0.0f;
        } else {
            p.y[i] = p.x[(o * p.n_in + p.start + k) * p.inner + in];
        }
    }
}
