// pipe_gemm.cuh: the pipelined tensor-core GEMM core (sm_80+), built as cuBLAS-class kernels
// are: a STAGES-deep ring of shared-memory tiles filled by cp.async (16-byte copies, zero fill at
// the edges), fragments read with ldmatrix from XOR-swizzled tiles (no bank conflicts: the emu
// counts them, tests/gemm_bf16.rs requires zero), mma.sync with f32 accumulation, and a
// fused epilogue (alpha, bias, beta·C, bf16 rounding; staged in shared memory and written in
// 16-byte row chunks where the problem allows it, two-element stores otherwise).
//
// Two element kinds (the K template parameter): bf16 (PgBf16: m16n8k16, 8 elements per 16-byte
// chunk, 32 k per stage) and f32 read as tf32 (PgTf32: m16n8k8, 4 per chunk, 16 k per stage, so
// that a stage's rows are 64 bytes in both and the shared memory per stage the same). ldmatrix
// moves 16-bit elements: it gives tf32 fragments (32-bit words) of k-contiguous tiles only, so the
// tf32 kind reads m- or n-contiguous tiles with warp-wide 32-bit loads (lds32_warp) from tiles
// swizzled for that pattern instead (pg_off_cols), as CUTLASS's tf32 kernels do for those layouts.
// The tf32 fragments are rounded with cvt.rna after the load, as the unpipelined tf32 kernel
// rounds its tile elements: with the same k order (steps of 8 from kbeg) the sums are the same.
//
// The core is shared by the GEMM (gemm.cu) and the implicit-GEMM convolutions (conv.cu): what
// differs is where a tile's 16-byte chunks come from (a loader) and where C goes (the problem).
// The problem struct P gives
//   uint32_t m, n; uint64_t kbeg, kend;      C is m x n, the sum runs over k in [kbeg, kend)
//   static constexpr bool VEC_STORE;         true: the vectorised epilogue below, with
//   float epi(uint32_t i, uint32_t j, float acc);                 C[i][j]'s final f32 value
//   void store8(uint32_t i, uint32_t j, uint4 bits, uint32_t cnt); bf16 C[i][j..j+cnt), cnt <= 8
//   or false: pair stores of the f32 sums,
//   void store2(uint32_t i, uint32_t j, float v0, float v1, bool both);   C[i][j] (and C[i][j+1])
// and the loader L (built per thread: it may precompute addresses that stay fixed over k)
//   void load(unsigned char* sa, unsigned char* sb, uint64_t k0);   the stage of k-tile k0..k0+BK
// fills A's and B's tiles (PgTiles<...>::TA / TB, swizzled by pg_off) with cp.async, zero outside.
// Layouts are template parameters: A_KF (A's tile stored [BM][BK], k contiguous) or not ([BK][BM],
// m contiguous); B_NF (B's tile stored [BK][BN], n contiguous) or not ([BN][BK]).
#pragma once
#include "common.cuh"

#define PG_BK 32
#define PG_STAGES 3

// Byte offset of 16-byte chunk `c` of row `r` in a tile whose rows hold CHUNKS chunks. The XOR
// makes the 8 consecutive rows an ldmatrix phase reads at one logical chunk land on 8 distinct
// 16-byte bank groups: rows of >= 8 chunks (>= 128 bytes) XOR with r % 8; rows of 4 chunks (64
// bytes, two rows per 128-byte line) with (r / 2) % 4, since r % 2 already picks the line half.
// Rows of 2 chunks (32 bytes, four rows per line) XOR with (r / 4) % 2.
template <int CHUNKS>
__device__ __forceinline__ uint32_t pg_off(uint32_t r, uint32_t c) {
    static_assert(CHUNKS == 2 || CHUNKS == 4 || CHUNKS % 8 == 0, "tile rows of 2, 4 or a multiple of 8 chunks");
    const uint32_t s = CHUNKS >= 8 ? (c ^ (r & 7u)) : CHUNKS == 4 ? (c ^ ((r >> 1) & 3u)) : (c ^ ((r >> 2) & 1u));
    return (r * CHUNKS + s) * 16u;
}

// The swizzle of the tf32 kind's m-/n-contiguous tiles, read by 32-bit loads: a warp reads rows
// r0 + t (t < 4, r0 a multiple of 4) at 8 consecutive words (two chunks, c and c + 1 with c even);
// XOR with 2 (r % 4) puts the four rows' chunk pairs on 8 distinct 16-byte bank groups.
template <int CHUNKS>
__device__ __forceinline__ uint32_t pg_off_cols(uint32_t r, uint32_t c) {
    static_assert(CHUNKS % 8 == 0, "rows of a multiple of 8 chunks");
    return (r * CHUNKS + (c ^ ((r & 3u) << 1))) * 16u;
}

// The element kinds: the storage type, elements per 16-byte chunk, k per stage and per mma.
struct PgBf16 {
    using E = uint16_t;
    static constexpr int PER_CHUNK = 8, BK = PG_BK, KSTEP = 16;
    static constexpr bool TF32 = false;
};
struct PgTf32 {
    using E = float;
    static constexpr int PER_CHUNK = 4, BK = 16, KSTEP = 8;
    static constexpr bool TF32 = true;
};

// One operand's stage: ROWS x COLS elements of type E as stored (rows along the non-contiguous
// index). COLS_SWZ: swizzled for 32-bit column reads (pg_off_cols) rather than for ldmatrix.
template <int ROWS, int COLS, class E = uint16_t, bool COLS_SWZ = false>
struct PgTile {
    static constexpr int PER_CHUNK = 16 / sizeof(E);
    static constexpr int CHUNKS = COLS / PER_CHUNK;
    static constexpr uint32_t BYTES = ROWS * COLS * sizeof(E);
    __device__ __forceinline__ static uint32_t off(uint32_t r, uint32_t c) {
        if constexpr (COLS_SWZ) return pg_off_cols<CHUNKS>(r, c);
        else return pg_off<CHUNKS>(r, c);
    }
    // Copies the tile whose (row, col) origin is (r0, c0) in the source matrix src[r·ld + c]
    // (rows < rows_end, cols < cols_end; cols_end a multiple of PER_CHUNK), zero-filling outside.
    __device__ __forceinline__ static void load(unsigned char* smem, const E* src, int64_t ld, uint64_t r0,
                                                uint64_t c0, uint64_t rows_end, uint64_t cols_end, int tid,
                                                int nthreads) {
        for (int e = tid; e < ROWS * CHUNKS; e += nthreads) {
            const uint32_t r = e / CHUNKS, c = e % CHUNKS;
            const uint64_t gr = r0 + r, gc = c0 + (uint64_t)PER_CHUNK * c;
            const bool ok = gr < rows_end && gc < cols_end;
            cp_async16(smem + off(r, c), ok ? src + (int64_t)gr * ld + (int64_t)gc : src, ok);
        }
    }
    // ldmatrix address of lane `l` for the 8 rows from `r` at 16-byte chunk `c`.
    __device__ __forceinline__ static const unsigned char* at(const unsigned char* smem, uint32_t r, uint32_t c) {
        return smem + off(r, c);
    }
    // Element (r, col) as a tf32 operand (a warp-wide 32-bit load, then cvt.rna).
    __device__ __forceinline__ static uint32_t tf32_at(const unsigned char* smem, uint32_t r, uint32_t col) {
        static_assert(sizeof(E) == 4, "32-bit elements");
        return f32_to_tf32(__uint_as_float(lds32_warp(smem + off(r, col / PER_CHUNK) + 4u * (col % PER_CHUNK))));
    }
};

// Element e (< 8) of eight bf16 packed in a uint4, low half first; selects rather than an
// indexed array, which would put `bits` in local memory.
__device__ __forceinline__ uint16_t pg_u4_elem(uint4 bits, uint32_t e) {
    const uint32_t w = e < 2 ? bits.x : e < 4 ? bits.y : e < 6 ? bits.z : bits.w;
    return (uint16_t)(e & 1u ? w >> 16 : w & 0xffffu);
}

// The stage tiles of a BM x BN block tile: A's as stored ([BM][BK] when k is contiguous, else
// [BK][BM]) and B's ([BK][BN] when n is contiguous, else [BN][BK]); the tf32 kind's m-/n-contiguous
// tiles swizzled for its 32-bit reads.
template <int BM, int BN, bool A_KF, bool B_NF, class K = PgBf16>
struct PgTiles {
    using E = typename K::E;
    using TA = PgTile<A_KF ? BM : K::BK, A_KF ? K::BK : BM, E, K::TF32 && !A_KF>;
    using TB = PgTile<B_NF ? K::BK : BN, B_NF ? BN : K::BK, E, K::TF32 && B_NF>;
    static constexpr uint32_t STAGE = TA::BYTES + TB::BYTES;
};

// The GEMM's loader: A and B strided matrices (the host guarantees: the contiguous extent of each
// operand a multiple of PER_CHUNK, a_ld and b_ld multiples of PER_CHUNK, 16-byte aligned bases, so
// every 16-byte chunk of a row is whole and aligned).
template <int BM, int BN, bool A_KF, bool B_NF, class K = PgBf16>
struct PgStridedLoader {
    using T = PgTiles<BM, BN, A_KF, B_NF, K>;
    const typename K::E* pa;
    const typename K::E* pb;
    int64_t a_ld, b_ld;
    uint32_t m, n, row0, col0;
    uint64_t k;
    int tid, nt;
    __device__ __forceinline__ void load(unsigned char* sa, unsigned char* sb, uint64_t k0) const {
        if (A_KF) T::TA::load(sa, pa, a_ld, row0, k0, m, k, tid, nt);
        else T::TA::load(sa, pa, a_ld, k0, row0, k, m, tid, nt);
        if (B_NF) T::TB::load(sb, pb, b_ld, k0, col0, k, n, tid, nt);
        else T::TB::load(sb, pb, b_ld, col0, k0, n, k, tid, nt);
    }
};

// BM x BN block tile, WARPS_M x WARPS_N warps, each WM x WN = BM/WARPS_M x BN/WARPS_N of C (MI m16
// tiles x NI n8 tiles). Dynamic shared memory: pg_smem_bytes<BM, BN>().
// grid = (ceil(n/BN), ceil(m/BM), batch), block = 32 · WARPS_M · WARPS_N.
template <int BM, int BN, class K = PgBf16>
constexpr uint32_t pg_smem_bytes() {
    return PG_STAGES * (BM * K::BK + K::BK * BN) * sizeof(typename K::E);
}

template <int BM, int BN, int WARPS_M, int WARPS_N, bool A_KF, bool B_NF, class K = PgBf16, class P, class L>
__device__ __forceinline__ void pg_body(const P& pr, const L& loader, unsigned char* smem) {
    constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, MI = WM / 16, NI = WN / 8;
    constexpr int NT = 32 * WARPS_M * WARPS_N, BK = K::BK, PC = K::PER_CHUNK;
    static_assert(NI % 2 == 0, "B fragments load two n8 tiles per ldmatrix.x4");
    using TA = typename PgTiles<BM, BN, A_KF, B_NF, K>::TA;
    using TB = typename PgTiles<BM, BN, A_KF, B_NF, K>::TB;
    constexpr uint32_t STAGE = PgTiles<BM, BN, A_KF, B_NF, K>::STAGE;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N, g = lane >> 2, t = lane & 3;
    const uint32_t row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const uint64_t ktiles = (pr.kend - pr.kbeg + BK - 1) / BK;

    auto load_stage = [&](uint64_t kt) {
        unsigned char* sa = smem + (kt % PG_STAGES) * STAGE;
        loader.load(sa, sa + TA::BYTES, pr.kbeg + kt * BK);
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
        for (int ks = 0; ks < BK; ks += K::KSTEP) {
            // bf16: k-steps of 16, a chunk is 8 k; tf32: k-steps of 8, a chunk is 4 k. Either way
            // an mma's A fragment is two chunks of k (a[0..1] and a[2..3]) and B's b[0], b[1].
            uint32_t af[MI][4], bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const uint32_t m0 = wm * WM + mi * 16;
                if constexpr (A_KF) {
                    // matrices: 0 = (m0.., ks..), 1 = (m0+8.., ks..), 2 = (m0.., ks+PC..), 3 = (m0+8.., ks+PC..)
                    ldmatrix_x4(af[mi], TA::at(sa, m0 + r8 + 8 * (q8 & 1), ks / PC + (q8 >> 1)));
                    if constexpr (K::TF32)
#pragma unroll
                        for (int q = 0; q < 4; ++q) af[mi][q] = f32_to_tf32(__uint_as_float(af[mi][q]));
                } else if constexpr (K::TF32) {
                    // a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4] from [BK][BM]
                    af[mi][0] = TA::tf32_at(sa, ks + t, m0 + g);
                    af[mi][1] = TA::tf32_at(sa, ks + t, m0 + g + 8);
                    af[mi][2] = TA::tf32_at(sa, ks + t + 4, m0 + g);
                    af[mi][3] = TA::tf32_at(sa, ks + t + 4, m0 + g + 8);
                } else {
                    ldmatrix_x4_trans(af[mi], TA::at(sa, ks + r8 + 8 * (q8 >> 1), m0 / 8 + (q8 & 1)));
                }
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                const uint32_t n0 = wn * WN + nj * 16;
                if constexpr (K::TF32 && B_NF) {
                    // b[0] = B[t][g], b[1] = B[t+4][g] of each n8 tile, from [BK][BN]
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        bf[2 * nj + h][0] = TB::tf32_at(sb, ks + t, n0 + 8 * h + g);
                        bf[2 * nj + h][1] = TB::tf32_at(sb, ks + t + 4, n0 + 8 * h + g);
                    }
                } else {
                    // matrices: 0 = (ks.., n0..), 1 = (ks+PC.., n0..), 2 = (ks.., n0+8..), 3 = (ks+PC.., n0+8..)
                    uint32_t r[4];
                    if constexpr (B_NF) ldmatrix_x4_trans(r, TB::at(sb, ks + r8 + 8 * (q8 & 1), n0 / 8 + (q8 >> 1)));
                    else ldmatrix_x4(r, TB::at(sb, n0 + r8 + 8 * (q8 >> 1), ks / PC + (q8 & 1)));
                    if constexpr (K::TF32)
#pragma unroll
                        for (int q = 0; q < 4; ++q) r[q] = f32_to_tf32(__uint_as_float(r[q]));
                    bf[2 * nj][0] = r[0], bf[2 * nj][1] = r[1], bf[2 * nj + 1][0] = r[2], bf[2 * nj + 1][1] = r[3];
                }
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) {
                    if constexpr (K::TF32) mma_m16n8k8_tf32(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
                    else mma_m16n8k16_bf16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
                }
        }
    }
    cp_async_wait<0>();  // only empty groups remain; retire them before exit

    if constexpr (P::VEC_STORE) {
        // Vectorised epilogue: the block's C tile, finished (pr.epi: alpha, bias, beta·C) and
        // rounded to bf16, is staged in shared memory (the pipeline's stages are free now), then
        // written out in 16-byte row chunks (pr.store8: one 128-bit store where the chunk is whole
        // and aligned in C, element stores otherwise). Rows padded by 8 elements: a warp's pair
        // stores of 8 rows land in distinct banks.
        constexpr int LDC = BN + 8;
        static_assert(BM * LDC * 2 <= PG_STAGES * STAGE, "the C tile fits in the pipeline's shared memory");
        uint16_t* ct = reinterpret_cast<uint16_t*>(smem);
        __syncthreads();  // every warp is done with the last stage
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t rl = wm * WM + mi * 16 + g + 8 * h, cl = wn * WN + ni * 8 + 2 * t;
                    const uint32_t r = row0 + rl, c = col0 + cl;
                    const float v0 = r < pr.m && c < pr.n ? pr.epi(r, c, acc[mi][ni][2 * h]) : 0.f;
                    const float v1 = r < pr.m && c + 1 < pr.n ? pr.epi(r, c + 1, acc[mi][ni][2 * h + 1]) : 0.f;
                    *reinterpret_cast<uint32_t*>(ct + rl * LDC + cl) =
                        (uint32_t)f32_to_bf16_bits(v0) | ((uint32_t)f32_to_bf16_bits(v1) << 16);
                }
        __syncthreads();
        for (int e = tid; e < BM * (BN / 8); e += NT) {
            const uint32_t rl = e / (BN / 8), cl = 8 * (e % (BN / 8));
            const uint32_t r = row0 + rl, c = col0 + cl;
            if (r < pr.m && c < pr.n) pr.store8(r, c, ld128(ct + rl * LDC + cl), min(8u, pr.n - c));
        }
    } else {
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
}

// The GEMM of strided operands, one layout instantiation.
template <int BM, int BN, int WARPS_M, int WARPS_N, bool A_KF, bool B_NF, class K, class P>
__device__ __forceinline__ void pg_strided(const P& pr, unsigned char* smem) {
    const PgStridedLoader<BM, BN, A_KF, B_NF, K> ld{pr.pa, pr.pb, pr.a_ld, pr.b_ld, pr.m, pr.n, blockIdx.y * BM,
                                                    blockIdx.x * BN, pr.kend, (int)threadIdx.x,
                                                    32 * WARPS_M * WARPS_N};
    pg_body<BM, BN, WARPS_M, WARPS_N, A_KF, B_NF, K>(pr, ld, smem);
}

// Picks the layout instantiation at run time (one kernel serves every transpose).
template <int BM, int BN, int WARPS_M, int WARPS_N, class K = PgBf16, class P>
__device__ __forceinline__ void pg_dispatch(const P& pr, bool a_kf, bool b_nf, unsigned char* smem) {
    if (a_kf) {
        if (b_nf) pg_strided<BM, BN, WARPS_M, WARPS_N, true, true, K>(pr, smem);
        else pg_strided<BM, BN, WARPS_M, WARPS_N, true, false, K>(pr, smem);
    } else {
        if (b_nf) pg_strided<BM, BN, WARPS_M, WARPS_N, false, true, K>(pr, smem);
        else pg_strided<BM, BN, WARPS_M, WARPS_N, false, false, K>(pr, smem);
    }
}
