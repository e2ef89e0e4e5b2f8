// plam.cu: the PLAM skip gate of the official U-Net decoder, per pixel, after its two 1×1
// convolutions (A = conv_avg(s), M = conv_max(s), done as GEMMs by the conv op):
//   a = mean_c ReLU(A),  m = max_c ReLU(M),  f = [a, m, a + m],
//   g = W2 · ReLU(W1 · f + b1) + b2   (Linear 3→6, ReLU, Linear 6→1; no sigmoid, as officially),
//   out = g · s   (broadcast over channels).
// One thread per pixel; the channel loops read [B, C, HW] coalesced across neighbouring pixels.
// `_f32` kernels read and write f32 tensors; `_bf16` ones (bf16 autocast) read a, m, s and dout
// and write out, dA and dM as bf16 bits (widened exactly, math in f32, each store rounded once);
// g, the argmax and the parameter gradients stay f32 / i32 in both.
#include "common.cuh"
#include "storage.cuh"

// a_, m_, s, out, d*: [B, C, HW] (f32 or bf16 bits: the kernel's suffix; ds f32); g: [B, HW]; arg: [B, HW] (argmax of M over channels;
// ties to the lowest channel); fc1w [6,3], fc1b [6], fc2w [1,6], fc2b [1]. The backward's da and
// dm may be a_ and m_ themselves (no restrict): each thread reads its pixel's a_ and m_ before it
// writes that pixel's gradients, element by element.
struct PlamParams {
    const void* a_;
    const void* m_;
    const void* s;
    const float* fc1w;
    const float* fc1b;
    const float* fc2w;
    const float* fc2b;
    const void* dout;
    void* out;
    float* g;
    int32_t* arg;
    float* ds;  // the direct path g·dout (f32 kernel only; the bf16 backward sums it in plam_gate_ds_bwd_bf16)
    void* da;
    void* dm;
    float* fcgrad;  // [blocks, 31]: dfc1w (18), dfc1b (6), dfc2w (6), dfc2b (1)
    uint32_t b;
    uint32_t c;
    uint32_t hw;
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(PlamParams, 136);

// Gate features of one pixel: a, m and the argmax channel of M.
template <bool BF16>
__device__ __forceinline__ void plam_features(const PlamParams& p, uint64_t base, float& a, float& m, int32_t& arg) {
    a = 0.f;
    m = -RECLMIS_INF;
    arg = 0x7fffffff;
    for (uint32_t c = 0; c < p.c; ++c) {
        const uint64_t e = base + (uint64_t)c * p.hw;
        a += fmaxf(load_f32<BF16>(p.a_, e), 0.f);
        const float v = fmaxf(load_f32<BF16>(p.m_, e), 0.f);
        if (max_better(v, (int32_t)c, m, arg)) m = v, arg = (int32_t)c;
    }
    a /= (float)p.c;
}

// grid-stride over the B·HW pixels
template <bool BF16>
__device__ __forceinline__ void plam_gate_fwd(const PlamParams& p) {
    const uint64_t n = (uint64_t)p.b * p.hw;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t q = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride) {
        const uint64_t base = (q / p.hw) * p.c * p.hw + q % p.hw;
        float a, m;
        int32_t arg;
        plam_features<BF16>(p, base, a, m, arg);
        const float f[3] = {a, m, a + m};
        float g = p.fc2b[0];
        for (int j = 0; j < 6; ++j) {
            const float z = p.fc1w[j * 3] * f[0] + p.fc1w[j * 3 + 1] * f[1] + p.fc1w[j * 3 + 2] * f[2] + p.fc1b[j];
            g += p.fc2w[j] * fmaxf(z, 0.f);
        }
        p.g[q] = g;
        p.arg[q] = arg;
        for (uint32_t c = 0; c < p.c; ++c) {
            const uint64_t e = base + (uint64_t)c * p.hw;
            store_f32<BF16>(p.out, e, g * load_f32<BF16>(p.s, e));
        }
    }
}
extern "C" __global__ void plam_gate_fwd_f32(PlamParams p) { plam_gate_fwd<false>(p); }
extern "C" __global__ void plam_gate_fwd_bf16(PlamParams p) { plam_gate_fwd<true>(p); }

// Backward: ds = g·dout (the direct path, f32 kernel; the host adds the 1×1 convolutions' input
// gradients), dA = (da / C)·[A > 0], dM = dm·[c = argmax]·[M > 0], and per block the 31
// gate-parameter gradient sums. grid-stride over pixels; block = 256.
template <bool BF16>
__device__ __forceinline__ void plam_gate_bwd(const PlamParams& p) {
    __shared__ float red[32];
    const uint64_t n = (uint64_t)p.b * p.hw;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    float acc[31];
    for (int k = 0; k < 31; ++k) acc[k] = 0.f;
    for (uint64_t q = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride) {
        const uint64_t base = (q / p.hw) * p.c * p.hw + q % p.hw;
        float a, m;
        int32_t arg;
        plam_features<BF16>(p, base, a, m, arg);
        const float f[3] = {a, m, a + m};
        const float g = p.g[q];
        float dg = 0.f;
        for (uint32_t c = 0; c < p.c; ++c) {
            const uint64_t e = base + (uint64_t)c * p.hw;
            const float d = load_f32<BF16>(p.dout, e);
            dg += d * load_f32<BF16>(p.s, e);
            if (!BF16) p.ds[e] = g * d;
        }
        float df[3] = {0.f, 0.f, 0.f};
        for (int j = 0; j < 6; ++j) {
            const float z = p.fc1w[j * 3] * f[0] + p.fc1w[j * 3 + 1] * f[1] + p.fc1w[j * 3 + 2] * f[2] + p.fc1b[j];
            const float h = fmaxf(z, 0.f);
            acc[24 + j] += dg * h;  // dfc2w
            const float dz = z > 0.f ? dg * p.fc2w[j] : 0.f;
            for (int i = 0; i < 3; ++i) {
                acc[j * 3 + i] += dz * f[i];  // dfc1w
                df[i] += dz * p.fc1w[j * 3 + i];
            }
            acc[18 + j] += dz;  // dfc1b
        }
        acc[30] += dg;  // dfc2b
        const float da = (df[0] + df[2]) / (float)p.c, dmv = df[1] + df[2];
        for (uint32_t c = 0; c < p.c; ++c) {
            const uint64_t e = base + (uint64_t)c * p.hw;
            const float av = load_f32<BF16>(p.a_, e), mv = load_f32<BF16>(p.m_, e);
            store_f32<BF16>(p.da, e, av > 0.f ? da : 0.f);
            store_f32<BF16>(p.dm, e, ((int32_t)c == arg && mv > 0.f) ? dmv : 0.f);
        }
    }
    for (int k = 0; k < 31; ++k) {
        const float v = block_sum(acc[k], red);
        if (threadIdx.x == 0) p.fcgrad[(uint64_t)blockIdx.x * 31 + k] = v;
    }
}
extern "C" __global__ void plam_gate_bwd_f32(PlamParams p) { plam_gate_bwd<false>(p); }
extern "C" __global__ void plam_gate_bwd_bf16(PlamParams p) { plam_gate_bwd<true>(p); }

// The bf16 backward's input gradient: ds = (g·dout + dxa) + dxm, the direct path and the two 1×1
// convolutions' input gradients (all bf16 bits but g), summed in f32 in this order (no fused
// multiply-add: the cpu computes the same bits) and rounded once. ds may be dxa (no restrict:
// each element is read before it is written). grid-stride over the B·C·HW elements.
struct PlamDsParams {
    const float* g;
    const uint16_t* dout;
    const uint16_t* dxa;
    const uint16_t* dxm;
    uint16_t* ds;
    uint64_t n;
    uint32_t c;
    uint32_t hw;
};
RECLMIS_PARAMS_SIZE(PlamDsParams, 56);

extern "C" __global__ void plam_gate_ds_bwd_bf16(PlamDsParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t e = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; e < p.n; e += stride) {
        const uint64_t q = e / ((uint64_t)p.c * p.hw) * p.hw + e % p.hw;
        const float direct = __fmul_rn(p.g[q], bf16_bits_to_f32(p.dout[e]));
        const float sum = __fadd_rn(__fadd_rn(direct, bf16_bits_to_f32(p.dxa[e])), bf16_bits_to_f32(p.dxm[e]));
        p.ds[e] = f32_to_bf16_bits(sum);
    }
}
