// norm.cu: batch normalisation over the channel axis of [B, C, S] (BatchNorm2d with S = H·W,
// BatchNorm1d with S = L), training and evaluation, with an optional fused ReLU, and the
// backward (f32).
//
// Training statistics: a block per channel, two passes (the mean, then the mean squared
// deviation) so that a large mean does not cancel the variance. The running statistics follow
// PyTorch: rm ← (1 − m)·rm + m·mean, rv ← (1 − m)·rv + m·var·n/(n − 1) (unbiased).
#include "common.cuh"
#include "storage.cuh"

// x: [B, C, S]; mean, var: [C] (biased batch variance); rm, rv: [C] running stats, read and
// written back updated (new_rm, new_rv)
struct BnStatsParams {
    const float* x;
    float* mean;
    float* var;
    const float* rm;
    const float* rv;
    float* new_rm;
    float* new_rv;
    uint32_t b;
    uint32_t c;
    uint32_t s;
    float momentum;
};
RECLMIS_PARAMS_SIZE(BnStatsParams, 72);

// grid = C, block = 256
extern "C" __global__ void bn_stats_fwd_f32(BnStatsParams p) {
    __shared__ float red[32];
    const uint32_t c = blockIdx.x;
    const uint64_t n = (uint64_t)p.b * p.s;
    float s = 0.f;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) s += p.x[((i / p.s) * p.c + c) * p.s + i % p.s];
    const float mean = block_sum(s, red) / (float)n;
    float q = 0.f;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = p.x[((i / p.s) * p.c + c) * p.s + i % p.s] - mean;
        q += d * d;
    }
    const float var = block_sum(q, red) / (float)n;
    if (threadIdx.x == 0) {
        p.mean[c] = mean;
        p.var[c] = var;
        const float unbiased = n > 1 ? var * (float)n / (float)(n - 1) : var;
        p.new_rm[c] = (1.f - p.momentum) * p.rm[c] + p.momentum * mean;
        p.new_rv[c] = (1.f - p.momentum) * p.rv[c] + p.momentum * unbiased;
    }
}

// y = γ (x − mean) / sqrt(var + eps) + β, then ReLU if relu != 0. mean / var are the batch
// statistics (training) or the running ones (evaluation).
struct BnApplyParams {
    const float* x;
    const float* mean;
    const float* var;
    const float* gamma;
    const float* beta;
    float* y;
    uint64_t n;
    uint32_t c;
    uint32_t s;
    float eps;
    uint32_t relu;
};
RECLMIS_PARAMS_SIZE(BnApplyParams, 72);

extern "C" __global__ void bn_apply_fwd_f32(BnApplyParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint32_t c = (uint32_t)(i / p.s % p.c);
        const float v = p.gamma[c] * (p.x[i] - p.mean[c]) / sqrtf(p.var[c] + p.eps) + p.beta[c];
        p.y[i] = p.relu && v < 0.f ? 0.f : v;
    }
}

// Backward, per channel: dγ = Σ g·x̂, dβ = Σ g with g = dy (masked by y > 0 when the ReLU was
// fused) and x̂ = (x − mean)/sqrt(var + eps). y: the forward output (for the ReLU mask). x and y
// are f32 (`_f32`) or bf16 bits (`_bf16`: bf16 autocast keeps them so; read widened, exactly);
// dy and everything computed are f32.
struct BnReduceParams {
    const void* x;
    const void* y;
    const float* dy;
    const float* mean;
    const float* var;
    float* dgamma;
    float* dbeta;
    uint32_t b;
    uint32_t c;
    uint32_t s;
    float eps;
    uint32_t relu;
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(BnReduceParams, 80);

// grid = C, block = 256
template <bool BF16>
__device__ __forceinline__ void bn_reduce_bwd(const BnReduceParams& p) {
    __shared__ float red[32];
    const uint32_t c = blockIdx.x;
    const uint64_t n = (uint64_t)p.b * p.s;
    const float mean = p.mean[c], inv = 1.f / sqrtf(p.var[c] + p.eps);
    float sg = 0.f, sgx = 0.f;
    for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const uint64_t e = ((i / p.s) * p.c + c) * p.s + i % p.s;
        const float g = p.relu && load_f32<BF16>(p.y, e) <= 0.f ? 0.f : p.dy[e];
        sg += g;
        sgx += g * (load_f32<BF16>(p.x, e) - mean) * inv;
    }
    sg = block_sum(sg, red);
    sgx = block_sum(sgx, red);
    if (threadIdx.x == 0) {
        p.dbeta[c] = sg;
        p.dgamma[c] = sgx;
    }
}
extern "C" __global__ void bn_reduce_bwd_f32(BnReduceParams p) { bn_reduce_bwd<false>(p); }
extern "C" __global__ void bn_reduce_bwd_bf16(BnReduceParams p) { bn_reduce_bwd<true>(p); }

// dx. Training (batch statistics): dx = γ·inv/n · (n·g − dβ − x̂·dγ); evaluation (running
// statistics, constants): dx = γ·inv·g.
struct BnApplyBwdParams {
    const void* x;  // f32 or bf16 bits, as y (the kernel's suffix)
    const void* y;
    const float* dy;
    const float* mean;
    const float* var;
    const float* gamma;
    const float* dgamma;
    const float* dbeta;
    void* dx;  // f32, or bf16 bits with bf16 x and y: a bf16 value's gradient, as the tape keeps it
    uint64_t n;
    uint32_t c;
    uint32_t s;
    float eps;
    uint32_t relu;
    uint32_t train;
    uint32_t count;  // B·S, the elements per channel
};
RECLMIS_PARAMS_SIZE(BnApplyBwdParams, 104);

template <bool BF16>
__device__ __forceinline__ void bn_apply_bwd(const BnApplyBwdParams& p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint32_t c = (uint32_t)(i / p.s % p.c);
        const float inv = 1.f / sqrtf(p.var[c] + p.eps);
        const float g = p.relu && load_f32<BF16>(p.y, i) <= 0.f ? 0.f : p.dy[i];
        if (p.train) {
            const float xh = (load_f32<BF16>(p.x, i) - p.mean[c]) * inv, cnt = (float)p.count;
            store_f32<BF16>(p.dx, i, p.gamma[c] * inv / cnt * (cnt * g - p.dbeta[c] - xh * p.dgamma[c]));
        } else {
            store_f32<BF16>(p.dx, i, p.gamma[c] * inv * g);
        }
    }
}
extern "C" __global__ void bn_apply_bwd_f32(BnApplyBwdParams p) { bn_apply_bwd<false>(p); }
extern "C" __global__ void bn_apply_bwd_bf16(BnApplyBwdParams p) { bn_apply_bwd<true>(p); }

// ---------------------------------------------------------------------------------------------
// Layer norm over the last axis of [R, C] (the transformers' LayerNorm, pre-LN or post-LN alike):
// y = (x − mean)·rstd·γ + β, rstd = 1/√(var + eps), biased variance. A warp per row, two passes
// over the row (mean, then the mean squared deviation: no cancellation for large means).
// gamma, beta may be null (no affine).
struct LnParams {
    const float* x;
    const float* gamma;
    const float* beta;
    float* y;
    float* mean;  // [R]
    float* rstd;  // [R]
    const float* dy;
    float* dx;
    float* dgamma_part;  // [parts, C]
    float* dbeta_part;   // [parts, C]
    uint32_t rows;
    uint32_t c;
    float eps;
    uint32_t rows_per_part;
};
RECLMIS_PARAMS_SIZE(LnParams, 96);

// block (32, 8): a warp per row
extern "C" __global__ void layer_norm_fwd_f32(LnParams p) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= p.rows) return;  // whole warps leave together
    const float* x = p.x + (uint64_t)row * p.c;
    float s = 0.f;
    for (uint32_t j = threadIdx.x; j < p.c; j += 32) s += x[j];
    const float mean = warp_sum(s) / p.c;
    float v = 0.f;
    for (uint32_t j = threadIdx.x; j < p.c; j += 32) {
        const float d = x[j] - mean;
        v = fmaf(d, d, v);
    }
    const float rstd = rsqrtf(warp_sum(v) / p.c + p.eps);
    float* y = p.y + (uint64_t)row * p.c;
    for (uint32_t j = threadIdx.x; j < p.c; j += 32) {
        const float xh = (x[j] - mean) * rstd;
        y[j] = p.gamma ? fmaf(xh, p.gamma[j], p.beta ? p.beta[j] : 0.f) : xh + (p.beta ? p.beta[j] : 0.f);
    }
    if (threadIdx.x == 0) p.mean[row] = mean, p.rstd[row] = rstd;
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ. A warp per row; block (32, 8).
extern "C" __global__ void layer_norm_bwd_f32(LnParams p) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= p.rows) return;
    const uint64_t off = (uint64_t)row * p.c;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float sg = 0.f, sgx = 0.f;
    for (uint32_t j = threadIdx.x; j < p.c; j += 32) {
        const float g = p.dy[off + j] * (p.gamma ? p.gamma[j] : 1.f);
        sg += g;
        sgx = fmaf(g, (p.x[off + j] - mean) * rstd, sgx);
    }
    sg = warp_sum(sg) / p.c;
    sgx = warp_sum(sgx) / p.c;
    for (uint32_t j = threadIdx.x; j < p.c; j += 32) {
        const float g = p.dy[off + j] * (p.gamma ? p.gamma[j] : 1.f);
        const float xh = (p.x[off + j] - mean) * rstd;
        p.dx[off + j] = rstd * (g - sg - xh * sgx);
    }
}

// Partial dγ = Σ dy·x̂ and dβ = Σ dy over rows_per_part rows; the parts are summed afterwards
// (deterministic, no atomics). grid = (ceil(C/32), parts), block (32, 8): thread (tx, ty) sums
// column 32·bx + tx over rows ty, ty + 8, ... of the part; the 8 partial sums meet in shared memory.
extern "C" __global__ void layer_norm_params_bwd_f32(LnParams p) {
    __shared__ float sg[8][33], sb[8][33];
    const uint32_t col = blockIdx.x * 32 + threadIdx.x;
    const uint32_t r0 = blockIdx.y * p.rows_per_part, r1 = min(p.rows, r0 + p.rows_per_part);
    float ag = 0.f, ab = 0.f;
    if (col < p.c)
        for (uint32_t r = r0 + threadIdx.y; r < r1; r += 8) {
            const uint64_t i = (uint64_t)r * p.c + col;
            const float d = p.dy[i];
            ag = fmaf(d, (p.x[i] - p.mean[r]) * p.rstd[r], ag);
            ab += d;
        }
    sg[threadIdx.y][threadIdx.x] = ag;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < p.c) {
        float tg = 0.f, tb = 0.f;
        for (int k = 0; k < 8; ++k) tg += sg[k][threadIdx.x], tb += sb[k][threadIdx.x];
        p.dgamma_part[(uint64_t)blockIdx.y * p.c + col] = tg;
        p.dbeta_part[(uint64_t)blockIdx.y * p.c + col] = tb;
    }
}
