// Combine wire formats of the low-latency kernels (IPC and NVSHMEM): how a row of `hidden` BF16 expert
// outputs sits in its slot. A slot keeps BF16's 2 * hidden bytes; an encoded row fills its first bytes only,
// so receivers (or RDMA puts) move fewer of them.
//
//   kLLFormatBF16Combine    hidden bf16
//   kLLFormatFP8Combine     per 128 channels: 128 e4m3 bytes, then their float32 scale
//                           (max(amax, 1e-4) / 448, as moe_a2a.fp8.per_token_cast_to_fp8): 132 bytes
//   kLLFormatLogFMTCombine  per 64 channels: 80 bytes of 10-bit codes, then the group's float16 log range
//                           (lo, hi): 84 bytes. Codes, ranges and rounding as docs/logfmt.md defines them
//                           (moe_a2a.formats.logfmt); eight codes of consecutive channels fill 10 bytes.
//
// Each block keeps its scale right after its values, so an encoding warp writes a row over itself front to
// back (zero-copy inputs are encoded in place): nothing it writes lies past what it has read.
//
// The scalar pieces below (offsets, casts, codes) are __host__ __device__: moe_a2a._C's host entry points
// (wire_format.cpp) run the same code on the CPU, where tests compare it with the Python codecs and check the
// in-place encoding pass by pass.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "low_latency.cuh"

namespace moe_a2a {

constexpr float kFp8Max = 448.0f;      // largest finite e4m3 value
constexpr float kFp8MinAmax = 1e-4f;   // floor of a block's amax, so an all-zero block gets a finite scale
constexpr int kFp8CombineBlock = 128;
constexpr int kFp8CombineBlockBytes = 132;
constexpr int kLogFmtGroup = 64;
constexpr int kLogFmtGroupBytes = 84;
constexpr int kLogFmtCodeBytes = 80;
constexpr float kLogFmtSpan = 16.0f;     // widest log2 span of a group (LOG_SPAN)
constexpr float kLogFmtSteps = 510.0f;   // nonzero levels 1..511 are 510 steps apart

// Where chunk `ch` (channels 8 ch .. 8 ch + 7) of an encoded row keeps its values, where its block keeps the
// scale (FP8) or log range (LogFMT), and whether the chunk opens its block (its writer stores that word).
MOE_A2A_LL_HD inline int64_t chunk_values_offset(int format, int ch) {
    return format == kLLFormatFP8Combine ? (ch >> 4) * kFp8CombineBlockBytes + (ch & 15) * 8
                                         : (ch >> 3) * kLogFmtGroupBytes + (ch & 7) * 10;
}
MOE_A2A_LL_HD inline int64_t chunk_scale_offset(int format, int ch) {
    return format == kLLFormatFP8Combine ? (ch >> 4) * kFp8CombineBlockBytes + kFp8CombineBlock
                                         : (ch >> 3) * kLogFmtGroupBytes + kLogFmtCodeBytes;
}
MOE_A2A_LL_HD inline bool chunk_opens_block(int format, int ch) {
    return format == kLLFormatFP8Combine ? (ch & 15) == 0 : (ch & 7) == 0;
}

// FP8 e4m3 with one float32 scale per 128 channels (moe_a2a.fp8): the scale from the block's largest
// magnitude, eight values cast with it (nearest even, saturating) as two words, and back.
MOE_A2A_LL_HD inline float fp8_block_scale(float amax) { return fmaxf(amax, kFp8MinAmax) / kFp8Max; }

MOE_A2A_LL_HD inline uint2 fp8_pack8(const float f[8], float scale) {
    const float inv = 1.0f / scale;
    uint32_t packed[2];
    for (int k = 0; k < 2; ++k) {
        const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * k] * inv, f[4 * k + 1] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * k + 2] * inv, f[4 * k + 3] * inv),
                                                     __NV_SATFINITE, __NV_E4M3);
        packed[k] = lo | (hi << 16);
    }
    return make_uint2(packed[0], packed[1]);
}

MOE_A2A_LL_HD inline void fp8_unpack8(uint32_t w0, uint32_t w1, float scale, float f[8]) {
    for (int k = 0; k < 8; ++k) {
        const uint32_t byte = ((k < 4 ? w0 : w1) >> (8 * (k & 3))) & 0xFFu;
        const __half h(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(byte), __NV_E4M3));
        f[k] = __half2float(h) * scale;
    }
}

// Bytes an encoded row of `hidden` channels fills in its slot.
MOE_A2A_LL_HD inline int64_t ll_combine_row_bytes(int64_t hidden, int format) {
    if (format == kLLFormatFP8Combine) return hidden / kFp8CombineBlock * kFp8CombineBlockBytes;
    if (format == kLLFormatLogFMTCombine) return hidden / kLogFmtGroup * kLogFmtGroupBytes;
    return 2 * hidden;
}

// float16 bits of v rounded toward +inf (`up`) or -inf, so the stored bound still covers v.
MOE_A2A_LL_HD inline uint16_t f16_bits_directed(float v, bool up) {
    const __half h = __float2half_rn(v);
    const float back = __half2float(h);
    uint16_t u = static_cast<__half_raw>(h).x;
    const bool negative = (u & 0x8000u) != 0, zero = (u & 0x7FFFu) == 0;
    if (up && back < v) u = zero ? 0x0001u : negative ? u - 1 : u + 1;
    if (!up && back > v) u = zero ? 0x8001u : negative ? u + 1 : u - 1;
    return u;
}

MOE_A2A_LL_HD inline float f16_bits_to_float(uint32_t bits) {
    __half_raw r;
    r.x = static_cast<unsigned short>(bits & 0xFFFFu);
    return __half2float(__half(r));
}

// A group's log range from its largest magnitude and its smallest nonzero one (amax 0: a zero group), as
// float16 bits lo | hi << 16 (lo rounded down, hi up).
MOE_A2A_LL_HD inline uint32_t logfmt_range_bits(float amax, float amin_nonzero) {
    float lo = 0.0f, hi = 0.0f;
    if (amax > 0.0f) {
        hi = log2f(amax);
        lo = fmaxf(log2f(amin_nonzero), hi - kLogFmtSpan);
    }
    return static_cast<uint32_t>(f16_bits_directed(lo, false)) |
           (static_cast<uint32_t>(f16_bits_directed(hi, true)) << 16);
}

// The grid of a stored range: its lowest level's log2 and the log2 step between levels.
MOE_A2A_LL_HD inline void logfmt_grid(uint32_t bits, float* lo, float* step) {
    *lo = f16_bits_to_float(bits);
    *step = (f16_bits_to_float(bits >> 16) - *lo) / kLogFmtSteps;
}

// 10-bit code of v: sign in bit 9 (never on a zero), level 0 (zero) or 1..511 (nearest in the log domain,
// ties to even). Magnitudes below half the smallest level are zero.
MOE_A2A_LL_HD inline uint32_t logfmt_code(float v, float lo, float step) {
    const float mag = fabsf(v);
    if (!(mag >= exp2f(lo) * 0.5f)) return 0;
    float level = step > 0.0f ? (log2f(mag) - lo) / step : 0.0f;
    level = fminf(fmaxf(level, 0.0f), kLogFmtSteps);
    const uint32_t m = static_cast<uint32_t>(rintf(level)) + 1;
    return m | (v < 0.0f ? 0x200u : 0u);
}

MOE_A2A_LL_HD inline float logfmt_value(uint32_t code, float lo, float step) {
    const uint32_t m = code & 0x1FFu;
    if (m == 0) return 0.0f;
#if defined(__CUDA_ARCH__)
    const float e = __fadd_rn(lo, __fmul_rn(static_cast<float>(m - 1), step));  // no FMA: the codec rounds twice
#else
    const float e = lo + static_cast<float>(m - 1) * step;
#endif
    const float v = exp2f(e);
    return (code & 0x200u) ? -v : v;
}

// Eight codes of consecutive channels as 80 bits, least significant first (two 40-bit words of
// docs/logfmt.md), in five 16-bit pieces.
MOE_A2A_LL_HD inline void logfmt_pack8(const uint32_t c[8], uint16_t out[5]) {
    uint64_t lo = 0;
    for (int i = 0; i < 6; ++i) lo |= static_cast<uint64_t>(c[i] & 0x3FFu) << (10 * i);
    lo |= static_cast<uint64_t>(c[6] & 0xFu) << 60;
    const uint32_t hi = ((c[6] & 0x3FFu) >> 4) | ((c[7] & 0x3FFu) << 6);
    for (int i = 0; i < 4; ++i) out[i] = static_cast<uint16_t>(lo >> (16 * i));
    out[4] = static_cast<uint16_t>(hi);
}

MOE_A2A_LL_HD inline void logfmt_unpack8(const uint16_t in[5], uint32_t c[8]) {
    uint64_t lo = 0;
    for (int i = 0; i < 4; ++i) lo |= static_cast<uint64_t>(in[i]) << (16 * i);
    const uint32_t hi = in[4];
    for (int i = 0; i < 6; ++i) c[i] = static_cast<uint32_t>(lo >> (10 * i)) & 0x3FFu;
    c[6] = (static_cast<uint32_t>(lo >> 60) | (hi << 4)) & 0x3FFu;
    c[7] = (hi >> 6) & 0x3FFu;
}

// Eight values of a group with log range `range` (logfmt_range_bits) as five 16-bit pieces, and back.
MOE_A2A_LL_HD inline void logfmt_encode8(const float f[8], uint32_t range, uint16_t out[5]) {
    float lo, step;
    logfmt_grid(range, &lo, &step);
    uint32_t codes[8];
    for (int k = 0; k < 8; ++k) codes[k] = logfmt_code(f[k], lo, step);
    logfmt_pack8(codes, out);
}

MOE_A2A_LL_HD inline void logfmt_decode8(const uint16_t in[5], uint32_t range, float f[8]) {
    uint32_t codes[8];
    logfmt_unpack8(in, codes);
    float lo, step;
    logfmt_grid(range, &lo, &step);
    for (int k = 0; k < 8; ++k) f[k] = logfmt_value(codes[k], lo, step);
}

}  // namespace moe_a2a
