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

// @autocast-only begin (build.rs leaves this region out of builds without bf16 autocast)
// ---- bf16 implicit GEMMs on the pipelined tensor-core core (pipe_gemm.cuh): cp.async ring of
// 16-byte copies with zero fill (the padding and the tile edges), ldmatrix from swizzled tiles,
// mma.sync m16n8k16, f32 sums. The activations are read in NHWC (conv_nhwc_fwd_bf16 packs them),
// so that 8 consecutive k of the reduction, k = (ky·kw + kx)·C + c, are 8 consecutive channels of
// one input pixel: one whole, aligned 16-byte chunk when C is a multiple of 8 (the host checks).
// The weights are packed [Co][kh·kw][Ci] to match (conv_wpack_fwd_bf16).
//
//   forward:        y[b,co,p] = bias[co] + Σ_k wp[co,k] · x(p shifted by tap(k))[c(k)]
//                   M=Co, N=B·H·W, K=kh·kw·Ci; A = wp (k contiguous), B = implicit [N][K]
//   input gradient: the same kernel over dy (NHWC) with the flipped weights packed [Ci][kh·kw][Co]
//   weight grad.:   part[z,co,k] = Σ_(q in split z) dy[q,co] · x(q shifted by tap(k))[c(k)]
//                   M=Co, N=kh·kw·Ci, K=B·H·W split over grid.z; A = dy NHWC (m contiguous),
//                   B = implicit [K][N]; conv_wgrad_sum_bwd_bf16 sums the splits into dw.
#include "pipe_gemm.cuh"

// x: NHWC [B,H,W,Ci] bf16 (dy [B,H,W,Co] for the input gradient's forward)
// w: forward: packed weights [Co, kh·kw, Ci] bf16 / weight gradient: dy NHWC [B,H,W,Co] bf16
// bias: forward: [Co] bf16 or null
// y: forward: NCHW [B,Co,H,W] bf16 / weight gradient: f32 partial sums [splits, Co, kh·kw·Ci]
struct ConvPipeParams {
    const uint16_t* x;
    const uint16_t* w;
    const uint16_t* bias;
    void* y;
    uint32_t b;
    uint32_t ci;
    uint32_t co;
    uint32_t h;
    uint32_t w_;
    uint32_t kh;
    uint32_t kw;
    uint32_t splits;
};
RECLMIS_PARAMS_SIZE(ConvPipeParams, 64);

// The element offset of pixel q's tap (dy, dx) in NHWC, where q = (b·H + y)·W + x; false when the
// tap falls in the zero padding.
__device__ __forceinline__ bool cp_tap(const ConvPipeParams& p, uint32_t yy, uint32_t xx, int dy, int dx) {
    const int iy = (int)yy + dy, ix = (int)xx + dx;
    return iy >= 0 && ix >= 0 && iy < (int)p.h && ix < (int)p.w_;
}

// Forward loader: A = packed weights (strided rows), B = the implicit im2col tile stored [BN][BK]
// (pixels by k). Thread tid copies chunk column tid % 4 of NR pixel rows, fixed over k: their
// coordinates are computed once.
// K: the element kind (PgBf16, or PgTf32 over f32 NHWC x and packed weights: 4 channels per
// chunk, 16 k per stage; either way 4 chunks per tile row).
template <int BM, int BN, int NT, class K = PgBf16>
struct ConvFwdLoader {
    using T = PgTiles<BM, BN, true, false, K>;
    using E = typename K::E;
    static constexpr int CPR = K::BK / K::PER_CHUNK;  // chunks per row of the [BN][BK] tile
    static constexpr int NR = BN * CPR / NT;
    static_assert(NR * NT == BN * CPR, "whole chunks per thread");
    const ConvPipeParams* p;
    uint32_t row0, ktot, n;
    int tid;
    uint32_t c;
    uint32_t yy[NR], xx[NR];
    uint64_t q[NR];
    bool valid[NR];
    __device__ __forceinline__ ConvFwdLoader(const ConvPipeParams& pp, uint32_t row0_, uint32_t col0, int tid_)
        : p(&pp), row0(row0_), tid(tid_) {
        ktot = pp.kh * pp.kw * pp.ci;
        n = pp.b * pp.h * pp.w_;
        c = tid % CPR;
#pragma unroll
        for (int i = 0; i < NR; ++i) {
            const uint32_t r = tid / CPR + i * (NT / CPR);
            q[i] = (uint64_t)col0 + r;
            valid[i] = q[i] < n;
            xx[i] = (uint32_t)(q[i] % pp.w_);
            yy[i] = (uint32_t)(q[i] / pp.w_ % pp.h);
        }
    }
    __device__ __forceinline__ void load(unsigned char* sa, unsigned char* sb, uint64_t k0) const {
        const E* xp = reinterpret_cast<const E*>(p->x);
        T::TA::load(sa, reinterpret_cast<const E*>(p->w), ktot, row0, k0, p->co, ktot, tid, NT);
        const uint32_t k = (uint32_t)k0 + K::PER_CHUNK * c, tap = k / p->ci, cc = k % p->ci;
        const int dy = (int)(tap / p->kw) - (int)(p->kh / 2), dx = (int)(tap % p->kw) - (int)(p->kw / 2);
        const int64_t shift = ((int64_t)dy * p->w_ + dx) * p->ci + cc;
#pragma unroll
        for (int i = 0; i < NR; ++i) {
            const uint32_t r = tid / CPR + i * (NT / CPR);
            const bool ok = valid[i] && k < ktot && cp_tap(*p, yy[i], xx[i], dy, dx);
            cp_async16(sb + T::TB::off(r, c), ok ? xp + (int64_t)(q[i] * p->ci) + shift : xp, ok);
        }
    }
};

// Forward epilogue: C[co][q] (+ bias) rounded once to bf16 into NCHW y.
struct ConvFwdPipeProblem {
    const ConvPipeParams* p;
    uint32_t m, n;
    uint64_t kbeg, kend;
    static constexpr bool VEC_STORE = true;
    __device__ __forceinline__ float epi(uint32_t i, uint32_t, float v) const {
        return v + (p->bias ? bf16_bits_to_f32(p->bias[i]) : 0.f);
    }
    // y[b, co = i, pixels j..j+cnt): one 128-bit store when the 8 pixels are in one image and
    // 16-byte aligned (H·W a multiple of 8: every map of the model but 14²), else element stores
    __device__ __forceinline__ void store8(uint32_t i, uint32_t j, uint4 bits, uint32_t cnt) const {
        const uint64_t hw = (uint64_t)p->h * p->w_;
        const uint64_t b = j / hw, px = j % hw;
        uint16_t* dst = (uint16_t*)p->y + (b * p->co + i) * hw + px;
        if (cnt == 8 && px + 8 <= hw && (reinterpret_cast<uint64_t>(dst) & 15u) == 0) {
            st128(dst, bits);
            return;
        }
        for (uint32_t e = 0; e < cnt; ++e) {
            const uint64_t q = j + e;
            ((uint16_t*)p->y)[(q / hw * p->co + i) * hw + q % hw] = pg_u4_elem(bits, e);
        }
    }
};

template <int BM, int BN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void conv_pipe_fwd(const ConvPipeParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const ConvFwdPipeProblem pr{&p, p.co, p.b * p.h * p.w_, 0, (uint64_t)p.kh * p.kw * p.ci};
    const ConvFwdLoader<BM, BN, 32 * WARPS_M * WARPS_N> ld(p, blockIdx.y * BM, blockIdx.x * BN, threadIdx.x);
    pg_body<BM, BN, WARPS_M, WARPS_N, true, false>(pr, ld, smem);
}

// grid = (ceil(B·H·W/128), ceil(Co/128)), block = 128, dynamic shared memory 48 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe128_fwd_bf16(ConvPipeParams p) {
    conv_pipe_fwd<128, 128, 2, 2>(p);
}
// grid = (ceil(B·H·W/64), ceil(Co/64)), block = 128, dynamic shared memory 24 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe64_fwd_bf16(ConvPipeParams p) {
    conv_pipe_fwd<64, 64, 2, 2>(p);
}

// ---- tf32: the same implicit GEMMs over f32 NHWC x (conv_nhwc_fwd_f32) and packed f32 weights
// (conv_wpack_fwd_f32), the tf32 kind of the core (ldmatrix for both operands: the weights' and
// the im2col tile are k-contiguous). The host needs Ci a multiple of 4.
// Forward epilogue: C[co][q] + bias into NCHW f32 y, pairs of pixels as one 64-bit store where
// both are in one image and aligned.
struct ConvFwdPipeF32Problem {
    const ConvPipeParams* p;
    uint32_t m, n;
    uint64_t kbeg, kend;
    static constexpr bool VEC_STORE = false;
    __device__ __forceinline__ void store2(uint32_t i, uint32_t j, float v0, float v1, bool both) const {
        const uint64_t hw = (uint64_t)p->h * p->w_;
        const float bias = p->bias ? reinterpret_cast<const float*>(p->bias)[i] : 0.f;
        float* y = reinterpret_cast<float*>(p->y);
        const uint64_t b = j / hw, px = j % hw;
        float* dst = y + (b * p->co + i) * hw + px;
        if (both && px + 1 < hw && (reinterpret_cast<uint64_t>(dst) & 7u) == 0) {
            *reinterpret_cast<float2*>(dst) = float2{v0 + bias, v1 + bias};
            return;
        }
        dst[0] = v0 + bias;
        if (both) {
            const uint64_t q = (uint64_t)j + 1;
            y[(q / hw * p->co + i) * hw + q % hw] = v1 + bias;
        }
    }
};

template <int BM, int BN, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void conv_pipe_fwd_f32(const ConvPipeParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const ConvFwdPipeF32Problem pr{&p, p.co, p.b * p.h * p.w_, 0, (uint64_t)p.kh * p.kw * p.ci};
    const ConvFwdLoader<BM, BN, 32 * WARPS_M * WARPS_N, PgTf32> ld(p, blockIdx.y * BM, blockIdx.x * BN, threadIdx.x);
    pg_body<BM, BN, WARPS_M, WARPS_N, true, false, PgTf32>(pr, ld, smem);
}

// grid = (ceil(B·H·W/128), ceil(Co/128)), block = 128, dynamic shared memory 48 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe128_fwd_f32(ConvPipeParams p) {
    conv_pipe_fwd_f32<128, 128, 2, 2>(p);
}
// grid = (ceil(B·H·W/64), ceil(Co/64)), block = 128, dynamic shared memory 24 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe64_fwd_f32(ConvPipeParams p) {
    conv_pipe_fwd_f32<64, 64, 2, 2>(p);
}

// Weight-gradient loader: B = the implicit im2col stored [BK][BN] (pixels by k); thread tid
// copies chunk column tid % CH of B (a fixed tap and PER_CHUNK channels) for NR pixel rows that
// move with k. A = dy: bf16 reads it in NHWC, stored [BK][BM] (pixels by output channels,
// strided rows of Co); tf32 in NCHW, stored [BM][BK] (k-contiguous, so that ldmatrix reads it:
// ldmatrix.trans cannot transpose 32-bit elements; a chunk is 4 pixels of one image, so the host
// needs H·W a multiple of 4), its B tile then read by 32-bit loads.
template <int BM, int BN, int NT, class K>
struct ConvWgradLoader {
    using T = PgTiles<BM, BN, K::TF32, true, K>;
    using E = typename K::E;
    static constexpr int CH = BN / K::PER_CHUNK;
    static constexpr int NR = K::BK * CH / NT;
    static_assert(NR * NT == K::BK * CH, "whole chunks per thread");
    const ConvPipeParams* p;
    uint32_t row0;
    uint64_t kend;
    int tid;
    uint32_t c;
    bool nvalid;
    int dy, dx;
    int64_t shift;
    __device__ __forceinline__ ConvWgradLoader(const ConvPipeParams& pp, uint32_t row0_, uint32_t col0, uint64_t kend_,
                                               int tid_)
        : p(&pp), row0(row0_), kend(kend_), tid(tid_) {
        c = tid % CH;
        const uint32_t ncol = col0 + K::PER_CHUNK * c, ntot = pp.kh * pp.kw * pp.ci;
        nvalid = ncol < ntot;
        const uint32_t tap = ncol / pp.ci, cc = ncol % pp.ci;
        dy = (int)(tap / pp.kw) - (int)(pp.kh / 2);
        dx = (int)(tap % pp.kw) - (int)(pp.kw / 2);
        shift = ((int64_t)dy * pp.w_ + dx) * pp.ci + cc;
    }
    __device__ __forceinline__ void load(unsigned char* sa, unsigned char* sb, uint64_t k0) const {
        const E* dyp = reinterpret_cast<const E*>(p->w);
        const E* xp = reinterpret_cast<const E*>(p->x);
        if constexpr (K::TF32) {
            const uint64_t hw = (uint64_t)p->h * p->w_;
            for (int e = tid; e < BM * 4; e += NT) {
                const uint32_t r = e / 4, cc = e % 4, co = row0 + r;
                const uint64_t q = k0 + 4 * cc;
                const bool ok = co < p->co && q < kend;
                cp_async16(sa + T::TA::off(r, cc), ok ? dyp + ((q / hw) * p->co + co) * hw + q % hw : dyp, ok);
            }
        } else {
            T::TA::load(sa, dyp, p->co, k0, row0, kend, p->co, tid, NT);
        }
#pragma unroll
        for (int i = 0; i < NR; ++i) {
            const uint32_t r = tid / CH + i * (NT / CH);
            const uint64_t q = k0 + r;
            const uint32_t xx = (uint32_t)(q % p->w_), yy = (uint32_t)(q / p->w_ % p->h);
            const bool ok = nvalid && q < kend && cp_tap(*p, yy, xx, dy, dx);
            cp_async16(sb + T::TB::off(r, c), ok ? xp + (int64_t)(q * p->ci) + shift : xp, ok);
        }
    }
};

// Weight-gradient epilogue: split z's f32 partial sums [z][co][k] (f32: the pair stores, one
// 64-bit store where the pair is whole and aligned: always when kh·kw·Ci is even, as j is).
struct ConvWgradPipeProblem {
    const ConvPipeParams* p;
    uint32_t m, n;
    uint64_t kbeg, kend;
    static constexpr bool VEC_STORE = false;
    __device__ __forceinline__ void store2(uint32_t i, uint32_t j, float v0, float v1, bool both) const {
        float* dst = (float*)p->y + ((uint64_t)blockIdx.z * m + i) * n + j;
        if (both && (reinterpret_cast<uint64_t>(dst) & 7u) == 0) {
            *reinterpret_cast<float2*>(dst) = float2{v0, v1};
            return;
        }
        dst[0] = v0;
        if (both) dst[1] = v1;
    }
};

// The split-K weight gradient: split z sums a whole number of k-tiles of the B·H·W pixels.
// x: NHWC; w: dy (bf16 NHWC, or f32 NCHW); y: f32 partial sums [splits, Co, kh·kw·Ci]
// BM x BM block tile, 4 warps (2 x 2) of BM/2 x BM/2, as the GEMM's pipelined tiles.
template <int BM, class K>
__device__ __forceinline__ void conv_pipe_wgrad(const ConvPipeParams& p) {
    extern __shared__ __align__(128) unsigned char smem[];
    constexpr int BK = K::BK;
    const uint64_t total = (uint64_t)p.b * p.h * p.w_;
    const uint64_t tiles = (total + BK - 1) / BK, per = (tiles + p.splits - 1) / p.splits;
    const uint64_t kbeg = min((uint64_t)blockIdx.z * per * BK, total), kend = min(kbeg + per * BK, total);
    const ConvWgradPipeProblem pr{&p, p.co, p.kh * p.kw * p.ci, kbeg, kend};
    const ConvWgradLoader<BM, BM, 128, K> ld(p, blockIdx.y * BM, blockIdx.x * BM, kend, threadIdx.x);
    pg_body<BM, BM, 2, 2, K::TF32, true, K>(pr, ld, smem);
}

// grid = (ceil(kh·kw·Ci/64), ceil(Co/64), splits), block = 128, dynamic shared memory 24 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe64_wgrad_bwd_bf16(ConvPipeParams p) {
    conv_pipe_wgrad<64, PgBf16>(p);
}
// the tf32 weight gradient (the same grid and shared memory)
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe64_wgrad_bwd_f32(ConvPipeParams p) {
    conv_pipe_wgrad<64, PgTf32>(p);
}
// The 128-square tile, for weight gradients with enough output tiles to fill the GPU with few
// or no splits (the decoder's wide layers): half the shared-memory traffic per mma.
// grid = (ceil(kh·kw·Ci/128), ceil(Co/128), splits), block = 128, dynamic shared memory 48 KiB
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe128_wgrad_bwd_bf16(ConvPipeParams p) {
    conv_pipe_wgrad<128, PgBf16>(p);
}
extern "C" __global__ void __launch_bounds__(128) conv2d_pipe128_wgrad_bwd_f32(ConvPipeParams p) {
    conv_pipe_wgrad<128, PgTf32>(p);
}

// dw[co][ci][tap] = bf16(Σ_z part[z][co][tap·Ci + ci]), the splits summed in order in f32.
struct WgradSumParams {
    const float* part;
    void* dw;
    uint32_t co;
    uint32_t ci;
    uint32_t k2;
    uint32_t splits;
};
RECLMIS_PARAMS_SIZE(WgradSumParams, 32);

__device__ __forceinline__ void wgrad_store(uint16_t* dw, uint64_t i, float s) { dw[i] = f32_to_bf16_bits(s); }
__device__ __forceinline__ void wgrad_store(float* dw, uint64_t i, float s) { dw[i] = s; }

template <class T>
__device__ __forceinline__ void wgrad_sum(const WgradSumParams& p) {
    const uint64_t n = (uint64_t)p.co * p.ci * p.k2, plane = n;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // i indexes dw[co][ci][tap]
        const uint32_t tap = (uint32_t)(i % p.k2), ci = (uint32_t)(i / p.k2 % p.ci);
        const uint64_t co = i / p.k2 / p.ci, src = (co * p.k2 + tap) * p.ci + ci;
        float s = 0.f;
        for (uint32_t z = 0; z < p.splits; ++z) s += p.part[z * plane + src];
        wgrad_store(reinterpret_cast<T*>(p.dw), i, s);
    }
}

extern "C" __global__ void conv_wgrad_sum_bwd_bf16(WgradSumParams p) { wgrad_sum<uint16_t>(p); }
// the same sum into f32 dw (the tf32 weight gradient)
extern "C" __global__ void conv_wgrad_sum_bwd_f32(WgradSumParams p) { wgrad_sum<float>(p); }

// NCHW -> NHWC for bf16 activations, into channels [c_off, c_off + C) of a [B, H·W, c_total]
// buffer (a concatenation's parts land side by side). A 32 x 32 tile through shared memory so
// that both the reads (along pixels) and the writes (along channels) coalesce.
// x: [B, C, HW] bf16; y: [B, HW, c_total] bf16
struct NhwcParams {
    const void* x;
    void* y;
    uint32_t b;
    uint32_t c;
    uint32_t hw;
    uint32_t c_total;
    uint32_t c_off;
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(NhwcParams, 40);

template <class T>
__device__ __forceinline__ void nhwc_body(const NhwcParams& p, T (*t)[33]) {
    const T* x = reinterpret_cast<const T*>(p.x);
    T* y = reinterpret_cast<T*>(p.y);
    const uint32_t p0 = blockIdx.x * 32, c0 = blockIdx.y * 32, b = blockIdx.z;
    for (uint32_t r = threadIdx.y; r < 32; r += 8) {
        const uint32_t c = c0 + r, px = p0 + threadIdx.x;
        if (c < p.c && px < p.hw) t[r][threadIdx.x] = x[((uint64_t)b * p.c + c) * p.hw + px];
    }
    __syncthreads();
    for (uint32_t r = threadIdx.y; r < 32; r += 8) {
        const uint32_t px = p0 + r, c = c0 + threadIdx.x;
        if (c < p.c && px < p.hw) y[((uint64_t)b * p.hw + px) * p.c_total + p.c_off + c] = t[threadIdx.x][r];
    }
}

// grid = (ceil(HW/32), ceil(C/32), B), block = (32, 8)
extern "C" __global__ void conv_nhwc_fwd_bf16(NhwcParams p) {
    __shared__ uint16_t t[32][33];
    nhwc_body(p, t);
}
// the same for f32 activations (the tf32 kernels)
extern "C" __global__ void conv_nhwc_fwd_f32(NhwcParams p) {
    __shared__ float t[32][33];
    nhwc_body(p, t);
}

// Packs bf16 weights w [Co, Ci, k2] for the pipelined kernels: flip = 0: wp[co][tap][ci] =
// w[co][ci][tap] (the forward); flip = 1: wp[ci][tap][co] = w[co][ci][k2 - 1 - tap] (the input
// gradient's weights: transposed, both kernel axes reversed).
struct WpackParams {
    const void* w;
    void* wp;
    uint32_t co;
    uint32_t ci;
    uint32_t k2;
    uint32_t flip;
};
RECLMIS_PARAMS_SIZE(WpackParams, 32);

template <class T>
__device__ __forceinline__ void wpack_body(const WpackParams& p) {
    const T* w = reinterpret_cast<const T*>(p.w);
    T* wp = reinterpret_cast<T*>(p.wp);
    const uint64_t n = (uint64_t)p.co * p.ci * p.k2;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // i indexes wp; (outer, tap, inner) = (co, tap, ci) or (ci, tap, co)
        const uint32_t inner_n = p.flip ? p.co : p.ci;
        const uint32_t inner = (uint32_t)(i % inner_n), tap = (uint32_t)(i / inner_n % p.k2);
        const uint32_t outer = (uint32_t)(i / inner_n / p.k2);
        const uint64_t src = p.flip ? ((uint64_t)inner * p.ci + outer) * p.k2 + (p.k2 - 1 - tap)
                                    : ((uint64_t)outer * p.ci + inner) * p.k2 + tap;
        wp[i] = w[src];
    }
}

extern "C" __global__ void conv_wpack_fwd_bf16(WpackParams p) { wpack_body<uint16_t>(p); }
// the same for f32 weights (the tf32 kernels)
extern "C" __global__ void conv_wpack_fwd_f32(WpackParams p) { wpack_body<float>(p); }
// @autocast-only end
