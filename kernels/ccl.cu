// ccl.cu: the conditioned contrastive loss's fused max-over-alignment similarity, its backward,
// row L2 normalisation, and the symmetric InfoNCE on top (f32).
//
// For every pair (a = text sample, b = image sample), S[t,v] = <t̂_at, v̂_bv> · mask[a,t] is built
// tile by tile in shared memory and reduced at once to running maxima over v (per t) and over t
// (per v); the B×B×L×N alignment tensor never exists. The argmaxes are kept ([B,B,L] and [B,B,N],
// no more than B(L+N)D while B <= D) so that the backward touches only the chosen pairs.
#include "common.cuh"

// x, y: [rows, d]; inv: [rows] = 1 / ||x|| (no epsilon: a zero row gives NaN, as officially)
struct L2NormParams {
    const float* x;
    float* y;
    float* inv;
    uint32_t rows;
    uint32_t d;
};
RECLMIS_PARAMS_SIZE(L2NormParams, 32);

// A warp per row; blockDim = (32, 8).
extern "C" __global__ void l2norm_fwd_f32(L2NormParams p) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < p.rows;
    const float* x = p.x + (uint64_t)(active ? row : 0) * p.d;
    float s = 0.f;
    for (uint32_t j = threadIdx.x; active && j < p.d; j += 32) s += x[j] * x[j];
    s = warp_sum(s);
    if (!active) return;
    // a zero (or underflowing) row stays 0 and gets no gradient (src/ops/ccl/mod.rs)
    const float inv = s == 0.f ? 0.f : 1.f / sqrtf(s);
    for (uint32_t j = threadIdx.x; j < p.d; j += 32) p.y[(uint64_t)row * p.d + j] = x[j] * inv;
    if (threadIdx.x == 0) p.inv[row] = inv;
}

// dx = inv · (dy − y <y, dy>); y: the forward output.
struct L2NormBwdParams {
    const float* y;
    const float* inv;
    const float* dy;
    float* dx;
    uint32_t rows;
    uint32_t d;
};
RECLMIS_PARAMS_SIZE(L2NormBwdParams, 40);

extern "C" __global__ void l2norm_bwd_f32(L2NormBwdParams p) {
    const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < p.rows;
    const uint64_t off = (uint64_t)(active ? row : 0) * p.d;
    float s = 0.f;
    for (uint32_t j = threadIdx.x; active && j < p.d; j += 32) s += p.y[off + j] * p.dy[off + j];
    s = warp_sum(s);
    if (!active) return;
    const float inv = p.inv[row];
    for (uint32_t j = threadIdx.x; j < p.d; j += 32) p.dx[off + j] = inv * (p.dy[off + j] - p.y[off + j] * s);
}

// t: [B,L,D] and v: [B,N,D], both already normalised; mask, tw: [B,L]; vw: [B,N]
// t2v, v2t, logits: [B,B] (row a = text, column b = image)
// max_v, arg_v: [B,B,L] (max over v of S[a,b,t,:]); max_t, arg_t: [B,B,N] (max over t)
struct CclParams {
    const float* t;
    const float* v;
    const float* mask;
    const float* tw;
    const float* vw;
    float* t2v;
    float* v2t;
    float* logits;
    float* max_v;
    int32_t* arg_v;
    float* max_t;
    int32_t* arg_t;
    uint32_t b;
    uint32_t l;
    uint32_t n;
    uint32_t d;
};
RECLMIS_PARAMS_SIZE(CclParams, 112);

#define CCL_LT 32  // t rows per tile
#define CCL_NT 64  // v columns per tile
#define CCL_DT 32  // depth per shared-memory stage

// grid = (B images, B texts), block = 256, dynamic shared memory = (L + N) · 8 bytes.
extern "C" __global__ void __launch_bounds__(256) ccl_fwd_f32(CclParams p) {
    extern __shared__ float running[];  // rmax[L], rarg[L], cmax[N], carg[N]
    __shared__ float ts[CCL_DT][CCL_LT + 1];
    __shared__ float vs[CCL_DT][CCL_NT + 1];
    __shared__ float st[CCL_LT][CCL_NT + 1];
    __shared__ float red[32];
    float* rmax = running;
    int32_t* rarg = (int32_t*)(running + p.l);
    float* cmax = running + 2 * p.l;
    int32_t* carg = (int32_t*)(running + 2 * p.l + p.n);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const uint32_t b = blockIdx.x, a = blockIdx.y;
    const float* ta = p.t + (uint64_t)a * p.l * p.d;
    const float* vb = p.v + (uint64_t)b * p.n * p.d;
    for (uint32_t i = tid; i < p.l; i += blockDim.x) rmax[i] = -RECLMIS_INF, rarg[i] = 0x7fffffff;
    for (uint32_t i = tid; i < p.n; i += blockDim.x) cmax[i] = -RECLMIS_INF, carg[i] = 0x7fffffff;
    for (uint32_t l0 = 0; l0 < p.l; l0 += CCL_LT) {
        for (uint32_t n0 = 0; n0 < p.n; n0 += CCL_NT) {
            // Thread (tx, ty) owns rows ty, ty + 16 and columns tx + 16 j of the tile.
            float acc[2][4] = {};
            for (uint32_t d0 = 0; d0 < p.d; d0 += CCL_DT) {
                __syncthreads();  // the previous stage (and the previous tile's maxima) are read
                for (int e = tid; e < CCL_LT * CCL_DT; e += blockDim.x) {
                    const uint32_t i = e / CCL_DT, k = e % CCL_DT;
                    ts[k][i] = (l0 + i < p.l && d0 + k < p.d) ? ta[(uint64_t)(l0 + i) * p.d + d0 + k] : 0.f;
                }
                for (int e = tid; e < CCL_NT * CCL_DT; e += blockDim.x) {
                    const uint32_t j = e / CCL_DT, k = e % CCL_DT;
                    vs[k][j] = (n0 + j < p.n && d0 + k < p.d) ? vb[(uint64_t)(n0 + j) * p.d + d0 + k] : 0.f;
                }
                __syncthreads();
#pragma unroll 8
                for (int k = 0; k < CCL_DT; ++k) {
                    const float a0 = ts[k][ty], a1 = ts[k][ty + 16];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float bv = vs[k][tx + 16 * j];
                        acc[0][j] = fmaf(a0, bv, acc[0][j]);
                        acc[1][j] = fmaf(a1, bv, acc[1][j]);
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const uint32_t r = ty + 16 * i;
                const float m = l0 + r < p.l ? p.mask[(uint64_t)a * p.l + l0 + r] : 0.f;
#pragma unroll
                for (int j = 0; j < 4; ++j) st[r][tx + 16 * j] = acc[i][j] * m;
            }
            __syncthreads();
            // Running maxima: threads 0..31 walk a row each, threads 64..127 a column each.
            // Tiles arrive in increasing index order, so "strictly better" keeps the lowest index.
            const uint32_t nl = min(CCL_LT, p.l - l0), nn = min(CCL_NT, p.n - n0);
            if (tid < CCL_LT && (uint32_t)tid < nl) {
                float best = rmax[l0 + tid];
                int32_t bi = rarg[l0 + tid];
                for (uint32_t c = 0; c < nn; ++c)
                    if (max_better(st[tid][c], (int32_t)(n0 + c), best, bi)) best = st[tid][c], bi = (int32_t)(n0 + c);
                rmax[l0 + tid] = best;
                rarg[l0 + tid] = bi;
            } else if (tid >= 64 && (uint32_t)(tid - 64) < nn) {
                const int c = tid - 64;
                float best = cmax[n0 + c];
                int32_t bi = carg[n0 + c];
                for (uint32_t r = 0; r < nl; ++r)
                    if (max_better(st[r][c], (int32_t)(l0 + r), best, bi)) best = st[r][c], bi = (int32_t)(l0 + r);
                cmax[n0 + c] = best;
                carg[n0 + c] = bi;
            }
        }
    }
    __syncthreads();
    const uint64_t pair = (uint64_t)a * p.b + b;
    float s1 = 0.f, s2 = 0.f;
    for (uint32_t i = tid; i < p.l; i += blockDim.x) {
        s1 += p.tw[(uint64_t)a * p.l + i] * rmax[i];
        p.max_v[pair * p.l + i] = rmax[i];
        p.arg_v[pair * p.l + i] = rarg[i];
    }
    for (uint32_t i = tid; i < p.n; i += blockDim.x) {
        s2 += p.vw[(uint64_t)b * p.n + i] * cmax[i];
        p.max_t[pair * p.n + i] = cmax[i];
        p.arg_t[pair * p.n + i] = carg[i];
    }
    s1 = block_sum(s1, red);
    s2 = block_sum(s2, red);
    if (tid == 0) {
        p.t2v[pair] = s1;
        p.v2t[pair] = s2;
        p.logits[pair] = 0.5f * (s1 + s2);
    }
}

// Backward. d_t2v, d_v2t: [B,B]; dt: [B,L,D], dv: [B,N,D] (gradients w.r.t. the normalised
// inputs); dtw: [B,L]; dvw: [B,N]. The gradient of each max goes to its argmax only.
struct CclBwdParams {
    const float* t;
    const float* v;
    const float* mask;
    const float* tw;
    const float* vw;
    const float* d_t2v;
    const float* d_v2t;
    const float* max_v;
    const int32_t* arg_v;
    const float* max_t;
    const int32_t* arg_t;
    float* dt;
    float* dv;
    float* dtw;
    float* dvw;
    uint32_t b;
    uint32_t l;
    uint32_t n;
    uint32_t d;
};
RECLMIS_PARAMS_SIZE(CclBwdParams, 136);

#define CCL_BWD_D 64   // columns of D per block (one per thread)
#define CCL_BWD_NV 64  // image tokens per block in the image-side kernel

// grid = (ceil(D/64), B texts), block = 64, dynamic shared memory = L · 64 floats.
// Thread k owns column d0 + k of every row of dt[a], so the accumulation needs no atomics and is
// deterministic.
extern "C" __global__ void ccl_text_bwd_f32(CclBwdParams p) {
    extern __shared__ float acc[];  // [L][64]
    const uint32_t a = blockIdx.y, k = threadIdx.x, col = blockIdx.x * CCL_BWD_D + k;
    const bool live = col < p.d;
    for (uint32_t t = 0; t < p.l; ++t) acc[t * CCL_BWD_D + k] = 0.f;
    for (uint32_t b = 0; b < p.b; ++b) {
        const uint64_t pair = (uint64_t)a * p.b + b;
        const float g1 = p.d_t2v[pair], g2 = p.d_v2t[pair];
        const float* vb = p.v + (uint64_t)b * p.n * p.d;
        for (uint32_t t = 0; t < p.l; ++t) {
            const float c = g1 * p.tw[(uint64_t)a * p.l + t] * p.mask[(uint64_t)a * p.l + t];
            const uint32_t vi = (uint32_t)p.arg_v[pair * p.l + t];
            if (live) acc[t * CCL_BWD_D + k] += c * vb[(uint64_t)vi * p.d + col];
        }
        for (uint32_t vi = 0; vi < p.n; ++vi) {
            const uint32_t t = (uint32_t)p.arg_t[pair * p.n + vi];
            const float c = g2 * p.vw[(uint64_t)b * p.n + vi] * p.mask[(uint64_t)a * p.l + t];
            if (live) acc[t * CCL_BWD_D + k] += c * vb[(uint64_t)vi * p.d + col];
        }
    }
    if (live)
        for (uint32_t t = 0; t < p.l; ++t) p.dt[((uint64_t)a * p.l + t) * p.d + col] = acc[t * CCL_BWD_D + k];
    if (blockIdx.x == 0)
        for (uint32_t t = k; t < p.l; t += blockDim.x) {
            float s = 0.f;
            for (uint32_t b = 0; b < p.b; ++b)
                s += p.d_t2v[(uint64_t)a * p.b + b] * p.max_v[((uint64_t)a * p.b + b) * p.l + t];
            p.dtw[(uint64_t)a * p.l + t] = s;
        }
}

// grid = (ceil(D/64), ceil(N/64), B images), block = 64, dynamic shared memory = 64 · 64 floats.
extern "C" __global__ void ccl_image_bwd_f32(CclBwdParams p) {
    extern __shared__ float acc[];  // [64 tokens][64 columns]
    const uint32_t b = blockIdx.z, n0 = blockIdx.y * CCL_BWD_NV, k = threadIdx.x, col = blockIdx.x * CCL_BWD_D + k;
    const uint32_t n1 = min(p.n, n0 + CCL_BWD_NV);
    const bool live = col < p.d;
    for (uint32_t i = 0; i < CCL_BWD_NV; ++i) acc[i * CCL_BWD_D + k] = 0.f;
    for (uint32_t a = 0; a < p.b; ++a) {
        const uint64_t pair = (uint64_t)a * p.b + b;
        const float g1 = p.d_t2v[pair], g2 = p.d_v2t[pair];
        const float* ta = p.t + (uint64_t)a * p.l * p.d;
        for (uint32_t t = 0; t < p.l; ++t) {
            const uint32_t vi = (uint32_t)p.arg_v[pair * p.l + t];
            if (vi < n0 || vi >= n1) continue;
            const float c = g1 * p.tw[(uint64_t)a * p.l + t] * p.mask[(uint64_t)a * p.l + t];
            if (live) acc[(vi - n0) * CCL_BWD_D + k] += c * ta[(uint64_t)t * p.d + col];
        }
        for (uint32_t vi = n0; vi < n1; ++vi) {
            const uint32_t t = (uint32_t)p.arg_t[pair * p.n + vi];
            const float c = g2 * p.vw[(uint64_t)b * p.n + vi] * p.mask[(uint64_t)a * p.l + t];
            if (live) acc[(vi - n0) * CCL_BWD_D + k] += c * ta[(uint64_t)t * p.d + col];
        }
    }
    if (live)
        for (uint32_t vi = n0; vi < n1; ++vi) p.dv[((uint64_t)b * p.n + vi) * p.d + col] = acc[(vi - n0) * CCL_BWD_D + k];
    if (blockIdx.x == 0)
        for (uint32_t vi = n0 + k; vi < n1; vi += blockDim.x) {
            float s = 0.f;
            for (uint32_t a = 0; a < p.b; ++a)
                s += p.d_v2t[(uint64_t)a * p.b + b] * p.max_t[((uint64_t)a * p.b + b) * p.n + vi];
            p.dvw[(uint64_t)b * p.n + vi] = s;
        }
}

// logits: [B,B]; loss: [3] = (½(CE_rows + CE_cols), CE_rows, CE_cols) of s·logits with diagonal
// targets; dlogits: [B,B] = d loss[0] / d logits. One block: B is the batch size (tens).
struct InfoNceParams {
    const float* logits;
    float* loss;
    float* dlogits;
    float scale;
    uint32_t b;
};
RECLMIS_PARAMS_SIZE(InfoNceParams, 32);

extern "C" __global__ void infonce_fwd_f32(InfoNceParams p) {
    __shared__ float red[32];
    const uint32_t B = p.b;
    const float s = p.scale, g = 0.5f * s / (float)B;
    float ce_r = 0.f, ce_c = 0.f;
    // Saturation-safe, as cpu::info_nce (see there): the log-sum-exp adds the non-maximal terms
    // through log1pf, and the diagonal gradient is minus the sum of the other probabilities
    // (p_ii - 1 in f32 loses the digits that matter once p_ii is near 1, the usual case at s = 100).
    // Rows: thread i owns row i of dlogits.
    for (uint32_t i = threadIdx.x; i < B; i += blockDim.x) {
        const float* row = p.logits + (uint64_t)i * B;
        float m = -RECLMIS_INF, rest = 0.f;
        uint32_t k = 0;
        for (uint32_t j = 0; j < B; ++j)
            if (s * row[j] > m) { m = s * row[j]; k = j; }
        for (uint32_t j = 0; j < B; ++j)
            if (j != k) rest += expf(s * row[j] - m);
        const float lse = m + log1pf(rest);
        ce_r += (m - s * row[i]) + log1pf(rest);
        float off = 0.f;
        for (uint32_t j = 0; j < B; ++j) {
            if (j == i) continue;
            const float pj = expf(s * row[j] - lse);
            off += pj;
            p.dlogits[(uint64_t)i * B + j] = g * pj;
        }
        p.dlogits[(uint64_t)i * B + i] = -g * off;
    }
    __syncthreads();  // the column pass adds to elements the row pass of other threads wrote
    for (uint32_t j = threadIdx.x; j < B; j += blockDim.x) {
        float m = -RECLMIS_INF, rest = 0.f;
        uint32_t k = 0;
        for (uint32_t i = 0; i < B; ++i) {
            const float x = s * p.logits[(uint64_t)i * B + j];
            if (x > m) { m = x; k = i; }
        }
        for (uint32_t i = 0; i < B; ++i)
            if (i != k) rest += expf(s * p.logits[(uint64_t)i * B + j] - m);
        const float lse = m + log1pf(rest);
        ce_c += (m - s * p.logits[(uint64_t)j * B + j]) + log1pf(rest);
        float off = 0.f;
        for (uint32_t i = 0; i < B; ++i) {
            if (i == j) continue;
            const float pi = expf(s * p.logits[(uint64_t)i * B + j] - lse);
            off += pi;
            p.dlogits[(uint64_t)i * B + j] += g * pi;
        }
        p.dlogits[(uint64_t)j * B + j] -= g * off;
    }
    ce_r = block_sum(ce_r, red);
    ce_c = block_sum(ce_c, red);
    if (threadIdx.x == 0) {
        p.loss[0] = 0.5f * (ce_r + ce_c) / (float)B;
        p.loss[1] = ce_r / (float)B;
        p.loss[2] = ce_c / (float)B;
    }
}
