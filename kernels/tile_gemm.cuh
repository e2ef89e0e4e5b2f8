// tile_gemm.cuh: the block-tiled GEMM core shared by every GEMM-shaped kernel (gemm.cu, conv.cu).
//
// A kernel describes its problem as a struct P with
//   uint32_t m, n;          C is m x n
//   uint64_t k0, k1;        the reduction runs over [k0, k1) (split-K gives each block a range)
//   bool a_k_fast, b_n_fast;    which index of A (m x k) and B (k x n) is contiguous in memory,
//                               so that the tile loads walk it and a warp's loads coalesce
//   float a(uint32_t i, uint64_t k), b(uint64_t k, uint32_t j);   elements (any addressing:
//                               strided, implicit im2col, ...), only called in range
//   void store(uint32_t i, uint32_t j, float v);                  only called in range
// and calls tg_fma_body (exact f32 FMA, 256 threads) or tg_mma_body (tf32 tensor cores, 128
// threads). One source for every variant, chosen by the problem struct.
#pragma once
#include "common.cuh"

#define TG_BM 64
#define TG_BN 64
#define TG_BK 16
// Row padding of the shared tiles: with a stride of 72 floats the mma fragment reads (rows t,
// columns g) hit 32 different banks.
#define TG_PAD 8

// A tile element as the tiles hold it: f32, or bf16 bits (rounded to nearest even).
__device__ __forceinline__ void tg_put(float& dst, float v) { dst = v; }
__device__ __forceinline__ void tg_put(uint16_t& dst, float v) { dst = f32_to_bf16_bits(v); }

// Loads the BM x BK tile of A at (row0, k) into as[k][m] (k-major, so that the compute loop reads a
// row of m contiguously) and the BK x BN tile of B at (k, col0) into bs[k][n]; zero outside. T is
// the tiles' element type (float, or uint16_t for bf16).
template <class P, class T>
__device__ __forceinline__ void tg_load(const P& pr, uint32_t row0, uint32_t col0, uint64_t k, T (*as)[TG_BM + TG_PAD],
                                        T (*bs)[TG_BN + TG_PAD], int tid, int nthreads) {
    for (int e = tid; e < TG_BM * TG_BK; e += nthreads) {
        int mm, kk;
        if (pr.a_k_fast) mm = e / TG_BK, kk = e % TG_BK;
        else mm = e % TG_BM, kk = e / TG_BM;
        const uint32_t r = row0 + mm;
        const uint64_t c = k + kk;
        tg_put(as[kk][mm], (r < pr.m && c < pr.k1) ? pr.a(r, c) : 0.f);
    }
    for (int e = tid; e < TG_BK * TG_BN; e += nthreads) {
        int kk, nn;
        if (pr.b_n_fast) kk = e / TG_BN, nn = e % TG_BN;
        else kk = e % TG_BK, nn = e / TG_BK;
        const uint64_t r = k + kk;
        const uint32_t c = col0 + nn;
        tg_put(bs[kk][nn], (r < pr.k1 && c < pr.n) ? pr.b(r, c) : 0.f);
    }
}

// The mma bodies' epilogue: warp (wm, wn) holds C[wm*32 + 16 mi + ...][wn*32 + 8 ni + ...] in the
// mma accumulator layout (c[q] = C[g + 8 (q/2)][2t + q%2] of each 16x8 tile).
template <class P>
__device__ __forceinline__ void tg_mma_store(const P& pr, uint32_t row0, uint32_t col0, int wm, int wn, int g, int t,
                                             const float (&acc)[2][4][4]) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const uint32_t r = row0 + wm * 32 + mi * 16 + g + 8 * (q >> 1);
                const uint32_t c = col0 + wn * 32 + ni * 8 + 2 * t + (q & 1);
                if (r < pr.m && c < pr.n) pr.store(r, c, acc[mi][ni][q]);
            }
}

// Exact f32: 64x64 block tile, 256 threads, thread (tx, ty) owns rows ty + 16 i and columns
// tx + 16 j (a warp reads 16 consecutive floats of a bs row and 2 broadcast values of an as row:
// no bank conflicts). grid = (ceil(n/64), ceil(m/64), ...).
template <class P>
__device__ __forceinline__ void tg_fma_body(const P& pr) {
    __shared__ float as[TG_BK][TG_BM + TG_PAD];
    __shared__ float bs[TG_BK][TG_BN + TG_PAD];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const uint32_t row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
    float acc[4][4] = {};
    for (uint64_t k = pr.k0; k < pr.k1; k += TG_BK) {
        tg_load(pr, row0, col0, k, as, bs, tid, 256);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TG_BK; ++kk) {
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
        for (int j = 0; j < 4; ++j) {
            const uint32_t r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
            if (r < pr.m && c < pr.n) pr.store(r, c, acc[i][j]);
        }
}

// tf32 tensor cores: 64x64 block tile, 128 threads = 4 warps in 2 x 2, each 32 x 32 of C
// (2 m16 tiles x 4 n8 tiles of mma.sync m16n8k8). grid = (ceil(n/64), ceil(m/64), ...).
template <class P>
__device__ __forceinline__ void tg_mma_body(const P& pr) {
    __shared__ float as[TG_BK][TG_BM + TG_PAD];
    __shared__ float bs[TG_BK][TG_BN + TG_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
    float acc[2][4][4] = {};
    for (uint64_t k = pr.k0; k < pr.k1; k += TG_BK) {
        tg_load(pr, row0, col0, k, as, bs, tid, 128);
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < TG_BK; ks += 8) {
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
    tg_mma_store(pr, row0, col0, wm, wn, g, t, acc);
}

// bf16 tensor cores: the tf32 body's tiling (64x64 block tile, 4 warps of 32x32, 128 threads)
// with mma.sync m16n8k16. The problem's a() / b() return f32 values, rounded to bf16 as they
// enter shared memory (exact when the source is bf16); the accumulation is f32.
// grid = (ceil(n/64), ceil(m/64), ...).
template <class P>
__device__ __forceinline__ void tg_mma_bf16_body(const P& pr) {
    __shared__ uint16_t as[TG_BK][TG_BM + TG_PAD];
    __shared__ uint16_t bs[TG_BK][TG_BN + TG_PAD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.y * TG_BM, col0 = blockIdx.x * TG_BN;
    float acc[2][4][4] = {};
    // two bf16 of a shared tile column (k, k+1) packed low to high, as the fragments hold them
    auto pair = [](uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); };
    for (uint64_t k = pr.k0; k < pr.k1; k += TG_BK) {
        tg_load(pr, row0, col0, k, as, bs, tid, 128);
        __syncthreads();
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const int r = wm * 32 + mi * 16 + g;
            af[mi][0] = pair(as[2 * t][r], as[2 * t + 1][r]);
            af[mi][1] = pair(as[2 * t][r + 8], as[2 * t + 1][r + 8]);
            af[mi][2] = pair(as[2 * t + 8][r], as[2 * t + 9][r]);
            af[mi][3] = pair(as[2 * t + 8][r + 8], as[2 * t + 9][r + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int col = wn * 32 + ni * 8 + g;
            bf[ni][0] = pair(bs[2 * t][col], bs[2 * t + 1][col]);
            bf[ni][1] = pair(bs[2 * t + 8][col], bs[2 * t + 9][col]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        __syncthreads();  // the next tile overwrites as / bs
    }
    tg_mma_store(pr, row0, col0, wm, wn, g, t, acc);
}
