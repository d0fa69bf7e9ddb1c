// Device side of the combine wire formats (wire_format.cuh): the FP8 cast of a 16-byte chunk, a warp's
// encoding of a row (in place allowed), and the load and decode of one 8-channel chunk of an encoded row.
// Shared by the low-latency kernels (ll_device.cuh) and the intranode combine. Internal linkage: each
// translation unit gets its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "utils.cuh"
#include "wire_format.cuh"

namespace moe_a2a {
namespace {

// Smallest power of two >= s (s positive and normal): the UE8M0-representable scale.
__device__ __forceinline__ float round_up_pow2(float s) {
    uint32_t bits = __float_as_uint(s);
    if (bits & 0x7FFFFFu) bits = (bits & 0x7F800000u) + 0x800000u;
    return __uint_as_float(bits);
}

// FP8 e4m3 of one 16-byte chunk (8 BF16 channels) with its per-128-channel scale. The 16 lanes that hold
// one 128-channel block reduce its amax together, so every lane of the warp must call this.
__device__ __forceinline__ uint2 cast_fp8_chunk(const int4& v, bool round_scale, float* scale_out) {
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
    float f[8];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        f[k] = __bfloat162float(h[k]);
        amax = fmaxf(amax, fabsf(f[k]));
    }
#pragma unroll
    for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
    float scale = fp8_block_scale(amax);
    if (round_scale) scale = round_up_pow2(scale);
    *scale_out = scale;
    return fp8_pack8(f, scale);
}

// Encodes one row of `hidden` BF16 values at `src` into `dst` in combine format kFormat (FP8 or LogFMT,
// wire_format.cuh); one warp. `src` may equal `dst` (in place): each pass reads 32 chunks of 8 channels into
// registers, syncs the warp, then writes their encoding, which ends before the bytes later passes read
// (pass j writes below byte 264 (j + 1) for FP8, 336 (j + 1) for LogFMT, and has read up to 512 (j + 1)).
template <int kFormat>
__device__ void encode_row_warp(const int4* src, char* dst, int hidden, int lane) {
    const int chunks = hidden / 8;
    for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int ch = c0 + lane;
        const bool have = ch < chunks;  // whole 16-lane (FP8) or 8-lane (LogFMT) groups, as hidden divides
        int4 v = make_int4(0, 0, 0, 0);
        if (have) v = src[ch];
        __syncwarp();
        char* values = dst + chunk_values_offset(kFormat, ch);
        const bool opens = chunk_opens_block(kFormat, ch);
        if constexpr (kFormat == kLLFormatFP8Combine) {
            float scale;
            const uint2 q = cast_fp8_chunk(v, false, &scale);  // every lane: the 16 lanes of a block reduce
            if (have) {
                uint32_t* words = reinterpret_cast<uint32_t*>(values);  // 4-byte aligned (132-byte blocks)
                words[0] = q.x;
                words[1] = q.y;
                if (opens) *reinterpret_cast<float*>(dst + chunk_scale_offset(kFormat, ch)) = scale;
            }
        } else {
            const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
            float f[8];
            float amax = 0.0f, amin = INFINITY;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                f[k] = __bfloat162float(h[k]);
                const float m = fabsf(f[k]);
                amax = fmaxf(amax, m);
                if (m > 0.0f) amin = fminf(amin, m);
            }
#pragma unroll
            for (int m = 4; m >= 1; m >>= 1) {  // the 8 lanes of a 64-channel group
                amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
                amin = fminf(amin, __shfl_xor_sync(0xFFFFFFFFu, amin, m));
            }
            const uint32_t range = logfmt_range_bits(amax, amax > 0.0f ? amin : 0.0f);
            uint16_t packed[5];
            logfmt_encode8(f, range, packed);
            if (have) {
                uint16_t* out = reinterpret_cast<uint16_t*>(values);  // 2-byte aligned (84-byte groups)
#pragma unroll
                for (int k = 0; k < 5; ++k) out[k] = packed[k];
                if (opens) *reinterpret_cast<uint32_t*>(dst + chunk_scale_offset(kFormat, ch)) = range;
            }
        }
        __syncwarp();
    }
}

// The raw words of chunk `ch` (8 channels) of an encoded row, loaded L2-coherently (rows of other ranks):
// BF16: the 16 bytes; FP8: x, y the 8 e4m3 bytes, z the block's scale; LogFMT: x, y, z the 10 code bytes
// (z's low half), w the group's range.
template <int kFormat>
__device__ __forceinline__ int4 load_chunk(const int4* row, int ch) {
    if constexpr (kFormat == kLLFormatBF16Combine) {
        return ld_cg_v4(row + ch);
    } else {
        const char* base = reinterpret_cast<const char*>(row);
        const int scale = ld_cg(reinterpret_cast<const int*>(base + chunk_scale_offset(kFormat, ch)));
        if constexpr (kFormat == kLLFormatFP8Combine) {
            const int* words = reinterpret_cast<const int*>(base + chunk_values_offset(kFormat, ch));
            return make_int4(ld_cg(words), ld_cg(words + 1), scale, 0);
        } else {
            const unsigned short* p = reinterpret_cast<const unsigned short*>(base + chunk_values_offset(kFormat, ch));
            const uint32_t w0 = __ldcg(p) | (static_cast<uint32_t>(__ldcg(p + 1)) << 16);
            const uint32_t w1 = __ldcg(p + 2) | (static_cast<uint32_t>(__ldcg(p + 3)) << 16);
            const uint32_t w2 = __ldcg(p + 4);
            return make_int4(static_cast<int>(w0), static_cast<int>(w1), static_cast<int>(w2), scale);
        }
    }
}

template <int kFormat>
__device__ __forceinline__ void decode_chunk(const int4& raw, float f[8]) {
    if constexpr (kFormat == kLLFormatBF16Combine) {
        const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
        for (int m = 0; m < 8; ++m) f[m] = __bfloat162float(h[m]);
    } else if constexpr (kFormat == kLLFormatFP8Combine) {
        fp8_unpack8(static_cast<uint32_t>(raw.x), static_cast<uint32_t>(raw.y), __int_as_float(raw.z), f);
    } else {
        const uint16_t pieces[5] = {static_cast<uint16_t>(raw.x), static_cast<uint16_t>(static_cast<uint32_t>(raw.x) >> 16),
                                    static_cast<uint16_t>(raw.y), static_cast<uint16_t>(static_cast<uint32_t>(raw.y) >> 16),
                                    static_cast<uint16_t>(raw.z)};
        logfmt_decode8(pieces, static_cast<uint32_t>(raw.w), f);
    }
}

}  // namespace
}  // namespace moe_a2a
