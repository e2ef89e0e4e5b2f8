// gemm.cu: batched C = alpha * A B + beta * C in f32, either operand transposed (through strides).
//
// A[z][i][k] = a[z*sa_batch + i*sa_row + k*sa_col] and likewise for B[z][k][j], so A^T or B^T is
// only a swap of two strides and a broadcast operand (shared weights) is sa_batch = 0. C is
// row-major per batch with row stride sc_row. beta == 0 never reads C. An optional bias [n] is
// added to every row in the store (C = alpha·AB + bias + beta·C), saving a pass over C, and an
// optional ReLU after it (the Linear → ReLU of the model's feed-forward layers): one pass fewer.
//
// Two kernels over the shared tile core (tile_gemm.cuh):
// - gemm_fwd_f32: exact f32 FMA, 64x64 block tile, 16x16 threads with 4x4 outputs each;
// - gemm_tc_fwd_f32: tensor cores through mma.sync m16n8k8 with tf32 operands (10-bit mantissa,
//   the same trade as PyTorch's allow_tf32) and f32 accumulation; 64x64 block tile, 4 warps of 32x32.
// and, in builds with autocast, the pipelined tf32 kernels gemm_pipe{128,64}_fwd_f32 (below).
#include "tile_gemm.cuh"

// a: [batch, m, k] (strided), b: [batch, k, n] (strided), c: [batch, m, n]
struct GemmParams {
    const float* a;
    const float* b;
    float* c;
    uint32_t m;
    uint32_t n;
    uint32_t k;
    uint32_t batch;
    int64_t sa_batch;
    int64_t sa_row;
    int64_t sa_col;
    int64_t sb_batch;
    int64_t sb_row;
    int64_t sb_col;
    int64_t sc_batch;
    int64_t sc_row;
    float alpha;
    float beta;
    const float* bias;  // [n] added to every row after alpha (the Linear epilogue), or null
    uint32_t relu;      // nonzero: C = ReLU(alpha·AB + bias + beta·C) (Linear → ReLU fused)
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(GemmParams, 128);

// The fused activation, as the elementwise ReLU computes it (NaN and -0 give +0): applied to the
// f32 value before any bf16 rounding, which commutes with it (rounding keeps the sign), so the
// fused and the unfused Linear → ReLU agree bit for bit.
__device__ __forceinline__ float gemm_act(float r, bool relu) { return relu ? (r > 0.f ? r : 0.f) : r; }

// A, B, C of one batch entry as a tile_gemm problem.
struct GemmProblem {
    const float* pa;
    const float* pb;
    float* pc;
    const float* bias;
    int64_t sa_row, sa_col, sb_row, sb_col, sc_row;
    float alpha, beta;
    uint32_t m, n;
    uint64_t k0, k1;
    bool a_k_fast, b_n_fast, relu;
    __device__ float a(uint32_t i, uint64_t k) const { return pa[(int64_t)i * sa_row + (int64_t)k * sa_col]; }
    __device__ float b(uint64_t k, uint32_t j) const { return pb[(int64_t)k * sb_row + (int64_t)j * sb_col]; }
    __device__ void store(uint32_t i, uint32_t j, float v) const {
        float* dst = pc + (int64_t)i * sc_row + j;
        const float r = bias ? fmaf(alpha, v, bias[j]) : alpha * v;
        *dst = gemm_act(beta == 0.f ? r : r + beta * *dst, relu);
    }
};

__device__ __forceinline__ GemmProblem gemm_problem(const GemmParams& p) {
    const uint32_t z = blockIdx.z;
    GemmProblem pr;
    pr.pa = p.a + (int64_t)z * p.sa_batch;
    pr.pb = p.b + (int64_t)z * p.sb_batch;
    pr.pc = p.c + (int64_t)z * p.sc_batch;
    pr.bias = p.bias;
    pr.sa_row = p.sa_row, pr.sa_col = p.sa_col, pr.sb_row = p.sb_row, pr.sb_col = p.sb_col, pr.sc_row = p.sc_row;
    pr.alpha = p.alpha, pr.beta = p.beta;
    pr.m = p.m, pr.n = p.n, pr.k0 = 0, pr.k1 = p.k;
    pr.a_k_fast = p.sa_col == 1;
    pr.b_n_fast = p.sb_col == 1;
    pr.relu = p.relu != 0;
    return pr;
}

// grid = (ceil(n/64), ceil(m/64), batch), block = 256
extern "C" __global__ void __launch_bounds__(256) gemm_fwd_f32(GemmParams p) { tg_fma_body(gemm_problem(p)); }

// grid = (ceil(n/64), ceil(m/64), batch), block = 128
extern "C" __global__ void __launch_bounds__(128) gemm_tc_fwd_f32(GemmParams p) { tg_mma_body(gemm_problem(p)); }

// @autocast-only begin (build.rs leaves this region out of builds without bf16 autocast)
// The bf16 problem: a, b, c (and the bias, when given) hold bf16; the sum is f32 and C is rounded
// to bf16 once, after alpha, the bias and beta·C.
struct GemmBf16Problem {
    const uint16_t* pa;
    const uint16_t* pb;
    uint16_t* pc;
    const uint16_t* bias;
    int64_t sa_row, sa_col, sb_row, sb_col, sc_row;
    float alpha, beta;
    uint32_t m, n;
    uint64_t k0, k1;
    bool a_k_fast, b_n_fast, relu;
    __device__ float a(uint32_t i, uint64_t k) const {
        return bf16_bits_to_f32(pa[(int64_t)i * sa_row + (int64_t)k * sa_col]);
    }
    __device__ float b(uint64_t k, uint32_t j) const {
        return bf16_bits_to_f32(pb[(int64_t)k * sb_row + (int64_t)j * sb_col]);
    }
    __device__ void store(uint32_t i, uint32_t j, float v) const {
        uint16_t* dst = pc + (int64_t)i * sc_row + j;
        const float r = bias ? fmaf(alpha, v, bf16_bits_to_f32(bias[j])) : alpha * v;
        *dst = f32_to_bf16_bits(gemm_act(beta == 0.f ? r : r + beta * bf16_bits_to_f32(*dst), relu));
    }
};

// grid = (ceil(n/64), ceil(m/64), batch), block = 128; GemmParams' pointers address bf16 here
extern "C" __global__ void __launch_bounds__(128) gemm_tc_fwd_bf16(GemmParams p) {
    const uint32_t z = blockIdx.z;
    GemmBf16Problem pr;
    pr.pa = (const uint16_t*)p.a + (int64_t)z * p.sa_batch;
    pr.pb = (const uint16_t*)p.b + (int64_t)z * p.sb_batch;
    pr.pc = (uint16_t*)p.c + (int64_t)z * p.sc_batch;
    pr.bias = (const uint16_t*)p.bias;
    pr.sa_row = p.sa_row, pr.sa_col = p.sa_col, pr.sb_row = p.sb_row, pr.sb_col = p.sb_col, pr.sc_row = p.sc_row;
    pr.alpha = p.alpha, pr.beta = p.beta;
    pr.m = p.m, pr.n = p.n, pr.k0 = 0, pr.k1 = p.k;
    pr.a_k_fast = p.sa_col == 1;
    pr.b_n_fast = p.sb_col == 1;
    pr.relu = p.relu != 0;
    tg_mma_bf16_body(pr);
}

// ---- The pipelined bf16 GEMM (pipe_gemm.cuh): cp.async ring, ldmatrix from swizzled tiles,
// mma.sync m16n8k16. The host launches it when every 16-byte chunk of A and B is whole and
// aligned (contiguous extents and strides multiples of 8 elements, 16-byte aligned bases) and
// gemm_tc_fwd_bf16 otherwise; same GemmParams, same numerics (f32 sums, one bf16 rounding).
#include "pipe_gemm.cuh"

struct GemmPipeProblem {
    const uint16_t* pa;
    const uint16_t* pb;
    uint16_t* pc;
    const uint16_t* bias;
    int64_t a_ld, b_ld, sc_row;
    float alpha, beta;
    uint32_t m, n;
    uint64_t kbeg, kend;
    bool relu;
    static constexpr bool VEC_STORE = true;
    __device__ float epi(uint32_t i, uint32_t j, float v) const {
        const float r = bias ? fmaf(alpha, v, bf16_bits_to_f32(bias[j])) : alpha * v;
        return gemm_act(beta == 0.f ? r : r + beta * bf16_bits_to_f32(pc[(int64_t)i * sc_row + j]), relu);
    }
    // C[i][j..j+cnt): one 128-bit store when the chunk is whole and 16-byte aligned
    __device__ void store8(uint32_t i, uint32_t j, uint4 bits, uint32_t cnt) const {
        uint16_t* dst = pc + (int64_t)i * sc_row + j;
        if (cnt == 8 && (reinterpret_cast<uint64_t>(dst) & 15u) == 0) {
            st128(dst, bits);
            return;
        }
        for (uint32_t e = 0; e < cnt; ++e) dst[e] = pg_u4_elem(bits, e);
    }
};

// The problem of one batch entry (bf16: GemmPipeProblem, tf32: GemmPipeF32Problem, the same
// fields over the kind's element type), then the layout's instantiation.
template <int BM, int BN, int WARPS_M, int WARPS_N, class K, class Prob>
__device__ __forceinline__ void gemm_pipe(const GemmParams& p) {
    using E = typename K::E;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t z = blockIdx.z;
    Prob pr;
    pr.pa = (const E*)p.a + (int64_t)z * p.sa_batch;
    pr.pb = (const E*)p.b + (int64_t)z * p.sb_batch;
    pr.pc = (E*)p.c + (int64_t)z * p.sc_batch;
    pr.bias = (const E*)p.bias;
    const bool a_kf = p.sa_col == 1, b_nf = p.sb_col == 1;
    pr.a_ld = a_kf ? p.sa_row : p.sa_col;
    pr.b_ld = b_nf ? p.sb_row : p.sb_col;
    pr.sc_row = p.sc_row;
    pr.alpha = p.alpha, pr.beta = p.beta;
    pr.m = p.m, pr.n = p.n, pr.kbeg = 0, pr.kend = p.k;
    pr.relu = p.relu != 0;
    pg_dispatch<BM, BN, WARPS_M, WARPS_N, K>(pr, a_kf, b_nf, smem);
}

// 128 x 128 block tile, 4 warps of 64 x 64, for problems with enough tiles to fill the GPU.
// Tried: 8 warps of 64 x 32 take 163 registers, still one 8-warp block per H100 SM (12.5 % of its
// warp slots, as now) with twice the ldmatrix per mma; capping them at 128 registers for two
// blocks spills on sm_90 (84 bytes: `reclmis kernels --check` refuses it).
// grid = (ceil(n/128), ceil(m/128), batch), block = 128, dynamic shared memory 48 KiB
extern "C" __global__ void __launch_bounds__(128) gemm_pipe128_fwd_bf16(GemmParams p) {
    gemm_pipe<128, 128, 2, 2, PgBf16, GemmPipeProblem>(p);
}

// 64 x 64 block tile (warps of 32 x 32), for smaller problems: four times the blocks.
// grid = (ceil(n/64), ceil(m/64), batch), block = 128, dynamic shared memory 24 KiB
extern "C" __global__ void __launch_bounds__(128) gemm_pipe64_fwd_bf16(GemmParams p) {
    gemm_pipe<64, 64, 2, 2, PgBf16, GemmPipeProblem>(p);
}

// ---- The pipelined tf32 GEMM: the same core with the tf32 kind (f32 tiles, 16 k per stage,
// m16n8k8, operands rounded with cvt.rna as gemm_tc_fwd_f32 rounds them, k summed in the same
// order: the same C bit for bit). The host launches it where every 16-byte chunk of A and B is
// whole and aligned (contiguous extents and strides multiples of 4 floats, 16-byte aligned bases).
struct GemmPipeF32Problem {
    const float* pa;
    const float* pb;
    float* pc;
    const float* bias;
    int64_t a_ld, b_ld, sc_row;
    float alpha, beta;
    uint32_t m, n;
    uint64_t kbeg, kend;
    bool relu;
    static constexpr bool VEC_STORE = false;
    __device__ __forceinline__ float fin(float v, uint32_t j, const float* dst) const {
        const float r = bias ? fmaf(alpha, v, bias[j]) : alpha * v;
        return gemm_act(beta == 0.f ? r : r + beta * *dst, relu);
    }
    // C[i][j] (and C[i][j+1]): one 64-bit store when both are in range and the pair is aligned
    __device__ __forceinline__ void store2(uint32_t i, uint32_t j, float v0, float v1, bool both) const {
        float* dst = pc + (int64_t)i * sc_row + j;
        const float r0 = fin(v0, j, dst);
        if (both && (reinterpret_cast<uint64_t>(dst) & 7u) == 0) {
            *reinterpret_cast<float2*>(dst) = float2{r0, fin(v1, j + 1, dst + 1)};
            return;
        }
        dst[0] = r0;
        if (both) dst[1] = fin(v1, j + 1, dst + 1);
    }
};

// grid = (ceil(n/128), ceil(m/128), batch), block = 128, dynamic shared memory 48 KiB
extern "C" __global__ void __launch_bounds__(128) gemm_pipe128_fwd_f32(GemmParams p) {
    gemm_pipe<128, 128, 2, 2, PgTf32, GemmPipeF32Problem>(p);
}
// grid = (ceil(n/64), ceil(m/64), batch), block = 128, dynamic shared memory 24 KiB
extern "C" __global__ void __launch_bounds__(128) gemm_pipe64_fwd_f32(GemmParams p) {
    gemm_pipe<64, 64, 2, 2, PgTf32, GemmPipeF32Problem>(p);
}
// @autocast-only end
