// pybind11 module moe_a2a._nvshmem: NVSHMEM bootstrap by unique id and the per-rank internode runtime
// (symmetric buffer, signal counters, error record). Tensor checks are done in Python before any call;
// nothing here throws into Python: failures come back as a non-empty message string.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstring>
#include <tuple>
#include <optional>
#include <string>
#include <vector>

#include "../ll_args.h"
#include "internode.cuh"
#include "low_latency.cuh"
#include "mixed.cuh"

namespace moe_a2a::internode {

namespace {

template <typename T>
T* ptr(const std::optional<torch::Tensor>& t) {
    return t.has_value() && t->numel() > 0 ? static_cast<T*>(t->data_ptr()) : nullptr;
}

template <typename T>
T* ptr(const torch::Tensor& t) {
    return t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

const char* phase_name(int phase) {
    switch (phase) {
        case kPhaseNotify: return "notify (count exchange)";
        case kPhaseDispatchBarrier: return "dispatch (slots free)";
        case kPhaseDispatchData: return "dispatch (rows sent)";
        case kPhaseCombineBarrier: return "combine (slots free)";
        case kPhaseCombineData: return "combine (rows sent)";
        default: return "unknown";
    }
}

pybind11::tuple unique_id() {
    std::string id;
    const std::string err = get_unique_id(&id);
    return pybind11::make_tuple(pybind11::bytes(id), err);
}

std::string init_py(pybind11::bytes id, int rank, int num_ranks) { return init(std::string(id), rank, num_ranks); }

int64_t dispatch_slot_bytes(int64_t row_bytes, int64_t num_scales, int64_t num_topk, int64_t num_local_ranks) {
    return dispatch_layout(static_cast<int>(row_bytes), static_cast<int>(num_scales), static_cast<int>(num_topk),
                           static_cast<int>(num_local_ranks)).stride;
}

int64_t combine_weights_offset(int64_t hidden) { return (hidden * 2 + 15) / 16 * 16; }

int64_t combine_slot_bytes(int64_t hidden, int64_t num_topk) {
    return combine_weights_offset(hidden) + (num_topk * 4 + 15) / 16 * 16;
}

}  // namespace

class Runtime {
   public:
    Runtime() = default;
    // Freeing symmetric memory is collective over the team, so only destroy() does it; a runtime dropped
    // without destroy() keeps its symmetric buffer until the process exits.
    ~Runtime() {
        if (host_) cudaFreeHost(const_cast<ErrorRecord*>(host_));
    }

    // Collective over the team: every member calls it with the same slot_bytes.
    std::string allocate(int rank, int num_nodes, int node, int local_rank, int num_local_ranks, int64_t slot_bytes,
                         double timeout_s) {
        if (sym_) return "already allocated";
        rank_ = rank;
        num_nodes_ = num_nodes;
        node_ = node;
        local_rank_ = local_rank;
        num_local_ranks_ = num_local_ranks;
        slot_bytes_ = slot_bytes;
        timeout_ns_ = static_cast<unsigned long long>(timeout_s * 1e9);
        void* host = nullptr;
        if (cudaHostAlloc(&host, sizeof(ErrorRecord), cudaHostAllocMapped) != cudaSuccess)
            return "cudaHostAlloc of the error record failed";
        host_ = static_cast<ErrorRecord*>(host);
        std::memset(host, 0, sizeof(ErrorRecord));
        if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host, 0) != cudaSuccess)
            return "cudaHostGetDevicePointer failed";
        void* sym = nullptr;
        const std::string err = sym_malloc(kHeaderBytes + static_cast<size_t>(slot_bytes), &sym);
        if (!err.empty()) return err;
        sym_ = static_cast<char*>(sym);
        return "";
    }

    bool is_available() const { return sym_ != nullptr; }

    // NVSHMEM PE of team member (node) m: offset + m * stride. Default 0, 1 (NVSHMEM runs over the team);
    // local_rank, ranks per node when it runs over the whole group.
    void set_pe_map(int offset, int stride) {
        pe_offset_ = offset;
        pe_stride_ = stride;
    }

    int64_t slot_bytes() const { return slot_bytes_; }

    std::string error() const {
        if (!host_ || host_->code == kErrNone) return "";
        const int peer = host_->peer * num_local_ranks_ + local_rank_;
        if (host_->code == kErrMismatch) {
            static const char* const fields[kSignatureInts] = {"operation (1 dispatch, 2 combine)", "bytes per row",
                                                               "scales per row", "top-k width", "number of experts"};
            const int field = host_->field;
            const char* step = host_->phase == kPhaseNotify           ? "dispatch (count exchange)"
                               : host_->phase == kPhaseCombineBarrier ? "combine (round barrier)"
                                                                      : "dispatch (round barrier)";
            return "rank " + std::to_string(rank_) + ": ranks disagree on the " +
                   std::string(field >= 0 && field < kSignatureInts ? fields[field] : "?") + " in internode " + step +
                   ": rank " + std::to_string(rank_) + " has " +
                   std::to_string(static_cast<long long>(host_->expected)) + ", rank " + std::to_string(peer) +
                   " (node " + std::to_string(host_->peer) + ") has " +
                   std::to_string(static_cast<long long>(host_->seen));
        }
        return "rank " + std::to_string(rank_) + " timed out after " + std::to_string(timeout_ns_ / 1000000) +
               " ms in internode " + phase_name(host_->phase) + " (round " + std::to_string(host_->round) +
               ") waiting for rank " + std::to_string(peer) + " (node " + std::to_string(host_->peer) +
               "): signal " + std::to_string(host_->seen) + " of " + std::to_string(host_->expected);
    }

    // What the next operation's team members must agree with (kSignatureInts); set before notify and the
    // rounds of every dispatch and combine.
    void set_signature(int op, int64_t row_bytes, int64_t num_scales, int64_t num_topk, int64_t num_experts) {
        signature_[0] = op;
        signature_[1] = static_cast<int>(row_bytes);
        signature_[2] = static_cast<int>(num_scales);
        signature_[3] = static_cast<int>(num_topk);
        signature_[4] = static_cast<int>(num_experts);
    }

    // records/out: [num_nodes, record_ints] int32 contiguous CUDA tensors.
    std::string notify(const torch::Tensor& records, torch::Tensor& out, int64_t record_ints) {
        if (!sym_) return "the internode buffer is not allocated";
        if (record_ints < 1 || record_ints > notify_max_record_ints(num_nodes_)) return "notify record too large";
        NotifyArgs a{};
        a.sym = sym_;
        a.me = node_;
        a.num_nodes = num_nodes_;
        a.record_ints = static_cast<int>(record_ints);
        a.parity = static_cast<int>(notify_count_ & 1);
        a.pe_offset = pe_offset_;
        a.pe_stride = pe_stride_;
        a.expect = ++notify_count_;
        a.records = ptr<const int>(records);
        a.out = ptr<int>(out);
        a.err = host_dev_;
        a.timeout_ns = timeout_ns_;
        for (int i = 0; i < kSignatureInts; ++i) a.signature[i] = signature_[i];
        return launch_notify(a, c10::cuda::getCurrentCUDAStream());
    }

    std::string dispatch_round(const torch::Tensor& x, int64_t row_bytes, const std::optional<torch::Tensor>& scales,
                               int64_t num_scales, const std::optional<torch::Tensor>& topk_idx,
                               const std::optional<torch::Tensor>& topk_weights, int64_t num_topk,
                               const torch::Tensor& is_token_in_rank, const torch::Tensor& send_pos,
                               const std::vector<int64_t>& recv_count, const std::vector<int64_t>& out_prefix,
                               int64_t node_expert_first, int64_t num_node_experts, int64_t round, int64_t lo,
                               int64_t window, int64_t num_blocks, torch::Tensor& out_x,
                               const std::optional<torch::Tensor>& out_scales,
                               const std::optional<torch::Tensor>& out_topk_idx,
                               const std::optional<torch::Tensor>& out_topk_weights,
                               const std::optional<torch::Tensor>& out_origin,
                               const std::optional<torch::Tensor>& out_in_rank) {
        if (!sym_) return "the internode buffer is not allocated";
        if (static_cast<int>(recv_count.size()) != num_nodes_ || static_cast<int>(out_prefix.size()) != num_nodes_)
            return "recv_count/out_prefix must have one entry per node";
        DispatchArgs a{};
        a.l = dispatch_layout(static_cast<int>(row_bytes), static_cast<int>(num_scales), static_cast<int>(num_topk),
                              num_local_ranks_);
        if (!fill_common(a.c, a.l.stride, round, lo, window, num_blocks)) return "window too large for the buffer";
        a.num_ranks = num_nodes_ * num_local_ranks_;
        a.local_rank = local_rank_;
        a.num_tokens = static_cast<int>(x.size(0));
        a.x = ptr<const char>(x);
        a.scales = ptr<const float>(scales);
        a.topk_idx = ptr<const int64_t>(topk_idx);
        a.topk_weights = ptr<const float>(topk_weights);
        a.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        a.send_pos = ptr<const int>(send_pos);
        for (int m = 0; m < num_nodes_; ++m) {
            a.recv_count[m] = static_cast<int>(recv_count[m]);
            a.out_prefix[m] = static_cast<int>(out_prefix[m]);
        }
        a.node_expert_first = node_expert_first;
        a.num_node_experts = num_node_experts;
        a.out_x = ptr<char>(out_x);
        a.out_scales = ptr<float>(out_scales);
        a.out_topk_idx = ptr<int64_t>(out_topk_idx);
        a.out_topk_weights = ptr<float>(out_topk_weights);
        a.out_origin = ptr<int>(out_origin);
        a.out_in_rank = ptr<bool>(out_in_rank);
        return launch_dispatch_round(a, static_cast<int>(num_blocks), c10::cuda::getCurrentCUDAStream());
    }

    std::string combine_round(const torch::Tensor& x, const std::optional<torch::Tensor>& weights, int64_t num_topk,
                              const torch::Tensor& origin, const torch::Tensor& send_pos,
                              const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
                              int64_t round, int64_t lo, int64_t window, int64_t num_blocks, torch::Tensor& out,
                              const std::optional<torch::Tensor>& out_weights, const std::string& wire_format) {
        if (!sym_) return "the internode buffer is not allocated";
        CombineArgs a{};
        const int64_t hidden = x.size(1);
        a.format = moe_a2a::combine_wire_format(wire_format, hidden, moe_a2a::kWireBF16 | moe_a2a::kWireFP8,
                                                "the internode combine");
        if (!fill_common(a.c, combine_slot_bytes(hidden, num_topk), round, lo, window, num_blocks))
            return "window too large for the buffer";
        a.hidden = static_cast<int>(hidden);
        a.num_topk = static_cast<int>(num_topk);
        a.off_weights = static_cast<int>(combine_weights_offset(hidden));
        a.num_recv_rows = static_cast<int>(x.size(0));
        a.x = ptr<const uint16_t>(x);
        a.weights = ptr<const float>(weights);
        a.origin = ptr<const int>(origin);
        a.num_tokens = static_cast<int>(out.size(0));
        a.send_pos = ptr<const int>(send_pos);
        a.bias0 = ptr<const uint16_t>(bias0);
        a.bias1 = ptr<const uint16_t>(bias1);
        a.out = ptr<uint16_t>(out);
        a.out_weights = ptr<float>(out_weights);
        return launch_combine_round(a, static_cast<int>(num_blocks), c10::cuda::getCurrentCUDAStream());
    }

    // The slot area (DeepEP's RDMA buffer) from `offset` bytes on, as uint8.
    torch::Tensor local_buffer(int64_t offset) const {
        auto opts = torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device());
        return torch::from_blob(sym_ + kHeaderBytes + offset, {slot_bytes_ - offset}, opts);
    }

    void destroy() {
        if (sym_) sym_free(sym_);
        if (host_) cudaFreeHost(const_cast<ErrorRecord*>(host_));
        sym_ = nullptr;
        host_ = nullptr;
    }

   private:
    static int device() {
        int d = 0;
        cudaGetDevice(&d);
        return d;
    }

    bool fill_common(Common& c, int64_t stride, int64_t round, int64_t lo, int64_t window, int64_t num_blocks) {
        if (window <= 0 || 2 * num_nodes_ * window * stride > slot_bytes_) return false;
        c.sym = sym_;
        c.me = node_;
        c.num_nodes = num_nodes_;
        c.pe_offset = pe_offset_;
        c.pe_stride = pe_stride_;
        c.window = static_cast<int>(window);
        c.stride = static_cast<int>(stride);
        c.lo = static_cast<int>(lo);
        c.round = static_cast<int>(round);
        c.arrive_expect = ++arrive_count_;
        data_count_ += static_cast<unsigned long long>(num_blocks);
        c.data_expect = data_count_;
        c.err = host_dev_;
        c.timeout_ns = timeout_ns_;
        for (int i = 0; i < kSignatureInts; ++i) c.signature[i] = signature_[i];
        return true;
    }

    char* sym_ = nullptr;
    ErrorRecord* host_ = nullptr;
    ErrorRecord* host_dev_ = nullptr;
    int rank_ = 0, num_nodes_ = 0, node_ = 0, local_rank_ = 0, num_local_ranks_ = 0;
    int pe_offset_ = 0, pe_stride_ = 1;
    int64_t slot_bytes_ = 0;
    unsigned long long timeout_ns_ = 0, notify_count_ = 0, arrive_count_ = 0, data_count_ = 0;
    int signature_[kSignatureInts] = {};
};


// Low-latency runtime over the whole group (low_latency.cuh): the symmetric buffer (two alternating sets),
// a local workspace of epochs and counters, and a pinned host record of the first timeout. Shapes and
// dtypes are checked in Python; every launch runs on the current stream and reads nothing on the host.
class LowLatencyRuntime {
   public:
    LowLatencyRuntime() = default;
    ~LowLatencyRuntime() {
        // The symmetric buffer is freed only by destroy() (collective).
        if (workspace_) cudaFree(workspace_);
        if (mask_) cudaFree(mask_);
        if (host_) cudaFreeHost(const_cast<LLHostError*>(host_));
    }

    // Collective over the group: every rank calls it with the same num_bytes.
    std::string allocate(int rank, int num_ranks, int64_t num_bytes, double timeout_s, bool use_nvlink) {
        if (sym_) return "already allocated";
        if (num_bytes <= moe_a2a::kLLSignalBytes) return "num_bytes too small";
        rank_ = rank;
        num_ranks_ = num_ranks;
        num_bytes_ = num_bytes;
        use_nvlink_ = use_nvlink;
        timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
        set_bytes_ = ((num_bytes - moe_a2a::kLLSignalBytes) / 2) / 128 * 128;
        cudaGetDevice(&device_);
        cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_);
        void* host = nullptr;
        if (cudaHostAlloc(&host, sizeof(LLHostError), cudaHostAllocMapped) != cudaSuccess)
            return "cudaHostAlloc of the error record failed";
        std::memset(host, 0, sizeof(LLHostError));
        host_ = static_cast<LLHostError*>(host);
        if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host, 0) != cudaSuccess)
            return "cudaHostGetDevicePointer failed";
        if (cudaMalloc(&workspace_, moe_a2a::kLLWorkspaceInts * sizeof(int)) != cudaSuccess ||
            cudaMemset(workspace_, 0, moe_a2a::kLLWorkspaceInts * sizeof(int)) != cudaSuccess)
            return "cudaMalloc of the workspace failed";
        if (cudaMalloc(&mask_, num_ranks * sizeof(int)) != cudaSuccess ||
            cudaMemset(mask_, 0, num_ranks * sizeof(int)) != cudaSuccess)
            return "cudaMalloc of the rank mask failed";
        void* sym = nullptr;
        const std::string err = sym_malloc(static_cast<size_t>(num_bytes), &sym);  // zeroed, then a barrier
        if (!err.empty()) return err;
        sym_ = static_cast<char*>(sym);
        return "";
    }

    bool is_available() const { return sym_ != nullptr; }
    int num_device_sms() const { return num_device_sms_; }

    // The first error the kernels recorded: (code, phase, peer, index, set, call, mine, theirs) as in
    // LLHostError; code 0 while none.
    std::tuple<int, int, int, int, int, int, int, int> error_record() const {
        if (!host_) return {0, 0, 0, 0, 0, 0, 0, 0};
        const int code = host_->code;
        std::atomic_thread_fence(std::memory_order_acquire);
        return {code, host_->phase, host_->peer, host_->index, host_->set, host_->call, host_->mine, host_->theirs};
    }

    // The rank mask as a [num_ranks] int32 CUDA tensor (1 = masked), a view the host sets on the stream of the
    // calls it governs; kernels with shrink set entries of ranks that time out. clean() keeps it.
    torch::Tensor rank_mask() {
        auto opts = torch::TensorOptions().dtype(torch::kInt32).device(torch::kCUDA, device_);
        return torch::from_blob(mask_, {num_ranks_}, opts);
    }

    // Whether a peer that times out is masked (and the call goes on without it) instead of failing the call.
    void set_shrink(bool shrink) { shrink_ = shrink; }

    // The step probe (LLHostError::block_step): off by default; on, later launches record each block's steps.
    void set_step_probe(bool on) { probe_ = on; }

    // (call << 4) | step of each of the first `num_blocks` blocks' last recorded step (0: none yet); no sync.
    std::vector<int> block_steps(int num_blocks) const {
        std::vector<int> out;
        for (int b = 0; host_ && b < std::min(num_blocks, moe_a2a::kLLProbeBlocks); ++b)
            out.push_back(static_cast<int>(host_->block_step[b]));
        return out;
    }

    // Zero the signals and the workspace (collective: the caller synchronizes the ranks around it).
    std::string clean() {
        if (!sym_) return "the low-latency buffer is not allocated";
        if (cudaDeviceSynchronize() != cudaSuccess || cudaMemset(sym_, 0, moe_a2a::kLLSignalBytes) != cudaSuccess ||
            cudaMemset(workspace_, 0, moe_a2a::kLLWorkspaceInts * sizeof(int)) != cudaSuccess ||
            cudaDeviceSynchronize() != cudaSuccess)
            return std::string("clean failed: ") + cudaGetErrorString(cudaGetLastError());
        return "";
    }

    std::string dispatch(const torch::Tensor& x, const torch::Tensor& topk_idx, int num_experts, int max_tokens,
                         bool use_fp8, bool round_scale, bool use_ue8m0, torch::Tensor& recv_x,
                         const std::optional<torch::Tensor>& recv_scales, torch::Tensor& recv_count,
                         torch::Tensor& src_info, torch::Tensor& layout_range,
                         const std::optional<torch::Tensor>& cumulative_stats,
                         const std::optional<torch::Tensor>& wait_stats, int set, int num_sms, int call, int phases) {
        nvshmem_ll::Ctx c{};
        std::string err = ctx(c, set, num_experts, max_tokens, static_cast<int>(x.size(1)), call, num_sms, phases);
        if (!err.empty()) return err;
        const LLDispatchArgs a = ll_dispatch_args(x, topk_idx, num_experts, max_tokens, use_fp8, round_scale, use_ue8m0,
                                                  recv_x, recv_scales, recv_count, src_info, layout_range,
                                                  cumulative_stats, wait_stats, rank_, num_ranks_);
        return nvshmem_ll::launch_dispatch(c, a, phases, num_sms, c10::cuda::getCurrentCUDAStream());
    }

    std::string combine(const torch::Tensor& x, const torch::Tensor& layout_range, const torch::Tensor& src_info,
                        const torch::Tensor& topk_idx, const torch::Tensor& topk_weights, torch::Tensor& out,
                        const std::optional<torch::Tensor>& wait_stats, int num_experts, int max_tokens, int set,
                        int num_sms, int call, int phases, const std::string& wire_format) {
        nvshmem_ll::Ctx c{};
        const int hidden = static_cast<int>(x.size(-1));
        const int format = combine_wire_format(wire_format, hidden, kWireBF16 | kWireFP8 | kWireLogFMT,
                                                "the low-latency combine");
        std::string err = ctx(c, set, num_experts, max_tokens, hidden, call, num_sms, phases);
        if (!err.empty()) return err;
        nvshmem_ll::CombineArgs a{};
        a.a = ll_combine_args(x, layout_range, topk_idx, topk_weights, out, wait_stats, num_experts, max_tokens,
                              send_base(set), format, rank_, num_ranks_);
        a.src_info = src_info.data_ptr<int>();
        return nvshmem_ll::launch_combine(c, a, phases, num_sms, c10::cuda::getCurrentCUDAStream());
    }

    // The send area of `set` as the zero-copy combine input [L, R * M, hidden] bf16 (shape checked in Python).
    torch::Tensor send_buffer(int set, int num_experts, int max_tokens, int hidden) {
        const int64_t L = num_experts / num_ranks_, RM = static_cast<int64_t>(num_ranks_) * max_tokens;
        auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA, device_);
        return torch::from_blob(send_base(set), {L, RM, hidden}, opts);
    }

    // Collective over the group (NVSHMEM frees with a barrier).
    void destroy() {
        if (sym_) sym_free(sym_);
        sym_ = nullptr;
    }

   private:
    char* send_base(int set) const { return sym_ + moe_a2a::kLLSignalBytes + set * set_bytes_; }

    std::string ctx(nvshmem_ll::Ctx& c, int set, int num_experts, int max_tokens, int hidden, int call, int num_sms,
                    int phases) const {
        if (!sym_) return "the low-latency buffer is not allocated or was destroyed";
        if (host_->code != 0)
            return "a kernel failed earlier (a timeout or ranks that disagree); the buffer cannot be used again";
        if (set != 0 && set != 1) return "buffer set must be 0 or 1";
        if (phases < 1 || phases > 3) return "phases must be 1, 2 or 3";
        if (num_sms < 1 || num_sms > num_device_sms_) return "num_sms out of range";
        if (num_experts <= 0 || num_experts > moe_a2a::kLLMaxExperts || num_experts % num_ranks_)
            return "num_experts must be a multiple of the group size, at most " + std::to_string(moe_a2a::kLLMaxExperts);
        if (max_tokens < 1 || max_tokens > nvshmem_ll::kMaxTokens) return "num_max_dispatch_tokens_per_rank out of range";
        const int64_t send = moe_a2a::ll_send_bytes(num_experts, max_tokens, hidden);
        const int64_t recv = moe_a2a::ll_recv_bytes(num_experts, max_tokens, hidden);
        if (send + recv > set_bytes_)
            return "the buffer of " + std::to_string(num_bytes_) + " bytes is too small for this call shape";
        c.sym = sym_;
        c.workspace = workspace_;
        c.host = host_dev_;
        c.timeout_ns = timeout_ns_;
        c.set_bytes = set_bytes_;
        c.recv_offset = send;
        c.rank = rank_;
        c.num_ranks = num_ranks_;
        c.set = set;
        c.call = call;
        c.use_nvlink = use_nvlink_ ? 1 : 0;
        c.mask = mask_;
        c.shrink = shrink_ ? 1 : 0;
        c.probe = probe_ ? host_dev_ : nullptr;
        return "";
    }

    char* sym_ = nullptr;
    int* workspace_ = nullptr;
    int* mask_ = nullptr;
    volatile LLHostError* host_ = nullptr;
    LLHostError* host_dev_ = nullptr;
    int rank_ = 0, num_ranks_ = 1, device_ = 0, num_device_sms_ = 0;
    int64_t num_bytes_ = 0, set_bytes_ = 0;
    uint64_t timeout_ns_ = 0;
    bool use_nvlink_ = true;
    bool shrink_ = false;
    bool probe_ = false;
};


// The mixed TP x DP one-shot across nodes (mixed.cuh): a symmetric buffer of fixed slot capacity, the
// device call counter and the error record. Checks of the tensors are made in Python before run().
class MixedRuntime {
   public:
    MixedRuntime() = default;
    // The symmetric buffer is freed only by destroy() (collective).
    ~MixedRuntime() {
        if (state_) cudaFree(state_);
        if (host_) cudaFreeHost(const_cast<nvshmem_mixed::ErrorRecord*>(host_));
    }

    // Collective over the group (NVSHMEM over all of it): every rank passes the same slot_bytes.
    std::string allocate(int rank, int num_ranks, int local_size, int64_t slot_bytes, double timeout_s) {
        if (sym_) return "already allocated";
        if (num_ranks > nvshmem_mixed::kMaxPes) return "at most " + std::to_string(nvshmem_mixed::kMaxPes) + " ranks";
        if (slot_bytes <= 0 || slot_bytes % 16) return "slot_bytes must be a positive multiple of 16";
        rank_ = rank, num_ranks_ = num_ranks, local_size_ = local_size, slot_bytes_ = slot_bytes;
        timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
        void* host = nullptr;
        if (cudaHostAlloc(&host, sizeof(nvshmem_mixed::ErrorRecord), cudaHostAllocMapped) != cudaSuccess)
            return "cudaHostAlloc of the error record failed";
        std::memset(host, 0, sizeof(nvshmem_mixed::ErrorRecord));
        host_ = static_cast<nvshmem_mixed::ErrorRecord*>(host);
        if (cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host, 0) != cudaSuccess)
            return "cudaHostGetDevicePointer failed";
        if (cudaMalloc(&state_, nvshmem_mixed::kStateInts * sizeof(int)) != cudaSuccess ||
            cudaMemset(state_, 0, nvshmem_mixed::kStateInts * sizeof(int)) != cudaSuccess)
            return "cudaMalloc of the call state failed";
        void* sym = nullptr;
        const std::string err = internode::sym_malloc(nvshmem_mixed::mixed_alloc_bytes(num_ranks, slot_bytes), &sym);
        if (!err.empty()) return err;
        sym_ = static_cast<char*>(sym);
        return "";
    }

    int64_t slot_bytes() const { return slot_bytes_; }

    // The first error a kernel recorded, as a sentence naming the ranks; empty while none.
    std::string error() const {
        if (!host_ || host_->code == nvshmem_mixed::kErrNone) return "";
        std::atomic_thread_fence(std::memory_order_acquire);
        const std::string me = "rank " + std::to_string(rank_), peer = "rank " + std::to_string(host_->peer);
        if (host_->code == nvshmem_mixed::kErrShape) {
            auto shape = [](const volatile int* v) {
                return "[" + std::to_string(v[0]) + " rows, hidden " + std::to_string(v[1]) + ", dtype " +
                       std::to_string(v[2]) + "]";
            };
            return me + " got a message of shape " + shape(host_->theirs) + " from " + peer + " in call " +
                   std::to_string(host_->call) + ", its own is " + shape(host_->mine) +
                   "; every rank must pass the same shape";
        }
        return me + " timed out after " + std::to_string(timeout_ns_ / 1000000) +
               " ms in the internode mixed one-shot (call " + std::to_string(host_->call) + ") waiting for " + peer +
               "; is every rank calling with the same shape, in the same order?";
    }

    // x [rows, hidden] float16/bfloat16 (dtype 1/2 as comm::ArDtype); out [out_blocks * send_rows, hidden].
    std::string run(const torch::Tensor& x, const std::vector<int64_t>& send_first, int64_t send_rows,
                    const std::vector<int64_t>& src_block, int64_t out_blocks, int64_t num_blocks, int64_t dtype,
                    torch::Tensor& out) {
        if (!sym_) return "the mixed internode buffer is not allocated";
        nvshmem_mixed::MixedArgs a{};
        a.sym = sym_;
        a.state = state_;
        a.host = host_dev_;
        a.timeout_ns = timeout_ns_;
        a.rank = rank_, a.num_ranks = num_ranks_, a.local_size = local_size_;
        a.slot_bytes = slot_bytes_;
        a.x = x.data_ptr();
        a.out = out.data_ptr();
        a.elem_size = static_cast<int>(x.element_size());
        a.dtype = static_cast<int>(dtype);
        a.hidden = static_cast<int>(x.size(1));
        a.send_rows = static_cast<int>(send_rows);
        a.out_blocks = static_cast<int>(out_blocks);
        for (int r = 0; r < num_ranks_; ++r) {
            a.send_first[r] = static_cast<int>(send_first[r]);
            a.src_block[r] = static_cast<int>(src_block[r]);
        }
        return nvshmem_mixed::launch_mixed(a, static_cast<int>(num_blocks), c10::cuda::getCurrentCUDAStream());
    }

    // Collective: frees the symmetric buffer.
    void destroy() {
        if (sym_) internode::sym_free(sym_);
        sym_ = nullptr;
    }

   private:
    char* sym_ = nullptr;
    int* state_ = nullptr;
    volatile nvshmem_mixed::ErrorRecord* host_ = nullptr;
    nvshmem_mixed::ErrorRecord* host_dev_ = nullptr;
    uint64_t timeout_ns_ = 0;
    int rank_ = 0, num_ranks_ = 0, local_size_ = 1;
    int64_t slot_bytes_ = 0;
};

}  // namespace moe_a2a::internode

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    namespace py = pybind11;
    using moe_a2a::internode::LowLatencyRuntime;
    using moe_a2a::internode::Runtime;
    m.doc() = "moe_a2a internode kernels over NVSHMEM";
    m.attr("max_nodes") = moe_a2a::internode::kMaxNodes;
    m.attr("max_local_ranks") = moe_a2a::internode::kMaxLocalRanks;
    m.attr("max_topk") = moe_a2a::internode::kMaxTopk;
    m.attr("max_notify_ints") = moe_a2a::internode::kNotifyInts;
    m.attr("notify_signature_ints") = moe_a2a::internode::kSignatureSlotInts;
    m.def("unique_id", &moe_a2a::internode::unique_id, "(id bytes, error) from nvshmemx_get_uniqueid");
    m.def("init", &moe_a2a::internode::init_py, "Initialise NVSHMEM by unique id; returns an error or ''");
    m.def("is_initialized", &moe_a2a::internode::is_initialized);
    m.def("my_pe", &moe_a2a::internode::my_pe);
    m.def("num_pes", &moe_a2a::internode::num_pes);
    m.def("dispatch_slot_bytes", &moe_a2a::internode::dispatch_slot_bytes);
    m.def("combine_slot_bytes", &moe_a2a::internode::combine_slot_bytes);
    m.attr("ll_max_experts") = moe_a2a::kLLMaxExperts;
    m.attr("ll_max_topk") = moe_a2a::kLLMaxTopk;
    m.attr("ll_max_tokens") = moe_a2a::nvshmem_ll::kMaxTokens;
    py::class_<LowLatencyRuntime>(m, "LowLatencyRuntime")
        .def(py::init<>())
        .def("allocate", &LowLatencyRuntime::allocate)
        .def("is_available", &LowLatencyRuntime::is_available)
        .def("num_device_sms", &LowLatencyRuntime::num_device_sms)
        .def("error_record", &LowLatencyRuntime::error_record)
        .def("clean", &LowLatencyRuntime::clean)
        .def("rank_mask", &LowLatencyRuntime::rank_mask)
        .def("set_shrink", &LowLatencyRuntime::set_shrink)
        .def("set_step_probe", &LowLatencyRuntime::set_step_probe)
        .def("block_steps", &LowLatencyRuntime::block_steps)
        .def("dispatch", &LowLatencyRuntime::dispatch)
        .def("combine", &LowLatencyRuntime::combine)
        .def("send_buffer", &LowLatencyRuntime::send_buffer)
        .def("destroy", &LowLatencyRuntime::destroy);
    m.attr("mixed_max_ranks") = moe_a2a::nvshmem_mixed::kMaxPes;
    m.def("mixed_alloc_bytes", &moe_a2a::nvshmem_mixed::mixed_alloc_bytes);
    py::class_<moe_a2a::internode::MixedRuntime>(m, "MixedRuntime")
        .def(py::init<>())
        .def("allocate", &moe_a2a::internode::MixedRuntime::allocate)
        .def("slot_bytes", &moe_a2a::internode::MixedRuntime::slot_bytes)
        .def("error", &moe_a2a::internode::MixedRuntime::error)
        .def("run", &moe_a2a::internode::MixedRuntime::run)
        .def("destroy", &moe_a2a::internode::MixedRuntime::destroy);
    py::class_<Runtime>(m, "Runtime")
        .def(py::init<>())
        .def("allocate", &Runtime::allocate)
        .def("is_available", &Runtime::is_available)
        .def("set_pe_map", &Runtime::set_pe_map)
        .def("slot_bytes", &Runtime::slot_bytes)
        .def("error", &Runtime::error)
        .def("set_signature", &Runtime::set_signature)
        .def("notify", &Runtime::notify)
        .def("dispatch_round", &Runtime::dispatch_round)
        .def("combine_round", &Runtime::combine_round)
        .def("local_buffer", &Runtime::local_buffer)
        .def("destroy", &Runtime::destroy);
}
