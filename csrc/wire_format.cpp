// Host entry points of the combine wire formats (kernels/wire_format.cuh): the kernels' scalar code run on the
// CPU, so tests compare it with the Python codecs without a GPU. logfmt_encode_host / logfmt_decode_host: the
// LogFMT codec in its wire form (as moe_a2a.formats.logfmt). encode_combine_rows_host /
// decode_combine_rows_host: whole rows in the kernels' in-slot layout, encoded pass by pass as one warp does
// it (32 chunks read, then written), also over themselves, and decoded chunk by chunk as a combine does.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include <torch/extension.h>

#include "kernels/utils.cuh"
#include "kernels/wire_format.cuh"
#include "ll_args.h"
#include "low_latency.h"

namespace moe_a2a {

namespace {

// x: [n, hidden] float32 CPU, hidden divisible by 64 -> (codes [n, hidden * 5 / 4] uint8, ranges
// [n, hidden / 64, 2] float16).
std::tuple<torch::Tensor, torch::Tensor> logfmt_encode_host(const torch::Tensor& x) {
    MOE_A2A_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2,
                  "logfmt_encode_host takes a [n, hidden] float32 CPU tensor");
    MOE_A2A_CHECK(x.size(1) % kLogFmtGroup == 0, "LogFMT needs hidden divisible by 64, got ", x.size(1));
    const torch::Tensor in = x.contiguous();
    const int64_t n = in.size(0), hidden = in.size(1), groups = hidden / kLogFmtGroup;
    torch::Tensor codes = torch::empty({n, hidden * 5 / 4}, torch::kUInt8);
    torch::Tensor ranges = torch::empty({n, groups, 2}, torch::kFloat16);
    const float* v = in.data_ptr<float>();
    uint8_t* out = codes.data_ptr<uint8_t>();
    uint16_t* range_out = reinterpret_cast<uint16_t*>(ranges.data_ptr());
    for (int64_t g = 0; g < n * groups; ++g) {
        const float* f = v + g * kLogFmtGroup;
        float amax = 0.0f, amin = std::numeric_limits<float>::infinity();
        for (int i = 0; i < kLogFmtGroup; ++i) {
            const float m = std::fabs(f[i]);
            amax = std::max(amax, m);
            if (m > 0.0f) amin = std::min(amin, m);
        }
        const uint32_t bits = logfmt_range_bits(amax, amax > 0.0f ? amin : 0.0f);
        range_out[2 * g] = static_cast<uint16_t>(bits);
        range_out[2 * g + 1] = static_cast<uint16_t>(bits >> 16);
        float lo, step;
        logfmt_grid(bits, &lo, &step);
        for (int c = 0; c < kLogFmtGroup / 8; ++c) {
            uint32_t c8[8];
            for (int i = 0; i < 8; ++i) c8[i] = logfmt_code(f[8 * c + i], lo, step);
            uint16_t pieces[5];
            logfmt_pack8(c8, pieces);
            uint8_t* dst = out + g * kLogFmtCodeBytes + c * 10;
            for (int i = 0; i < 5; ++i) {
                dst[2 * i] = static_cast<uint8_t>(pieces[i]);
                dst[2 * i + 1] = static_cast<uint8_t>(pieces[i] >> 8);
            }
        }
    }
    return {codes, ranges};
}

// Inverse: (codes, ranges) as logfmt_encode_host returns them -> [n, hidden] float32.
torch::Tensor logfmt_decode_host(const torch::Tensor& codes, const torch::Tensor& ranges) {
    MOE_A2A_CHECK(codes.device().is_cpu() && codes.scalar_type() == torch::kUInt8 && codes.dim() == 2 &&
                      codes.size(1) % kLogFmtCodeBytes == 0,
                  "logfmt_decode_host takes [n, hidden * 5 / 4] uint8 CPU codes");
    const int64_t n = codes.size(0), groups = codes.size(1) / kLogFmtCodeBytes;
    MOE_A2A_CHECK(ranges.device().is_cpu() && ranges.scalar_type() == torch::kFloat16 && ranges.dim() == 3 &&
                      ranges.size(0) == n && ranges.size(1) == groups && ranges.size(2) == 2,
                  "logfmt_decode_host takes [n, hidden / 64, 2] float16 CPU ranges");
    const torch::Tensor c = codes.contiguous(), r = ranges.contiguous();
    torch::Tensor out = torch::empty({n, groups * kLogFmtGroup}, torch::kFloat32);
    const uint8_t* src = c.data_ptr<uint8_t>();
    const uint16_t* range_in = reinterpret_cast<const uint16_t*>(r.data_ptr());
    float* dst = out.data_ptr<float>();
    for (int64_t g = 0; g < n * groups; ++g) {
        float lo, step;
        logfmt_grid(range_in[2 * g] | (static_cast<uint32_t>(range_in[2 * g + 1]) << 16), &lo, &step);
        for (int k = 0; k < kLogFmtGroup / 8; ++k) {
            const uint8_t* b = src + g * kLogFmtCodeBytes + k * 10;
            uint16_t pieces[5];
            for (int i = 0; i < 5; ++i) pieces[i] = static_cast<uint16_t>(b[2 * i] | (b[2 * i + 1] << 8));
            uint32_t c8[8];
            logfmt_unpack8(pieces, c8);
            for (int i = 0; i < 8; ++i) dst[g * kLogFmtGroup + 8 * k + i] = logfmt_value(c8[i], lo, step);
        }
    }
    return out;
}

float bf16_bits_to_float(uint16_t bits) {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// encode_row_warp's passes on the host: per pass, every lane's 16 bytes are read before any is written, the
// block statistics (what the lanes' shuffles reduce) are taken over the pass's chunks, and each chunk is
// written at the kernels' offsets. `src` may be `dst`.
void encode_row_host(const uint8_t* src, uint8_t* dst, int hidden, int format) {
    const int chunks = hidden / 8;
    const int per_block = format == kLLFormatFP8Combine ? kFp8CombineBlock / 8 : kLogFmtGroup / 8;
    for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int n = std::min(32, chunks - c0);
        float f[32][8];
        for (int lane = 0; lane < n; ++lane)
            for (int k = 0; k < 8; ++k) {
                uint16_t bits;
                std::memcpy(&bits, src + (static_cast<int64_t>(c0 + lane) * 8 + k) * 2, 2);
                f[lane][k] = bf16_bits_to_float(bits);
            }
        for (int b0 = 0; b0 < n; b0 += per_block) {  // passes hold whole blocks (32 is a multiple of 16 and 8)
            float amax = 0.0f, amin = std::numeric_limits<float>::infinity();
            for (int lane = b0; lane < b0 + per_block; ++lane)
                for (int k = 0; k < 8; ++k) {
                    const float m = std::fabs(f[lane][k]);
                    amax = std::max(amax, m);
                    if (m > 0.0f) amin = std::min(amin, m);
                }
            for (int lane = b0; lane < b0 + per_block; ++lane) {
                const int ch = c0 + lane;
                uint8_t* values = dst + chunk_values_offset(format, ch);
                if (format == kLLFormatFP8Combine) {
                    const float scale = fp8_block_scale(amax);
                    const uint2 q = fp8_pack8(f[lane], scale);
                    std::memcpy(values, &q.x, 4);
                    std::memcpy(values + 4, &q.y, 4);
                    if (chunk_opens_block(format, ch)) std::memcpy(dst + chunk_scale_offset(format, ch), &scale, 4);
                } else {
                    const uint32_t range = logfmt_range_bits(amax, amax > 0.0f ? amin : 0.0f);
                    uint16_t pieces[5];
                    logfmt_encode8(f[lane], range, pieces);
                    std::memcpy(values, pieces, 10);
                    if (chunk_opens_block(format, ch)) std::memcpy(dst + chunk_scale_offset(format, ch), &range, 4);
                }
            }
        }
    }
}

// x: [n, hidden] bfloat16 CPU -> [n, 2 * hidden] uint8: each row's BF16 slot with its encoding in front (the rest
// of the slot as it was: x's bytes with `in_place`, zeros otherwise).
torch::Tensor encode_combine_rows_host(const torch::Tensor& x, const std::string& format_name, bool in_place) {
    MOE_A2A_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kBFloat16 && x.dim() == 2,
                  "encode_combine_rows_host takes a [n, hidden] bfloat16 CPU tensor");
    const int64_t n = x.size(0), hidden = x.size(1);
    const int format = combine_wire_format(format_name, hidden, kWireFP8 | kWireLogFMT, "the row encoding");
    const torch::Tensor in = x.contiguous();
    torch::Tensor out = in_place ? in.view(torch::kUInt8).clone() : torch::zeros({n, hidden * 2}, torch::kUInt8);
    const uint8_t* src = reinterpret_cast<const uint8_t*>(in.data_ptr());
    uint8_t* dst = out.data_ptr<uint8_t>();
    for (int64_t r = 0; r < n; ++r)
        encode_row_host(in_place ? dst + r * hidden * 2 : src + r * hidden * 2, dst + r * hidden * 2,
                        static_cast<int>(hidden), format);
    return out;
}

// rows: [n, 2 * hidden] uint8 as encode_combine_rows_host returns them -> [n, hidden] float32, chunk by chunk
// at the offsets the combines read.
torch::Tensor decode_combine_rows_host(const torch::Tensor& rows, int64_t hidden, const std::string& format_name) {
    MOE_A2A_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kUInt8 && rows.dim() == 2 &&
                      rows.size(1) == hidden * 2,
                  "decode_combine_rows_host takes [n, 2 * hidden] uint8 CPU rows");
    const int format = combine_wire_format(format_name, hidden, kWireFP8 | kWireLogFMT, "the row encoding");
    const torch::Tensor in = rows.contiguous();
    const int64_t n = in.size(0);
    torch::Tensor out = torch::empty({n, hidden}, torch::kFloat32);
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* row = in.data_ptr<uint8_t>() + r * hidden * 2;
        for (int ch = 0; ch < hidden / 8; ++ch) {
            const uint8_t* values = row + chunk_values_offset(format, ch);
            uint32_t scale_bits;
            std::memcpy(&scale_bits, row + chunk_scale_offset(format, ch), 4);
            float* f = out.data_ptr<float>() + r * hidden + ch * 8;
            if (format == kLLFormatFP8Combine) {
                uint32_t w[2];
                std::memcpy(w, values, 8);
                float scale;
                std::memcpy(&scale, &scale_bits, 4);
                fp8_unpack8(w[0], w[1], scale, f);
            } else {
                uint16_t pieces[5];
                std::memcpy(pieces, values, 10);
                logfmt_decode8(pieces, scale_bits, f);
            }
        }
    }
    return out;
}

}  // namespace

void register_wire_format(pybind11::module_& m) {
    m.def("encode_combine_rows_host", &encode_combine_rows_host,
          "The combine kernels' row encoding (fp8, logfmt) run on the CPU: [n, hidden] bf16 -> [n, 2 hidden] uint8",
          pybind11::arg("x"), pybind11::arg("format"), pybind11::arg("in_place") = false);
    m.def("decode_combine_rows_host", &decode_combine_rows_host,
          "The combine kernels' row decoding run on the CPU: [n, 2 hidden] uint8 -> [n, hidden] float32",
          pybind11::arg("rows"), pybind11::arg("hidden"), pybind11::arg("format"));
    m.def("logfmt_encode_host", &logfmt_encode_host,
          "The low-latency kernels' LogFMT encoder run on the CPU: [n, hidden] float32 -> (codes, ranges)",
          pybind11::arg("x"));
    m.def("logfmt_decode_host", &logfmt_decode_host,
          "The low-latency kernels' LogFMT decoder run on the CPU: (codes, ranges) -> [n, hidden] float32",
          pybind11::arg("codes"), pybind11::arg("ranges"));
}

}  // namespace moe_a2a
