// Host entry points of the low-latency combine's LogFMT codec (kernels/wire_format.cuh): the kernels'
// scalar code run on the CPU, row by row, so tests compare it with the Python codec (moe_a2a.formats.logfmt)
// without a GPU. Same inputs and outputs as logfmt_encode / logfmt_decode.
#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include <torch/extension.h>

#include "kernels/utils.cuh"
#include "kernels/wire_format.cuh"
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

}  // namespace

void register_wire_format(pybind11::module_& m) {
    m.def("logfmt_encode_host", &logfmt_encode_host,
          "The low-latency kernels' LogFMT encoder run on the CPU: [n, hidden] float32 -> (codes, ranges)",
          pybind11::arg("x"));
    m.def("logfmt_decode_host", &logfmt_decode_host,
          "The low-latency kernels' LogFMT decoder run on the CPU: (codes, ranges) -> [n, hidden] float32",
          pybind11::arg("codes"), pybind11::arg("ranges"));
}

}  // namespace moe_a2a
