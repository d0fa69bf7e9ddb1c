// The part every CUDA IPC runtime of moe_a2a._C shares (intranode, low-latency, all-reduce): one rank's
// device allocation exported to the other ranks of its group, the peers' allocations mapped here, and a
// pinned host record, mapped to the device, through which kernels report errors without a device sync.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <torch/extension.h>

#include "kernels/utils.cuh"
#include "vmm.h"

namespace moe_a2a {

// HostRecord: the error record the runtime's kernels write (plain ints). kMaxRanks: the group size limit.
// Lifecycle: construct (checks, device), allocate_shared + allocate_host_record (in the derived constructor),
// connect(handles of every rank), kernels, destroy(). A derived class frees what it allocated itself in its
// own destroy(), after begin_destroy() and before or after release_shared().
template <typename HostRecord, int kMaxRanks>
class IpcRuntime {
   public:
    // `what` names the group in errors ("intranode", "low-latency", "all-reduce"). Arguments are checked
    // before any CUDA call, so bad ones raise the same way on a machine without a GPU.
    IpcRuntime(const char* what, int rank, int num_ranks, double timeout_s) : rank_(rank), num_ranks_(num_ranks) {
        MOE_A2A_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, what, " groups have 1..", kMaxRanks, " ranks, got ",
                      num_ranks);
        MOE_A2A_CHECK(rank >= 0 && rank < num_ranks, "rank ", rank, " out of range [0, ", num_ranks, ")");
        MOE_A2A_CHECK(timeout_s > 0, "timeout_s must be positive, got ", timeout_s);
        timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
        MOE_A2A_CUDA_CHECK(cudaGetDevice(&device_));
        MOE_A2A_CUDA_CHECK(cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_));
    }

    IpcRuntime(const IpcRuntime&) = delete;
    IpcRuntime& operator=(const IpcRuntime&) = delete;

    // This rank's cudaIpcMemHandle_t as bytes, for the other ranks' connect().
    pybind11::bytes ipc_handle() const {
        MOE_A2A_CHECK(!vmm_, "this runtime shares virtual memory: use export_fd() and connect_fds()");
        return pybind11::bytes(reinterpret_cast<const char*>(&ipc_handle_), sizeof(ipc_handle_));
    }

    // Virtual memory: a new file descriptor of this rank's allocation, for the other ranks' connect_fds() (the
    // caller passes it on, e.g. over a Unix socket, then closes it).
    int export_fd() const {
        MOE_A2A_CHECK(vmm_, "this runtime shares cudaIpc handles: use ipc_handle() and connect()");
        return vmm::export_fd(local_map_);
    }

    // Virtual memory: map every peer's allocation; fds[r] is rank r's descriptor received into this process
    // (closed here; fds[rank] is ignored). Once per runtime.
    void connect_fds(const std::vector<int64_t>& fds) {
        MOE_A2A_CHECK(vmm_, "this runtime shares cudaIpc handles: use ipc_handle() and connect()");
        MOE_A2A_CHECK(!destroyed_, "the runtime was destroyed");
        MOE_A2A_CHECK(!connected_, "connect_fds() was already called");
        MOE_A2A_CHECK(static_cast<int>(fds.size()) == num_ranks_, "expected ", num_ranks_, " descriptors, got ",
                      fds.size());
        for (int r = 0; r < num_ranks_; ++r) {
            if (r == rank_) {
                peers_[r] = local_;
                continue;
            }
            peer_maps_[r] = vmm::import_fd(static_cast<int>(fds[r]), local_map_.size, device_);
            peers_[r] = reinterpret_cast<void*>(peer_maps_[r].ptr);
        }
        connected_ = true;
    }

    // Open every peer's allocation; handles[r] is rank r's ipc_handle(). Once per runtime.
    void connect(const std::vector<std::string>& handles) {
        MOE_A2A_CHECK(!destroyed_, "the runtime was destroyed");
        MOE_A2A_CHECK(!connected_, "connect() was already called");
        MOE_A2A_CHECK(static_cast<int>(handles.size()) == num_ranks_, "expected ", num_ranks_, " IPC handles, got ",
                      handles.size());
        for (int r = 0; r < num_ranks_; ++r) {
            if (r == rank_) {
                peers_[r] = local_;
                continue;
            }
            MOE_A2A_CHECK(handles[r].size() == sizeof(cudaIpcMemHandle_t), "bad IPC handle from rank ", r);
            cudaIpcMemHandle_t h;
            std::memcpy(&h, handles[r].data(), sizeof(h));
            MOE_A2A_CUDA_CHECK(cudaIpcOpenMemHandle(&peers_[r], h, cudaIpcMemLazyEnablePeerAccess));
        }
        connected_ = true;
    }

    bool is_available() const { return connected_ && !destroyed_; }
    int num_device_sms() const { return num_device_sms_; }

   protected:
    ~IpcRuntime() = default;  // the derived destructor calls its destroy()

    // Allocate `bytes` of device memory (contents left to the caller) and export it: a cudaIpc handle, or with
    // `vmm` CUDA virtual memory shared as file descriptors.
    void allocate_shared(int64_t bytes, bool vmm = false) {
        vmm_ = vmm;
        if (vmm) {
            local_map_ = vmm::create(static_cast<size_t>(bytes), device_);
            local_ = reinterpret_cast<void*>(local_map_.ptr);
            return;
        }
        MOE_A2A_CUDA_CHECK(cudaMalloc(&local_, bytes));
        MOE_A2A_CUDA_CHECK(cudaIpcGetMemHandle(&ipc_handle_, local_));
    }

    // The zeroed pinned error record and its device address.
    void allocate_host_record() {
        void* host = nullptr;
        MOE_A2A_CUDA_CHECK(cudaHostAlloc(&host, sizeof(HostRecord), cudaHostAllocMapped));
        std::memset(host, 0, sizeof(HostRecord));
        host_ = static_cast<HostRecord*>(host);
        MOE_A2A_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_dev_), host, 0));
    }

    // First step of destroy(): false if it ran already; otherwise marks the runtime destroyed and waits for
    // the device (peers may still read this allocation only through kernels that have ended by then).
    bool begin_destroy() {
        if (destroyed_) return false;
        destroyed_ = true;
        // This rank's GPU, which need not be the current device of the thread that destroys the runtime.
        int current = -1;
        cudaGetDevice(&current);
        if (current != device_) cudaSetDevice(device_);
        cudaDeviceSynchronize();
        if (current >= 0 && current != device_) cudaSetDevice(current);
        return true;
    }

    // Unmap the peers and free the shared allocation and the host record. Errors are ignored: teardown.
    void release_shared() {
        if (vmm_) {
            for (int r = 0; r < num_ranks_; ++r) vmm::release(peer_maps_[r]);
            vmm::release(local_map_);
        } else {
            if (connected_)
                for (int r = 0; r < num_ranks_; ++r)
                    if (r != rank_ && peers_[r]) cudaIpcCloseMemHandle(peers_[r]);
            if (local_) cudaFree(local_);
        }
        if (host_) cudaFreeHost(const_cast<HostRecord*>(host_));
        local_ = nullptr;
        host_ = nullptr;
        host_dev_ = nullptr;
    }

    int rank_, num_ranks_;
    uint64_t timeout_ns_ = 0;
    int device_ = 0, num_device_sms_ = 0;
    void* local_ = nullptr;
    void* peers_[kMaxRanks] = {};  // peers_[rank_] is local_
    cudaIpcMemHandle_t ipc_handle_{};
    bool vmm_ = false;                      // shared as virtual memory (file descriptors), not cudaIpc handles
    vmm::Mapping local_map_;                // with vmm_: this rank's allocation
    vmm::Mapping peer_maps_[kMaxRanks];     // with vmm_: the peers' allocations mapped here
    volatile HostRecord* host_ = nullptr;
    HostRecord* host_dev_ = nullptr;
    bool connected_ = false, destroyed_ = false;
};

}  // namespace moe_a2a
