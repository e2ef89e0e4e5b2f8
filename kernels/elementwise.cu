// elementwise.cu: unary ops, their backward, and broadcasting binary ops (f32).
//
// One kernel per shape of computation; the op is a warp-uniform parameter, so the switch costs a
// predictable branch, not a divergence, and the family stays one source (these kernels are bound by
// memory bandwidth, not by the branch).
#include "common.cuh"

// Op codes, mirrored by ops::elementwise::UnaryOp.
#define UNARY_RELU 0
#define UNARY_SIGMOID 1
#define UNARY_EXP 2
#define UNARY_LOG 3
#define UNARY_SCALE 4       // y = alpha * x
#define UNARY_ADD_SCALAR 5  // y = x + alpha
#define UNARY_GELU 6        // y = x·Φ(x)
#define UNARY_QUICK_GELU 7  // y = x·σ(1.702x)
#define QUICK_GELU_A 1.702f

// Φ(x) = erfc(−x/√2)/2: erfc keeps the small left tail accurate (1 + erf would cancel).
__device__ __forceinline__ float normal_cdf(float x) { return 0.5f * erfcf(-x * 0.70710678f); }

// x, y: [n]
struct UnaryParams {
    const float* x;
    float* y;
    uint64_t n;
    float alpha;
    uint32_t op;
};
RECLMIS_PARAMS_SIZE(UnaryParams, 32);

__device__ __forceinline__ float unary_apply(uint32_t op, float x, float alpha) {
    switch (op) {
        case UNARY_RELU: return x > 0.f ? x : 0.f;
        // exp(-x) overflows to inf for x < -88, giving 1/inf = 0: the right limit, no NaN.
        case UNARY_SIGMOID: return 1.f / (1.f + expf(-x));
        case UNARY_EXP: return expf(x);
        case UNARY_LOG: return logf(x);
        case UNARY_SCALE: return alpha * x;
        case UNARY_GELU: return x * normal_cdf(x);
        case UNARY_QUICK_GELU: return x / (1.f + expf(-QUICK_GELU_A * x));
        default: return x + alpha;
    }
}

extern "C" __global__ void unary_fwd_f32(UnaryParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride)
        p.y[i] = unary_apply(p.op, p.x[i], p.alpha);
}

// x (forward input), y (forward output), dy, dx: [n]. Each op reads the one it needs:
// relu, log, gelu and quick gelu read x; sigmoid and exp read y (cheaper than recomputing); scale and add_scalar
// read neither.
struct UnaryBwdParams {
    const float* x;
    const float* y;
    const float* dy;
    float* dx;
    uint64_t n;
    float alpha;
    uint32_t op;
};
RECLMIS_PARAMS_SIZE(UnaryBwdParams, 48);

extern "C" __global__ void unary_bwd_f32(UnaryBwdParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float g = p.dy[i];
        float d;
        switch (p.op) {
            case UNARY_RELU: d = p.x[i] > 0.f ? g : 0.f; break;
            case UNARY_SIGMOID: d = g * p.y[i] * (1.f - p.y[i]); break;
            case UNARY_EXP: d = g * p.y[i]; break;
            case UNARY_LOG: d = g / p.x[i]; break;
            case UNARY_SCALE: d = g * p.alpha; break;
            case UNARY_GELU: {
                const float x = p.x[i];
                d = g * (normal_cdf(x) + x * 0.39894228f * expf(-0.5f * x * x));
                break;
            }
            case UNARY_QUICK_GELU: {  // σ from x (y / x fails at 0)
                const float x = p.x[i], s = 1.f / (1.f + expf(-QUICK_GELU_A * x));
                d = g * (s + QUICK_GELU_A * x * s * (1.f - s));
                break;
            }
            default: d = g; break;
        }
        p.dx[i] = d;
    }
}

#define BINARY_ADD 0
#define BINARY_SUB 1
#define BINARY_MUL 2
#define BINARY_DIV 3
#define BINARY_MAX_RANK 6

// y[i] = a[.] op b[.] with numpy broadcasting. shape is y's shape after the host merged every run
// of dims that broadcast alike; sa / sb are a's and b's element strides over that shape (0 where
// the operand is broadcast). y: [n] contiguous.
struct BinaryParams {
    const float* a;
    const float* b;
    float* y;
    uint64_t n;
    uint32_t rank;
    uint32_t op;
    uint32_t shape[BINARY_MAX_RANK];
    uint32_t sa[BINARY_MAX_RANK];
    uint32_t sb[BINARY_MAX_RANK];
};
RECLMIS_PARAMS_SIZE(BinaryParams, 112);

extern "C" __global__ void binary_fwd_f32(BinaryParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        uint64_t rem = i, ia = 0, ib = 0;
        // Unrolled with a guard rather than a loop to p.rank: constant indices keep the param
        // arrays out of local memory (a runtime index forces a 112-byte stack copy).
#pragma unroll
        for (int d = BINARY_MAX_RANK - 1; d >= 0; --d) {
            if (d < (int)p.rank) {
                const uint64_t c = rem % p.shape[d];
                rem /= p.shape[d];
                ia += c * p.sa[d];
                ib += c * p.sb[d];
            }
        }
        const float a = p.a[ia], b = p.b[ib];
        p.y[i] = p.op == BINARY_ADD ? a + b : p.op == BINARY_SUB ? a - b : p.op == BINARY_MUL ? a * b : a / b;
    }
}
