// Element types of the collective kernels: float32, float16 and bfloat16 as raw bits, 16 bytes at a time,
// with float32 conversions and the -0.0 sentinel of the Lamport protocol.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace moe_a2a::comm {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
    using Bits = uint32_t;
    static constexpr int kPerVec = 4;
    static constexpr Bits kSentinel = 0x80000000u;
    __device__ static float to_float(Bits b) { return __uint_as_float(b); }
    __device__ static Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<__half> {
    using Bits = uint16_t;
    static constexpr int kPerVec = 8;
    static constexpr Bits kSentinel = 0x8000u;
    __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
    __device__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<__nv_bfloat16> {
    using Bits = uint16_t;
    static constexpr int kPerVec = 8;
    static constexpr Bits kSentinel = 0x8000u;
    __device__ static float to_float(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
    __device__ static Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

template <typename T>
union Vec {
    int4 v;
    typename Elem<T>::Bits b[Elem<T>::kPerVec];
};

}  // namespace moe_a2a::comm
