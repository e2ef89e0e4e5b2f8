// emu.h: just enough of CUDA C++ for kernels/*.cu to compile with g++ and run on the CPU.
//
// Every CUDA thread is a fiber; a block's fibers run on one OS thread and switch only at barriers
// (__syncthreads, warp collectives), so between two barriers the threads run one after another in
// an order the scheduler picks (forward, reversed or seeded-random, varied per launch). A kernel that
// forgets a barrier therefore reads data that is not there yet and fails its test. Deadlock,
// barrier divergence and warp collectives after lanes exited are reported as launch errors.
//
// The building blocks of pipelined tensor-core kernels are emulated as the PTX ISA defines them:
// cp.async (4/8/16 bytes, zero fill past src-size) lands in shared memory only when the issuing
// thread's cp.async.wait_group retires its group, so a missing or too-weak wait reads stale data
// (dynamic shared memory starts as NaN bytes); a thread that exits with copies in flight is a
// launch error. ldmatrix (x1/x2/x4, .trans) is a warp collective with exact fragment layouts; its
// shared-memory bank conflicts (and those of the warp-wide 32-bit loads, lds32) are counted per launch (emu::LaunchStats, a report, not a failure).
//
// Limits (write new kernels within them): no wgmma / TMA / cooperative groups, cp.async only into
// dynamic shared memory, bank conflicts counted for ldmatrix and lds32_warp only, no half arithmetic, warp collectives assume the full warp (masks are ignored), math runs at full
// precision, __shared__ variables are per OS thread and keep the previous block's contents (dynamic
// shared memory is refilled with NaN bytes per block).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace emu {
extern thread_local uint3 cur_thread_idx;
extern thread_local uint3 cur_block_idx;
extern thread_local dim3 cur_block_dim;
extern thread_local dim3 cur_grid_dim;

// Scheduling points; `site` identifies the call site so that divergence can be reported.
void sync_block(int site);
void sync_warp(int site);
// This lane's 16 exchange slots (the warp's slots are laid out [lane][16]).
uint64_t* warp_slots();
unsigned lane();
unsigned warp_live_mask();
void* dynamic_smem();
[[noreturn]] void trap(const char* what, int site);

// cp.async: `cp_size` bytes (4, 8 or 16) to shared `dst`, the first `src_size` read from global
// `src` now and the rest zero, landing at this thread's wait_group that retires the group.
void cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size, int site);
void cp_async_commit();
// Lands this thread's committed groups until at most `n` (the newest) are still in flight.
void cp_async_wait(unsigned n);
// One shared-memory access phase of a warp (ldmatrix: 8 rows of 16 bytes): counts the extra
// wavefronts its bank conflicts cost.
void note_smem_phase(const uintptr_t* addrs, unsigned count, unsigned bytes);

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: lanes 8i..8i+7 give the row addresses (16
// bytes each) of matrix i; lane l receives in r[i] row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i
// (low half first), or with .trans rows 2(l%4) and 2(l%4)+1 of column l/4.
template <int N, bool TRANS>
inline void ldmatrix(uint32_t (&r)[N], const void* row, int site) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    uint64_t* s = warp_slots();
    const unsigned me = lane();
    // Each addressing lane reads its row when it reaches the instruction (not when the warp is
    // released), so a writer that another warp has not yet run is seen as missing.
    if (me < 8u * N) {
        if ((reinterpret_cast<uintptr_t>(row) & 15u) != 0) trap("ldmatrix row address not 16-byte aligned", site);
        s[me * 16] = reinterpret_cast<uintptr_t>(row);
        std::memcpy(&s[me * 16 + 1], row, 16);
    }
    sync_warp(site);
    if (warp_live_mask() != 0xffffffffu) trap("ldmatrix needs all 32 lanes", site);
    if (me == 0)
        for (int i = 0; i < N; ++i) {
            uintptr_t a[8];
            for (int j = 0; j < 8; ++j) a[j] = (uintptr_t)s[(8 * i + j) * 16];
            note_smem_phase(a, 8, 16);
        }
    // the 16-bit element `col` of the row that lane `src` published
    auto elem = [&](unsigned src, unsigned col) {
        uint16_t v;
        std::memcpy(&v, reinterpret_cast<const unsigned char*>(&s[src * 16 + 1]) + 2 * col, 2);
        return (uint32_t)v;
    };
    for (int i = 0; i < N; ++i) {
        if (!TRANS) {
            const unsigned src = 8 * i + me / 4;
            r[i] = elem(src, 2 * (me % 4)) | elem(src, 2 * (me % 4) + 1) << 16;
        } else {
            r[i] = elem(8 * i + 2 * (me % 4), me / 4) | elem(8 * i + 2 * (me % 4) + 1, me / 4) << 16;
        }
    }
    sync_warp(site);  // every lane has read the slots before they are reused
}

// A 32-bit shared-memory load all 32 lanes execute together (the tf32 pipelines' scalar fragment
// reads, lds32_warp): each lane reads its word when it reaches the instruction, and the warp's 32
// addresses are one phase for the bank-conflict count.
inline uint32_t lds32(const void* p, int site) {
    if ((reinterpret_cast<uintptr_t>(p) & 3u) != 0) trap("32-bit shared load not 4-byte aligned", site);
    uint64_t* s = warp_slots();
    const unsigned me = lane();
    uint32_t v;
    std::memcpy(&v, p, 4);
    s[me * 16] = reinterpret_cast<uintptr_t>(p);
    sync_warp(site);
    if (warp_live_mask() != 0xffffffffu) trap("lds32_warp needs all 32 lanes", site);
    if (me == 0) {
        uintptr_t a[32];
        for (int j = 0; j < 32; ++j) a[j] = (uintptr_t)s[j * 16];
        note_smem_phase(a, 32, 4);
    }
    sync_warp(site);  // lane 0 has read the slots before they are reused
    return v;
}

template <class T>
inline T exchange(T v, int src, int site) {
    static_assert(sizeof(T) <= 8, "warp exchange of more than 8 bytes");
    uint64_t* s = warp_slots();
    unsigned me = lane();
    std::memcpy(&s[me * 16], &v, sizeof(T));
    sync_warp(site);
    T r = v;
    if (src >= 0 && src < 32 && ((warp_live_mask() >> src) & 1u)) std::memcpy(&r, &s[src * 16], sizeof(T));
    sync_warp(site);
    return r;
}

struct LaunchCfg {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t smem_bytes;
    uint32_t reserved;
    uint64_t seed;
    const char* name;
};
using BodyFn = void (*)(void* ctx);
int run_grid(const LaunchCfg* cfg, BodyFn body, void* ctx, char* err, size_t errlen);

template <class... P, size_t... I>
inline void call_kernel(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

// Unpacks a cuLaunchKernel-style argument array by the kernel's own signature.
template <class... P>
inline int launch(void (*k)(P...), const LaunchCfg* cfg, void** args, char* err, size_t errlen) {
    struct Ctx {
        void (*k)(P...);
        void** args;
    } ctx{k, args};
    return run_grid(
        cfg,
        [](void* c) {
            auto* x = static_cast<Ctx*>(c);
            call_kernel(x->k, x->args, std::index_sequence_for<P...>{});
        },
        &ctx, err, errlen);
}
}  // namespace emu

#define threadIdx (::emu::cur_thread_idx)
#define blockIdx (::emu::cur_block_idx)
#define blockDim (::emu::cur_block_dim)
#define gridDim (::emu::cur_grid_dim)
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared memory: one copy per OS thread, which runs one block at a time.
#define __shared__ static thread_local
#define __constant__ static

#define __syncthreads() ::emu::sync_block(__LINE__)
#define __syncwarp(...) ::emu::sync_warp(__LINE__)
#define __trap() ::emu::trap("__trap()", __LINE__)
#define __shfl_sync(mask, v, src, ...) ::emu_shfl_idx((v), (src), __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lm, ...) ::emu_shfl_xor((v), (lm), __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) ::emu_shfl_down((v), (d), __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) ::emu_shfl_up((v), (d), __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) ::emu_ballot((p), __LINE__)
#define __any_sync(mask, p) (::emu_ballot((p), __LINE__) != 0u)
#define __all_sync(mask, p) (::emu_ballot((p), __LINE__) == ::emu::warp_live_mask())

template <class T>
inline T emu_shfl_idx(T v, int src, int site, int width = 32) {
    int me = (int)emu::lane();
    return emu::exchange(v, (me & ~(width - 1)) + (src & (width - 1)), site);
}
template <class T>
inline T emu_shfl_xor(T v, int lm, int site, int width = 32) {
    int me = (int)emu::lane();
    int src = me ^ lm;
    if ((src & ~(width - 1)) != (me & ~(width - 1))) src = me;
    return emu::exchange(v, src, site);
}
template <class T>
inline T emu_shfl_down(T v, unsigned d, int site, int width = 32) {
    int me = (int)emu::lane();
    int src = ((me & (width - 1)) + (int)d < width) ? me + (int)d : me;
    return emu::exchange(v, src, site);
}
template <class T>
inline T emu_shfl_up(T v, unsigned d, int site, int width = 32) {
    int me = (int)emu::lane();
    int src = ((me & (width - 1)) - (int)d >= 0) ? me - (int)d : me;
    return emu::exchange(v, src, site);
}
inline unsigned emu_ballot(bool p, int site) {
    uint64_t* s = emu::warp_slots();
    unsigned me = emu::lane();
    s[me * 16] = p ? 1u : 0u;
    emu::sync_warp(site);
    unsigned live = emu::warp_live_mask(), r = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((live >> l) & 1u) && s[l * 16]) r |= 1u << l;
    emu::sync_warp(site);
    return r;
}

// Fibers switch only at barriers, so read-modify-write is already atomic within a launch.
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
    T old = *p;
    *p = old > v ? old : v;
    return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
    T old = *p;
    *p = old < v ? old : v;
    return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <class T>
inline T atomicCAS(T* p, T cmp, T v) {
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}

template <class A, class B>
inline auto min(A a, B b) -> std::common_type_t<A, B> {
    return a < b ? a : b;
}
template <class A, class B>
inline auto max(A a, B b) -> std::common_type_t<A, B> {
    return a < b ? b : a;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
// round-to-nearest product and sum that the compiler may not fuse (g++ builds the emu without
// FMA contraction: the plain operations are these)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fma;
using std::isinf;
using std::isnan;
using std::log;
using std::sqrt;
using std::tanh;
