// gemm.cu: batched C = alpha * A B + beta * C in f32, either operand transposed (through strides).
//
// A[z][i][k] = a[z*sa_batch + i*sa_row + k*sa_col] and likewise for B[z][k][j], so A^T or B^T is
// only a swap of two strides and a broadcast operand (shared weights) is sa_batch = 0. C is
// row-major per batch with row stride sc_row. beta == 0 never reads C.
//
// Two kernels from the same tile loaders:
// - gemm_fwd_f32: exact f32 FMA, 64x64 block tile, 16x16 threads with 4x4 outputs each;
// - gemm_tc_fwd_f32: tensor cores through mma.sync m16n8k8 with tf32 operands (10-bit mantissa,
//   the same trade as PyTorch's allow_tf32) and f32 accumulation; 64x64 block tile, 4 warps of 32x32.
#include "common.cuh"

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
};
RECLMIS_PARAMS_SIZE(GemmParams, 112);

#define BM 64
#define BN 64
#define BK 16
// Row padding of the shared tiles: with a stride of 72 floats the mma fragment reads (rows t, columns g)
// hit 32 different banks.

// Loads the BM x BK tile of A starting at (row0, k0) into as[k][m] (k-major so that the compute
// loop reads a row of m contiguously). Out-of-range elements are zero.
__device__ __forceinline__ void load_a_tile(const GemmParams& p, const float* a, uint32_t row0, uint32_t k0,
                                            float (*as)[BM + 8], int tid, int nthreads) {
    for (int e = tid; e < BM * BK; e += nthreads) {
        // Walk the tile along whichever dim is contiguous in memory, so a warp's loads coalesce.
        int mm, kk;
        if (p.sa_col == 1) mm = e / BK, kk = e % BK;
        else mm = e % BM, kk = e / BM;
        const uint32_t r = row0 + mm, c = k0 + kk;
        as[kk][mm] = (r < p.m && c < p.k) ? a[(int64_t)r * p.sa_row + (int64_t)c * p.sa_col] : 0.f;
    }
}

__device__ __forceinline__ void load_b_tile(const GemmParams& p, const float* b, uint32_t k0, uint32_t col0,
                                            float (*bs)[BN + 8], int tid, int nthreads) {
    for (int e = tid; e < BK * BN; e += nthreads) {
        int kk, nn;
        if (p.sb_col == 1) kk = e / BN, nn = e % BN;
        else kk = e % BK, nn = e / BK;
        const uint32_t r = k0 + kk, c = col0 + nn;
        bs[kk][nn] = (r < p.k && c < p.n) ? b[(int64_t)r * p.sb_row + (int64_t)c * p.sb_col] : 0.f;
    }
}

__device__ __forceinline__ void store_c(const GemmParams& p, float* c, uint32_t r, uint32_t col, float v) {
    if (r < p.m && col < p.n) {
        float* dst = c + (int64_t)r * p.sc_row + col;
        *dst = p.beta == 0.f ? p.alpha * v : p.alpha * v + p.beta * *dst;
    }
}

// grid = (ceil(n/64), ceil(m/64), batch), block = 256
extern "C" __global__ void __launch_bounds__(256) gemm_fwd_f32(GemmParams p) {
    __shared__ float as[BK][BM + 8];
    __shared__ float bs[BK][BN + 8];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const uint32_t row0 = blockIdx.y * BM, col0 = blockIdx.x * BN, z = blockIdx.z;
    const float* a = p.a + (int64_t)z * p.sa_batch;
    const float* b = p.b + (int64_t)z * p.sb_batch;
    float* c = p.c + (int64_t)z * p.sc_batch;
    // Thread (tx, ty) owns rows ty + 16 i and columns tx + 16 j: a warp reads 16 consecutive
    // floats of a bs row and 2 broadcast values of an as row, with no bank conflicts.
    float acc[4][4] = {};
    for (uint32_t k0 = 0; k0 < p.k; k0 += BK) {
        load_a_tile(p, a, row0, k0, as, tid, 256);
        load_b_tile(p, b, k0, col0, bs, tid, 256);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();  // the next tile overwrites as / bs
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) store_c(p, c, row0 + ty + 16 * i, col0 + tx + 16 * j, acc[i][j]);
}

// grid = (ceil(n/64), ceil(m/64), batch), block = 128 (4 warps, 2 x 2, each 32 x 32 of C:
// 2 m16 tiles x 4 n8 tiles).
extern "C" __global__ void __launch_bounds__(128) gemm_tc_fwd_f32(GemmParams p) {
    __shared__ float as[BK][BM + 8];
    __shared__ float bs[BK][BN + 8];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.y * BM, col0 = blockIdx.x * BN, z = blockIdx.z;
    const float* a = p.a + (int64_t)z * p.sa_batch;
    const float* b = p.b + (int64_t)z * p.sb_batch;
    float* c = p.c + (int64_t)z * p.sc_batch;
    float acc[2][4][4] = {};
    for (uint32_t k0 = 0; k0 < p.k; k0 += BK) {
        load_a_tile(p, a, row0, k0, as, tid, 128);
        load_b_tile(p, b, k0, col0, bs, tid, 128);
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < BK; ks += 8) {
            uint32_t af[2][4], bf[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm * 32 + mi * 16 + g;
                af[mi][0] = f32_to_tf32(as[ks + t][r]);
                af[mi][1] = f32_to_tf32(as[ks + t][r + 8]);
                af[mi][2] = f32_to_tf32(as[ks + t + 4][r]);
                af[mi][3] = f32_to_tf32(as[ks + t + 4][r + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = wn * 32 + ni * 8 + g;
                bf[ni][0] = f32_to_tf32(bs[ks + t][col]);
                bf[ni][1] = f32_to_tf32(bs[ks + t + 4][col]);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_m16n8k8_tf32(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint32_t r = row0 + wm * 32 + mi * 16 + g + 8 * (q >> 1);
                const uint32_t col = col0 + wn * 32 + ni * 8 + 2 * t + (q & 1);
                store_c(p, c, r, col, acc[mi][ni][q]);
            }
}
