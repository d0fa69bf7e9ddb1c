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

constexpr float kFp8Max = 448.0f;   // largest finite e4m3 value
constexpr float kFp8MinAmax = 1e-4f;   // floor of a block's amax, so an all-zero block gets a finite scale

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
    float scale = fmaxf(amax, kFp8MinAmax) / kFp8Max;
    if (round_scale) scale = round_up_pow2(scale);
    const float inv = 1.0f / scale;
    uint32_t packed[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * k] * inv, f[4 * k + 1] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * k + 2] * inv, f[4 * k + 3] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        packed[k] = lo | (hi << 16);
    }
    *scale_out = scale;
    return make_uint2(packed[0], packed[1]);
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
        if constexpr (kFormat == kLLFormatFP8Combine) {
            float scale;
            const uint2 q = cast_fp8_chunk(v, false, &scale);  // every lane: the 16 lanes of a block reduce
            if (have) {
                char* block = dst + (ch >> 4) * kFp8CombineBlockBytes;
                uint32_t* words = reinterpret_cast<uint32_t*>(block + (ch & 15) * 8);
                words[0] = q.x;
                words[1] = q.y;
                if ((ch & 15) == 0) *reinterpret_cast<float*>(block + kFp8CombineBlock) = scale;
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
            float lo, step;
            logfmt_grid(range, &lo, &step);
            uint32_t codes[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) codes[k] = logfmt_code(f[k], lo, step);
            uint16_t packed[5];
            logfmt_pack8(codes, packed);
            if (have) {
                char* group = dst + (ch >> 3) * kLogFmtGroupBytes;
                uint16_t* out = reinterpret_cast<uint16_t*>(group + (ch & 7) * 10);
#pragma unroll
                for (int k = 0; k < 5; ++k) out[k] = packed[k];
                if ((ch & 7) == 0) *reinterpret_cast<uint32_t*>(group + kLogFmtCodeBytes) = range;
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
    } else if constexpr (kFormat == kLLFormatFP8Combine) {
        const char* block = reinterpret_cast<const char*>(row) + (ch >> 4) * kFp8CombineBlockBytes;
        const int* words = reinterpret_cast<const int*>(block + (ch & 15) * 8);
        return make_int4(ld_cg(words), ld_cg(words + 1), ld_cg(reinterpret_cast<const int*>(block + kFp8CombineBlock)),
                         0);
    } else {
        const char* group = reinterpret_cast<const char*>(row) + (ch >> 3) * kLogFmtGroupBytes;
        const unsigned short* p = reinterpret_cast<const unsigned short*>(group + (ch & 7) * 10);
        const uint32_t w0 = __ldcg(p) | (static_cast<uint32_t>(__ldcg(p + 1)) << 16);
        const uint32_t w1 = __ldcg(p + 2) | (static_cast<uint32_t>(__ldcg(p + 3)) << 16);
        const uint32_t w2 = __ldcg(p + 4);
        const int w3 = ld_cg(reinterpret_cast<const int*>(group + kLogFmtCodeBytes));
        return make_int4(static_cast<int>(w0), static_cast<int>(w1), static_cast<int>(w2), w3);
    }
}

template <int kFormat>
__device__ __forceinline__ void decode_chunk(const int4& raw, float f[8]) {
    if constexpr (kFormat == kLLFormatBF16Combine) {
        const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
        for (int m = 0; m < 8; ++m) f[m] = __bfloat162float(h[m]);
    } else if constexpr (kFormat == kLLFormatFP8Combine) {
        const __nv_fp8_e4m3* q = reinterpret_cast<const __nv_fp8_e4m3*>(&raw);
        const float scale = __int_as_float(raw.z);
#pragma unroll
        for (int m = 0; m < 8; ++m) f[m] = static_cast<float>(q[m]) * scale;
    } else {
        const uint16_t pieces[5] = {static_cast<uint16_t>(raw.x), static_cast<uint16_t>(static_cast<uint32_t>(raw.x) >> 16),
                                    static_cast<uint16_t>(raw.y), static_cast<uint16_t>(static_cast<uint32_t>(raw.y) >> 16),
                                    static_cast<uint16_t>(raw.z)};
        uint32_t codes[8];
        logfmt_unpack8(pieces, codes);
        float lo, step;
        logfmt_grid(static_cast<uint32_t>(raw.w), &lo, &step);
#pragma unroll
        for (int m = 0; m < 8; ++m) f[m] = logfmt_value(codes[m], lo, step);
    }
}

}  // namespace
}  // namespace moe_a2a
