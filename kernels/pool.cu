// pool.cu: the U-Net's 2×2 max-pool (stride 2) and nearest ×2 upsampling, forward and backward
// (f32, NCHW; the forwards and the pool's backward from its input also on bf16 values).
//
// The pooling windows do not overlap, so both backward passes are gathers over the input: each
// input element reads the one output it fed (no atomics, deterministic).
#include "common.cuh"

// x: [planes, h, w]; y, idx: [planes, h/2, w/2] (floor, as PyTorch's MaxPool2d(2)).
// idx = position of the max inside its window, (dy·2 + dx); NaN wins, ties go to the first in
// row-major order (PyTorch's rule).
struct Pool2Params {
    const float* x;
    float* y;
    int32_t* idx;
    uint64_t planes;
    uint32_t h;
    uint32_t w;
};
RECLMIS_PARAMS_SIZE(Pool2Params, 40);

// The window whose top-left element is x[o] (row stride w): its maximum and index, by the rule
// above; ld(i) reads x[i] as f32 (the bf16 kernels' x is bf16).
template <class Ld>
__device__ __forceinline__ int32_t pool_window(Ld ld, uint64_t o, uint32_t w, float& best) {
    best = ld(o);
    int32_t bi = 0;
    const float v[3] = {ld(o + 1), ld(o + w), ld(o + w + 1)};
    for (int k = 1; k < 4; ++k)
        if (max_better(v[k - 1], k, best, bi)) best = v[k - 1], bi = k;
    return bi;
}

extern "C" __global__ void maxpool2_fwd_f32(Pool2Params p) {
    const uint32_t oh = p.h / 2, ow = p.w / 2;
    const uint64_t n = p.planes * oh * ow;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)oh * ow);
        const uint32_t r = (uint32_t)(i / ow % oh), c = (uint32_t)(i % ow);
        float best;
        const int32_t bi =
            pool_window([&](uint64_t e) { return p.x[e]; }, plane * p.h * p.w + (uint64_t)(2 * r) * p.w + 2 * c, p.w, best);
        p.y[i] = best;
        p.idx[i] = bi;
    }
}

// dy, idx: [planes, h/2, w/2]; dx: [planes, h, w] (rows / columns past the last window get 0)
struct Pool2BwdParams {
    const float* dy;
    const int32_t* idx;
    float* dx;
    uint64_t planes;
    uint32_t h;
    uint32_t w;
};
RECLMIS_PARAMS_SIZE(Pool2BwdParams, 40);

// The gather both backward kernels share: dx[i] (x [planes, h, w]) is dy of its window where
// argmax(o, first) — the window's index, given its output o and the offset of its top-left input
// element — names element i, else 0.
template <class Argmax>
__device__ __forceinline__ void maxpool2_gather(const float* dy, float* dx, uint64_t planes, uint32_t h, uint32_t w,
                                                Argmax argmax) {
    const uint32_t oh = h / 2, ow = w / 2;
    const uint64_t n = planes * h * w;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)h * w);
        const uint32_t r = (uint32_t)(i / w % h), c = (uint32_t)(i % w);
        float g = 0.f;
        if (r / 2 < oh && c / 2 < ow) {
            const uint64_t o = plane * oh * ow + (uint64_t)(r / 2) * ow + c / 2;
            const uint64_t first = plane * h * w + (uint64_t)(r & ~1u) * w + (c & ~1u);
            if (argmax(o, first) == (int32_t)((r % 2) * 2 + c % 2)) g = dy[o];
        }
        dx[i] = g;
    }
}

extern "C" __global__ void maxpool2_bwd_f32(Pool2BwdParams p) {
    maxpool2_gather(p.dy, p.dx, p.planes, p.h, p.w, [&](uint64_t o, uint64_t) { return p.idx[o]; });
}

// x: [planes, h, w] -> y: [planes, 2h, 2w], y[2r + a][2c + b] = x[r][c]
struct Up2Params {
    const float* x;
    float* y;
    uint64_t planes;
    uint32_t h;
    uint32_t w;
};
RECLMIS_PARAMS_SIZE(Up2Params, 32);

extern "C" __global__ void upsample2_fwd_f32(Up2Params p) {
    const uint32_t oh = 2 * p.h, ow = 2 * p.w;
    const uint64_t n = p.planes * oh * ow;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)oh * ow);
        const uint32_t r = (uint32_t)(i / ow % oh), c = (uint32_t)(i % ow);
        p.y[i] = p.x[plane * p.h * p.w + (uint64_t)(r / 2) * p.w + c / 2];
    }
}

// dy: [planes, 2h, 2w] -> dx: [planes, h, w], the sum of the four copies' gradients
extern "C" __global__ void upsample2_bwd_f32(Up2Params p) {
    const uint64_t n = p.planes * p.h * p.w;
    const uint32_t ow = 2 * p.w;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)p.h * p.w);
        const uint32_t r = (uint32_t)(i / p.w % p.h), c = (uint32_t)(i % p.w);
        const float* g = p.x + plane * 4 * p.h * p.w + (uint64_t)(2 * r) * ow + 2 * c;
        p.y[i] = (g[0] + g[1]) + (g[ow] + g[ow + 1]);
    }
}

// @autocast-only begin (build.rs leaves this region out of builds without bf16 autocast)
// ---------------------------------------------------------------------------------------------
// bf16 (bf16 autocast keeps a pooled or upsampled bf16 value in bf16: a maximum or a copy of bf16
// values is one of them, exactly). Params as above with x and y addressing bf16.

// y = the window maxima of x, both bf16 (the backward finds the indices again: none written).
extern "C" __global__ void maxpool2_fwd_bf16(Pool2Params p) {
    const uint16_t* x = (const uint16_t*)p.x;
    const uint32_t oh = p.h / 2, ow = p.w / 2;
    const uint64_t n = p.planes * oh * ow;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)oh * ow);
        const uint32_t r = (uint32_t)(i / ow % oh), c = (uint32_t)(i % ow);
        float best;
        pool_window([&](uint64_t e) { return bf16_bits_to_f32(x[e]); },
                    plane * p.h * p.w + (uint64_t)(2 * r) * p.w + 2 * c, p.w, best);
        ((uint16_t*)p.y)[i] = f32_to_bf16_bits(best);  // exact: best is a bf16 value
    }
}

// dx (f32) of max_pool2 from dy (f32) and the bf16 input itself: each input element finds its
// window's maximum again by the forward's rule and takes dy where it is that maximum (a gather:
// no index array, no f32 copy of x).
struct Pool2FromInputParams {
    const uint16_t* x;
    const float* dy;
    float* dx;
    uint64_t planes;
    uint32_t h;
    uint32_t w;
};
RECLMIS_PARAMS_SIZE(Pool2FromInputParams, 40);

extern "C" __global__ void maxpool2_input_bwd_bf16(Pool2FromInputParams p) {
    maxpool2_gather(p.dy, p.dx, p.planes, p.h, p.w, [&](uint64_t, uint64_t first) {
        float best;
        return pool_window([&](uint64_t e) { return bf16_bits_to_f32(p.x[e]); }, first, p.w, best);
    });
}

// y [planes, 2h, 2w] = copies of x [planes, h, w], both bf16.
extern "C" __global__ void upsample2_fwd_bf16(Up2Params p) {
    const uint32_t oh = 2 * p.h, ow = 2 * p.w;
    const uint64_t n = p.planes * oh * ow;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const uint64_t plane = i / ((uint64_t)oh * ow);
        const uint32_t r = (uint32_t)(i / ow % oh), c = (uint32_t)(i % ow);
        ((uint16_t*)p.y)[i] = ((const uint16_t*)p.x)[plane * p.h * p.w + (uint64_t)(r / 2) * p.w + c / 2];
    }
}
// @autocast-only end
