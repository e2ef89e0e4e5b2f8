// cast.cu: conversions between the float storage types (f32, bf16, f16), elementwise.
//
// Each kernel widens its input to f32 exactly and rounds once to the output type (round to
// nearest, ties to even: common.cuh), so bf16 <-> f16 is one rounding, as on the cpu path.
#include "common.cuh"

// x: [n] of the source type, y: [n] of the destination type.
struct CastParams {
    const void* x;
    void* y;
    uint64_t n;
};
RECLMIS_PARAMS_SIZE(CastParams, 24);

__device__ __forceinline__ float load_f32(const void* x, uint64_t i) { return ((const float*)x)[i]; }
__device__ __forceinline__ float load_bf16(const void* x, uint64_t i) {
    return bf16_bits_to_f32(((const uint16_t*)x)[i]);
}
__device__ __forceinline__ float load_f16(const void* x, uint64_t i) { return f16_bits_to_f32(((const uint16_t*)x)[i]); }
__device__ __forceinline__ void store_f32(void* y, uint64_t i, float v) { ((float*)y)[i] = v; }
__device__ __forceinline__ void store_bf16(void* y, uint64_t i, float v) { ((uint16_t*)y)[i] = f32_to_bf16_bits(v); }
__device__ __forceinline__ void store_f16(void* y, uint64_t i, float v) { ((uint16_t*)y)[i] = f32_to_f16_bits(v); }

// grid-stride over n
#define CAST_LOOP(LOAD, STORE)                                                                   \
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;                                   \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) \
        STORE(p.y, i, LOAD(p.x, i));

extern "C" __global__ void cast_fwd_f32_bf16(CastParams p) { CAST_LOOP(load_f32, store_bf16) }
extern "C" __global__ void cast_fwd_bf16_f32(CastParams p) { CAST_LOOP(load_bf16, store_f32) }
extern "C" __global__ void cast_fwd_f32_f16(CastParams p) { CAST_LOOP(load_f32, store_f16) }
extern "C" __global__ void cast_fwd_f16_f32(CastParams p) { CAST_LOOP(load_f16, store_f32) }
extern "C" __global__ void cast_fwd_bf16_f16(CastParams p) { CAST_LOOP(load_bf16, store_f16) }
extern "C" __global__ void cast_fwd_f16_bf16(CastParams p) { CAST_LOOP(load_f16, store_bf16) }
