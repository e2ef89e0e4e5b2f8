// plam.cu: the PLAM skip gate of the official U-Net decoder, per pixel, after its two 1×1
// convolutions (A = conv_avg(s), M = conv_max(s), done as GEMMs by the conv op):
//   a = mean_c ReLU(A),  m = max_c ReLU(M),  f = [a, m, a + m],
//   g = W2 · ReLU(W1 · f + b1) + b2   (Linear 3→6, ReLU, Linear 6→1; no sigmoid, as officially),
//   out = g · s   (broadcast over channels).
// One thread per pixel; the channel loops read [B, C, HW] coalesced across neighbouring pixels.
#include "common.cuh"

// a_, m_, s, out, d*: [B, C, HW]; g, gm: [B, HW]; arg: [B, HW] (argmax of M over channels;
// ties to the lowest channel); fc1w [6,3], fc1b [6], fc2w [1,6], fc2b [1]. The backward's da and
// dm may be a_ and m_ themselves (no restrict): each thread reads its pixel's a_ and m_ before it
// writes that pixel's gradients, element by element.
struct PlamParams {
    const float* a_;
    const float* m_;
    const float* s;
    const float* fc1w;
    const float* fc1b;
    const float* fc2w;
    const float* fc2b;
    const float* dout;
    float* out;
    float* g;
    int32_t* arg;
    float* ds;
    float* da;
    float* dm;
    float* fcgrad;  // [blocks, 31]: dfc1w (18), dfc1b (6), dfc2w (6), dfc2b (1)
    uint32_t b;
    uint32_t c;
    uint32_t hw;
    uint32_t pad_;
};
RECLMIS_PARAMS_SIZE(PlamParams, 136);

// Gate features of one pixel: a, m and the argmax channel of M.
__device__ __forceinline__ void plam_features(const PlamParams& p, uint64_t base, float& a, float& m, int32_t& arg) {
    a = 0.f;
    m = -RECLMIS_INF;
    arg = 0x7fffffff;
    for (uint32_t c = 0; c < p.c; ++c) {
        const uint64_t e = base + (uint64_t)c * p.hw;
        a += fmaxf(p.a_[e], 0.f);
        const float v = fmaxf(p.m_[e], 0.f);
        if (max_better(v, (int32_t)c, m, arg)) m = v, arg = (int32_t)c;
    }
    a /= (float)p.c;
}

// grid-stride over the B·HW pixels
extern "C" __global__ void plam_gate_fwd_f32(PlamParams p) {
    const uint64_t n = (uint64_t)p.b * p.hw;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t q = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride) {
        const uint64_t base = (q / p.hw) * p.c * p.hw + q % p.hw;
        float a, m;
        int32_t arg;
        plam_features(p, base, a, m, arg);
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
            p.out[e] = g * p.s[e];
        }
    }
}

// Backward: ds = g·dout (the direct path; the host adds the 1×1 convolutions' input gradients),
// dA = (da / C)·[A > 0], dM = dm·[c = argmax]·[M > 0], and per block the 31 gate-parameter
// gradient sums. grid-stride over pixels; block = 256.
extern "C" __global__ void plam_gate_bwd_f32(PlamParams p) {
    __shared__ float red[32];
    const uint64_t n = (uint64_t)p.b * p.hw;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    float acc[31];
    for (int k = 0; k < 31; ++k) acc[k] = 0.f;
    for (uint64_t q = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride) {
        const uint64_t base = (q / p.hw) * p.c * p.hw + q % p.hw;
        float a, m;
        int32_t arg;
        plam_features(p, base, a, m, arg);
        const float f[3] = {a, m, a + m};
        const float g = p.g[q];
        float dg = 0.f;
        for (uint32_t c = 0; c < p.c; ++c) {
            const uint64_t e = base + (uint64_t)c * p.hw;
            dg += p.dout[e] * p.s[e];
            p.ds[e] = g * p.dout[e];
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
            p.da[e] = p.a_[e] > 0.f ? da : 0.f;
            p.dm[e] = ((int32_t)c == arg && p.m_[e] > 0.f) ? dmv : 0.f;
        }
    }
    for (int k = 0; k < 31; ++k) {
        const float v = block_sum(acc[k], red);
        if (threadIdx.x == 0) p.fcgrad[(uint64_t)blockIdx.x * 31 + k] = v;
    }
}
