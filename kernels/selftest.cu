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

// ---- cp.async and ldmatrix, as tests/emu_pipeline.rs checks them (and, on a GPU, against the
// hardware). x: a 16 x 16 matrix of 16-bit values, row-major (32 chunks of 16 bytes); block = 64
// threads, one block; dynamic shared memory: 16 rows of `row_bytes` (32 or 48: 48 spreads the
// rows of an ldmatrix phase over every bank). Warp 1 copies the matrix into shared memory with
// cp.async of `piece` bytes (4, 8 or 16), rows 0-7 as one group and rows 8-15 as a second; chunks
// from `valid_chunks` on are zero-filled (src-size 0) instead of read. Then warp 0 loads the four
// 8x8 quadrants with ldmatrix (x4, x4.trans, x2, x2.trans, x1, x1.trans) and writes each lane's
// registers to y: [32 lanes][14] u32. Quadrant i (lanes 8i..8i+7 give its rows): rows
// 8 (i % 2) + l % 8, columns 8 (i / 2)...
#define PIPE_OK 0
#define PIPE_WEAK_WAIT 1  // waits with one group still in flight: rows 8-15 are not there yet
#define PIPE_NO_WAIT 2    // never waits: the copies are still in flight when the threads exit
#define PIPE_NO_BARRIER 3 // warp 1 waits, but warp 0 reads without a __syncthreads after the wait
struct PipeSelftestParams {
    const uint16_t* x;
    uint32_t* y;
    uint32_t mode;
    uint32_t piece;
    uint32_t valid_chunks;
    uint32_t row_bytes;
};
RECLMIS_PARAMS_SIZE(PipeSelftestParams, 32);

extern "C" __global__ void __launch_bounds__(64) selftest_pipe_fwd_bf16(PipeSelftestParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (warp == 1) {
        for (int group = 0; group < 2; ++group) {
            // 16 chunks of 16 bytes per group (8 rows x 2), lane l takes chunk l % 16 of the group
            const int chunk = group * 16 + lane % 16, row = chunk / 2, half = chunk % 2;
            const bool valid = chunk < (int)p.valid_chunks;
            const unsigned char* src = reinterpret_cast<const unsigned char*>(p.x) + chunk * 16;
            unsigned char* dst = smem + row * p.row_bytes + half * 16;
            if (lane < 16) {
                if (p.piece == 16) {
                    cp_async16(dst, valid ? src : reinterpret_cast<const unsigned char*>(p.x), valid);
                } else if (p.piece == 8) {
                    for (int o = 0; o < 16; o += 8) cp_async_small<8>(dst + o, src + o, valid);
                } else {
                    for (int o = 0; o < 16; o += 4) cp_async_small<4>(dst + o, src + o, valid);
                }
            }
            cp_async_commit();
        }
        if (p.mode == PIPE_WEAK_WAIT) cp_async_wait<1>();
        else if (p.mode != PIPE_NO_WAIT) cp_async_wait<0>();
    }
    if (p.mode != PIPE_NO_BARRIER) __syncthreads();
    if (warp == 0) {
        const int q = lane / 8;
        const unsigned char* row = smem + (8 * (q % 2) + lane % 8) * p.row_bytes + (q / 2) * 16;
        uint32_t r4[4], t4[4], r2[2], t2[2], r1[1], t1[1];
        ldmatrix_x4(r4, row);
        ldmatrix_x4_trans(t4, row);
        ldmatrix_x2(r2, row);
        ldmatrix_x2_trans(t2, row);
        ldmatrix_x1(r1, row);
        ldmatrix_x1_trans(t1, row);
        const uint32_t out[14] = {r4[0], r4[1], r4[2], r4[3], t4[0], t4[1], t4[2], t4[3], r2[0], r2[1], t2[0], t2[1],
                                  r1[0], t1[0]};
        for (int i = 0; i < 14; ++i) p.y[lane * 14 + i] = out[i];
    }
    __syncthreads();  // warp 0 has read everything before the weak-wait mode retires the rest
    if (warp == 1 && p.mode == PIPE_WEAK_WAIT) cp_async_wait<0>();
}
