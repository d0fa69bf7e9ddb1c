// pybind11 module moe_a2a._C: the layout kernel and the per-rank intranode runtime (the IPC-shared NVL
// allocation, the peer pointer table, the pinned host record the kernels report counts and errors
// through, and launch wrappers taking tensors). Streams and events are handled in Python: every launch
// runs on the current CUDA stream, which the backend sets to its communication stream. One translation
// unit includes torch, which keeps the build short.
#include <torch/extension.h>

#include "low_latency.h"
#include "comm/allreduce.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/api.cuh"
#include "kernels/low_latency.cuh"
#include "kernels/utils.cuh"
#include "ipc.h"
#include "ll_args.h"

namespace moe_a2a {

namespace {

const char* phase_name(int phase) {
    switch (phase) {
        case kPhaseNotify: return "notify (count exchange)";
        case kPhaseDispatchStart: return "dispatch (buffer free)";
        case kPhaseDispatchStaged: return "dispatch (rows staged)";
        case kPhaseCombineStart: return "combine (buffer free)";
        case kPhaseCombineStaged: return "combine (rows staged)";
        case kPhaseCombineInput: return "get_next_combine_buffer (peers done reading the buffer)";
        default: return "unknown";
    }
}

void check_tensor(const torch::Tensor& t, const char* name, torch::ScalarType dtype, int dim) {
    MOE_A2A_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
    MOE_A2A_CHECK(t.scalar_type() == dtype, name, " has dtype ", c10::toString(t.scalar_type()), ", expected ",
                  c10::toString(dtype));
    MOE_A2A_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

template <typename T>
T* opt_ptr(const std::optional<torch::Tensor>& t) {
    return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor, torch::Tensor> get_dispatch_layout(
    const torch::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t num_ranks_per_node) {
    MOE_A2A_CHECK(topk_idx.is_cuda(), "topk_idx must be a CUDA tensor");
    MOE_A2A_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == torch::kInt64,
                "topk_idx must be [num_tokens, num_topk] int64");
    MOE_A2A_CHECK(num_ranks > 0 && num_experts > 0 && num_experts % num_ranks == 0,
                "num_experts must be a positive multiple of num_ranks");
    MOE_A2A_CHECK(num_ranks_per_node > 0 && (num_ranks <= num_ranks_per_node || num_ranks % num_ranks_per_node == 0),
                "num_ranks must be a multiple of num_ranks_per_node");
    MOE_A2A_CHECK(num_experts <= 8192, "the layout kernel supports at most 8192 experts");
    const c10::cuda::CUDAGuard guard(topk_idx.device());
    const auto idx = topk_idx.contiguous();
    const int64_t num_tokens = idx.size(0);
    const auto i32 = torch::TensorOptions().dtype(torch::kInt32).device(idx.device());
    auto per_rank = torch::zeros({num_ranks}, i32);
    auto per_expert = torch::zeros({num_experts}, i32);
    std::optional<torch::Tensor> per_node;
    if (num_ranks > num_ranks_per_node) per_node = torch::zeros({num_ranks / num_ranks_per_node}, i32);
    auto in_rank = torch::empty({num_tokens, num_ranks}, i32.dtype(torch::kBool));
    launch_dispatch_layout(idx.data_ptr<int64_t>(), static_cast<int>(num_tokens), static_cast<int>(idx.size(1)),
                           static_cast<int>(num_experts), static_cast<int>(num_ranks),
                           static_cast<int>(num_ranks_per_node), per_rank.data_ptr<int>(),
                           per_node ? per_node->data_ptr<int>() : nullptr, per_expert.data_ptr<int>(),
                           in_rank.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream());
    return {per_rank, per_node, per_expert, in_rank};
}


class Runtime : public IpcRuntime<HostInfo, kMaxRanks> {
   public:
    Runtime(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s)
        : IpcRuntime("intranode", rank, num_ranks, timeout_s), num_nvl_bytes_(num_nvl_bytes) {
        MOE_A2A_CHECK(num_nvl_bytes >= 0 && num_nvl_bytes % 16 == 0, "num_nvl_bytes must be a multiple of 16");
        allocate_shared(kHeaderBytes + num_nvl_bytes);
        MOE_A2A_CUDA_CHECK(cudaMemset(local_, 0, kHeaderBytes + num_nvl_bytes));
        allocate_host_record();
        MOE_A2A_CUDA_CHECK(cudaDeviceSynchronize());
    }

    ~Runtime() { destroy(); }

    void destroy() {
        if (begin_destroy()) release_shared();
    }

    int64_t num_nvl_bytes() const { return num_nvl_bytes_; }

    // The error the kernels recorded, as text; empty while none. Built without iostreams on purpose:
    // it runs on the error path only, where nothing else should be able to fail.
    std::string error() const {
        if (!host_ || host_->error_code == kErrNone) return "";
        const int code = host_->error_code;
        const std::string me = "rank " + std::to_string(rank_);
        if (code == kErrPeerTimeout)
            return me + " timed out after " + std::to_string(timeout_ns_ / 1000000) + " ms in " +
                   phase_name(host_->error_phase) + " (round " + std::to_string(host_->error_round) +
                   ") waiting for rank " + std::to_string(host_->error_peer) + ": barrier counter " +
                   std::to_string(host_->error_expected) + " expected, " + std::to_string(host_->error_seen) + " seen";
        if (code == kErrGridTimeout)
            return me + " timed out in " + phase_name(host_->error_phase) + " waiting for its own blocks (grid barrier " +
                   std::to_string(host_->error_expected) + "); are num_ranks * num_sms blocks co-resident on the device?";
        if (code == kErrBadHandle)
            return me + " combine: a token's copy on rank " + std::to_string(host_->error_peer) + " would be row " +
                   std::to_string(host_->error_seen) + " of its " + std::to_string(host_->error_expected) +
                   " staged rows (the handle does not match the dispatch that rank saw)";
        if (code == kErrMismatch) {
            static const char* const fields[kSignatureInts] = {"operation (1 dispatch, 2 combine)", "bytes per row",
                                                               "scales per row", "top-k width", "number of experts",
                                                               "combine windows (set_combine_windows; 0 on fewer than 16 SMs)"};
            const int field = host_->error_round;
            return me + ": ranks disagree on the " + std::string(field >= 0 && field < kSignatureInts ? fields[field] : "?") +
                   " in " + phase_name(host_->error_phase) + ": rank " + std::to_string(rank_) + " has " +
                   std::to_string(host_->error_expected) + ", rank " + std::to_string(host_->error_peer) + " has " +
                   std::to_string(host_->error_seen);
        }
        if (code == kErrCopyTimeout)
            return me + " timed out in " + std::string(phase_name(host_->error_phase)) + " (round " +
                   std::to_string(host_->error_round) + ") waiting for a bulk copy of its own to complete";
        if (code == kErrRecvOverflow)
            return me + " received " + std::to_string(host_->error_seen) + " tokens but only " +
                   std::to_string(host_->error_expected) + " rows were allocated (num_worst_tokens too small)";
        return me + ": unknown error code " + std::to_string(code);
    }

    void raise_if_error() const {
        const std::string e = error();
        if (!e.empty()) throw std::runtime_error("moe_a2a intranode: " + e + "; the buffer cannot be used again");
    }

    // Exchange counts (see notify_kernel). Outputs are preallocated by the caller.
    void notify(const torch::Tensor& num_tokens_per_expert, const torch::Tensor& is_token_in_rank, int num_channels,
                int expert_alignment, int num_worst_tokens, int seq, torch::Tensor& send_head,
                torch::Tensor& channel_prefix, torch::Tensor& rank_prefix, torch::Tensor& recv_channel_prefix) {
        check_ready();
        check_tensor(num_tokens_per_expert, "num_tokens_per_expert", torch::kInt32, 1);
        check_tensor(is_token_in_rank, "is_token_in_rank", torch::kBool, 2);
        const int num_experts = static_cast<int>(num_tokens_per_expert.size(0));
        MOE_A2A_CHECK(num_experts <= kMaxExperts && num_experts / num_ranks_ <= kMaxLocalExperts, "at most ",
                    kMaxExperts, " experts");
        MOE_A2A_CHECK(num_channels >= 1 && num_channels <= kMaxChannels, "num_channels must be in [1, ", kMaxChannels, "]");
        launch_notify(ctx(), num_tokens_per_expert.data_ptr<int>(), num_experts, is_token_in_rank.data_ptr<bool>(),
                      static_cast<int>(is_token_in_rank.size(0)), num_channels, expert_alignment, num_worst_tokens, seq,
                      send_head.data_ptr<int>(), channel_prefix.data_ptr<int>(), rank_prefix.data_ptr<int>(),
                      recv_channel_prefix.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
    }

    // Wait (GIL released) until notify `seq` published its counts. Returns (num_recv, per-expert list,
    // error text); the error text is empty on success, and the caller raises it.
    std::tuple<int, std::vector<int>, std::string> wait_notify(int seq, int num_local_experts) const {
        MOE_A2A_CHECK(connected_ && !destroyed_, "moe_a2a intranode: the buffer is not connected or was destroyed");
        const auto start = std::chrono::steady_clock::now();
        const auto limit = std::chrono::nanoseconds(2 * timeout_ns_) + std::chrono::seconds(5);
        {
            pybind11::gil_scoped_release release;
            // The dispatch launch waits on this, so the first 200 us are a pure spin: a yield can hand the core
            // to another thread for a whole time slice when the ranks' threads outnumber the cores. After that
            // (a slow peer, a long previous kernel) the wait yields.
            const auto spin_until = start + std::chrono::microseconds(200);
            while (host_->notify_seq != seq && host_->error_code == kErrNone) {
                const auto now = std::chrono::steady_clock::now();
                if (now - start > limit) break;
                if (now > spin_until) std::this_thread::yield();
            }
        }
        std::string err = error();
        if (err.empty() && host_->notify_seq != seq)
            err = "rank " + std::to_string(rank_) + " gave up waiting on the host for the notify kernel";
        std::atomic_thread_fence(std::memory_order_acquire);
        std::vector<int> per_expert(num_local_experts);
        if (err.empty())
            for (int i = 0; i < num_local_experts; ++i) per_expert[i] = host_->recv_tokens_per_expert[i];
        return {err.empty() ? host_->num_recv_tokens : 0, per_expert, err};
    }

    // A non-cached dispatch from its notify on: waits for the counts (as wait_notify), allocates the received
    // tensors on `alloc_stream` (a cudaStream_t; the caller's compute or communication stream) and launches the
    // dispatch on the current stream without returning to Python in between. The ranks' dispatch kernels meet
    // at a barrier, so the slowest rank's host time from the notify's end to this launch delays them all.
    // recv_x_in_buffer: the senders write the rows into the receive area when the most rows any rank receives
    // (from the notify: the same answer on every rank) fit it. Scales, top-k ids and weights are allocated
    // when their inputs are given. Returns (num_recv, per-expert counts, error text, most rows any rank
    // receives, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx); on an error (the
    // text, which the caller raises) nothing was allocated or launched.
    std::tuple<int, std::vector<int>, std::string, int, std::optional<torch::Tensor>,
               std::optional<torch::Tensor>, std::optional<torch::Tensor>, std::optional<torch::Tensor>,
               std::optional<torch::Tensor>>
    notified_dispatch(int seq, int num_local_experts, const torch::Tensor& x,
                      const std::optional<torch::Tensor>& x_scales, const std::optional<torch::Tensor>& topk_idx,
                      const std::optional<torch::Tensor>& topk_weights, const torch::Tensor& send_head,
                      const torch::Tensor& rank_prefix, int num_experts, int num_sms, int64_t alloc_stream,
                      bool recv_x_in_buffer) {
        auto [num_rows, per_expert, err] = wait_notify(seq, num_local_experts);
        if (!err.empty()) return {0, per_expert, err, 0, {}, {}, {}, {}, {}};
        const int most = host_->max_recv_tokens;
        const int64_t hidden = x.size(1);
        const int num_scales = x_scales ? static_cast<int>(x_scales->size(1)) : 0;
        const int num_topk = topk_idx ? static_cast<int>(topk_idx->size(1)) : 0;
        bool in_buffer = false;
        if (recv_x_in_buffer) {
            const int64_t rows_fit =
                std::get<1>(dispatch_receive_area(static_cast<int>(hidden * x.element_size()), num_scales, num_topk));
            in_buffer = most <= rows_fit;
        }
        torch::Tensor recv_x;
        std::optional<torch::Tensor> recv_scales, recv_topk_idx, recv_topk_weights;
        torch::Tensor recv_src_idx;
        {
            const c10::cuda::CUDAStreamGuard guard(
                c10::cuda::getStreamFromExternal(reinterpret_cast<cudaStream_t>(alloc_stream), device_));
            const auto on_device = torch::TensorOptions().device(torch::kCUDA, device_);
            recv_x = in_buffer ? torch::from_blob(staging_base(), {num_rows, hidden}, on_device.dtype(x.scalar_type()))
                               : torch::empty({num_rows, hidden}, on_device.dtype(x.scalar_type()));
            if (x_scales) recv_scales = torch::empty({num_rows, num_scales}, on_device.dtype(torch::kFloat32));
            if (topk_idx) recv_topk_idx = torch::empty({num_rows, num_topk}, on_device.dtype(torch::kInt64));
            if (topk_weights) recv_topk_weights = torch::empty({num_rows, num_topk}, on_device.dtype(torch::kFloat32));
            recv_src_idx = torch::empty({num_rows}, on_device.dtype(torch::kInt32));
        }
        dispatch(x, x_scales, topk_idx, topk_weights, send_head, rank_prefix, num_experts, num_sms, recv_x, recv_scales,
                 recv_topk_idx, recv_topk_weights, recv_src_idx, true, in_buffer);
        return {num_rows, per_expert, err, most, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx};
    }

    int dispatch_capacity(int hidden_bytes, int num_scales, int num_topk) const {
        const int h4 = hidden_bytes / 16;
        const int64_t per = dispatch_staging_bytes(1, h4, num_ranks_, num_scales, num_topk);
        int q = static_cast<int>(std::min<int64_t>(num_nvl_bytes_ / per, 1 << 30));
        while (q > 0 && dispatch_staging_bytes(q, h4, num_ranks_, num_scales, num_topk) > num_nvl_bytes_) --q;
        return q;
    }

    // Where a dispatch whose senders write the rows keeps them: (byte offset of the staged per-token fields,
    // rows the receive area before it holds). The receive area starts the staging area.
    std::tuple<int64_t, int64_t> dispatch_receive_area(int hidden_bytes, int num_scales, int num_topk) const {
        MOE_A2A_CHECK(hidden_bytes > 0 && hidden_bytes % 16 == 0, "hidden bytes must be a positive multiple of 16, got ",
                      hidden_bytes);
        const int q = dispatch_capacity(hidden_bytes, num_scales, num_topk);
        const int64_t small_base = dispatch_in_buffer_fields_base(num_nvl_bytes_, q, num_ranks_, num_scales, num_topk);
        return {small_base, std::max<int64_t>(small_base, 0) / hidden_bytes};
    }

    int combine_capacity(int hidden_bytes, int num_topk) const {
        const int h4 = hidden_bytes / 16;
        const int64_t per = combine_staging_bytes(1, h4, num_ranks_, num_topk);
        int q = static_cast<int>(std::min<int64_t>(num_nvl_bytes_ / per, 1 << 30));
        while (q > 0 && combine_staging_bytes(q, h4, num_ranks_, num_topk) > num_nvl_bytes_) --q;
        return q;
    }

    void dispatch(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                  const std::optional<torch::Tensor>& topk_idx, const std::optional<torch::Tensor>& topk_weights,
                  const torch::Tensor& send_head, const torch::Tensor& rank_prefix, int num_experts, int num_sms,
                  torch::Tensor& recv_x, const std::optional<torch::Tensor>& recv_x_scales,
                  const std::optional<torch::Tensor>& recv_topk_idx, const std::optional<torch::Tensor>& recv_topk_weights,
                  const std::optional<torch::Tensor>& recv_src_idx, bool after_notify, bool recv_x_in_buffer) {
        check_ready();
        MOE_A2A_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous [T, hidden] CUDA tensor");
        const int hidden_bytes = static_cast<int>(x.size(1) * x.element_size());
        MOE_A2A_CHECK(hidden_bytes % 16 == 0, "hidden * element size must be a multiple of 16 bytes, got ", hidden_bytes);
        check_tensor(send_head, "send_head", torch::kInt32, 2);
        check_tensor(rank_prefix, "rank_prefix_matrix", torch::kInt32, 2);
        check_sms(num_sms);
        const int num_scales = x_scales ? static_cast<int>(x_scales->size(1)) : 0;
        const int num_topk = topk_idx ? static_cast<int>(topk_idx->size(1)) : 0;
        DispatchArgs a{};
        a.x = x.data_ptr();
        a.hidden_int4 = hidden_bytes / 16;
        a.x_scales = opt_ptr<const float>(x_scales);
        a.num_scales = num_scales;
        a.topk_idx = opt_ptr<const int64_t>(topk_idx);
        a.topk_weights = opt_ptr<const float>(topk_weights);
        a.num_topk = num_topk;
        a.send_head = send_head.data_ptr<int>();
        a.rank_prefix = rank_prefix.data_ptr<int>();
        a.num_tokens = static_cast<int>(x.size(0));
        a.recv_x = recv_x.data_ptr();
        a.recv_x_scales = opt_ptr<float>(recv_x_scales);
        a.recv_topk_idx = opt_ptr<int64_t>(recv_topk_idx);
        a.recv_topk_weights = opt_ptr<float>(recv_topk_weights);
        a.recv_src_idx = opt_ptr<int>(recv_src_idx);
        a.num_alloc_rows = static_cast<int>(recv_x.size(0));
        a.bulk = a.num_alloc_rows >= bulk_min_rows_;
        a.num_experts_per_rank = num_experts / num_ranks_;
        a.capacity = dispatch_capacity(hidden_bytes, num_scales, num_topk);
        MOE_A2A_CHECK(a.capacity > 0, "num_nvl_bytes (", num_nvl_bytes_, ") cannot stage one token of ", hidden_bytes,
                    " bytes; use Config.get_nvl_buffer_size_hint");
        if (recv_x_in_buffer) {
            const auto [small_base, recv_rows] = dispatch_receive_area(hidden_bytes, num_scales, num_topk);
            // An empty view has no address (data_ptr() is 0): the kernel writes no rows of it anyway.
            MOE_A2A_CHECK(recv_x.numel() == 0 || recv_x.data_ptr() == static_cast<void*>(staging_base()),
                          "with rows written by their senders, recv_x must be the receive area's view");
            a.recv_x = staging_base();
            MOE_A2A_CHECK(a.num_alloc_rows <= recv_rows, "the receive area holds ", recv_rows, " rows, ",
                          a.num_alloc_rows, " received");
            a.recv_x_in_buffer = 1;
            a.small_base = small_base;
            a.recv_rows = static_cast<int>(recv_rows);
            a.bulk = 0;
        }
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        // After a notify on this stream the buffer is free already: every peer passed the notify's barrier,
        // so finished its earlier operations, and the notify published this rank's token count.
        if (!after_notify) launch_prologue(ctx(), a.num_tokens, -1, kPhaseDispatchStart, stream);
        // When every token fits one round, the copy engine may stage the rows (set_copy_engine_staging; the
        // size is the input's, known on the host, so this also holds under CUDA graph capture).
        if (copy_engine_staging_ && !recv_x_in_buffer && a.num_tokens > 0 && a.num_tokens <= a.capacity) {
            MOE_A2A_CUDA_CHECK(cudaMemcpyAsync(staging_base(), x.data_ptr(),
                                               static_cast<size_t>(a.num_tokens) * hidden_bytes,
                                               cudaMemcpyDeviceToDevice, stream));
            a.data_staged = 1;
        }
        launch_dispatch(ctx(), a, num_sms, stream);
    }

    void combine(const torch::Tensor& x, const std::optional<torch::Tensor>& topk_weights,
                 const torch::Tensor& recv_src_idx, const torch::Tensor& rank_prefix,
                 const torch::Tensor& is_token_in_rank, const torch::Tensor& send_head,
                 const std::optional<torch::Tensor>& bias_0,
                 const std::optional<torch::Tensor>& bias_1, int num_sms, torch::Tensor& out,
                 const std::optional<torch::Tensor>& out_weights, bool in_place, const std::string& wire_format) {
        check_ready();
        check_tensor(x, "x", torch::kBFloat16, 2);
        check_tensor(recv_src_idx, "recv_src_idx", torch::kInt32, 1);
        check_tensor(rank_prefix, "rank_prefix_matrix", torch::kInt32, 2);
        check_tensor(is_token_in_rank, "is_token_in_rank", torch::kBool, 2);
        check_tensor(send_head, "send_head", torch::kInt32, 2);
        MOE_A2A_CHECK(send_head.size(0) == is_token_in_rank.size(0) && send_head.size(1) == num_ranks_,
                    "send_head must be [", is_token_in_rank.size(0), ", ", num_ranks_, "]");
        check_sms(num_sms);
        const int hidden_bytes = static_cast<int>(x.size(1) * 2);
        MOE_A2A_CHECK(hidden_bytes % 16 == 0, "hidden must be a multiple of 8, got ", x.size(1));
        const int num_topk = topk_weights ? static_cast<int>(topk_weights->size(1)) : 0;
        CombineArgs a{};
        a.format = combine_wire_format(wire_format, x.size(1), kWireBF16 | kWireFP8, "the intranode combine");
        a.x = x.data_ptr();
        a.hidden_int4 = hidden_bytes / 16;
        a.topk_weights = opt_ptr<const float>(topk_weights);
        a.num_topk = num_topk;
        a.recv_src_idx = recv_src_idx.data_ptr<int>();
        a.rank_prefix = rank_prefix.data_ptr<int>();
        a.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
        a.send_head = send_head.data_ptr<int>();
        a.num_tokens = static_cast<int>(is_token_in_rank.size(0));
        a.bias_0 = bias_0 ? bias_0->data_ptr() : nullptr;
        a.bias_1 = bias_1 ? bias_1->data_ptr() : nullptr;
        a.out = out.data_ptr();
        a.out_weights = opt_ptr<float>(out_weights);
        a.capacity = combine_capacity(hidden_bytes, num_topk);
        // With few SMs the copy engine stages faster than the kernel's blocks can: one barrier then.
        const int windows = num_sms >= kMinWindowSms ? combine_windows_ : 0;
        a.num_windows = windows;
        signature_[5] = windows;  // the ranks must run the same schedule (see launch_combine)
        MOE_A2A_CHECK(a.capacity > 0, "num_nvl_bytes (", num_nvl_bytes_, ") cannot stage one token per rank of ",
                    hidden_bytes, " bytes; use Config.get_nvl_buffer_size_hint");
        // When all received rows (and their weights) fit the buffer, the copy engine stages them in arrival
        // order with one copy each, and peers find a token's copy from rank_prefix and send_head. The row
        // count is the handle's (padded to num_worst_tokens when that was used), known on the host, so
        // this also holds under CUDA graph capture. Otherwise the kernel stages by slots, in rounds.
        const int64_t rows = recv_src_idx.size(0);
        const int64_t data_bytes = (rows * hidden_bytes + 15) / 16 * 16;
        const bool flat = rows <= x.size(0) && data_bytes + (rows * num_topk * 4 + 15) / 16 * 16 <= num_nvl_bytes_;
        a.staged_rows = flat ? static_cast<int>(rows) : -1;
        // in_place: x is the zero-copy input (get_next_combine_buffer), written where the rows are staged.
        // Checked before the prologue: a throw after it would leave the peers waiting at its barrier.
        MOE_A2A_CHECK(!in_place || rows == 0 || x.data_ptr() == static_cast<void*>(staging_base()),
                    "a combine input written in place must start at the staging area");
        MOE_A2A_CHECK(!in_place || flat, "a combine input written in place must fit the buffer with its weights");
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        launch_prologue(ctx(), a.num_tokens, a.staged_rows, kPhaseCombineStart, stream);
        if (flat && rows > 0) {
            a.stage_in_kernel = !in_place && (!copy_engine_staging_ || windows > 0);
            if (!in_place && !a.stage_in_kernel)
                MOE_A2A_CUDA_CHECK(cudaMemcpyAsync(staging_base(), x.data_ptr(),
                                                   static_cast<size_t>(rows) * hidden_bytes, cudaMemcpyDeviceToDevice,
                                                   stream));
            if (num_topk > 0 && !a.stage_in_kernel)
                MOE_A2A_CUDA_CHECK(cudaMemcpyAsync(staging_base() + data_bytes, topk_weights->data_ptr(),
                                                   static_cast<size_t>(rows) * num_topk * 4, cudaMemcpyDeviceToDevice,
                                                   stream));
        }
        launch_combine(ctx(), a, num_sms, stream);
    }

    // On the current stream: encode the BF16 rows of `x` into the first bytes of the same rows of `out`
    // (`out` may be `x`) in `wire_format` ("fp8"), the form combine(..., wire_format) pulls.
    void encode_rows(const torch::Tensor& x, torch::Tensor& out, const std::string& wire_format) {
        check_tensor(x, "x", torch::kBFloat16, 2);
        check_tensor(out, "out", torch::kBFloat16, 2);
        MOE_A2A_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
        const int format = combine_wire_format(wire_format, x.size(1), kWireBF16 | kWireFP8, "the intranode combine");
        MOE_A2A_CHECK(format != kLLFormatBF16Combine, "encode_rows needs a format other than bf16");
        const c10::cuda::CUDAGuard guard(x.device());
        launch_encode_rows(x.data_ptr(), out.data_ptr(), static_cast<int>(x.size(0)), static_cast<int>(x.size(1)),
                           format, c10::cuda::getCurrentCUDAStream());
    }

    // On the current stream: wait until every peer finished the operations this rank finished, so none
    // reads this rank's staging area any more (before a producer writes a zero-copy combine input there).
    void wait_peers_done() {
        check_ready();
        launch_wait_peers_done(ctx(), c10::cuda::getCurrentCUDAStream());
    }

    // Dispatches that receive at least this many rows pull them with bulk copies through shared memory
    // (faster on large batches); smaller ones copy through registers.
    void set_bulk_min_rows(int64_t rows) {
        MOE_A2A_CHECK(rows >= 0, "bulk_min_rows must be >= 0, got ", rows);
        bulk_min_rows_ = rows;
    }

    // Whether the copy engine stages a dispatch's input rows and a combine's input rows and weights into the
    // buffer before the kernel (one cudaMemcpyAsync each), or the kernel's own blocks copy them. Either way
    // the bytes are the same; which is faster depends on the GPU and on how many ranks share it. A
    // pipelined combine (set_combine_windows) always stages in the kernel.
    void set_copy_engine_staging(bool on) { copy_engine_staging_ = on; }

    // Combines whose tokens fit the buffer at once and that run on at least kMinWindowSms SMs run as a
    // pipeline of `n` token windows (the kernel's blocks stage window k + 1 before pulling window k; each
    // pull waits for that window's flag on every rank), or with one barrier between staging and pulling
    // (n = 0). Every rank must use the same n: the prologue compares it and reports a difference. A
    // pipelined combine stages in the kernel (the copy engine would stage everything before the first pull).
    void set_combine_windows(int64_t n) {
        MOE_A2A_CHECK(n >= 0 && n <= kMaxCombineWindows, "combine windows must be in [0, ", kMaxCombineWindows,
                      "], got ", n);
        combine_windows_ = static_cast<int>(n);
    }

    // What the next operation's peers must agree with (see kSignatureInts); set before notify/dispatch/combine.
    void set_signature(int op, int64_t row_bytes, int64_t num_scales, int64_t num_topk, int64_t num_experts) {
        signature_[0] = op;
        signature_[1] = static_cast<int>(row_bytes);
        signature_[2] = static_cast<int>(num_scales);
        signature_[3] = static_cast<int>(num_topk);
        signature_[4] = static_cast<int>(num_experts);
        signature_[5] = 0;  // combine() sets its window count
    }

    // The benchmark's SM copy probe (copy_probe_kernel) on the current stream: `local` is contiguous CUDA memory of
    // a multiple of 16 bytes; pattern kProbeWrite / kProbeRead move it to / from `peer`'s staging area (at byte
    // rank * its size), kProbeScatter / kProbeGather as rows of `row_bytes` spread over every rank's area,
    // kProbeMulticast / kProbeReduce as rows of `row_bytes` to / from `fanout` ranks each.
    void copy_probe(const torch::Tensor& local, int64_t peer, int64_t pattern, int64_t row_bytes, int64_t num_sms,
                    int64_t fanout) {
        check_ready();
        check_sms(static_cast<int>(num_sms));
        MOE_A2A_CHECK(local.is_cuda() && local.is_contiguous(), "the probe's tensor must be contiguous CUDA memory");
        const int64_t bytes = local.numel() * local.element_size();
        MOE_A2A_CHECK(bytes > 0 && bytes % 16 == 0, "the probe moves a multiple of 16 bytes, got ", bytes);
        MOE_A2A_CHECK(pattern >= kProbeWrite && pattern <= kProbeReduce, "unknown probe pattern ", pattern);
        int64_t area = bytes * num_ranks_;
        if (pattern != kProbeWrite && pattern != kProbeRead) {
            MOE_A2A_CHECK(row_bytes > 0 && row_bytes % 16 == 0 && bytes % row_bytes == 0, "row_bytes (", row_bytes,
                          ") must be a positive multiple of 16 that divides ", bytes);
        } else {
            MOE_A2A_CHECK(peer >= 0 && peer < num_ranks_, "peer must be in [0, ", num_ranks_, "), got ", peer);
        }
        if (pattern == kProbeScatter || pattern == kProbeGather)
            area = (bytes / row_bytes + num_ranks_ - 1) / num_ranks_ * num_ranks_ * row_bytes;
        if (pattern == kProbeMulticast || pattern == kProbeReduce) {
            MOE_A2A_CHECK(fanout >= 1 && fanout <= num_ranks_, "fanout must be in [1, ", num_ranks_, "], got ", fanout);
            area = (bytes / row_bytes + num_ranks_ - 1) / num_ranks_ * num_ranks_ * fanout * row_bytes;
        }
        MOE_A2A_CHECK(area <= num_nvl_bytes_, "the probe needs ", area, " bytes of staging area, the buffer has ",
                      num_nvl_bytes_);
        launch_copy_probe(ctx(), local.data_ptr(), bytes / 16, static_cast<int>(peer), static_cast<int>(pattern),
                          static_cast<int>(row_bytes / 16), static_cast<int>(fanout), static_cast<int>(num_sms),
                          c10::cuda::getCurrentCUDAStream());
    }

    // A view of the staging area (DeepEP's get_local_buffer_tensor): `offset` bytes in.
    torch::Tensor local_buffer(int64_t offset) const {
        check_ready();
        MOE_A2A_CHECK(offset >= 0 && offset <= num_nvl_bytes_, "offset ", offset, " outside [0, ", num_nvl_bytes_, "]");
        auto opts = torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device_);
        return torch::from_blob(static_cast<char*>(local_) + kHeaderBytes + offset, {num_nvl_bytes_ - offset}, opts);
    }

   private:
    char* staging_base() const { return static_cast<char*>(local_) + kHeaderBytes; }

    PeerCtx ctx() const {
        PeerCtx c{};
        for (int r = 0; r < num_ranks_; ++r) c.peers[r] = static_cast<int*>(peers_[r]);
        c.host = host_dev_;
        c.timeout_ns = timeout_ns_;
        c.rank = rank_;
        c.num_ranks = num_ranks_;
        for (int i = 0; i < kSignatureInts; ++i) c.signature[i] = signature_[i];
        return c;
    }

    void check_ready() const {
        MOE_A2A_CHECK(!destroyed_, "moe_a2a intranode: the buffer was destroyed");
        MOE_A2A_CHECK(connected_, "moe_a2a intranode: connect() was not called");
        raise_if_error();
    }

    void check_sms(int num_sms) const {
        MOE_A2A_CHECK(num_sms >= 1 && num_sms <= num_device_sms_, "num_sms must be in [1, ", num_device_sms_,
                    "] (one block per SM, all resident), got ", num_sms);
    }

    int64_t num_nvl_bytes_;
    int64_t bulk_min_rows_ = 8192;
    bool copy_engine_staging_ = true;
    int combine_windows_ = 0;
    int signature_[kSignatureInts] = {};
};

}  // namespace

}  // namespace moe_a2a

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    using moe_a2a::Runtime;
    m.doc() = "moe_a2a CUDA kernels: routing layout and intranode dispatch/combine over CUDA IPC";
    m.def("get_dispatch_layout", &moe_a2a::get_dispatch_layout, "Routing layout on the current stream",
          py::arg("topk_idx"), py::arg("num_experts"), py::arg("num_ranks"), py::arg("num_ranks_per_node"));
    py::class_<Runtime>(m, "Runtime")
        .def(py::init<int, int, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_nvl_bytes"),
             py::arg("timeout_s"))
        .def("ipc_handle", &Runtime::ipc_handle)
        .def("connect", &Runtime::connect)
        .def("destroy", &Runtime::destroy)
        .def("is_available", &Runtime::is_available)
        .def("num_device_sms", &Runtime::num_device_sms)
        .def("num_nvl_bytes", &Runtime::num_nvl_bytes)
        .def("error", &Runtime::error)
        .def("raise_if_error", &Runtime::raise_if_error)
        .def("notify", &Runtime::notify)
        .def("notified_dispatch", &Runtime::notified_dispatch)
        .def("dispatch_capacity", &Runtime::dispatch_capacity)
        .def("dispatch_receive_area", &Runtime::dispatch_receive_area)
        .def("combine_capacity", &Runtime::combine_capacity)
        .def("dispatch", &Runtime::dispatch)
        .def("combine", &Runtime::combine)
        .def("set_bulk_min_rows", &Runtime::set_bulk_min_rows)
        .def("set_copy_engine_staging", &Runtime::set_copy_engine_staging)
        .def("set_combine_windows", &Runtime::set_combine_windows)
        .def("encode_rows", &Runtime::encode_rows)
        .def("wait_peers_done", &Runtime::wait_peers_done)
        .def("set_signature", &Runtime::set_signature)
        .def("local_buffer", &Runtime::local_buffer)
        .def("copy_probe", &Runtime::copy_probe);
    moe_a2a::register_low_latency(m);
    moe_a2a::register_wire_format(m);
    moe_a2a::register_allreduce(m);
}
