// Low-latency runtime (see low_latency.h and kernels/low_latency.cuh for the buffer layout). Every launch
// runs on the current CUDA stream and reads no device value on the host, so calls can be captured in a
// CUDA graph. The Python backend alternates the buffer set between calls. Validation lives in the Python
// backend; the checks here are a backstop.
#include "low_latency.h"

#include <cstring>
#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/low_latency.cuh"
#include "kernels/utils.cuh"
#include "ipc.h"
#include "ll_args.h"

namespace moe_a2a {

namespace {

std::string shape_text(c10::IntArrayRef shape) {
    std::string text = "[";
    for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
    return text + "]";
}

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, std::vector<int64_t> shape) {
    MOE_A2A_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
    MOE_A2A_CHECK(t.scalar_type() == dtype, name, " has dtype ", c10::toString(t.scalar_type()), ", expected ",
                  c10::toString(dtype));
    MOE_A2A_CHECK(t.sizes().vec() == shape, name, " has shape ", shape_text(t.sizes()), ", expected ",
                  shape_text(shape));
}

class LowLatencyRuntime : public IpcRuntime<LLHostError, kLLMaxRanks> {
   public:
    LowLatencyRuntime(int rank, int num_ranks, int64_t num_bytes, double timeout_s)
        : IpcRuntime("low-latency", rank, num_ranks, timeout_s), num_bytes_(num_bytes) {
        MOE_A2A_CHECK(num_bytes > kLLSignalBytes, "num_bytes must exceed ", kLLSignalBytes, ", got ", num_bytes);
        set_bytes_ = ((num_bytes - kLLSignalBytes) / 2) / 128 * 128;
        allocate_shared(num_bytes);
        MOE_A2A_CUDA_CHECK(cudaMemset(local_, 0, num_bytes));
        MOE_A2A_CUDA_CHECK(cudaMalloc(&workspace_, kLLWorkspaceInts * sizeof(int)));
        MOE_A2A_CUDA_CHECK(cudaMemset(workspace_, 0, kLLWorkspaceInts * sizeof(int)));
        allocate_host_record();
        MOE_A2A_CUDA_CHECK(cudaDeviceSynchronize());
    }

    ~LowLatencyRuntime() { destroy(); }

    // Bytes a buffer needs for calls of this shape: signals plus two sets of (send area, recv area).
    static int64_t required_bytes(int64_t max_tokens, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
        return kLLSignalBytes + 2 * (ll_send_bytes(num_experts, max_tokens, hidden) +
                                     ll_recv_bytes(num_experts, max_tokens, hidden));
    }

    void destroy() {
        if (!begin_destroy()) return;
        release_shared();
        if (workspace_) cudaFree(workspace_);
        workspace_ = nullptr;
    }

    int64_t set_bytes() const { return set_bytes_; }

    // The first error the kernels recorded: (code, phase, peer, index, set, call, mine, theirs) as in
    // LLHostError; code 0 while none. The message is built in Python.
    std::tuple<int, int, int, int, int, int, int, int> error_record() const {
        if (!host_) return {0, 0, 0, 0, 0, 0, 0, 0};
        const int code = host_->code;
        std::atomic_thread_fence(std::memory_order_acquire);
        return {code, host_->phase, host_->peer, host_->index, host_->set, host_->call, host_->mine, host_->theirs};
    }

    // Zero every flag and counter (collective: the caller synchronizes the ranks around it). The rank mask
    // stays as it is (a masked rank does not take part in the clean either).
    void clean() {
        check_ready();
        MOE_A2A_CUDA_CHECK(cudaDeviceSynchronize());
        MOE_A2A_CUDA_CHECK(cudaMemset(local_, 0, kLLSignalBytes));
        MOE_A2A_CUDA_CHECK(cudaMemset(workspace_, 0, kLLWorkspaceMask * sizeof(int)));
        MOE_A2A_CUDA_CHECK(cudaMemset(workspace_ + kLLWorkspaceMask + kLLMaxRanks, 0,
                                      (kLLWorkspaceInts - kLLWorkspaceMask - kLLMaxRanks) * sizeof(int)));
        MOE_A2A_CUDA_CHECK(cudaDeviceSynchronize());
    }

    // The rank mask as a [num_ranks] int32 CUDA tensor (1 = masked), a view of the kernels' workspace: the
    // host sets it on the stream of the calls it governs; kernels with shrink set entries of ranks that time
    // out.
    torch::Tensor rank_mask() {
        MOE_A2A_CHECK(!destroyed_, "moe_a2a low-latency: the buffer was destroyed");
        auto opts = torch::TensorOptions().dtype(torch::kInt32).device(torch::kCUDA, device_);
        return torch::from_blob(workspace_ + kLLWorkspaceMask, {num_ranks_}, opts);
    }

    // Whether a peer that times out is masked (and the call goes on without it) instead of failing the call.
    void set_shrink(bool shrink) { shrink_ = shrink; }

    // phases: 1 send (stage the tokens, release), 2 receive (wait, pull into the outputs), 3 both in one
    // kernel. Every phase gets the same tensors; the send phase reads x and topk_idx, the receive phase
    // writes the rest.
    void dispatch(const torch::Tensor& x, const torch::Tensor& topk_idx, int num_experts, int max_tokens, bool use_fp8,
                  bool round_scale, bool use_ue8m0, torch::Tensor& recv_x, const std::optional<torch::Tensor>& recv_scales,
                  torch::Tensor& recv_count, torch::Tensor& src_info, torch::Tensor& layout_range,
                  const std::optional<torch::Tensor>& cumulative_stats, const std::optional<torch::Tensor>& wait_stats,
                  int set, int num_sms, int call, int phases) {
        const int T = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
        const int K = static_cast<int>(topk_idx.size(1));
        check_shape(T, hidden, K, num_experts, max_tokens, use_fp8);
        check_phases(phases);
        check(x, "x", torch::kBFloat16, {T, hidden});
        check(topk_idx, "topk_idx", torch::kInt64, {T, K});
        const int64_t L = num_experts / num_ranks_, RM = static_cast<int64_t>(num_ranks_) * max_tokens;
        check(recv_x, "recv_x", use_fp8 ? torch::kFloat8_e4m3fn : torch::kBFloat16, {L, RM, hidden});
        MOE_A2A_CHECK(use_fp8 == recv_scales.has_value(), "recv_scales must be given exactly with use_fp8");
        if (use_fp8) {
            MOE_A2A_CHECK(!use_ue8m0 || hidden % 512 == 0, "UE8M0 scales need hidden divisible by 512, got ", hidden);
            const int64_t cols = use_ue8m0 ? hidden / 512 : hidden / 128;
            // Column-major in the last two dims: the storage is [L, cols, R * M].
            const auto& s = *recv_scales;
            MOE_A2A_CHECK(s.is_cuda() && s.scalar_type() == (use_ue8m0 ? torch::kInt32 : torch::kFloat32) &&
                            s.sizes().vec() == std::vector<int64_t>({L, RM, cols}) && s.stride(0) == cols * RM &&
                            s.stride(1) == 1 && s.stride(2) == RM,
                        "recv_scales must be a column-major [", L, ", ", RM, ", ", cols, "] ",
                        use_ue8m0 ? "int32" : "float32", " tensor");
        }
        check(recv_count, "recv_count", torch::kInt32, {L});
        check(src_info, "src_info", torch::kInt32, {L, RM});
        check(layout_range, "layout_range", torch::kInt64, {L, num_ranks_});
        if (cumulative_stats) check(*cumulative_stats, "cumulative_local_expert_recv_stats", torch::kInt32, {L});
        if (wait_stats) check(*wait_stats, "dispatch_wait_recv_cost_stats", torch::kInt64, {num_ranks_, num_ranks_});
        const LLDispatchArgs a = ll_dispatch_args(x, topk_idx, num_experts, max_tokens, use_fp8, round_scale, use_ue8m0,
                                                  recv_x, recv_scales, recv_count, src_info, layout_range,
                                                  cumulative_stats, wait_stats, rank_, num_ranks_);
        const c10::cuda::CUDAGuard guard(recv_x.device());
        launch_ll_dispatch(ctx(set, num_experts, max_tokens, hidden, call), a, phases, checked_sms(num_sms),
                           c10::cuda::getCurrentCUDAStream());
    }

    // phases as for dispatch: the send phase reads x and layout_range, the receive phase topk_idx,
    // topk_weights and writes out. x may be the send area of `set` (zero copy).
    void combine(const torch::Tensor& x, const torch::Tensor& layout_range, const torch::Tensor& topk_idx,
                 const torch::Tensor& topk_weights, torch::Tensor& out, const std::optional<torch::Tensor>& wait_stats,
                 int num_experts, int max_tokens, int set, int num_sms, int call, int phases,
                 const std::string& wire_format) {
        const int T = static_cast<int>(topk_idx.size(0)), K = static_cast<int>(topk_idx.size(1));
        const int hidden = static_cast<int>(x.size(-1));
        check_shape(T, hidden, K, num_experts, max_tokens, false);
        const int format = combine_wire_format(wire_format, hidden, kWireBF16 | kWireFP8 | kWireLogFMT,
                                               "the low-latency combine");
        check_phases(phases);
        const int64_t L = num_experts / num_ranks_, RM = static_cast<int64_t>(num_ranks_) * max_tokens;
        check(x, "x", torch::kBFloat16, {L, RM, hidden});
        check(layout_range, "layout_range", torch::kInt64, {L, num_ranks_});
        check(topk_idx, "topk_idx", torch::kInt64, {T, K});
        check(topk_weights, "topk_weights", torch::kFloat32, {T, K});
        check(out, "out", torch::kBFloat16, {T, hidden});
        if (wait_stats) check(*wait_stats, "combine_wait_recv_cost_stats", torch::kInt64, {num_ranks_, num_ranks_});
        const LLCtx c = ctx(set, num_experts, max_tokens, hidden, call);
        const LLCombineArgs a = ll_combine_args(x, layout_range, topk_idx, topk_weights, out, wait_stats, num_experts,
                                                max_tokens, send_base(set), format, rank_, num_ranks_);
        const c10::cuda::CUDAGuard guard(out.device());
        launch_ll_combine(c, a, phases, checked_sms(num_sms), c10::cuda::getCurrentCUDAStream());
    }

    // Probes for the benchmark, on the current stream: an empty kernel of the kernels' launch shape, and
    // `iters` flag round trips with `peer` (which must call it too); out_ns: [2] int64 CUDA tensor.
    void empty_kernel(int num_sms) {
        check_ready();
        launch_ll_empty(checked_sms(num_sms), c10::cuda::getCurrentCUDAStream());
    }

    void ping(int peer, int iters, int warmup, torch::Tensor& out_ns) {
        check_ready();
        MOE_A2A_CHECK(peer >= 0 && peer < num_ranks_ && peer != rank_, "peer must be another rank, got ", peer);
        MOE_A2A_CHECK(iters > warmup && warmup >= 0, "need iters > warmup >= 0, got ", iters, ", ", warmup);
        check(out_ns, "out_ns", torch::kInt64, {2});
        LLCtx c = ctx(0, num_ranks_, 1, 8, 0);
        launch_ll_ping(c, peer, iters, warmup, out_ns.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
    }

    // Phase clock for the launches that follow (benchmark): a [4] int64 CUDA tensor, [-1, 0, 0, 0], that the
    // caller keeps alive until they ran (see LLCtx::clock), or None to stop.
    void set_phase_clock(const std::optional<torch::Tensor>& clock) {
        if (clock) check(*clock, "clock", torch::kInt64, {4});
        clock_ = clock ? reinterpret_cast<unsigned long long*>(clock->data_ptr<int64_t>()) : nullptr;
    }

    // The send area of `set` as the zero-copy combine input [L, R * M, hidden] bf16.
    torch::Tensor send_buffer(int set, int num_experts, int max_tokens, int hidden) {
        check_shape(0, hidden, 1, num_experts, max_tokens, false);
        check_set(set);
        ctx(set, num_experts, max_tokens, hidden, 0);  // checks the size
        const int64_t L = num_experts / num_ranks_, RM = static_cast<int64_t>(num_ranks_) * max_tokens;
        auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA, device_);
        return torch::from_blob(send_base(set), {L, RM, hidden}, opts);
    }

   private:
    void check_ready() const {
        MOE_A2A_CHECK(!destroyed_, "moe_a2a low-latency: the buffer was destroyed");
        MOE_A2A_CHECK(connected_, "moe_a2a low-latency: connect() was not called");
        // The Python backend raises the detailed message before calling in; this is the backstop.
        if (host_ && host_->code != 0)
            throw std::runtime_error("moe_a2a low-latency: a kernel failed earlier (a timeout or ranks that disagree); "
                                     "the buffer cannot be used again");
    }

    char* send_base(int set) const { return static_cast<char*>(local_) + kLLSignalBytes + set * set_bytes_; }

    void check_phases(int phases) const {
        MOE_A2A_CHECK(phases >= 1 && phases <= 3, "phases must be 1 (send), 2 (receive) or 3 (both), got ", phases);
    }

    void check_set(int set) const { MOE_A2A_CHECK(set == 0 || set == 1, "buffer set must be 0 or 1, got ", set); }

    void check_shape(int num_tokens, int hidden, int num_topk, int num_experts, int max_tokens, bool fp8) const {
        check_ready();
        MOE_A2A_CHECK(num_experts > 0 && num_experts <= kLLMaxExperts && num_experts % num_ranks_ == 0,
                    "num_experts must be a multiple of ", num_ranks_, " in [1, ", kLLMaxExperts, "], got ", num_experts);
        MOE_A2A_CHECK(num_topk >= 1 && num_topk <= kLLMaxTopk, "num_topk must be in [1, ", kLLMaxTopk, "], got ", num_topk);
        MOE_A2A_CHECK(max_tokens >= 1 && num_tokens >= 0 && num_tokens <= max_tokens, "num_tokens (", num_tokens,
                    ") must be in [0, num_max_dispatch_tokens_per_rank=", max_tokens, "]");
        MOE_A2A_CHECK(hidden > 0 && hidden % (fp8 ? 128 : 8) == 0, "hidden must be a positive multiple of ",
                    fp8 ? 128 : 8, ", got ", hidden);
    }

    int checked_sms(int num_sms) const {
        MOE_A2A_CHECK(num_sms >= 1 && num_sms <= num_device_sms_, "num_sms must be in [1, ", num_device_sms_, "], got ",
                    num_sms);
        return num_sms;
    }

    LLCtx ctx(int set, int num_experts, int max_tokens, int hidden, int call) const {
        check_set(set);
        const int64_t send = ll_send_bytes(num_experts, max_tokens, hidden);
        const int64_t recv = ll_recv_bytes(num_experts, max_tokens, hidden);
        MOE_A2A_CHECK(send + recv <= set_bytes_, "moe_a2a low-latency: the buffer of ", num_bytes_, " bytes is too small for ",
                    max_tokens, " tokens per rank, hidden ", hidden, ", ", num_experts, " experts: need ",
                    required_bytes(max_tokens, hidden, num_ranks_, num_experts), " bytes");
        LLCtx c{};
        for (int r = 0; r < num_ranks_; ++r) c.peers[r] = static_cast<char*>(peers_[r]);
        c.workspace = workspace_;
        c.host = host_dev_;
        c.timeout_ns = timeout_ns_;
        c.set_bytes = set_bytes_;
        c.stage_offset = send;
        c.rank = rank_;
        c.num_ranks = num_ranks_;
        c.set = set;
        c.call = call;
        c.clock = clock_;
        c.shrink = shrink_ ? 1 : 0;
        return c;
    }

    bool shrink_ = false;
    unsigned long long* clock_ = nullptr;  // phase clock of the next launches, or null
    int64_t num_bytes_, set_bytes_ = 0;
    int* workspace_ = nullptr;
};

}  // namespace

void register_low_latency(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<LowLatencyRuntime>(m, "LowLatencyRuntime")
        .def(py::init<int, int, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_bytes"),
             py::arg("timeout_s"))
        .def_static("required_bytes", &LowLatencyRuntime::required_bytes, py::arg("max_tokens"), py::arg("hidden"),
                    py::arg("num_ranks"), py::arg("num_experts"))
        .def("ipc_handle", &LowLatencyRuntime::ipc_handle)
        .def("connect", &LowLatencyRuntime::connect)
        .def("destroy", &LowLatencyRuntime::destroy)
        .def("num_device_sms", &LowLatencyRuntime::num_device_sms)
        .def("set_bytes", &LowLatencyRuntime::set_bytes)
        .def("error_record", &LowLatencyRuntime::error_record)
        .def("clean", &LowLatencyRuntime::clean)
        .def("rank_mask", &LowLatencyRuntime::rank_mask)
        .def("set_shrink", &LowLatencyRuntime::set_shrink)
        .def("dispatch", &LowLatencyRuntime::dispatch)
        .def("combine", &LowLatencyRuntime::combine)
        .def("empty_kernel", &LowLatencyRuntime::empty_kernel)
        .def("ping", &LowLatencyRuntime::ping)
        .def("set_phase_clock", &LowLatencyRuntime::set_phase_clock)
        .def("send_buffer", &LowLatencyRuntime::send_buffer);
}

}  // namespace moe_a2a
