// optim.cu: one fused Adam / AdamW update per parameter tensor (f32), as torch.optim computes it:
//   (AdamW) p ← p·(1 − lr·wd);  (Adam) g ← g + wd·p
//   m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / bc1) · m / (√v / √bc2 + eps),  bc_i = 1 − β_i^step
// The new p goes to a fresh buffer (tensors are immutable in the engine: caches key on their
// identity); m_out and v_out are m and v themselves when the optimiser owns its moments alone
// (optim::adam_update_owned), else fresh buffers. Each element is read before it is written, by
// one thread: one read of p, g, m, v and one write of each result.
#include "common.cuh"

// p, g, m, v, p_out, m_out, v_out: [n]
struct AdamParams {
    const float* p;
    const float* g;
    const float* m;
    const float* v;
    float* p_out;
    float* m_out;
    float* v_out;
    uint64_t n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float bc1;       // 1 − β1^step
    float bc2_sqrt;  // √(1 − β2^step)
    uint32_t decoupled;
};
RECLMIS_PARAMS_SIZE(AdamParams, 96);

extern "C" __global__ void adam_fwd_f32(AdamParams a) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += stride) {
        float p = a.p[i], g = a.g[i];
        if (a.decoupled) {
            p *= 1.0f - a.lr * a.weight_decay;
        } else {
            g += a.weight_decay * p;
        }
        const float m = a.beta1 * a.m[i] + (1.0f - a.beta1) * g;
        const float v = a.beta2 * a.v[i] + (1.0f - a.beta2) * g * g;
        const float denom = sqrtf(v) / a.bc2_sqrt + a.eps;
        a.p_out[i] = p - (a.lr / a.bc1) * m / denom;
        a.m_out[i] = m;
        a.v_out[i] = v;
    }
}
