// selftest.cu: one kernel with deliberate bugs selected by `mode`, used by tests/emu_checks.rs to
// prove that the emu device reports them. Mode 0 is a correct block sum; never launch the buggy
// modes on a GPU (a divergent barrier or a deadlock may hang it).
#include "common.cuh"

#define SELFTEST_OK 0
#define SELFTEST_MISSING_BARRIER 1  // race: the tree reads shared memory before all of it is written
#define SELFTEST_EARLY_EXIT 2       // half the block returns before a __syncthreads
#define SELFTEST_SPLIT_BARRIER 3    // two halves wait at different __syncthreads
#define SELFTEST_OOB 4              // writes one element past the end of y
#define SELFTEST_WARP_AFTER_EXIT 5  // a warp shuffle after half the warp returned
#define SELFTEST_DEADLOCK 6         // some lanes at a warp sync, the rest at a block barrier

// x: [n] (n <= blockDim.x), y: [1] = sum(x); blockDim.x a power of two, one block,
// dynamic shared memory: blockDim.x floats
struct SelftestParams {
    const float* x;
    float* y;
    uint32_t n;
    uint32_t mode;
};
RECLMIS_PARAMS_SIZE(SelftestParams, 24);

extern "C" __global__ void selftest_fwd_f32(SelftestParams p) {
    extern __shared__ float s[];
    const int t = threadIdx.x;
    if (p.mode == SELFTEST_EARLY_EXIT && t >= (int)blockDim.x / 2) return;
    s[t] = t < (int)p.n ? p.x[t] : 0.f;
    if (p.mode == SELFTEST_SPLIT_BARRIER && t < (int)blockDim.x / 2) {
        __syncthreads();
    } else if (p.mode != SELFTEST_MISSING_BARRIER) {
        __syncthreads();
    }
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (p.mode == SELFTEST_WARP_AFTER_EXIT) {
        if ((t & 31) >= 16) return;
        s[t] = warp_sum(s[t]);
    }
    if (p.mode == SELFTEST_DEADLOCK) {
        if ((t & 31) < 16) __syncwarp();
        else __syncthreads();
    }
    if (t == 0) p.y[p.mode == SELFTEST_OOB ? 1 : 0] = s[0];
}

// x: [n], y: [1]. Keeps a 64 KiB local array, more than the emu's 48 KiB fiber stack, so that
// tests/emu_checks.rs can prove a stack overflow is a launch error rather than silent corruption of
// a neighbour's stack. Never launch it on a GPU: 64 KiB of local memory per thread is legal there
// but wasteful, and it proves nothing.
extern "C" __global__ void selftest_stack_fwd_f32(SelftestParams p) {
    volatile float big[16384];
    for (int i = 0; i < 16384; ++i) big[i] = i < (int)p.n ? p.x[i] : 0.f;
    float s = 0.f;
    for (int i = 0; i < 16384; ++i) s += big[i];
    if (threadIdx.x == 0) p.y[0] = s;
}
