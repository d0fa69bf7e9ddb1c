// CUDA IPC peer mappings shared by the intranode and low-latency runtimes.
#pragma once

#include <cstring>
#include <string>
#include <vector>

#include <torch/extension.h>

#include "kernels/utils.cuh"

namespace moe_a2a {

// Map every rank's exported allocation: peers[r] is `local` for this rank, rank r's buffer opened over
// CUDA IPC otherwise; handles[r] is rank r's cudaIpcMemHandle_t as bytes.
template <typename T>
void open_ipc_peers(const std::vector<std::string>& handles, int rank, int num_ranks, void* local, T** peers) {
    MOE_A2A_CHECK(static_cast<int>(handles.size()) == num_ranks, "expected ", num_ranks, " IPC handles, got ",
                handles.size());
    for (int r = 0; r < num_ranks; ++r) {
        if (r == rank) {
            peers[r] = static_cast<T*>(local);
            continue;
        }
        MOE_A2A_CHECK(handles[r].size() == sizeof(cudaIpcMemHandle_t), "bad IPC handle from rank ", r);
        cudaIpcMemHandle_t h;
        std::memcpy(&h, handles[r].data(), sizeof(h));
        void* p = nullptr;
        MOE_A2A_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
        peers[r] = static_cast<T*>(p);
    }
}

// Unmap what open_ipc_peers opened; errors are ignored because this runs on teardown.
template <typename T>
void close_ipc_peers(int rank, int num_ranks, T** peers) {
    for (int r = 0; r < num_ranks; ++r)
        if (r != rank && peers[r]) cudaIpcCloseMemHandle(peers[r]);
}

}  // namespace moe_a2a
