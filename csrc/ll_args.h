// Launch arguments of the low-latency kernels from their tensors, shared by the runtime over CUDA IPC
// (low_latency.cpp) and the one over NVSHMEM (nvshmem/bindings.cpp). Shapes and dtypes are checked by the
// callers; `wait_stats` is [R, R] int64 and this rank uses its own row.
#pragma once

#include <optional>
#include <string>

#include <torch/extension.h>

#include "kernels/low_latency.cuh"
#include "kernels/utils.cuh"
#include "kernels/wire_format.cuh"

namespace moe_a2a {

inline int64_t* ll_wait_row(const std::optional<torch::Tensor>& wait_stats, int rank, int num_ranks) {
    return wait_stats ? wait_stats->data_ptr<int64_t>() + static_cast<int64_t>(rank) * num_ranks : nullptr;
}

inline LLDispatchArgs ll_dispatch_args(const torch::Tensor& x, const torch::Tensor& topk_idx, int num_experts,
                                       int max_tokens, bool use_fp8, bool round_scale, bool use_ue8m0,
                                       torch::Tensor& recv_x, const std::optional<torch::Tensor>& recv_scales,
                                       torch::Tensor& recv_count, torch::Tensor& src_info,
                                       torch::Tensor& layout_range,
                                       const std::optional<torch::Tensor>& cumulative_stats,
                                       const std::optional<torch::Tensor>& wait_stats, int rank, int num_ranks) {
    LLDispatchArgs a{};
    a.x = x.data_ptr();
    a.topk_idx = topk_idx.data_ptr<int64_t>();
    a.num_tokens = static_cast<int>(x.size(0));
    a.num_topk = static_cast<int>(topk_idx.size(1));
    a.hidden = static_cast<int>(x.size(1));
    a.num_experts = num_experts;
    a.max_tokens = max_tokens;
    a.fp8 = use_fp8;
    a.round_scale = round_scale;
    a.ue8m0 = use_ue8m0;
    a.recv_x = recv_x.data_ptr();
    a.recv_scales = recv_scales ? recv_scales->data_ptr() : nullptr;
    a.recv_count = recv_count.data_ptr<int>();
    a.src_info = src_info.data_ptr<int>();
    a.layout_range = layout_range.data_ptr<int64_t>();
    a.cumulative_stats = cumulative_stats ? cumulative_stats->data_ptr<int>() : nullptr;
    a.wait_stats = ll_wait_row(wait_stats, rank, num_ranks);
    return a;
}

// `send_area`: the rank's send area of this set; x elsewhere is copied there first (not zero copy).
inline LLCombineArgs ll_combine_args(const torch::Tensor& x, const torch::Tensor& layout_range,
                                     const torch::Tensor& topk_idx, const torch::Tensor& topk_weights,
                                     torch::Tensor& out, const std::optional<torch::Tensor>& wait_stats,
                                     int num_experts, int max_tokens, const void* send_area, int format, int rank,
                                     int num_ranks) {
    LLCombineArgs a{};
    a.x = x.data_ptr();
    a.copy_rows = x.data_ptr() != send_area;
    a.layout_range = layout_range.data_ptr<int64_t>();
    a.topk_idx = topk_idx.data_ptr<int64_t>();
    a.topk_weights = topk_weights.data_ptr<float>();
    a.out = out.data_ptr();
    a.wait_stats = ll_wait_row(wait_stats, rank, num_ranks);
    a.num_tokens = static_cast<int>(topk_idx.size(0));
    a.num_topk = static_cast<int>(topk_idx.size(1));
    a.hidden = static_cast<int>(x.size(-1));
    a.num_experts = num_experts;
    a.max_tokens = max_tokens;
    a.format = format;
    return a;
}

// Which combine wire formats a path sends (a bit per kLLFormat*Combine code).
enum : unsigned { kWireBF16 = 1u << kLLFormatBF16Combine, kWireFP8 = 1u << kLLFormatFP8Combine,
                  kWireLogFMT = 1u << kLLFormatLogFMTCombine };

// The combine wire format code from its Python name ("bf16", "fp8", "logfmt"), refused unless it is in `accepted`
// (a mask of kWire* bits) or the hidden size does not split into the format's blocks. `what` names the path.
inline int combine_wire_format(const std::string& name, int64_t hidden, unsigned accepted, const char* what) {
    static constexpr const char* kNames[] = {"bf16", "fp8", "logfmt"};
    static constexpr int kCodes[] = {kLLFormatBF16Combine, kLLFormatFP8Combine, kLLFormatLogFMTCombine};
    static constexpr int kBlocks[] = {8, kFp8CombineBlock, kLogFmtGroup};  // channels a hidden size must split into
    for (int i = 0; i < 3; ++i) {
        if (name != kNames[i] || !(accepted & (1u << kCodes[i]))) continue;
        MOE_A2A_CHECK(hidden % kBlocks[i] == 0, what, " in ", name, " needs hidden divisible by ", kBlocks[i],
                      ", got ", hidden);
        return kCodes[i];
    }
    std::string names;  // only on the error path
    for (int i = 0; i < 3; ++i)
        if (accepted & (1u << kCodes[i])) names += (names.empty() ? "" : ", ") + std::string(kNames[i]);
    MOE_A2A_CHECK(false, what, " sends ", names, " rows, got '", name, "'");
    return -1;
}

}  // namespace moe_a2a
