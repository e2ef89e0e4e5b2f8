// pipe_gemm.cuh: the pipelined bf16 tensor-core GEMM core (sm_80+), built as cuBLAS-class kernels
// are: a STAGES-deep ring of shared-memory tiles filled by cp.async (16-byte copies, zero fill at
// the edges), fragments read with ldmatrix from XOR-swizzled tiles (no bank conflicts: the emu
// counts them, tests/gemm_pipe.rs requires zero), mma.sync m16n8k16 with f32 accumulation, and a
// fused epilogue (alpha, bias, beta·C, bf16 rounding, two-element stores).
//
// The problem struct P gives
//   uint32_t m, n; uint64_t k;               C is m x n, the sum runs over k
//   const uint16_t* pa, *pb;                 bf16 operands of this batch entry
//   int64_t a_ld, b_ld;                      the stride of A's and B's non-contiguous index
//   void store2(uint32_t i, uint32_t j, float v0, float v1, bool both);   C[i][j] (and C[i][j+1])
// Layouts are template parameters: A_KF (A[i][k] at pa[i·a_ld + k], k contiguous) or not
// (pa[k·a_ld + i], m contiguous); B_NF (B[k][j] at pb[k·b_ld + j]) or not (pb[j·b_ld + k]). The
// host guarantees: the contiguous extent of each operand a multiple of 8, a_ld and b_ld multiples
// of 8, 16-byte aligned bases (every 16-byte chunk of a row is whole and aligned).
#pragma once
#include "common.cuh"

#define PG_BK 32
#define PG_STAGES 3

// Byte offset of 16-byte chunk `c` of row `r` in a tile whose rows hold CHUNKS chunks. The XOR
// makes the 8 consecutive rows an ldmatrix phase reads at one logical chunk land on 8 distinct
// 16-byte bank groups: rows of >= 8 chunks (>= 128 bytes) XOR with r % 8; rows of 4 chunks (64
// bytes, two rows per 128-byte line) with (r / 2) % 4, since r % 2 already picks the line half.
template <int CHUNKS>
__device__ __forceinline__ uint32_t pg_off(uint32_t r, uint32_t c) {
    static_assert(CHUNKS == 4 || CHUNKS % 8 == 0, "tile rows of 4 or a multiple of 8 chunks");
    const uint32_t s = CHUNKS >= 8 ? (c ^ (r & 7u)) : (c ^ ((r >> 1) & 3u));
    return (r * CHUNKS + s) * 16u;
}

// One operand's stage: ROWS x COLS bf16 as stored (rows along the non-contiguous index).
template <int ROWS, int COLS>
struct PgTile {
    static constexpr int CHUNKS = COLS / 8;
    static constexpr uint32_t BYTES = ROWS * COLS * 2;
    // Copies the tile whose (row, col) origin is (r0, c0) in the source matrix src[r·ld + c]
    // (rows < rows_end, cols < cols_end; cols_end a multiple of 8), zero-filling outside.
    __device__ __forceinline__ static void load(unsigned char* smem, const uint16_t* src, int64_t ld, uint64_t r0,
                                                uint64_t c0, uint64_t rows_end, uint64_t cols_end, int tid,
                                                int nthreads) {
        for (int e = tid; e < ROWS * CHUNKS; e += nthreads) {
            const uint32_t r = e / CHUNKS, c = e % CHUNKS;
            const uint64_t gr = r0 + r, gc = c0 + 8u * c;
            const bool ok = gr < rows_end && gc < cols_end;
            cp_async16(smem + pg_off<CHUNKS>(r, c), ok ? src + (int64_t)gr * ld + (int64_t)gc : src, ok);
        }
    }
    // ldmatrix address of lane `l` for the 8 rows from `r` at 16-byte chunk `c`.
    __device__ __forceinline__ static const unsigned char* at(const unsigned char* smem, uint32_t r, uint32_t c) {
        return smem + pg_off<CHUNKS>(r, c);
    }
};

// BM x BN block tile, WARPS_M x WARPS_N warps, each WM x WN = BM/WARPS_M x BN/WARPS_N of C (MI m16
// tiles x NI n8 tiles). Dynamic shared memory: pg_smem_bytes<BM, BN>().
// grid = (ceil(n/BN), ceil(m/BM), batch), block = 32 · WARPS_M · WARPS_N.
template <int BM, int BN>
constexpr uint32_t pg_smem_bytes() {
    return PG_STAGES * (BM * PG_BK * 2 + PG_BK * BN * 2);
}

template <int BM, int BN, int WARPS_M, int WARPS_N, bool A_KF, bool B_NF, class P>
__device__ __forceinline__ void pg_body(const P& pr, unsigned char* smem) {
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NI = WN / 8;
    constexpr int NT = 32 * WARPS_M * WARPS_N;
    static_assert(NI % 2 == 0, "B fragments load two n8 tiles per ldmatrix.x4");
    // A's stage as stored: [BM][BK] (k contiguous) or [BK][BM]; B's: [BK][BN] or [BN][BK]
    using TA = PgTile<A_KF ? BM : PG_BK, A_KF ? PG_BK : BM>;
    using TB = PgTile<B_NF ? PG_BK : BN, B_NF ? BN : PG_BK>;
    constexpr uint32_t STAGE = TA::BYTES + TB::BYTES;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N, g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const uint64_t ktiles = (pr.k + PG_BK - 1) / PG_BK;

    auto load_stage = [&](uint64_t kt) {
        unsigned char* sa = smem + (kt % PG_STAGES) * STAGE;
        unsigned char* sb = sa + TA::BYTES;
        const uint64_t k0 = kt * PG_BK;
        if (A_KF) TA::load(sa, pr.pa, pr.a_ld, row0, k0, pr.m, pr.k, tid, NT);
        else TA::load(sa, pr.pa, pr.a_ld, k0, row0, pr.k, pr.m, tid, NT);
        if (B_NF) TB::load(sb, pr.pb, pr.b_ld, k0, col0, pr.k, pr.n, tid, NT);
        else TB::load(sb, pr.pb, pr.b_ld, col0, k0, pr.n, pr.k, tid, NT);
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    // Prologue: STAGES - 1 tiles in flight (a group per tile, empty past the end, so that the
    // wait count below is the same at every step).
#pragma unroll
    for (int s = 0; s < PG_STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s);
        cp_async_commit();
    }
    const int q8 = lane >> 3, r8 = lane & 7;  // the ldmatrix matrix and row this lane addresses
    for (uint64_t kt = 0; kt < ktiles; ++kt) {
        // tile kt has landed (at most STAGES - 2 newer groups in flight) and every warp is done
        // with tile kt - 1, whose stage the prefetch below overwrites
        cp_async_wait<PG_STAGES - 2>();
        __syncthreads();
        if (kt + PG_STAGES - 1 < ktiles) load_stage(kt + PG_STAGES - 1);
        cp_async_commit();
        const unsigned char* sa = smem + (kt % PG_STAGES) * STAGE;
        const unsigned char* sb = sa + TA::BYTES;
#pragma unroll
        for (int ks = 0; ks < PG_BK; ks += 16) {
            uint32_t af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const uint32_t m0 = wm * WM + mi * 16;
                // matrices: 0 = (m0.., ks..), 1 = (m0+8.., ks..), 2 = (m0.., ks+8..), 3 = (m0+8.., ks+8..)
                if (A_KF) ldmatrix_x4(af[mi], TA::at(sa, m0 + r8 + 8 * (q8 & 1), ks / 8 + (q8 >> 1)));
                else ldmatrix_x4_trans(af[mi], TA::at(sa, ks + r8 + 8 * (q8 >> 1), m0 / 8 + (q8 & 1)));
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                const uint32_t n0 = wn * WN + nj * 16;
                // matrices: 0 = (ks.., n0..), 1 = (ks+8.., n0..), 2 = (ks.., n0+8..), 3 = (ks+8.., n0+8..)
                uint32_t r[4];
                if (B_NF) ldmatrix_x4_trans(r, TB::at(sb, ks + r8 + 8 * (q8 & 1), n0 / 8 + (q8 >> 1)));
                else ldmatrix_x4(r, TB::at(sb, n0 + r8 + 8 * (q8 >> 1), ks / 8 + (q8 & 1)));
                bf[2 * nj][0] = r[0], bf[2 * nj][1] = r[1], bf[2 * nj + 1][0] = r[2], bf[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
    }
    cp_async_wait<0>();  // only empty groups remain; retire them before exit

    // Epilogue: each lane holds C[g (+8)][2t, 2t+1] of every 16 x 8 tile: pairs of adjacent columns.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint32_t r = row0 + wm * WM + mi * 16 + g + 8 * h;
                const uint32_t c = col0 + wn * WN + ni * 8 + 2 * t;
                if (r < pr.m && c < pr.n) pr.store2(r, c, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], c + 1 < pr.n);
            }
}

// Picks the layout instantiation at run time (one kernel serves every transpose).
template <int BM, int BN, int WARPS_M, int WARPS_N, class P>
__device__ __forceinline__ void pg_dispatch(const P& pr, bool a_kf, bool b_nf, unsigned char* smem) {
    if (a_kf) {
        if (b_nf) pg_body<BM, BN, WARPS_M, WARPS_N, true, true>(pr, smem);
        else pg_body<BM, BN, WARPS_M, WARPS_N, true, false>(pr, smem);
    } else {
        if (b_nf) pg_body<BM, BN, WARPS_M, WARPS_N, false, true>(pr, smem);
        else pg_body<BM, BN, WARPS_M, WARPS_N, false, false>(pr, smem);
    }
}
