// The mixed TP x DP one-shot across nodes over NVSHMEM (module moe_a2a._nvshmem; the fused mode of
// moe_a2a.comm.mixed when the ranks span several nodes). Plain C++ types only: mixed.cu includes NVSHMEM but
// not torch; bindings.cpp turns tensors into these structs.
//
// NVSHMEM runs over the whole group (PE = world rank). Rank s sends rows [send_first[p], send_first[p] +
// send_rows) of its input to every rank p, into slot s of p's receive area; p sums output block b over the
// sources s with src_block[s] == b, in rank order with float32 accumulation (the intranode one-shot's sums).
// Ranks of the sender's node that NVSHMEM maps get plain stores; the others get puts from a staged copy of
// the input in the sender's symmetric send area (RDMA reads only registered memory).
//
// Symmetric allocation of every rank (offsets in bytes):
//   [0, kHeaderBytes)  per set (2): kMaxPes signal ints, then kMaxPes 16-byte message headers
//   then               send area (num_ranks * slot_bytes), set 0's receive area, set 1's (num_ranks slots each)
// Call t (t = calls made + 1, counted on the device so CUDA graph replays count) uses set t & 1. A sender
// writes its header (rows, hidden, dtype, t) and rows, completes them (quiet), then sets its signal on the
// receiver to t; the receiver waits for every source's signal, then checks its header. Every rank sends to
// every rank, so a sender writes set t & 1 again (call t + 2) only after it saw the receiver's signal of call
// t + 1, which the receiver sends after it has finished reading call t.
#pragma once

#include <cstdint>
#include <string>
#include <cuda_runtime.h>

namespace moe_a2a::nvshmem_mixed {

constexpr int kMaxPes = 128;
constexpr int kThreads = 512;
constexpr int64_t kSetHeaderBytes = kMaxPes * 4 + kMaxPes * 16;
constexpr int64_t kHeaderBytes = 2 * kSetHeaderBytes;

// Local device state: calls made, blocks of the current call done sending, abort.
constexpr int kStateCalls = 0, kStateArrived = 1, kStateAbort = 2, kStateInts = 4;

enum ErrorCode : int { kErrNone = 0, kErrTimeout = 1, kErrShape = 2 };

// Pinned, device-mapped host record of the first error; `code` written last.
struct ErrorRecord {
    volatile int code;
    volatile int peer;
    volatile int call;
    volatile int mine[3];     // shape error: this rank's (rows, hidden, dtype)
    volatile int theirs[3];   // the peer's
};

struct MixedArgs {
    char* sym;                 // this PE's symmetric allocation
    int* state;                // kStateInts local ints
    ErrorRecord* host;         // device view of the pinned record
    uint64_t timeout_ns;
    int rank, num_ranks, local_size;   // rank r is on node r / local_size
    int64_t slot_bytes;        // capacity of one slot (the allocation's)
    const void* x;             // [rows, hidden]
    void* out;                 // [out_blocks * send_rows, hidden]
    int elem_size, dtype, hidden, send_rows, out_blocks;
    int send_first[kMaxPes];
    int src_block[kMaxPes];
};

// Bytes of symmetric allocation for slots of slot_bytes on num_ranks ranks.
inline int64_t mixed_alloc_bytes(int num_ranks, int64_t slot_bytes) {
    return kHeaderBytes + 3 * static_cast<int64_t>(num_ranks) * slot_bytes;
}

// An error message, empty on success.
std::string launch_mixed(const MixedArgs& a, int num_blocks, cudaStream_t stream);

}  // namespace moe_a2a::nvshmem_mixed
