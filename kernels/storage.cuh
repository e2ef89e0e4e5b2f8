// f32-or-bf16 element access for the kernels that serve both storages from one template body
// (batch norm, the PLAM gate). Its own header, not common.cuh: every module embeds its expanded
// source in the binary, so what common.cuh holds is paid for once per module.
#pragma once
#include "common.cuh"

// Element i of a tensor stored as f32 or as bf16 bits (BF16), as f32 (exact).
template <bool BF16>
__device__ __forceinline__ float load_f32(const void* v, uint64_t i) {
    return BF16 ? bf16_bits_to_f32(((const uint16_t*)v)[i]) : ((const float*)v)[i];
}

// Stores x as element i: as is in f32 storage, rounded once to bf16 in bf16 storage (BF16).
template <bool BF16>
__device__ __forceinline__ void store_f32(void* v, uint64_t i, float x) {
    if (BF16) {
        ((uint16_t*)v)[i] = f32_to_bf16_bits(x);
    } else {
        ((float*)v)[i] = x;
    }
}
