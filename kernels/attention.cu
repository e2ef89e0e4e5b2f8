// attention.cu: fused multi-head attention, forward and backward (FlashAttention-2 scheme).
//
// q [B,Tq,E], k, v [B,S,E], o [B,Tq,E] with E = H·Dh (head h = columns h·Dh..); lse [B,H,Tq].
// Every product is done per warp on 16-row tiles in the mma.m16n8k8 fragment layout (see
// common.cuh): with tc != 0 on tensor cores (tf32 operands), else by exact f32 FMAs that produce
// the same fragments, so the softmax code is shared. Keys come in tiles of 16; the online softmax
// keeps a running max and sum per query row, so the Tq×S score matrix never leaves the SM.
//
// Logit of (i, j): t = scale·⟨q_i, k_j⟩; z = t·kw_j + kb_j, where kb_j = ln(w_j + 1e-10) under the
// official condition (= multiplying the probabilities by w + 1e-10 and renormalising), kw_j = w_j
// under the paper's condition, and kb_j = −inf for invalid or out-of-range keys; −inf when
// causal and j > i. Rows with no key get o = 0, lse = −inf, and zero gradients.
//
// Head dims are padded (zeros) to DP ∈ {16, 32, 64, 128}; the warps per block are chosen per DP
// so that the tiles fit in 48 KiB of static shared memory (mirrored in src/ops/attention/mod.rs).
#include "common.cuh"

struct AttnParams {
    const float* q;
    const float* k;
    const float* v;
    float* o;       // forward output; in the backward, the forward's output (read)
    float* lse;     // forward output; in the backward, read
    const float* w;         // [B,S] condition weights, or null
    const int32_t* valid;   // [B,S] nonzero = key taken, or null
    const float* dout;      // [B,Tq,E]
    float* delta;           // [B,H,Tq]: Σ_d dO·O
    float* dq;
    float* dk;
    float* dv;
    float* dw;      // [B,H,S] per-head partial dw, or null
    float* probs;   // [B,H,Tq,S], or null
    uint32_t b, h, tq, s, dh, e;
    float scale;
    uint32_t causal;
    uint32_t cond;  // ATTN_COND_*
    uint32_t tc;
};
RECLMIS_PARAMS_SIZE(AttnParams, 152);

#define ATTN_COND_NONE 0
#define ATTN_COND_PROBS 1
#define ATTN_COND_LOGITS 2
#define ATTN_COND_EPS 1e-10f
#define ATTN_BC 16         // keys per tile
#define ATTN_LDP (ATTN_BC + 4)  // row stride of the per-warp 16x16 probability tiles

__host__ __device__ constexpr int attn_fwd_warps(int dp) { return dp == 128 ? 2 : 4; }
__host__ __device__ constexpr int attn_bwd_warps(int dp) { return dp == 128 ? 1 : (dp == 64 ? 2 : 4); }

// acc[NT][4] += A (16 x K) · B (K x 8·NT) for one warp, in the mma fragment layout:
// acc[nt][c] is row g + 8·(c/2), column 8·nt + 2t + c%2 (g = lane/4, t = lane%4).
// a(r, k) and b(k, n) read shared memory; K is a multiple of 8.
template <bool TC, int NT, int K, class FA, class FB>
__device__ __forceinline__ void warp_tile(float (*acc)[4], FA a, FB b) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 2
    for (int k = 0; k < K; k += 8) {
        if constexpr (TC) {
            const uint32_t af[4] = {f32_to_tf32(a(g, k + t)), f32_to_tf32(a(g + 8, k + t)),
                                    f32_to_tf32(a(g, k + t + 4)), f32_to_tf32(a(g + 8, k + t + 4))};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const uint32_t bf[2] = {f32_to_tf32(b(k + t, 8 * nt + g)), f32_to_tf32(b(k + t + 4, 8 * nt + g))};
                mma_m16n8k8_tf32(acc[nt], af, bf, acc[nt]);
            }
        } else {
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const float a0 = a(g, k + kk), a1 = a(g + 8, k + kk);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const float b0 = b(k + kk, 8 * nt + 2 * t), b1 = b(k + kk, 8 * nt + 2 * t + 1);
                    acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
                    acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
                    acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
                    acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
                }
            }
        }
    }
}

// Rows r0.. r0+R of head h of x [B,T,E] into dst[R][LD], zero outside T and Dh.
template <int DP, int LD>
__device__ __forceinline__ void load_rows(float* dst, const float* x, const AttnParams& p, uint32_t bb, uint32_t h,
                                          uint32_t T, uint32_t r0, int R) {
    for (int e = threadIdx.x; e < R * DP; e += blockDim.x) {
        const int r = e / DP, d = e % DP;
        const uint32_t row = r0 + r;
        dst[r * LD + d] = (row < T && (uint32_t)d < p.dh) ? x[((uint64_t)bb * T + row) * p.e + (uint64_t)h * p.dh + d] : 0.f;
    }
}

// Additive bias and logit multiplier of key j of batch row bb (see the file comment).
__device__ __forceinline__ void key_terms(const AttnParams& p, uint32_t bb, uint32_t j, float& bias, float& mult) {
    bias = 0.f;
    mult = 1.f;
    if (j >= p.s || (p.valid && p.valid[(uint64_t)bb * p.s + j] == 0)) {
        bias = -RECLMIS_INF;
        return;
    }
    if (p.cond == ATTN_COND_PROBS) bias = logf(p.w[(uint64_t)bb * p.s + j] + ATTN_COND_EPS);
    else if (p.cond == ATTN_COND_LOGITS) mult = p.w[(uint64_t)bb * p.s + j];
}

// Keys j0..j0+n of the tile: bias and multiplier into shared memory (threads 0..n-1).
__device__ __forceinline__ void load_key_terms(const AttnParams& p, uint32_t bb, uint32_t j0, int n, float* kb, float* kw) {
    if ((int)threadIdx.x < n) key_terms(p, bb, j0 + threadIdx.x, kb[threadIdx.x], kw[threadIdx.x]);
}

// Shared-memory floats each body needs; one array of the largest size is declared per kernel
// (a __shared__ array in each template instance would be allocated for all of them).
template <int DP>
__host__ __device__ constexpr int attn_fwd_smem() {
    return 16 * attn_fwd_warps(DP) * (DP + 4) + ATTN_BC * (DP + 4) + ATTN_BC * (DP + 8) +
           attn_fwd_warps(DP) * 16 * ATTN_LDP + 2 * ATTN_BC;
}
template <int DP>
__host__ __device__ constexpr int attn_bwd_smem() {
    // rows owned by the block (16·warps) and the streamed tile (16 rows), two operands each, the
    // per-warp probability and dS tiles, and 2 x 16·warps per-row or per-key scalars.
    return 2 * 16 * attn_bwd_warps(DP) * (DP + 4) + 2 * 16 * (DP + 4) + 2 * attn_bwd_warps(DP) * 16 * ATTN_LDP +
           2 * 16 * attn_bwd_warps(DP) + 2 * 16;
}
constexpr int cmax(int a, int b) { return a > b ? a : b; }
#define ATTN_FWD_SMEM cmax(cmax(attn_fwd_smem<16>(), attn_fwd_smem<32>()), cmax(attn_fwd_smem<64>(), attn_fwd_smem<128>()))
#define ATTN_BWD_SMEM cmax(cmax(attn_bwd_smem<16>(), attn_bwd_smem<32>()), cmax(attn_bwd_smem<64>(), attn_bwd_smem<128>()))
static_assert(ATTN_FWD_SMEM * 4 <= 48 * 1024, "forward tiles exceed static shared memory");
static_assert(ATTN_BWD_SMEM * 4 <= 48 * 1024, "backward tiles exceed static shared memory");

// ---------------------------------------------------------------------------------------------
// Forward: block = 16·NW query rows of one (b, h); warp w owns rows 16w..16w+15.
template <int DP, bool TC>
__device__ __forceinline__ void attn_fwd(const AttnParams& p, float* sm) {
    constexpr int NW = attn_fwd_warps(DP), BR = 16 * NW, LD = DP + 4, LDV = DP + 8, NT = DP / 8;
    float* qs = sm;                     // [BR][LD]
    float* ks = qs + BR * LD;           // [BC][LD]
    float* vs = ks + ATTN_BC * LD;      // [BC][LDV]
    float* ps_all = vs + ATTN_BC * LDV;  // [NW][16][LDP]
    float* kb = ps_all + NW * 16 * ATTN_LDP;
    float* kw = kb + ATTN_BC;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* ps = ps_all + warp * 16 * ATTN_LDP;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t i_blk = blockIdx.x * BR, i_w = i_blk + 16 * warp;
    load_rows<DP, LD>(qs, p.q, p, bb, h, p.tq, i_blk, BR);

    float m[2] = {-RECLMIS_INF, -RECLMIS_INF}, l[2] = {0.f, 0.f};
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    // Causal: no key beyond the block's last row is taken.
    const uint32_t kend = p.causal ? min(p.s, i_blk + BR) : p.s;
    for (uint32_t j0 = 0; j0 < kend; j0 += ATTN_BC) {
        __syncthreads();  // everyone is done with the previous ks / vs
        load_rows<DP, LD>(ks, p.k, p, bb, h, p.s, j0, ATTN_BC);
        load_rows<DP, LDV>(vs, p.v, p, bb, h, p.s, j0, ATTN_BC);
        load_key_terms(p, bb, j0, ATTN_BC, kb, kw);
        __syncthreads();
        float sc[2][4] = {};
        warp_tile<TC, 2, DP>(
            sc, [&](int r, int k) { return qs[(16 * warp + r) * LD + k]; }, [&](int k, int n) { return ks[n * LD + k]; });
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
            const uint32_t i = i_w + g + 8 * rh;
            float mx = -RECLMIS_INF;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int col = 8 * nt + 2 * t + c;
                    float z = sc[nt][2 * rh + c] * p.scale * kw[col] + kb[col];
                    if (p.causal && j0 + col > i) z = -RECLMIS_INF;
                    sc[nt][2 * rh + c] = z;
                    mx = fmaxf(mx, z);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[rh], mx);
            // With no key so far (mnew = −inf) every term is 0 and acc stays 0.
            const float alpha = m[rh] == -RECLMIS_INF ? 0.f : expf(m[rh] - mnew);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float z = sc[nt][2 * rh + c];
                    const float e = z == -RECLMIS_INF ? 0.f : expf(z - mnew);
                    sum += e;
                    ps[(g + 8 * rh) * ATTN_LDP + 8 * nt + 2 * t + c] = e;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[rh] = l[rh] * alpha + sum;
            m[rh] = mnew;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc[nt][2 * rh] *= alpha, acc[nt][2 * rh + 1] *= alpha;
        }
        __syncwarp();  // ps written by the whole warp before it is read as an A operand
        warp_tile<TC, NT, ATTN_BC>(
            acc, [&](int r, int k) { return ps[r * ATTN_LDP + k]; }, [&](int k, int n) { return vs[k * LDV + n]; });
        __syncwarp();
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        const uint32_t i = i_w + g + 8 * rh;
        if (i >= p.tq) continue;
        const float inv = l[rh] > 0.f ? 1.f / l[rh] : 0.f;
        float* orow = p.o + ((uint64_t)bb * p.tq + i) * p.e + (uint64_t)h * p.dh;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t d = 8 * nt + 2 * t + c;
                if (d < p.dh) orow[d] = acc[nt][2 * rh + c] * inv;
            }
        if (t == 0) p.lse[((uint64_t)bb * p.h + h) * p.tq + i] = l[rh] > 0.f ? m[rh] + logf(l[rh]) : -RECLMIS_INF;
    }
}

template <bool TC>
__device__ __forceinline__ void attn_fwd_dispatch(const AttnParams& p, float* sm) {
    if (p.dh <= 16) attn_fwd<16, TC>(p, sm);
    else if (p.dh <= 32) attn_fwd<32, TC>(p, sm);
    else if (p.dh <= 64) attn_fwd<64, TC>(p, sm);
    else attn_fwd<128, TC>(p, sm);
}

extern "C" __global__ void attention_fwd_f32(AttnParams p) {
    __shared__ float sm[ATTN_FWD_SMEM];
    if (p.tc) attn_fwd_dispatch<true>(p, sm);
    else attn_fwd_dispatch<false>(p, sm);
}

// Probabilities on request: one thread per (b, h, i, j), from the saved lse. Under tc the
// operands are rounded to tf32 as the forward's tensor cores round them, so the rows sum to 1
// to f32 accuracy.
extern "C" __global__ void attention_probs_fwd_f32(AttnParams p) {
    const uint64_t n = (uint64_t)p.b * p.h * p.tq * p.s;
    for (uint64_t x = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t j = x % p.s, i = (x / p.s) % p.tq, h = (x / ((uint64_t)p.s * p.tq)) % p.h;
        const uint32_t bb = x / ((uint64_t)p.s * p.tq * p.h);
        const float lse = p.lse[((uint64_t)bb * p.h + h) * p.tq + i];
        float bias, mult;
        key_terms(p, bb, j, bias, mult);
        float out = 0.f;
        if (lse != -RECLMIS_INF && bias != -RECLMIS_INF && !(p.causal && j > i)) {
            const float* q = p.q + ((uint64_t)bb * p.tq + i) * p.e + (uint64_t)h * p.dh;
            const float* k = p.k + ((uint64_t)bb * p.s + j) * p.e + (uint64_t)h * p.dh;
            float dot = 0.f;
            for (uint32_t d = 0; d < p.dh; ++d)
                dot = p.tc ? fmaf(__uint_as_float(f32_to_tf32(q[d])), __uint_as_float(f32_to_tf32(k[d])), dot)
                           : fmaf(q[d], k[d], dot);
            out = expf(dot * p.scale * mult + bias - lse);
        }
        p.probs[x] = out;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward. delta[b,h,i] = Σ_d dO·O (a warp per row; block (32, 8)).
// (ld(x, i) reads element i of dout or o as f32: the bf16 backward's are bf16)
template <class Ld>
__device__ __forceinline__ void attn_delta(const AttnParams& p, Ld ld) {
    const uint64_t row = (uint64_t)blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < (uint64_t)p.b * p.h * p.tq;
    const uint32_t i = active ? row % p.tq : 0, h = active ? (row / p.tq) % p.h : 0;
    const uint32_t bb = active ? row / ((uint64_t)p.tq * p.h) : 0;
    const uint64_t off = ((uint64_t)bb * p.tq + i) * p.e + (uint64_t)h * p.dh;
    float s = 0.f;
    for (uint32_t d = threadIdx.x; active && d < p.dh; d += 32) s = fmaf(ld(p.dout, off + d), ld(p.o, off + d), s);
    s = warp_sum(s);
    if (active && threadIdx.x == 0) p.delta[row] = s;
}

extern "C" __global__ void attention_delta_bwd_f32(AttnParams p) {
    attn_delta(p, [](const float* x, uint64_t i) { return x[i]; });
}

// One (query, key) element of the backward: the probability pr and dS = pr·(dP − delta), from the
// raw product t = ⟨q_i, k_j⟩; dw_term is this element's share of dw_j (by condition).
struct BwdElem {
    float pr, ds, dw_term;
};
__device__ __forceinline__ BwdElem bwd_elem(const AttnParams& p, float dot, float dpv, float lse, float dl, float bias,
                                            float mult, bool masked) {
    BwdElem r = {0.f, 0.f, 0.f};
    if (masked || bias == -RECLMIS_INF || lse == -RECLMIS_INF) return r;
    const float t = dot * p.scale, u = t * mult;
    r.pr = expf(u + bias - lse);
    r.ds = r.pr * (dpv - dl);
    // Official: d/dw_j of ln(w_j + eps) = 1/(w_j + eps), and pr/(w_j + eps) = exp(u − lse) exactly
    // (no division by a tiny w). Paper: z = t·w_j, so dz/dw_j = t.
    if (p.cond == ATTN_COND_PROBS) r.dw_term = expf(u - lse) * (dpv - dl);
    else if (p.cond == ATTN_COND_LOGITS) r.dw_term = r.ds * t;
    return r;
}

// dK, dV and dw: block = 16·NW keys of one (b, h), warp w owns keys 16w..; query tiles of 16
// stream through. The warp computes the transposed tiles Sᵀ = K Qᵀ and dPᵀ = V dOᵀ so that its
// accumulators are rows of dK and dV.
template <int DP, bool TC>
__device__ __forceinline__ void attn_dkdv(const AttnParams& p, float* sm) {
    constexpr int NW = attn_bwd_warps(DP), BK = 16 * NW, LD = DP + 4, NT = DP / 8;
    float* ks = sm;                  // [BK][LD]
    float* vs = ks + BK * LD;        // [BK][LD]
    float* qs = vs + BK * LD;        // [16][LD]
    float* dos = qs + 16 * LD;       // [16][LD]
    float* pt_all = dos + 16 * LD;   // [NW][16][LDP] Pᵀ
    float* dt_all = pt_all + NW * 16 * ATTN_LDP;  // [NW][16][LDP] dSᵀ·scale·kw
    float* kb = dt_all + NW * 16 * ATTN_LDP;      // [BK]
    float* kw = kb + BK;                          // [BK]
    float* lse_s = kw + BK;                       // [16]
    float* dl_s = lse_s + 16;                     // [16]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float *pt = pt_all + warp * 16 * ATTN_LDP, *dt = dt_all + warp * 16 * ATTN_LDP;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t j_blk = blockIdx.x * BK, j_w = j_blk + 16 * warp;
    load_rows<DP, LD>(ks, p.k, p, bb, h, p.s, j_blk, BK);
    load_rows<DP, LD>(vs, p.v, p, bb, h, p.s, j_blk, BK);
    load_key_terms(p, bb, j_blk, BK, kb, kw);

    float dk[NT][4], dv[NT][4], dwacc[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk[nt][c] = dv[nt][c] = 0.f;
    // Causal: queries before the block's first key see none of its keys.
    const uint32_t i_start = p.causal ? j_blk : 0;
    for (uint32_t i0 = i_start; i0 < p.tq; i0 += 16) {
        __syncthreads();
        load_rows<DP, LD>(qs, p.q, p, bb, h, p.tq, i0, 16);
        load_rows<DP, LD>(dos, p.dout, p, bb, h, p.tq, i0, 16);
        if (threadIdx.x < 16) {
            const uint32_t i = i0 + threadIdx.x;
            const uint64_t r = ((uint64_t)bb * p.h + h) * p.tq + i;
            lse_s[threadIdx.x] = i < p.tq ? p.lse[r] : -RECLMIS_INF;
            dl_s[threadIdx.x] = i < p.tq ? p.delta[r] : 0.f;
        }
        __syncthreads();
        float st[2][4] = {}, dpt[2][4] = {};
        warp_tile<TC, 2, DP>(
            st, [&](int r, int k) { return ks[(16 * warp + r) * LD + k]; }, [&](int k, int n) { return qs[n * LD + k]; });
        warp_tile<TC, 2, DP>(
            dpt, [&](int r, int k) { return vs[(16 * warp + r) * LD + k]; }, [&](int k, int n) { return dos[n * LD + k]; });
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int kr = 16 * warp + g + 8 * (c / 2), qc = 8 * nt + 2 * t + c % 2;
                const uint32_t j = j_blk + kr, i = i0 + qc;
                const BwdElem e =
                    bwd_elem(p, st[nt][c], dpt[nt][c], lse_s[qc], dl_s[qc], kb[kr], kw[kr], p.causal && j > i);
                dwacc[c / 2] += e.dw_term;
                pt[(g + 8 * (c / 2)) * ATTN_LDP + qc] = e.pr;
                dt[(g + 8 * (c / 2)) * ATTN_LDP + qc] = e.ds * p.scale * kw[kr];
            }
        __syncwarp();
        warp_tile<TC, NT, 16>(
            dv, [&](int r, int k) { return pt[r * ATTN_LDP + k]; }, [&](int k, int n) { return dos[k * LD + n]; });
        warp_tile<TC, NT, 16>(
            dk, [&](int r, int k) { return dt[r * ATTN_LDP + k]; }, [&](int k, int n) { return qs[k * LD + n]; });
        __syncwarp();
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        float s = dwacc[rh];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        const uint32_t j = j_w + g + 8 * rh;
        if (j >= p.s) continue;
        const uint64_t off = ((uint64_t)bb * p.s + j) * p.e + (uint64_t)h * p.dh;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t d = 8 * nt + 2 * t + c;
                if (d < p.dh) p.dk[off + d] = dk[nt][2 * rh + c], p.dv[off + d] = dv[nt][2 * rh + c];
            }
        if (p.dw && t == 0) p.dw[((uint64_t)bb * p.h + h) * p.s + j] = s;
    }
}

// dQ: block = 16·NW queries of one (b, h), warp w owns queries 16w..; key tiles of 16 stream.
template <int DP, bool TC>
__device__ __forceinline__ void attn_dq(const AttnParams& p, float* sm) {
    constexpr int NW = attn_bwd_warps(DP), BQ = 16 * NW, LD = DP + 4, NT = DP / 8;
    float* qs = sm;                  // [BQ][LD]
    float* dos = qs + BQ * LD;       // [BQ][LD]
    float* ks = dos + BQ * LD;       // [16][LD]
    float* vs = ks + 16 * LD;        // [16][LD]
    float* ds_all = vs + 16 * LD;    // [NW][16][LDP]
    float* kb = ds_all + 2 * NW * 16 * ATTN_LDP;  // [16] (layout shared with attn_dkdv's budget)
    float* kw = kb + 16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* dsw = ds_all + warp * 16 * ATTN_LDP;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t i_blk = blockIdx.x * BQ, i_w = i_blk + 16 * warp;
    load_rows<DP, LD>(qs, p.q, p, bb, h, p.tq, i_blk, BQ);
    load_rows<DP, LD>(dos, p.dout, p, bb, h, p.tq, i_blk, BQ);
    float lse[2], dl[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        const uint32_t i = i_w + g + 8 * rh;
        const uint64_t r = ((uint64_t)bb * p.h + h) * p.tq + i;
        lse[rh] = i < p.tq ? p.lse[r] : -RECLMIS_INF;
        dl[rh] = i < p.tq ? p.delta[r] : 0.f;
    }
    float dq[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
    const uint32_t kend = p.causal ? min(p.s, i_blk + BQ) : p.s;
    for (uint32_t j0 = 0; j0 < kend; j0 += 16) {
        __syncthreads();
        load_rows<DP, LD>(ks, p.k, p, bb, h, p.s, j0, 16);
        load_rows<DP, LD>(vs, p.v, p, bb, h, p.s, j0, 16);
        load_key_terms(p, bb, j0, 16, kb, kw);
        __syncthreads();
        float sc[2][4] = {}, dpv[2][4] = {};
        warp_tile<TC, 2, DP>(
            sc, [&](int r, int k) { return qs[(16 * warp + r) * LD + k]; }, [&](int k, int n) { return ks[n * LD + k]; });
        warp_tile<TC, 2, DP>(
            dpv, [&](int r, int k) { return dos[(16 * warp + r) * LD + k]; }, [&](int k, int n) { return vs[n * LD + k]; });
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int rh = c / 2, col = 8 * nt + 2 * t + c % 2;
                const uint32_t i = i_w + g + 8 * rh, j = j0 + col;
                const BwdElem e = bwd_elem(p, sc[nt][c], dpv[nt][c], lse[rh], dl[rh], kb[col], kw[col], p.causal && j > i);
                dsw[(g + 8 * rh) * ATTN_LDP + col] = e.ds * p.scale * kw[col];
            }
        __syncwarp();
        warp_tile<TC, NT, 16>(
            dq, [&](int r, int k) { return dsw[r * ATTN_LDP + k]; }, [&](int k, int n) { return ks[k * LD + n]; });
        __syncwarp();
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        const uint32_t i = i_w + g + 8 * rh;
        if (i >= p.tq) continue;
        float* row = p.dq + ((uint64_t)bb * p.tq + i) * p.e + (uint64_t)h * p.dh;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t d = 8 * nt + 2 * t + c;
                if (d < p.dh) row[d] = dq[nt][2 * rh + c];
            }
    }
}

// Picks the body instance for the head dim and the product kind (one source, eight instances).
template <template <int, bool> class Body>
__device__ __forceinline__ void attn_bwd_dispatch(const AttnParams& p, float* sm) {
    if (p.tc) {
        if (p.dh <= 16) Body<16, true>::run(p, sm);
        else if (p.dh <= 32) Body<32, true>::run(p, sm);
        else if (p.dh <= 64) Body<64, true>::run(p, sm);
        else Body<128, true>::run(p, sm);
    } else {
        if (p.dh <= 16) Body<16, false>::run(p, sm);
        else if (p.dh <= 32) Body<32, false>::run(p, sm);
        else if (p.dh <= 64) Body<64, false>::run(p, sm);
        else Body<128, false>::run(p, sm);
    }
}
template <int DP, bool TC>
struct DkDv {
    static __device__ __forceinline__ void run(const AttnParams& p, float* sm) { attn_dkdv<DP, TC>(p, sm); }
};
template <int DP, bool TC>
struct Dq {
    static __device__ __forceinline__ void run(const AttnParams& p, float* sm) { attn_dq<DP, TC>(p, sm); }
};

extern "C" __global__ void attention_dkdv_bwd_f32(AttnParams p) {
    __shared__ float sm[ATTN_BWD_SMEM];
    attn_bwd_dispatch<DkDv>(p, sm);
}

extern "C" __global__ void attention_dq_bwd_f32(AttnParams p) {
    __shared__ float sm[ATTN_BWD_SMEM];
    attn_bwd_dispatch<Dq>(p, sm);
}

// @autocast-only begin (build.rs leaves this region out of builds without bf16 autocast)
// ---------------------------------------------------------------------------------------------
// The pipelined attention (pipe_gemm.cuh's building blocks): the bf16 kernels (bf16 autocast)
// and the tf32 ones (f32 operands at --precision tf32), one template over the element kind.
#include "pipe_gemm.cuh"

// The element kinds (pipe_gemm.cuh's): PgBf16, bf16 operands on mma.m16n8k16; PgTf32, f32
// operands read as tf32 on mma.m16n8k8 (fragments rounded with cvt.rna after the load, as the
// unpipelined tensor-core branch rounds its operands). An mma's k-step is two 16-byte chunks of a
// k-contiguous row in both, so the products over the head dim (Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ) address
// their ldmatrix reads alike. The products over keys or queries (P·V, dS·K, Pᵀ·dO, dSᵀ·Q) take
// their A operand from the accumulators and B from a row-major tile: bf16 through ldmatrix.trans;
// tf32, which .trans cannot transpose at 32 bits, by warp-wide 32-bit loads (lds32_warp), with the
// accumulator columns 2t and 2t + 1 of an 8-key block as the k slots t and t + 4 (A's a[0]/a[2]
// are then the pair a lane holds, and B's b[0]/b[1] rows 2t and 2t + 1: the same sum over the
// block's keys in another order).
template <class K, int DP>
struct AttnTile {
    static constexpr int CH = DP / K::PER_CHUNK;  // 16-byte chunks of a head's row
    // tf32 rows of 4 chunks (head dim 16) are padded to 5: the 32-bit reads of rows 2t (t < 4)
    // would otherwise find 16 banks only (two 64-byte rows share a 128-byte line, so every even
    // row starts at bank 0); at a stride of 5 chunks both they and ldmatrix's 8 consecutive rows
    // fall on distinct banks. Other rows: pg_off's XOR swizzle (for the 32-bit reads of rows 2t,
    // chunks c ^ 2t: the four rows' chunk pairs on 8 distinct 16-byte bank groups).
    static constexpr bool PAD = K::TF32 && CH == 4;
    static constexpr uint32_t bytes(int rows) { return rows * (PAD ? 5 : CH) * 16; }
    __device__ __forceinline__ static uint32_t off(uint32_t r, uint32_t c) {
        if constexpr (PAD) return (r * 5 + c) * 16;
        else return pg_off<CH>(r, c);
    }
    // element (r, col) of a tf32 tile as an mma operand
    __device__ __forceinline__ static uint32_t tf32_at(const unsigned char* s, uint32_t r, uint32_t col) {
        return f32_to_tf32(__uint_as_float(lds32_warp(s + off(r, col / 4) + 4 * (col % 4))));
    }
};

// Tile shapes per kind and head dim: the streamed tiles' rows, and the most warps per block (16
// query or key rows each) such that every instance fits in 48 KiB of dynamic shared memory (f32
// tiles are twice bf16's bytes: fewer rows at head dims 64 and 128). The host launches 1, 2 or 4
// warps up to that, per problem: as few as cover the block's rows (Tq for the forward and dQ, S
// for dK/dV; e.g. 2 warps for the model's 18 text tokens, not 4 of which 46 rows are padding),
// and the kernels read it from blockDim. Mirrored in src/ops/attention/pipe.rs.
template <class K, int DP>
__host__ __device__ constexpr int attn_pipe_fwd_warps() {
    return K::TF32 && DP == 128 ? 2 : 4;
}
template <class K, int DP>
__host__ __device__ constexpr int attn_pipe_fwd_bc() {
    return K::TF32 && DP == 128 ? 16 : 32;
}
template <class K, int DP>
__host__ __device__ constexpr int attn_pipe_bwd_warps() {
    return !K::TF32 ? 4 : DP == 128 ? 1 : DP == 64 ? 2 : 4;
}
template <class K, int DP>
__host__ __device__ constexpr int attn_pipe_bwd_bc() {
    return DP == 128 ? 16 : 32;
}
// Dynamic shared memory of the forward at the most warps: the Q tile and two stages of K and V tiles.
template <class K, int DP>
__host__ __device__ constexpr uint32_t attn_pipe_smem() {
    return AttnTile<K, DP>::bytes(16 * attn_pipe_fwd_warps<K, DP>()) + 4 * AttnTile<K, DP>::bytes(attn_pipe_fwd_bc<K, DP>());
}
// ... of both backward kernels: the block's two resident tiles and two stages of two streamed ones.
template <class K, int DP>
__host__ __device__ constexpr uint32_t attn_pipe_bwd_smem() {
    return 2 * AttnTile<K, DP>::bytes(16 * attn_pipe_bwd_warps<K, DP>()) +
           4 * AttnTile<K, DP>::bytes(attn_pipe_bwd_bc<K, DP>());
}
template <class K>
__host__ __device__ constexpr bool attn_pipe_fits() {
    return attn_pipe_smem<K, 16>() <= 48 * 1024 && attn_pipe_smem<K, 32>() <= 48 * 1024 &&
           attn_pipe_smem<K, 64>() <= 48 * 1024 && attn_pipe_smem<K, 128>() <= 48 * 1024 &&
           attn_pipe_bwd_smem<K, 16>() <= 48 * 1024 && attn_pipe_bwd_smem<K, 32>() <= 48 * 1024 &&
           attn_pipe_bwd_smem<K, 64>() <= 48 * 1024 && attn_pipe_bwd_smem<K, 128>() <= 48 * 1024;
}
static_assert(attn_pipe_fits<PgBf16>() && attn_pipe_fits<PgTf32>(), "a pipelined attention tile set exceeds 48 KiB");

// cp.async of rows r0..r0+R of head h of x [B,T,E] into a swizzled tile, zero rows past T.
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_rows(unsigned char* dst, const void* xv, const AttnParams& p, uint32_t bb,
                                               uint32_t h, uint32_t T, uint32_t r0, int R) {
    using Tl = AttnTile<K, DP>;
    constexpr int CH = Tl::CH;
    const typename K::E* x = (const typename K::E*)xv;
    for (int e = threadIdx.x; e < R * CH; e += blockDim.x) {
        const uint32_t r = e / CH, c = e % CH, row = r0 + r;
        const bool ok = row < T;
        const typename K::E* src =
            ok ? x + ((uint64_t)bb * T + row) * p.e + (uint64_t)h * p.dh + K::PER_CHUNK * c : x;
        cp_async16(dst + Tl::off(r, c), src, ok);
    }
}

__device__ __forceinline__ uint32_t attn_pack_bf16(float lo, float hi) {
    return (uint32_t)f32_to_bf16_bits(lo) | ((uint32_t)f32_to_bf16_bits(hi) << 16);
}

// An ldmatrix'd fragment as the kind's mma operand (tf32: rounded).
template <class K, int N>
__device__ __forceinline__ void attn_operand(uint32_t (&r)[N]) {
    if constexpr (K::TF32)
#pragma unroll
        for (int q = 0; q < N; ++q) r[q] = f32_to_tf32(__uint_as_float(r[q]));
}
template <class K>
__device__ __forceinline__ void attn_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (K::TF32) mma_m16n8k8_tf32(d, a, b, d);
    else mma_m16n8k16_bf16(d, a, b, d);
}

// The A fragment of k-step ks for the warp's 16 rows from a0.. of the swizzled tile `a`.
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_afrag(uint32_t (&af)[4], const unsigned char* a, uint32_t a_r0, int ks) {
    const int lane = threadIdx.x & 31, q8 = lane >> 3, r8 = lane & 7;
    ldmatrix_x4(af, a + AttnTile<K, DP>::off(a_r0 + r8 + 8 * (q8 & 1), 2 * ks + (q8 >> 1)));
    attn_operand<K>(af);
}

// acc[2·nj + 0/1] = A · B for the warp, K = DP (CH/2 k-steps): A's 16 rows are rows a_r0.. of the
// swizzled tile `a` (or, with AF, the fragments af[ks] already in registers), B's 8·(2·NJ)
// columns are rows 0.. of the swizzled tile `b` (B(k, n) = b[n][k], the non-transposed ldmatrix:
// Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ).
template <class K, int DP, int NJ, bool AF = false>
__device__ __forceinline__ void attn_pipe_abt(float (*acc)[4], const unsigned char* a, uint32_t a_r0,
                                              const unsigned char* b, const uint32_t (*af_reg)[4] = nullptr) {
    using Tl = AttnTile<K, DP>;
    const int lane = threadIdx.x & 31, q8 = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int nt = 0; nt < 2 * NJ; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < Tl::CH / 2; ++ks) {
        uint32_t af[4];
        if constexpr (AF) af[0] = af_reg[ks][0], af[1] = af_reg[ks][1], af[2] = af_reg[ks][2], af[3] = af_reg[ks][3];
        else attn_pipe_afrag<K, DP>(af, a, a_r0, ks);
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj) {
            uint32_t r[4];
            ldmatrix_x4(r, b + Tl::off(16 * nj + r8 + 8 * (q8 >> 1), 2 * ks + (q8 & 1)));
            attn_operand<K>(r);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            attn_mma<K>(acc[2 * nj], af, b0);
            attn_mma<K>(acc[2 * nj + 1], af, b1);
        }
    }
}

// acc[NT][4] (16 x DP) += X · B for the warp: X (16 x BC) is in the accumulator layout x[BC/8][4]
// (f32, rounded to the operand kind here: no shared memory), B(k, n) = b[k][n] the streamed or
// resident swizzled tile of BC rows (rows b_r0..): bf16 by ldmatrix.trans; tf32 by 32-bit loads
// of rows 2t and 2t + 1 (the k-slot order of the file comment above).
template <class K, int DP, int BC>
__device__ __forceinline__ void attn_pipe_xb(float (*acc)[4], const float (*x)[4], const unsigned char* b,
                                             uint32_t b_r0) {
    using Tl = AttnTile<K, DP>;
    const int lane = threadIdx.x & 31, q8 = lane >> 3, r8 = lane & 7, g = lane >> 2, t = lane & 3;
    if constexpr (K::TF32) {
#pragma unroll
        for (int kk = 0; kk < BC / 8; ++kk) {
            const uint32_t xf[4] = {f32_to_tf32(x[kk][0]), f32_to_tf32(x[kk][2]), f32_to_tf32(x[kk][1]),
                                    f32_to_tf32(x[kk][3])};
            const uint32_t r = b_r0 + 8 * kk + 2 * t;
#pragma unroll
            for (int nt = 0; nt < DP / 8; ++nt) {
                const uint32_t bf[2] = {Tl::tf32_at(b, r, 8 * nt + g), Tl::tf32_at(b, r + 1, 8 * nt + g)};
                attn_mma<K>(acc[nt], xf, bf);
            }
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            const uint32_t xf[4] = {attn_pack_bf16(x[2 * kk][0], x[2 * kk][1]), attn_pack_bf16(x[2 * kk][2], x[2 * kk][3]),
                                    attn_pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                                    attn_pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
            for (int nj = 0; nj < DP / 16; ++nj) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, b + Tl::off(b_r0 + 16 * kk + r8 + 8 * (q8 & 1), 2 * nj + (q8 >> 1)));
                const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                attn_mma<K>(acc[2 * nj], xf, b0);
                attn_mma<K>(acc[2 * nj + 1], xf, b1);
            }
        }
    }
}

// Rows r0.. r0+15 (< T) of head h of x [B,T,E] from the warp's accumulators times mul[0] (rows
// g) and mul[1] (rows g + 8), in the kind's type: staged through `stage`, the warp's own 16 rows
// (from s_r0) of a resident swizzled tile that only this warp has read and that no copy is still
// filling (the caller's cp_async_wait<0> and barrier), then written as 16-byte row chunks, each
// one 128-bit store (a warp covers whole row segments instead of 4- or 8-byte pieces 8 rows
// apart); element stores where a chunk's address is not 16-byte aligned (not for the host's
// aligned operands, but an output tensor's base is not checked).
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_store_rows(void* x, const float (*acc)[4], const AttnParams& p, uint32_t bb,
                                                     uint32_t h, uint32_t T, uint32_t r0, const float (&mul)[2],
                                                     unsigned char* stage, uint32_t s_r0) {
    using Tl = AttnTile<K, DP>;
    using E = typename K::E;
    constexpr int CH = Tl::CH, PC = K::PER_CHUNK;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int rh = 0; rh < 2; ++rh)
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
            const float v0 = acc[nt][2 * rh] * mul[rh], v1 = acc[nt][2 * rh + 1] * mul[rh];
            const uint32_t col = 8 * nt + 2 * t;  // even: the pair is 4- (bf16) or 8-byte (f32) aligned
            unsigned char* at = stage + Tl::off(s_r0 + g + 8 * rh, col / PC) + sizeof(E) * (col % PC);
            if constexpr (K::TF32) *reinterpret_cast<float2*>(at) = float2{v0, v1};
            else *reinterpret_cast<uint32_t*>(at) = attn_pack_bf16(v0, v1);
        }
    __syncwarp();
    for (int e = lane; e < 16 * CH; e += 32) {
        const uint32_t r = e / CH, c = e % CH;
        if (r0 + r >= T) continue;
        E* dst = (E*)x + ((uint64_t)bb * T + r0 + r) * p.e + (uint64_t)h * p.dh + PC * c;
        const uint4 v = ld128(stage + Tl::off(s_r0 + r, c));
        if ((reinterpret_cast<uint64_t>(dst) & 15u) == 0) {
            st128(dst, v);
        } else if constexpr (K::TF32) {
            dst[0] = __uint_as_float(v.x), dst[1] = __uint_as_float(v.y);
            dst[2] = __uint_as_float(v.z), dst[3] = __uint_as_float(v.w);
        } else {
#pragma unroll
            for (int q = 0; q < PC; ++q) dst[q] = pg_u4_elem(v, q);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward on the pipelined building blocks: Q, K, V and O of the kind's type (AttnParams' q, k, v,
// o address bf16 for PgBf16, f32 for PgTf32), the logits, the online softmax statistics and lse
// in f32, P rounded to the operand type for the P·V product (as FlashAttention), f32
// accumulation. Block = 16·NW query rows of one (b, h), warp w owns rows 16w..; the Q tile is
// copied once (its fragments then stay in registers), the K and V tiles of BC keys are
// double-buffered by cp.async (the next tile's copy overlaps this tile's products); fragments of
// K are ldmatrix'd from XOR-swizzled tiles, V is the B operand of P·V (see attn_pipe_xb), P goes
// from the accumulators straight into A fragments. The host launches it when dh is 16, 32, 64 or
// 128 (= the tile width) and every row of q, k, v is made of whole, aligned 16-byte chunks.
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_fwd(const AttnParams& p, unsigned char* smem) {
    using Tl = AttnTile<K, DP>;
    constexpr int BC = attn_pipe_fwd_bc<K, DP>(), NT = DP / 8, KS = Tl::CH / 2;
    const int BR = 16 * (blockDim.x >> 5);  // the host's choice, up to 16·attn_pipe_fwd_warps
    constexpr uint32_t TB = Tl::bytes(BC);
    const uint32_t QB = Tl::bytes(BR);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t i_blk = blockIdx.x * BR, i_w = i_blk + 16 * warp;
    // Causal: no key beyond the block's last row is taken.
    const uint32_t kend = p.causal ? min(p.s, i_blk + BR) : p.s;
    const uint32_t ntiles = (kend + BC - 1) / BC;
    unsigned char* qs = smem;
    auto kst = [&](uint32_t st) { return smem + QB + st * 2 * TB; };
    auto vst = [&](uint32_t st) { return smem + QB + st * 2 * TB + TB; };

    // group 0: Q and the first K, V tiles
    attn_pipe_rows<K, DP>(qs, p.q, p, bb, h, p.tq, i_blk, BR);
    if (ntiles > 0) {
        attn_pipe_rows<K, DP>(kst(0), p.k, p, bb, h, p.s, 0, BC);
        attn_pipe_rows<K, DP>(vst(0), p.v, p, bb, h, p.s, 0, BC);
    }
    cp_async_commit();

    float m[2] = {-RECLMIS_INF, -RECLMIS_INF}, l[2] = {0.f, 0.f};
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    uint32_t qf[KS][4];
    for (uint32_t tt = 0; tt < ntiles; ++tt) {
        // tile tt has landed (the only group in flight) and every warp is done with tile tt - 1,
        // whose stage the prefetch below overwrites
        cp_async_wait<0>();
        __syncthreads();
        if (tt == 0) {
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) attn_pipe_afrag<K, DP>(qf[ks], qs, 16 * warp, ks);
        }
        if (tt + 1 < ntiles) {
            attn_pipe_rows<K, DP>(kst((tt + 1) & 1), p.k, p, bb, h, p.s, (tt + 1) * BC, BC);
            attn_pipe_rows<K, DP>(vst((tt + 1) & 1), p.v, p, bb, h, p.s, (tt + 1) * BC, BC);
        }
        cp_async_commit();
        const unsigned char* ks_ = kst(tt & 1);
        const unsigned char* vs_ = vst(tt & 1);
        const uint32_t j0 = tt * BC;

        // S = Q·Kᵀ (16 x BC per warp): K's rows are the B operand's columns
        float sc[BC / 8][4];
        attn_pipe_abt<K, DP, BC / 16, true>(sc, nullptr, 0, ks_, qf);
        // this lane's key columns: bias and multiplier (the same for both of its rows)
        float kb[BC / 8][2], kw[BC / 8][2];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) key_terms(p, bb, j0 + 8 * nt + 2 * t + c, kb[nt][c], kw[nt][c]);
        // online softmax, f32; sc becomes the unnormalised probabilities
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
            const uint32_t i = i_w + g + 8 * rh;
            float mx = -RECLMIS_INF;
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float z = sc[nt][2 * rh + c] * p.scale * kw[nt][c] + kb[nt][c];
                    if (p.causal && j0 + 8 * nt + 2 * t + c > i) z = -RECLMIS_INF;
                    sc[nt][2 * rh + c] = z;
                    mx = fmaxf(mx, z);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mnew = fmaxf(m[rh], mx);
            // With no key so far (mnew = −inf) every term is 0 and acc stays 0.
            const float alpha = m[rh] == -RECLMIS_INF ? 0.f : expf(m[rh] - mnew);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const float z = sc[nt][2 * rh + c];
                    const float e = z == -RECLMIS_INF ? 0.f : expf(z - mnew);
                    sum += e;
                    sc[nt][2 * rh + c] = e;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[rh] = l[rh] * alpha + sum;
            m[rh] = mnew;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) acc[nt][2 * rh] *= alpha, acc[nt][2 * rh + 1] *= alpha;
        }
        // O += P·V
        attn_pipe_xb<K, DP, BC>(acc, sc, vs_, 0);
    }
    cp_async_wait<0>();  // only an empty group (or, with no key tile, Q's) remains
    __syncthreads();     // every thread's copies into the Q tile have landed: it stages O
    const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
    attn_pipe_store_rows<K, DP>(p.o, acc, p, bb, h, p.tq, i_w, inv, qs, 16 * warp);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        const uint32_t i = i_w + g + 8 * rh;
        if (i < p.tq && t == 0)
            p.lse[((uint64_t)bb * p.h + h) * p.tq + i] = l[rh] > 0.f ? m[rh] + logf(l[rh]) : -RECLMIS_INF;
    }
}

// Runs Body<K, dh> for the head dim (16, 32, 64 or 128).
#define ATTN_PIPE_DISPATCH(BODY, K)       \
    if (p.dh == 16) BODY<K, 16>(p, smem);      \
    else if (p.dh == 32) BODY<K, 32>(p, smem); \
    else if (p.dh == 64) BODY<K, 64>(p, smem); \
    else BODY<K, 128>(p, smem);

// grid = (ceil(Tq / (16·warps)), B·H), block = 32·warps (warps <= attn_pipe_fwd_warps), dynamic
// shared memory for them (at the most warps attn_pipe_smem: bf16 6, 12, 24 or 48 KiB at dh 16,
// 32, 64, 128; tf32 15, 24, 48, 48 KiB)
extern "C" __global__ void __launch_bounds__(128) attention_pipe_fwd_bf16(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_fwd, PgBf16)
}
extern "C" __global__ void __launch_bounds__(128) attention_pipe_fwd_f32(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_fwd, PgTf32)
}
// ---------------------------------------------------------------------------------------------
// Backward on the same building blocks (FlashAttention-2's, without atomics): q, k, v, o and dout
// of the kind's type, lse and delta f32, dq, dk, dv written in the kind's type (f32 accumulators;
// bf16: rounded once), the per-head partial dw in f32. P and dS are recomputed in f32 from the
// logsumexp and rounded to the operand type only as the A operands of dV += Pᵀ·dO,
// dK += dSᵀ·Q and dQ += dS·K (as FlashAttention). Two kernels, as the unpipelined backward: one
// per 16·NW keys (dK, dV, dw) streaming query tiles, one per 16·NW queries (dQ) streaming key
// tiles; the streamed tiles are double-buffered by cp.async, the block's own rows of two operands
// stay in shared memory. Tile shapes: attn_pipe_bwd_warps / attn_pipe_bwd_bc.

// delta = Σ_d dO·O from bf16 dout and o (a warp per row; block (32, 8)); the tf32 kernels take
// attention_delta_bwd_f32's.
extern "C" __global__ void attention_delta_bwd_bf16(AttnParams p) {
    attn_delta(p, [](const float* x, uint64_t i) { return bf16_bits_to_f32(((const uint16_t*)x)[i]); });
}

// dQ: block = 16·NW queries of one (b, h), warp w owns queries 16w..; key tiles of BC stream (K
// and V double-buffered). Per tile and warp: S = Q·Kᵀ and dP = dO·Vᵀ (16 x BC), dS in f32, then
// dQ += (dS·scale·kw)·K.
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_dq(const AttnParams& p, unsigned char* smem) {
    using Tl = AttnTile<K, DP>;
    constexpr int BC = attn_pipe_bwd_bc<K, DP>(), NT = DP / 8;
    const int BR = 16 * (blockDim.x >> 5);  // the host's choice, up to 16·attn_pipe_bwd_warps
    constexpr uint32_t TB = Tl::bytes(BC);
    const uint32_t RB = Tl::bytes(BR);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t i_blk = blockIdx.x * BR, i_w = i_blk + 16 * warp;
    const uint32_t kend = p.causal ? min(p.s, i_blk + BR) : p.s;
    const uint32_t ntiles = (kend + BC - 1) / BC;
    unsigned char *qs = smem, *dos = smem + RB;
    auto kst = [&](uint32_t st) { return smem + 2 * RB + st * 2 * TB; };
    auto vst = [&](uint32_t st) { return smem + 2 * RB + st * 2 * TB + TB; };

    // group 0: Q, dO and the first K, V tiles
    attn_pipe_rows<K, DP>(qs, p.q, p, bb, h, p.tq, i_blk, BR);
    attn_pipe_rows<K, DP>(dos, p.dout, p, bb, h, p.tq, i_blk, BR);
    if (ntiles > 0) {
        attn_pipe_rows<K, DP>(kst(0), p.k, p, bb, h, p.s, 0, BC);
        attn_pipe_rows<K, DP>(vst(0), p.v, p, bb, h, p.s, 0, BC);
    }
    cp_async_commit();
    float lse[2], dl[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        const uint32_t i = i_w + g + 8 * rh;
        const uint64_t r = ((uint64_t)bb * p.h + h) * p.tq + i;
        lse[rh] = i < p.tq ? p.lse[r] : -RECLMIS_INF;
        dl[rh] = i < p.tq ? p.delta[r] : 0.f;
    }
    float dq[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
    for (uint32_t tt = 0; tt < ntiles; ++tt) {
        // tile tt has landed (the only group in flight); every warp is done with tile tt - 1,
        // whose stage the prefetch below overwrites
        cp_async_wait<0>();
        __syncthreads();
        if (tt + 1 < ntiles) {
            attn_pipe_rows<K, DP>(kst((tt + 1) & 1), p.k, p, bb, h, p.s, (tt + 1) * BC, BC);
            attn_pipe_rows<K, DP>(vst((tt + 1) & 1), p.v, p, bb, h, p.s, (tt + 1) * BC, BC);
        }
        cp_async_commit();
        const unsigned char *ks_ = kst(tt & 1), *vs_ = vst(tt & 1);
        const uint32_t j0 = tt * BC;
        float sc[BC / 8][4], dp[BC / 8][4];
        attn_pipe_abt<K, DP, BC / 16>(sc, qs, 16 * warp, ks_);
        attn_pipe_abt<K, DP, BC / 16>(dp, dos, 16 * warp, vs_);
        // sc becomes dS·scale·kw (this lane's key columns: the same terms for both of its rows)
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t j = j0 + 8 * nt + 2 * t + c;
                float kb, kw;
                key_terms(p, bb, j, kb, kw);
#pragma unroll
                for (int rh = 0; rh < 2; ++rh) {
                    const uint32_t i = i_w + g + 8 * rh;
                    const BwdElem e =
                        bwd_elem(p, sc[nt][2 * rh + c], dp[nt][2 * rh + c], lse[rh], dl[rh], kb, kw, p.causal && j > i);
                    sc[nt][2 * rh + c] = e.ds * p.scale * kw;
                }
            }
        attn_pipe_xb<K, DP, BC>(dq, sc, ks_, 0);
    }
    cp_async_wait<0>();  // only an empty group (or, with no key tile, Q's and dO's) remains
    __syncthreads();     // every thread's copies into the Q tile have landed: it stages dQ
    attn_pipe_store_rows<K, DP>(p.dq, dq, p, bb, h, p.tq, i_w, {1.f, 1.f}, qs, 16 * warp);
}

// dK, dV and dw: block = 16·NW keys of one (b, h), warp w owns keys 16w..; query tiles of BC
// stream (Q and dO double-buffered). Per tile and warp the transposed products Sᵀ = K·Qᵀ and
// dPᵀ = V·dOᵀ (16 keys x BC queries), so that Pᵀ and dSᵀ are A operands in registers:
// dV += Pᵀ·dO, dK += (dSᵀ·scale·kw)·Q.
template <class K, int DP>
__device__ __forceinline__ void attn_pipe_dkdv(const AttnParams& p, unsigned char* smem) {
    using Tl = AttnTile<K, DP>;
    constexpr int BC = attn_pipe_bwd_bc<K, DP>(), NT = DP / 8;
    const int BK = 16 * (blockDim.x >> 5);  // the host's choice, up to 16·attn_pipe_bwd_warps
    constexpr uint32_t TB = Tl::bytes(BC);
    const uint32_t RB = Tl::bytes(BK);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t bb = blockIdx.y / p.h, h = blockIdx.y % p.h;
    const uint32_t j_blk = blockIdx.x * BK, j_w = j_blk + 16 * warp;
    // Causal: queries before the block's first key see none of its keys.
    const uint32_t i_start = p.causal ? j_blk : 0;
    const uint32_t ntiles = i_start < p.tq ? (p.tq - i_start + BC - 1) / BC : 0;
    unsigned char *ks = smem, *vs = smem + RB;
    auto qst = [&](uint32_t st) { return smem + 2 * RB + st * 2 * TB; };
    auto dost = [&](uint32_t st) { return smem + 2 * RB + st * 2 * TB + TB; };

    // group 0: K, V and the first Q, dO tiles
    attn_pipe_rows<K, DP>(ks, p.k, p, bb, h, p.s, j_blk, BK);
    attn_pipe_rows<K, DP>(vs, p.v, p, bb, h, p.s, j_blk, BK);
    if (ntiles > 0) {
        attn_pipe_rows<K, DP>(qst(0), p.q, p, bb, h, p.tq, i_start, BC);
        attn_pipe_rows<K, DP>(dost(0), p.dout, p, bb, h, p.tq, i_start, BC);
    }
    cp_async_commit();
    // this lane's keys (rows g, g + 8 of the warp's): bias and multiplier, fixed for the block
    float kb[2], kw[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) key_terms(p, bb, j_w + g + 8 * rh, kb[rh], kw[rh]);
    float dk[NT][4], dv[NT][4], dwacc[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk[nt][c] = dv[nt][c] = 0.f;
    const uint64_t row0 = ((uint64_t)bb * p.h + h) * p.tq;
    for (uint32_t tt = 0; tt < ntiles; ++tt) {
        cp_async_wait<0>();
        __syncthreads();
        const uint32_t i0 = i_start + tt * BC;
        if (tt + 1 < ntiles) {
            attn_pipe_rows<K, DP>(qst((tt + 1) & 1), p.q, p, bb, h, p.tq, i0 + BC, BC);
            attn_pipe_rows<K, DP>(dost((tt + 1) & 1), p.dout, p, bb, h, p.tq, i0 + BC, BC);
        }
        cp_async_commit();
        const unsigned char *qs_ = qst(tt & 1), *dos_ = dost(tt & 1);
        // this lane's query columns: their logsumexp and delta (rows past Tq are masked below)
        float lse[BC / 8][2], dl[BC / 8][2];
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const uint32_t i = i0 + 8 * nt + 2 * t + c;
                lse[nt][c] = i < p.tq ? p.lse[row0 + i] : -RECLMIS_INF;
                dl[nt][c] = i < p.tq ? p.delta[row0 + i] : 0.f;
            }
        float st[BC / 8][4], dpt[BC / 8][4];
        attn_pipe_abt<K, DP, BC / 16>(st, ks, 16 * warp, qs_);
        attn_pipe_abt<K, DP, BC / 16>(dpt, vs, 16 * warp, dos_);
        // st becomes Pᵀ, dpt dSᵀ·scale·kw
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int rh = c / 2;
                const uint32_t j = j_w + g + 8 * rh, i = i0 + 8 * nt + 2 * t + c % 2;
                const BwdElem e = bwd_elem(p, st[nt][c], dpt[nt][c], lse[nt][c % 2], dl[nt][c % 2], kb[rh], kw[rh],
                                           p.causal && j > i);
                dwacc[rh] += e.dw_term;
                st[nt][c] = e.pr;
                dpt[nt][c] = e.ds * p.scale * kw[rh];
            }
        attn_pipe_xb<K, DP, BC>(dv, st, dos_, 0);
        attn_pipe_xb<K, DP, BC>(dk, dpt, qs_, 0);
    }
    cp_async_wait<0>();
    __syncthreads();  // every thread's copies into the K and V tiles have landed: they stage dK, dV
    attn_pipe_store_rows<K, DP>(p.dk, dk, p, bb, h, p.s, j_w, {1.f, 1.f}, ks, 16 * warp);
    attn_pipe_store_rows<K, DP>(p.dv, dv, p, bb, h, p.s, j_w, {1.f, 1.f}, vs, 16 * warp);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
        float s = dwacc[rh];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        const uint32_t j = j_w + g + 8 * rh;
        if (p.dw && t == 0 && j < p.s) p.dw[((uint64_t)bb * p.h + h) * p.s + j] = s;
    }
}

// grid = (ceil(Tq / (16·warps)), B·H), block = 32·warps (warps <= attn_pipe_bwd_warps), dynamic
// shared memory for them (at the most warps attn_pipe_bwd_smem: bf16 8, 16, 32 or 48 KiB at dh
// 16, 32, 64, 128; tf32 20, 32, 48, 48 KiB); delta from attention_delta_bwd_bf16 / _f32 first.
extern "C" __global__ void __launch_bounds__(128) attention_pipe_dq_bwd_bf16(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_dq, PgBf16)
}
extern "C" __global__ void __launch_bounds__(128) attention_pipe_dq_bwd_f32(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_dq, PgTf32)
}
// grid = (ceil(S / (16·warps)), B·H): as the dQ kernel, its warps chosen for S.
extern "C" __global__ void __launch_bounds__(128) attention_pipe_dkdv_bwd_bf16(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_dkdv, PgBf16)
}
extern "C" __global__ void __launch_bounds__(128) attention_pipe_dkdv_bwd_f32(AttnParams p) {
    extern __shared__ __align__(128) unsigned char smem[];
    ATTN_PIPE_DISPATCH(attn_pipe_dkdv, PgTf32)
}
// @autocast-only end
