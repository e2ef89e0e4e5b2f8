// loss.cu: segmentation loss (soft Dice + BCE from logits, sigmoid fused), evaluation metrics
// (hard Dice, IoU), and mean squared error, forward and backward (f32).
//
// Per-sample sums are made in two steps so that a large mask uses the whole GPU: each block
// reduces one chunk of one sample to partial sums, then one small block finishes every sample.
// Both steps have a fixed shape, so the result does not depend on scheduling.
#include "common.cuh"

#define SEG_DICE_BCE 0  // x = logits: sums (Σ p·g, Σ p², Σ g², Σ bce) with p = σ(x)
#define SEG_METRICS 1   // x = probabilities: sums (Σ g·ŷ, Σ g, Σ ŷ, Σ g∨ŷ) with ŷ = x > 0.5

// −log σ(z) clamped like the official BCE of probabilities (log p >= −100), computed without
// forming p: softplus(−z) = max(−z, 0) + log1p(exp(−|z|)).
__device__ __forceinline__ float neg_log_sigmoid(float z) {
    return fminf(fmaxf(-z, 0.f) + log1pf(expf(-fabsf(z))), 100.f);
}

// x, g: [B, P]; partial: [B, chunks, 4]
struct SegPartialParams {
    const float* x;
    const float* g;
    float* partial;
    uint32_t b;
    uint32_t p;
    uint32_t chunks;
    uint32_t mode;
};
RECLMIS_PARAMS_SIZE(SegPartialParams, 40);

// grid = (chunks, B), block = 256
extern "C" __global__ void seg_partial_fwd_f32(SegPartialParams p) {
    __shared__ float red[32];
    const uint32_t c = blockIdx.x, b = blockIdx.y;
    const uint32_t per = (p.p + p.chunks - 1) / p.chunks;
    const uint32_t lo = c * per, hi = min(p.p, lo + per);
    const float* x = p.x + (uint64_t)b * p.p;
    const float* g = p.g + (uint64_t)b * p.p;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (uint32_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float z = x[i], t = g[i];
        if (p.mode == SEG_DICE_BCE) {
            const float q = 1.f / (1.f + expf(-z));
            s0 += q * t;
            s1 += q * q;
            s2 += t * t;
            s3 += t * neg_log_sigmoid(z) + (1.f - t) * neg_log_sigmoid(-z);
        } else {
            const float y = z > 0.5f ? 1.f : 0.f;
            s0 += t * y;
            s1 += t;
            s2 += y;
            s3 += fmaxf(t, y);
        }
    }
    s0 = block_sum(s0, red);
    s1 = block_sum(s1, red);
    s2 = block_sum(s2, red);
    s3 = block_sum(s3, red);
    if (threadIdx.x == 0) {
        float* out = p.partial + ((uint64_t)b * p.chunks + c) * 4;
        out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
    }
}

// partial: [B, chunks, 4] -> per_sample: [B, 4]; loss: [3]
//   dice/bce: per_sample = (I, U, dice_b, bce_sum_b) with I = ¼Σpg, U = ¼(Σp² + Σg²) (the
//             official 0.5 weights multiply p and g), dice_b = 1 − (2I + 1e-5)/(U + 1e-5);
//             loss = (mean dice_b, Σ bce / (B·P), ½ dice + ½ bce)
//   metrics:  per_sample = (dice_b, iou_b, hard_dice_b, 0): dice_b = 2Σgŷ/(Σg + Σŷ + 1e-5),
//             iou_b = Σg∧ŷ / Σg∨ŷ (0 when both are empty), hard_dice_b = 1 − the training Dice
//             loss of ŷ; loss = the three means
struct SegFinalParams {
    const float* partial;
    float* per_sample;
    float* loss;
    uint32_t b;
    uint32_t chunks;
    uint32_t p;
    uint32_t mode;
};
RECLMIS_PARAMS_SIZE(SegFinalParams, 40);

// One block of 256 threads; thread i finishes samples i, i + 256, ...
extern "C" __global__ void seg_final_fwd_f32(SegFinalParams p) {
    __shared__ float red[32];
    float m0 = 0.f, m1 = 0.f, m2 = 0.f;
    for (uint32_t b = threadIdx.x; b < p.b; b += blockDim.x) {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        for (uint32_t c = 0; c < p.chunks; ++c)
            for (int k = 0; k < 4; ++k) s[k] += p.partial[((uint64_t)b * p.chunks + c) * 4 + k];
        float* o = p.per_sample + (uint64_t)b * 4;
        if (p.mode == SEG_DICE_BCE) {
            const float inter = 0.25f * s[0], uni = 0.25f * (s[1] + s[2]);
            const float dice = 1.f - (2.f * inter + 1e-5f) / (uni + 1e-5f);
            o[0] = inter, o[1] = uni, o[2] = dice, o[3] = s[3];
            m0 += dice;
            m1 += s[3];
        } else {
            const float dice = 2.f * s[0] / (s[1] + s[2] + 1e-5f);
            const float iou = s[3] > 0.f ? s[0] / s[3] : 0.f;
            const float hard = (0.5f * s[0] + 1e-5f) / (0.25f * (s[1] + s[2]) + 1e-5f);
            o[0] = dice, o[1] = iou, o[2] = hard, o[3] = 0.f;
            m0 += dice;
            m1 += iou;
            m2 += hard;
        }
    }
    m0 = block_sum(m0, red);
    m1 = block_sum(m1, red);
    m2 = block_sum(m2, red);
    if (threadIdx.x == 0) {
        const float nb = (float)p.b;
        if (p.mode == SEG_DICE_BCE) {
            const float dice = m0 / nb, bce = m1 / (nb * (float)p.p);
            p.loss[0] = dice, p.loss[1] = bce, p.loss[2] = 0.5f * dice + 0.5f * bce;
        } else {
            p.loss[0] = m0 / nb, p.loss[1] = m1 / nb, p.loss[2] = m2 / nb;
        }
    }
}

// dx = scale · d(½ dice + ½ bce)/dx for logits x [B,P], targets g [B,P], per_sample from the
// forward. The clamp of the official log at −100 has zero derivative where it is active.
struct DiceBceBwdParams {
    const float* x;
    const float* g;
    const float* per_sample;
    float* dx;
    uint32_t b;
    uint32_t p;
    float scale;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(DiceBceBwdParams, 48);

extern "C" __global__ void dicebce_bwd_f32(DiceBceBwdParams p) {
    const uint64_t total = (uint64_t)p.b * p.p;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const float wd = 0.5f * p.scale / (float)p.b, wb = 0.5f * p.scale / ((float)p.b * (float)p.p);
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const uint64_t b = i / p.p;
        const float z = p.x[i], t = p.g[i];
        // 1 − q as σ(−z): forming it from q would cancel to a few bits for large z
        const float q = 1.f / (1.f + expf(-z)), qn = 1.f / (1.f + expf(z));
        const float inter = p.per_sample[b * 4], den = p.per_sample[b * 4 + 1] + 1e-5f;
        // d dice_b / d q = −[½ t (U + ε) − (2I + ε) · ½ q] / (U + ε)²
        const float dq = -(0.5f * t * den - (2.f * inter + 1e-5f) * 0.5f * q) / (den * den);
        const float ddice = dq * q * qn;
        // d bce / d z = −t (1 − q) + (1 − t) q where the log is not clamped
        const float dpos = neg_log_sigmoid(z) < 100.f ? -qn : 0.f;
        const float dneg = neg_log_sigmoid(-z) < 100.f ? q : 0.f;
        p.dx[i] = wd * ddice + wb * (t * dpos + (1.f - t) * dneg);
    }
}

// x, y: [n]; partial: [gridDim.x] = Σ (x − y)² over each block's share (grid-stride)
struct MseParams {
    const float* x;
    const float* y;
    float* partial;
    uint64_t n;
};
RECLMIS_PARAMS_SIZE(MseParams, 32);

extern "C" __global__ void mse_fwd_f32(MseParams p) {
    __shared__ float red[32];
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    float s = 0.f;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float e = p.x[i] - p.y[i];
        s += e * e;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}

// dx = scale · 2 (x − y) / n and dy = −dx (dy may be null: a fixed target)
struct MseBwdParams {
    const float* x;
    const float* y;
    float* dx;
    float* dy;
    uint64_t n;
    float scale;
    uint32_t pad;
};
RECLMIS_PARAMS_SIZE(MseBwdParams, 48);

extern "C" __global__ void mse_bwd_f32(MseBwdParams p) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const float k = 2.f * p.scale / (float)p.n;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float d = k * (p.x[i] - p.y[i]);
        p.dx[i] = d;
        if (p.dy) p.dy[i] = -d;
    }
}
