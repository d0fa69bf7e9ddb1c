// AllReduceWorkspace (see allreduce.h, and comm/allreduce.cuh for the protocol). Launches run on the current
// CUDA stream and read nothing back on the host, so they can be captured in a CUDA graph. Validation lives
// in moe_a2a/comm (Python); the checks here are a backstop that never lets a kernel write out of bounds.
#include "comm/allreduce.h"

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "comm/allreduce.cuh"
#include "ipc.h"
#include "kernels/utils.cuh"

namespace moe_a2a {

namespace {

using comm::ArArgs;
using comm::ArHostError;

// Blocks per call when the caller gives none: few enough that the blocks of 8 ranks sharing one GPU are all
// resident (the Python side passes its own count, from the ranks it finds on this GPU).
constexpr int kDefaultBlocks = 16;

const char* step_name(int step) {
    switch (step) {
        case comm::kStepHeader: return "the shape header";
        case comm::kStepOneShot: return "the one-shot reduce";
        case comm::kStepScatter: return "the two-shot reduce-scatter";
        case comm::kStepGather: return "the two-shot all-gather";
        default: return "an unknown step";
    }
}

std::string triple(const volatile int* v) {
    return "[" + std::to_string(v[0]) + " tokens, hidden " + std::to_string(v[1]) + ", " +
           (v[2] == 2 ? "two-shot" : v[2] == 1 ? "one-shot" : v[2] == comm::kArModeMixed ? "mixed TP x DP"
            : v[2] == comm::kArModeMixedTwoShot ? "mixed TP x DP two-shot" : "mode " + std::to_string(v[2])) +
           "]";
}

void check_tensor(const torch::Tensor& t, const char* name, const torch::Tensor& like, bool same_shape) {
    MOE_A2A_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
    MOE_A2A_CHECK(t.device() == like.device(), name, " must be on the input's device");
    MOE_A2A_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
    if (same_shape) MOE_A2A_CHECK(t.sizes() == like.sizes(), name, " must have the input's shape");
}

class AllReduceWorkspace : public IpcRuntime<ArHostError, comm::kArMaxRanks> {
   public:
    // vmm: share the buffers as CUDA virtual memory (export_fd / connect_fds) instead of cudaIpc handles.
    AllReduceWorkspace(int rank, int num_ranks, int64_t buffer_bytes, int elem_size, double timeout_s, bool vmm)
        : IpcRuntime("all-reduce", rank, num_ranks, timeout_s), buffer_bytes_(buffer_bytes), elem_size_(elem_size) {
        MOE_A2A_CHECK(buffer_bytes > 0 && buffer_bytes % 16 == 0, "buffer_bytes must be a positive multiple of 16, got ",
                      buffer_bytes);
        MOE_A2A_CHECK(buffer_bytes / 16 < (int64_t{1} << 31), "buffer_bytes must be below 32 GiB, got ", buffer_bytes);
        MOE_A2A_CHECK(elem_size == 2 || elem_size == 4, "elem_size must be 2 or 4, got ", elem_size);
        const int64_t total = comm::kArNumBuffers * buffer_bytes;
        allocate_shared(total, vmm);
        comm::launch_fill_sentinel(local_, total / 16, elem_size, nullptr);
        MOE_A2A_CUDA_CHECK(cudaMalloc(&flags_, comm::kNumFlags * sizeof(int)));
        MOE_A2A_CUDA_CHECK(cudaMemset(flags_, 0, comm::kNumFlags * sizeof(int)));
        allocate_host_record();
        // The peers map this buffer only after the handles are exchanged: the fill is complete by then.
        MOE_A2A_CUDA_CHECK(cudaDeviceSynchronize());
    }

    ~AllReduceWorkspace() { destroy(); }

    void destroy() {
        if (!begin_destroy()) return;
        release_shared();
        if (flags_) cudaFree(flags_);
        flags_ = nullptr;
    }

    int64_t buffer_bytes() const { return buffer_bytes_; }

    std::string error() const {
        if (!host_ || host_->code == comm::kArErrNone) return "";
        const std::string me = "rank " + std::to_string(rank_);
        const std::string where = std::string(step_name(host_->step)) + " of call " + std::to_string(host_->call);
        if (host_->code == comm::kArErrTimeout)
            return me + " timed out after " + std::to_string(timeout_ns_ / 1000000) + " ms in " + where +
                   " waiting for rank " + std::to_string(host_->peer) +
                   (host_->token >= 0 ? " (token " + std::to_string(host_->token) + ")" : "") +
                   "; is every rank calling with the same shape, in the same order?";
        if (host_->code == comm::kArErrShape)
            return me + " got a message of shape " + triple(host_->theirs) + " from rank " +
                   std::to_string(host_->peer) + " in call " + std::to_string(host_->call) + ", its own is " +
                   triple(host_->mine) + "; every rank must pass the same shape";
        if (host_->code == comm::kArErrResidual)
            return me + " in call " + std::to_string(host_->call) + ": its residual of token " +
                   std::to_string(host_->token) + " differs from that of rank " + std::to_string(host_->peer) +
                   ", which owns the token in the fused two-shot; the residual must be the same on every rank";
        return me + ": unknown error code " + std::to_string(host_->code);
    }

    // Mixed TP x DP one-shot (comm/allreduce.cuh, ArArgs::mixed): x [rows, hidden] float16/bfloat16; rank p
    // receives rows send_first[p].. (send_rows of them); out [out_blocks * send_rows, hidden] block b sums the
    // sources s with src_block[s] == b in rank order.
    void mixed(const torch::Tensor& x, const std::vector<int64_t>& send_first, int64_t send_rows,
               const std::vector<int64_t>& src_block, int64_t out_blocks, int64_t num_blocks, torch::Tensor& out) {
        const int dtype = check_call(x);
        MOE_A2A_CHECK(static_cast<int>(send_first.size()) == num_ranks_ && static_cast<int>(src_block.size()) == num_ranks_,
                      "send_first and src_block need one entry per rank");
        MOE_A2A_CHECK(send_rows > 0 && send_rows <= x.size(0), "send_rows must be in [1, ", x.size(0), "]");
        MOE_A2A_CHECK(out_blocks >= 1 && out_blocks <= num_ranks_, "out_blocks must be in [1, ", num_ranks_, "]");
        for (int r = 0; r < num_ranks_; ++r) {
            MOE_A2A_CHECK(send_first[r] >= 0 && send_first[r] + send_rows <= x.size(0), "send_first[", r,
                          "] = ", send_first[r], " leaves the input's ", x.size(0), " rows");
            MOE_A2A_CHECK(src_block[r] >= 0 && src_block[r] < out_blocks, "src_block[", r, "] must be in [0, ",
                          out_blocks, ")");
        }
        check_tensor(out, "out", x, false);
        MOE_A2A_CHECK(out.scalar_type() == x.scalar_type() && out.dim() == 2 && out.size(0) == out_blocks * send_rows &&
                      out.size(1) == x.size(1), "out must be [out_blocks * send_rows, hidden] of the input's dtype");
        const int rows = static_cast<int>(send_rows), hidden = static_cast<int>(x.size(1));
        check_fits(comm::ar_slots_vecs(num_ranks_, rows, hidden, elem_size_, false));
        ArArgs a = base_args(x, dtype);
        a.mixed = 1;
        a.send_rows = rows;
        a.out_blocks = static_cast<int>(out_blocks);
        for (int r = 0; r < num_ranks_; ++r) {
            a.send_first[r] = static_cast<int>(send_first[r]);
            a.src_block[r] = static_cast<int>(src_block[r]);
        }
        a.out = out.data_ptr();
        launch(a, x, num_blocks, static_cast<int64_t>(out_blocks) * rows);
    }

    // Mixed TP x DP two-shot (comm/allreduce.cuh): owner p sums rows send_first[p].. (own_rows[p] of them) of
    // the ranks in the bit mask scatter_src[p] and sends the sum to the ranks in gather_dst[p], which store it
    // at row out_first[p] of out [out_rows, hidden].
    void mixed_two_shot(const torch::Tensor& x, const std::vector<int64_t>& send_first,
                        const std::vector<int64_t>& own_rows, const std::vector<int64_t>& scatter_src,
                        const std::vector<int64_t>& gather_dst, const std::vector<int64_t>& out_first,
                        int64_t num_blocks, torch::Tensor& out) {
        const int dtype = check_call(x);
        const int R = num_ranks_;
        for (const auto* v : {&send_first, &own_rows, &scatter_src, &gather_dst, &out_first})
            MOE_A2A_CHECK(static_cast<int>(v->size()) == R, "the two-shot's per-owner lists need one entry per rank");
        check_tensor(out, "out", x, false);
        MOE_A2A_CHECK(out.scalar_type() == x.scalar_type() && out.dim() == 2 && out.size(1) == x.size(1),
                      "out must be [rows, hidden] of the input's dtype");
        int64_t largest = 0;
        for (int p = 0; p < R; ++p) {
            MOE_A2A_CHECK(own_rows[p] >= 0 && send_first[p] >= 0 && send_first[p] + own_rows[p] <= x.size(0),
                          "owner ", p, "'s rows [", send_first[p], ", ", send_first[p] + own_rows[p],
                          ") leave the input's ", x.size(0), " rows");
            MOE_A2A_CHECK(scatter_src[p] >= 0 && scatter_src[p] < (int64_t{1} << R) && gather_dst[p] >= 0 &&
                          gather_dst[p] < (int64_t{1} << R), "owner ", p, "'s rank masks must be below 2^", R);
            MOE_A2A_CHECK(own_rows[p] == 0 || scatter_src[p] != 0, "owner ", p, " has rows but no sources");
            if ((gather_dst[p] >> rank_ & 1) && own_rows[p] > 0)
                MOE_A2A_CHECK(out_first[p] >= 0 && out_first[p] + own_rows[p] <= out.size(0), "owner ", p,
                              "'s rows land outside out's ", out.size(0), " rows");
            largest = std::max(largest, own_rows[p]);
        }
        MOE_A2A_CHECK(largest > 0, "the two-shot has no rows to sum");
        const int rows = static_cast<int>(largest), hidden = static_cast<int>(x.size(1));
        check_fits(comm::ar_slots_vecs(R, rows, hidden, elem_size_, true));
        ArArgs a = base_args(x, dtype);
        a.mixed = 1;
        a.two_shot = 1;
        a.send_rows = rows;
        for (int p = 0; p < R; ++p) {
            a.send_first[p] = static_cast<int>(send_first[p]);
            a.own_rows[p] = static_cast<int>(own_rows[p]);
            a.scatter_src[p] = static_cast<unsigned>(scatter_src[p]);
            a.gather_dst[p] = static_cast<unsigned>(gather_dst[p]);
            a.out_first[p] = static_cast<int>(out_first[p]);
        }
        a.out = out.data_ptr();
        launch(a, x, num_blocks, static_cast<int64_t>(R) * rows);
    }

    void allreduce(const torch::Tensor& x, const std::optional<torch::Tensor>& bias,
                   const std::optional<torch::Tensor>& residual, const std::optional<torch::Tensor>& weight,
                   const std::optional<torch::Tensor>& scale, double eps, bool norm, bool two_shot, int64_t num_blocks,
                   const std::optional<torch::Tensor>& out, const std::optional<torch::Tensor>& residual_out,
                   const std::optional<torch::Tensor>& quant) {
        const int dtype = check_call(x);
        const auto st = x.scalar_type();
        const int tokens = static_cast<int>(x.size(0)), hidden = static_cast<int>(x.size(1));
        check_fits(comm::ar_used_vecs(num_ranks_, tokens, hidden, elem_size_, two_shot));
        ArArgs a = base_args(x, dtype);
        a.tokens = tokens;
        a.eps = static_cast<float>(eps);
        a.two_shot = two_shot ? 1 : 0;
        if (bias) {
            check_tensor(*bias, "bias", x, false);
            MOE_A2A_CHECK(bias->scalar_type() == st && bias->numel() == hidden, "bias must be [hidden] like input");
            a.bias = bias->data_ptr();
        }
        if (norm) {
            MOE_A2A_CHECK(residual && weight && residual_out, "the norm needs residual, norm_weight and residual_out");
            check_tensor(*residual, "residual", x, true);
            check_tensor(*residual_out, "residual_out", x, true);
            check_tensor(*weight, "norm_weight", x, false);
            MOE_A2A_CHECK(residual->scalar_type() == st && residual_out->scalar_type() == st &&
                          weight->scalar_type() == st && weight->numel() == hidden,
                          "residual, residual_out and norm_weight must have the input's dtype and size");
            a.residual = residual->data_ptr();
            a.residual_out = residual_out->data_ptr();
            a.weight = weight->data_ptr();
            if (quant) {
                MOE_A2A_CHECK(scale && scale->is_cuda() && scale->scalar_type() == torch::kFloat32 &&
                              scale->numel() == 1, "the FP8 output needs scale, a [1] float32 CUDA tensor");
                MOE_A2A_CHECK(quant->is_cuda() && quant->is_contiguous() && quant->sizes() == x.sizes() &&
                              quant->element_size() == 1, "quant must be a contiguous 1-byte tensor of the input's shape");
                a.scale = scale->data_ptr<float>();
                a.quant = static_cast<uint8_t*>(quant->data_ptr());
            }
        } else {
            MOE_A2A_CHECK(!quant, "the FP8 output needs the norm");
        }
        MOE_A2A_CHECK(out || norm, "the plain all-reduce needs out");
        if (out) {
            check_tensor(*out, "out", x, true);
            MOE_A2A_CHECK(out->scalar_type() == st, "out must have the input's dtype");
            a.out = out->data_ptr();
        }
        launch(a, x, num_blocks, tokens);
    }

   private:
    // The checks every call makes of the workspace and its input x [rows, hidden]; returns x's ArDtype.
    int check_call(const torch::Tensor& x) const {
        MOE_A2A_CHECK(connected_ && !destroyed_, "the all-reduce workspace is not connected or was destroyed");
        const std::string err = error();
        MOE_A2A_CHECK(err.empty(), "moe_a2a all-reduce: ", err);
        MOE_A2A_CHECK(x.dim() == 2 && x.size(0) > 0 && x.size(1) > 0, "input must be a non-empty [tokens, hidden]");
        check_tensor(x, "input", x, true);
        const auto st = x.scalar_type();
        int dtype = -1;
        if (st == torch::kFloat32) dtype = comm::kArFloat32;
        if (st == torch::kFloat16) dtype = comm::kArFloat16;
        if (st == torch::kBFloat16) dtype = comm::kArBFloat16;
        MOE_A2A_CHECK(dtype >= 0, "input dtype must be float32, float16 or bfloat16, got ", c10::toString(st));
        MOE_A2A_CHECK(static_cast<int>(x.element_size()) == elem_size_, "this workspace serves ", elem_size_,
                      "-byte elements, got ", c10::toString(st));
        MOE_A2A_CHECK((x.size(1) * x.element_size()) % 16 == 0, "rows must be a multiple of 16 bytes, got ",
                      x.size(1) * x.element_size());
        MOE_A2A_CHECK(x.size(0) < (int64_t{1} << 30) && x.size(1) < (int64_t{1} << 30), "input too large");
        return dtype;
    }

    // A call whose message takes `used_vecs` 16-byte pieces of each Lamport buffer fits the workspace.
    void check_fits(int64_t used_vecs) const {
        MOE_A2A_CHECK(used_vecs * 16 <= buffer_bytes_, "the problem needs ", used_vecs * 16, " bytes per Lamport "
                      "buffer, the workspace has ", buffer_bytes_, "; grow it first");
    }

    ArArgs base_args(const torch::Tensor& x, int dtype) const {
        ArArgs a{};
        for (int r = 0; r < num_ranks_; ++r) a.peers[r] = peers_[r];
        a.buffer_bytes = buffer_bytes_;
        a.flags = flags_;
        a.host = host_dev_;
        a.timeout_ns = timeout_ns_;
        a.rank = rank_;
        a.num_ranks = num_ranks_;
        a.x = x.data_ptr();
        a.hidden = static_cast<int>(x.size(1));
        a.dtype = dtype;
        return a;
    }

    // One block per row by default (at most kDefaultBlocks, and the device's SMs); a thread per 16-byte piece.
    void launch(const ArArgs& a, const torch::Tensor& x, int64_t num_blocks, int64_t rows) {
        int blocks = static_cast<int>(num_blocks > 0 ? num_blocks : std::min<int64_t>(rows, kDefaultBlocks));
        blocks = std::max(1, std::min(blocks, num_device_sms_));
        const int row_vecs = static_cast<int>(x.size(1) * x.element_size() / 16);
        const int threads = std::min(comm::kArMaxThreads, std::max(32, (row_vecs + 31) / 32 * 32));
        const c10::cuda::CUDAGuard guard(x.device());
        comm::launch_allreduce(a, blocks, threads, c10::cuda::getCurrentCUDAStream());
    }

    int64_t buffer_bytes_;
    int elem_size_;
    int* flags_ = nullptr;
};

}  // namespace

void register_allreduce(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<AllReduceWorkspace>(m, "AllReduceWorkspace")
        .def(py::init<int, int, int64_t, int, double, bool>(), py::arg("rank"), py::arg("num_ranks"),
             py::arg("buffer_bytes"), py::arg("elem_size"), py::arg("timeout_s"), py::arg("vmm") = false)
        .def("ipc_handle", &AllReduceWorkspace::ipc_handle)
        .def("connect", &AllReduceWorkspace::connect)
        .def("export_fd", &AllReduceWorkspace::export_fd)
        .def("connect_fds", &AllReduceWorkspace::connect_fds)
        .def("destroy", &AllReduceWorkspace::destroy)
        .def("buffer_bytes", &AllReduceWorkspace::buffer_bytes)
        .def("error", &AllReduceWorkspace::error)
        .def("allreduce", &AllReduceWorkspace::allreduce, py::arg("x"), py::arg("bias"), py::arg("residual"),
             py::arg("norm_weight"), py::arg("scale"), py::arg("eps"), py::arg("norm"), py::arg("two_shot"),
             py::arg("num_blocks"), py::arg("out"), py::arg("residual_out"), py::arg("quant"))
        .def("mixed", &AllReduceWorkspace::mixed, py::arg("x"), py::arg("send_first"), py::arg("send_rows"),
             py::arg("src_block"), py::arg("out_blocks"), py::arg("num_blocks"), py::arg("out"))
        .def("mixed_two_shot", &AllReduceWorkspace::mixed_two_shot, py::arg("x"), py::arg("send_first"),
             py::arg("own_rows"), py::arg("scatter_src"), py::arg("gather_dst"), py::arg("out_first"),
             py::arg("num_blocks"), py::arg("out"));
}

}  // namespace moe_a2a
