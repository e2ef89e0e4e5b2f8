// conv.cu: 2-D convolution, kh x kw (both odd: 3x3 and 1x1 in the U-Net, 1x3 for the text
// branch's Conv1d over tokens), padding (kh/2, kw/2), stride 1, NCHW,
// as implicit GEMMs over the shared tile core (tile_gemm.cuh): im2col is computed on the fly while
// the tiles are loaded, never stored in global memory.
//
//   forward:        y[b,co,p] = bias[co] + Σ_kk w[co,kk] · col[kk,(b,p)]       M=Co, N=B·H·W, K=Ci·kh·kw
//   input gradient: the forward applied to dy with the flipped, transposed weights (conv_wflip)
//   weight grad.:   dw[co,kk] = Σ_(b,p) dy[b,co,p] · col[kk,(b,p)]             M=Co, N=Ci·kh·kw, K=B·H·W
//                   split over grid.z into partial sums [splits, Co, Ci·kh·kw] that the host adds
// where col[kk,(b,p)] = x[b, ci, y + ky - kh/2, x + kx - kw/2] (0 outside), kk = (ci·kh + ky)·kw + kx.
#include "tile_gemm.cuh"

// x: [B,Ci,H,W]; w: forward [Co, Ci·kh·kw] / weight gradient: dy [B,Co,H,W]; bias: [Co] or null;
// y: forward [B,Co,H,W] / weight gradient: partial [splits, Co, Ci·kh·kw]
struct ConvParams {
    const float* x;
    const float* w;
    const float* bias;
    float* y;
    uint32_t b;
    uint32_t ci;
    uint32_t co;
    uint32_t h;
    uint32_t w_;
    uint32_t kh;
    uint32_t kw;
    uint32_t splits;
    // Row stride of the weight matrix in the forward (Ci_total·kh·kw: a slice of the input
    // channels reads its columns of the full weights, see conv2d_cat) and of the partial sums in
    // the weight gradient (Ci_total·kh·kw: a slice writes its columns).
    uint32_t w_ld;
    uint32_t accumulate;  // forward: y += conv (the next slice of a concatenated input)
};
RECLMIS_PARAMS_SIZE(ConvParams, 72);

// The im2col element col[kk, q] with q = b·H·W + y·W + x.
__device__ __forceinline__ float im2col(const ConvParams& p, uint64_t kk, uint64_t q) {
    const uint32_t k2 = p.kh * p.kw;
    const uint32_t ci = (uint32_t)(kk / k2), r = (uint32_t)(kk % k2), ky = r / p.kw, kx = r % p.kw;
    const uint64_t hw = (uint64_t)p.h * p.w_;
    const uint64_t b = q / hw;
    const uint32_t pix = (uint32_t)(q % hw), y = pix / p.w_, x = pix % p.w_;
    const int iy = (int)y + (int)ky - (int)(p.kh / 2), ix = (int)x + (int)kx - (int)(p.kw / 2);
    if (iy < 0 || ix < 0 || iy >= (int)p.h || ix >= (int)p.w_) return 0.f;
    return p.x[((b * p.ci + ci) * p.h + iy) * p.w_ + ix];
}

struct ConvFwdProblem {
    const ConvParams* p;
    uint32_t m, n;
    uint64_t k0, k1;
    bool a_k_fast, b_n_fast;
    __device__ float a(uint32_t i, uint64_t kk) const { return p->w[(uint64_t)i * p->w_ld + kk]; }
    __device__ float b(uint64_t kk, uint32_t j) const { return im2col(*p, kk, j); }
    __device__ void store(uint32_t i, uint32_t j, float v) const {
        const uint64_t hw = (uint64_t)p->h * p->w_, b = j / hw;
        float* dst = p->y + (b * p->co + i) * hw + j % hw;
        const float r = v + (p->bias ? p->bias[i] : 0.f);
        *dst = p->accumulate ? *dst + r : r;
    }
};

__device__ __forceinline__ ConvFwdProblem fwd_problem(const ConvParams& p) {
    ConvFwdProblem pr;
    pr.p = &p;
    pr.m = p.co;
    pr.n = p.b * p.h * p.w_;
    pr.k0 = 0;
    pr.k1 = (uint64_t)p.ci * p.kh * p.kw;
    pr.a_k_fast = true;  // weights are contiguous along kk
    pr.b_n_fast = true;  // im2col rows are contiguous along the output pixels
    return pr;
}

struct ConvWgradProblem {
    const ConvParams* p;
    uint32_t m, n;
    uint64_t k0, k1;
    bool a_k_fast, b_n_fast;
    __device__ float a(uint32_t i, uint64_t q) const {
        const uint64_t hw = (uint64_t)p->h * p->w_, b = q / hw;
        return p->w[(b * p->co + i) * hw + q % hw];  // dy
    }
    __device__ float b(uint64_t q, uint32_t kk) const { return im2col(*p, kk, q); }
    __device__ void store(uint32_t i, uint32_t j, float v) const {
        p->y[((uint64_t)blockIdx.z * p->co + i) * p->w_ld + j] = v;
    }
};

__device__ __forceinline__ ConvWgradProblem wgrad_problem(const ConvParams& p) {
    ConvWgradProblem pr;
    pr.p = &p;
    pr.m = p.co;
    pr.n = p.ci * p.kh * p.kw;
    const uint64_t total = (uint64_t)p.b * p.h * p.w_;
    // split z of `splits` takes a whole number of k-tiles
    const uint64_t tiles = (total + TG_BK - 1) / TG_BK, per = (tiles + p.splits - 1) / p.splits;
    pr.k0 = min((uint64_t)blockIdx.z * per * TG_BK, total);
    pr.k1 = min(pr.k0 + per * TG_BK, total);
    pr.a_k_fast = true;   // dy is contiguous along the pixels
    pr.b_n_fast = false;  // im2col is contiguous along the pixels, which are k here
    return pr;
}

// grid = (ceil(B·H·W / 64), ceil(Co / 64)), block = 256
extern "C" __global__ void __launch_bounds__(256) conv2d_fwd_f32(ConvParams p) { tg_fma_body(fwd_problem(p)); }

// grid = (ceil(B·H·W / 64), ceil(Co / 64)), block = 128; tf32 operands, f32 accumulation
extern "C" __global__ void __launch_bounds__(128) conv2d_tc_fwd_f32(ConvParams p) { tg_mma_body(fwd_problem(p)); }

// grid = (ceil(Ci·kh·kw / 64), ceil(Co / 64), splits), block = 256
extern "C" __global__ void __launch_bounds__(256) conv2d_wgrad_bwd_f32(ConvParams p) { tg_fma_body(wgrad_problem(p)); }

// grid = (ceil(Ci·kh·kw / 64), ceil(Co / 64), splits), block = 128
extern "C" __global__ void __launch_bounds__(128) conv2d_tc_wgrad_bwd_f32(ConvParams p) { tg_mma_body(wgrad_problem(p)); }

// w: [Co, Ci, kh, kw] -> wt: [Ci, Co, kh, kw] with both kernel axes reversed (reversing the
// flattened kh·kw index reverses both): the weights of the convolution that maps dy to dx
// (stride 1, same padding). k2 = kh·kw.
struct WflipParams {
    const float* w;
    float* wt;
    uint32_t co;
    uint32_t ci;
    uint32_t k2;
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(WflipParams, 32);

extern "C" __global__ void conv_wflip_bwd_f32(WflipParams p) {
    const uint32_t k2 = p.k2;
    const uint64_t n = (uint64_t)p.co * p.ci * k2;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // i indexes wt[ci][co][r]
        const uint32_t r = (uint32_t)(i % k2);
        const uint64_t co = i / k2 % p.co, ci = i / k2 / p.co;
        p.wt[i] = p.w[(co * p.ci + ci) * k2 + (k2 - 1 - r)];
    }
}
