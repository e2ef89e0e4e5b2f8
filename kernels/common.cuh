// common.cuh: device helpers shared by every kernel family.
//
// The only place with inline PTX: each wrapper has a real path under NVRTC and an emulated path
// under g++ (the emu device, RECLMIS_EMU), so kernels never contain raw asm.
#pragma once

#ifndef RECLMIS_EMU
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#endif

#define RECLMIS_INF __int_as_float(0x7f800000)

// Parameter structs are shared with Rust (#[repr(C)]): a size mismatch must not compile.
#define RECLMIS_PARAMS_SIZE(T, n) static_assert(sizeof(T) == (n), #T " must match its Rust mirror")

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Max rule shared by every max-with-argmax (reduce, ccl) and their cpu paths and references:
// NaN wins (it propagates, as in PyTorch), and among equal values the lowest index wins, so the
// argmax does not depend on the schedule.
__device__ __forceinline__ bool max_better(float v, int32_t i, float best, int32_t bi) {
    const bool vn = v != v, bn = best != best;
    if (vn != bn) return vn;
    if (vn || v == best) return i < bi;
    return v > best;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024); `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -RECLMIS_INF;
    return warp_max(v);
}

// f32 -> tf32 (cvt.rna: round to nearest, ties away from zero; 10 mantissa bits kept).
__device__ __forceinline__ uint32_t f32_to_tf32(float x) {
#ifdef RECLMIS_EMU
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // inf/nan pass through
    return u & 0xffffe000u;
#else
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#endif
}

#ifdef RECLMIS_EMU
// The emulated mma.sync m16n8kK: each lane publishes its A and B registers to the warp's slots
// ([lane][16]: a in 0..3, b in 4..5), all 32 lanes must take part, and each lane's four C elements
// are d[i] = c[i] + A[row][k]·B[k][col] added in k order with f32 rounding, where
// `ab(slots, row, col, k, av, bv)` reads A[row][k] and B[k][col] from the slots (the fragment
// layout of the instruction's type).
template <unsigned K, class Ab>
__device__ __forceinline__ void emu_mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Ab ab) {
    uint64_t* s = emu::warp_slots();
    const unsigned me = emu::lane();
    uint64_t* mine = s + me * 16;
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    emu::sync_warp(__LINE__);
    if (emu::warp_live_mask() != 0xffffffffu) emu::trap("mma.sync needs all 32 lanes", __LINE__);
    const unsigned g = me / 4, t = me % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = c[i];
        for (unsigned k = 0; k < K; ++k) {
            float av, bv;
            ab(s, row, col, k, av, bv);
            acc = fmaf(av, bv, acc);
        }
        out[i] = acc;
    }
    emu::sync_warp(__LINE__);  // everyone has read the slots before they are reused
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
#endif

// d = a * b + c for one warp, m16n8k8, tf32 operands and f32 accumulation.
// Fragment layout (PTX ISA, mma.m16n8k8 .tf32), g = lane / 4, t = lane % 4:
//   a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]      (A: 16x8, row major)
//   b[0] = B[t][g]   b[1] = B[t+4][g]                                            (B: 8x8, k x n)
//   c[i] = C[g + 8*(i/2)][2*t + i%2]                                              (C, D: 16x8)
// The emulator below is written from the same table, so only a GPU run checks it against the
// hardware: tests/gemm.rs has the GPU-vs-emu cross-check.
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                 const float c[4]) {
#ifdef RECLMIS_EMU
    emu_mma<8>(d, a, b, c, [](const uint64_t* s, unsigned row, unsigned col, unsigned k, float& av, float& bv) {
        const uint64_t* la = s + ((row % 8) * 4 + k % 4) * 16;  // lane holding A[row][k]
        const uint64_t* lb = s + (col * 4 + k % 4) * 16;        // lane holding B[k][col]
        av = __uint_as_float((uint32_t)la[(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)] & 0xffffe000u);
        bv = __uint_as_float((uint32_t)lb[4 + (k >= 4 ? 1 : 0)] & 0xffffe000u);
    });
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// bf16 and f16 are stored as their 16-bit patterns (uint16_t): NVRTC has no cuda_bf16.h /
// cuda_fp16.h without the toolkit's headers, and g++ (emu) has no __nv_bfloat16. The conversions
// below are the only place that knows the formats: cvt instructions under NVRTC, the same IEEE
// arithmetic in software under g++. Rounding is to nearest, ties to even, in both directions that
// round; widening is exact.
#ifndef RECLMIS_EMU
typedef unsigned short uint16_t;
#endif

// f32 -> bf16 bits (cvt.rn.bf16.f32, sm_80+). NaN stays NaN (its payload bits may differ between
// the GPU and the emulation; tests compare NaN-ness).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float x) {
#ifdef RECLMIS_EMU
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // ties to even; overflow carries into inf, as it must
    return (uint16_t)(u >> 16);
#else
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
#endif
}

// bf16 bits -> f32: the 16 bits are f32's upper half (exact).
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }

// f32 -> IEEE half bits (cvt.rn.f16.f32): overflow to inf, gradual underflow to subnormals.
__device__ __forceinline__ uint16_t f32_to_f16_bits(float x) {
#ifdef RECLMIS_EMU
    _Float16 h = (_Float16)x;  // IEEE conversion, round to nearest even (libgcc)
    uint16_t r;
    std::memcpy(&r, &h, 2);
    return r;
#else
    uint16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
#endif
}

// IEEE half bits -> f32 (exact).
__device__ __forceinline__ float f16_bits_to_f32(uint16_t b) {
#ifdef RECLMIS_EMU
    _Float16 h;
    std::memcpy(&h, &b, 2);
    return (float)h;
#else
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(b));
    return r;
#endif
}

// d = a * b + c for one warp, m16n8k16, bf16 operands (two per 32-bit register, the lower column
// or row index in the low half) and f32 accumulation.
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// g = lane / 4, t = lane % 4:
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]                                 (B: 16x8, k x n)
//   c[i] = C[g + 8*(i/2)][2*t + i%2]                                                 (C, D: 16x8)
// bf16 products are exact in f32; the emulation adds them to c in k order with f32 rounding at
// each step. The hardware's summation order within the instruction is not documented: tests
// bound the difference by f32 accumulation error, and tests/gemm_bf16.rs cross-checks the
// emulated layout against the GPU.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#ifdef RECLMIS_EMU
    emu_mma<16>(d, a, b, c, [](const uint64_t* s, unsigned row, unsigned col, unsigned k, float& av, float& bv) {
        // A[row][k] sits in lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8),
        // half k % 2; B[k][col] in lane col * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2
        const uint64_t* la = s + ((row % 8) * 4 + (k % 8) / 2) * 16;
        const uint64_t* lb = s + (col * 4 + (k % 8) / 2) * 16;
        const uint32_t ra = (uint32_t)la[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        const uint32_t rb = (uint32_t)lb[4 + (k >= 8 ? 1 : 0)];
        av = bf16_bits_to_f32((uint16_t)(k % 2 ? ra >> 16 : ra & 0xffffu));
        bv = bf16_bits_to_f32((uint16_t)(k % 2 ? rb >> 16 : rb & 0xffffu));
    });
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// ---- The building blocks of pipelined kernels (sm_80+): asynchronous copies, ldmatrix, 128-bit
// accesses. Under g++ they are emulated as the PTX ISA defines them (emu.h): a cp.async lands
// only at the wait that retires its group, ldmatrix delivers the documented fragment layout.

// 16-byte global -> shared copy (cp.async.cg: cached in L2 only, as streamed tiles want); when
// `valid` is false nothing is read and the 16 bytes are zero-filled (src-size 0), so tile edges
// need no branch around the copy. `src` must be a valid address even then (pass the tensor base).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef RECLMIS_EMU
    emu::cp_async(smem_dst, gmem_src, 16, valid ? 16 : 0, __LINE__);
#else
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(gmem_src), "r"(valid ? 16 : 0));
#endif
}

// 4- or 8-byte copy (cp.async.ca, the sizes .cg does not take), zero-filled when not valid.
template <int BYTES>
__device__ __forceinline__ void cp_async_small(void* smem_dst, const void* gmem_src, bool valid) {
    static_assert(BYTES == 4 || BYTES == 8, "cp.async.ca copies 4 or 8 bytes here (16: cp_async16)");
#ifdef RECLMIS_EMU
    emu::cp_async(smem_dst, gmem_src, BYTES, valid ? BYTES : 0, __LINE__);
#else
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(gmem_src), "n"(BYTES),
                 "r"(valid ? BYTES : 0));
#endif
}

// Closes the group of copies this thread issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef RECLMIS_EMU
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are in flight. Other threads see the
// landed data only after a __syncthreads that follows the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef RECLMIS_EMU
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ldmatrix.x4 / .x4.trans: four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix
// l / 8 (16-byte aligned shared memory). Without .trans lane l receives row l/4, columns 2(l%4)
// and 2(l%4)+1 of each matrix (the mma A/B fragment of a row-major tile); with .trans the same
// of the transposed matrix (rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<4, false>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<4, true>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
// x2 and x1: lanes 0-15 (x2) or 0-7 (x1) give the row addresses; the others are ignored.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<2, false>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<2, true>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<1, false>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
#ifdef RECLMIS_EMU
    emu::ldmatrix<1, true>(r, smem_row, __LINE__);
#else
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem_row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#endif
}

// A 32-bit shared-memory load that all 32 lanes of a warp execute together (the tf32 pipelines
// read fragments of m-/n-contiguous tiles this way: ldmatrix.trans moves 16-bit elements, not
// 32-bit ones). LDS.32 on the GPU; under g++ a warp collective, so that the emu counts its bank
// conflicts as it does ldmatrix's.
__device__ __forceinline__ uint32_t lds32_warp(const void* smem) {
#ifdef RECLMIS_EMU
    return emu::lds32(smem, __LINE__);
#else
    return *reinterpret_cast<const uint32_t*>(smem);
#endif
}

// 128-bit loads and stores (LDG.E.128 / LDS.128 / STG.E.128): the address must be 16-byte
// aligned; the emulation traps where the GPU would raise a misaligned-address error.
__device__ __forceinline__ uint4 ld128(const void* p) {
#ifdef RECLMIS_EMU
    if (reinterpret_cast<uintptr_t>(p) & 15u) emu::trap("128-bit load from an address not 16-byte aligned", __LINE__);
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
#else
    return *reinterpret_cast<const uint4*>(p);
#endif
}
__device__ __forceinline__ void st128(void* p, uint4 v) {
#ifdef RECLMIS_EMU
    if (reinterpret_cast<uintptr_t>(p) & 15u) emu::trap("128-bit store to an address not 16-byte aligned", __LINE__);
    std::memcpy(p, &v, 16);
#else
    *reinterpret_cast<uint4*>(p) = v;
#endif
}
