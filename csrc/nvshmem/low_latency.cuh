// Low-latency dispatch/combine across nodes over NVSHMEM (module moe_a2a._nvshmem). Plain C++ types only:
// low_latency.cu includes NVSHMEM but not torch; bindings.cpp turns tensors into these structs.
//
// NVSHMEM runs over the whole group (PE = group rank). Senders push: every (token, expert) message is
// put straight into the receive area of the rank that holds the expert (over RDMA, or with plain stores
// to peers that NVSHMEM maps, i.e. NVLink inside a node), then the sender signals after the data.
//
// Every rank's symmetric allocation has the layout of the intranode low-latency buffer
// (kernels/low_latency.cuh), so the same num_rdma_bytes (config.get_low_latency_rdma_size_hint) serves:
//
//   [signals: kLLSignalBytes]  [set 0: send area | recv area]  [set 1: send area | recv area]
//
// Signals of set b (kLLSetSignalInts ints at b * kLLSetSignalInts), all written by peers:
//   [kSigDispatch + l * R + s]  dispatch count of source s for local expert l: (tag << 16) | count
//   [kSigCombine + s]           combine flag of source s: the tag of its last combine send
// Tags count the calls of a kind on a set since the last clean (device-side epochs, so graph replays
// count); nothing is reset between calls.
// Signatures of set b (after both sets' signals, as in kernels/low_latency.cuh): [s] what source s's last
// call on this set was (ll_signature), put by s before the quiet that precedes its counts or flag.
// Send area: dispatch stages each token once there ([M] messages); combine reads its rows from there
//   ([L, R * M, hidden] bf16, the zero-copy buffer; other inputs are copied there for RDMA puts).
// Recv area: dispatch messages [L][R][M] (16-byte header with the source token, then the BF16 token or
//   the FP8 token and its float scales); combine rows [E][M][hidden] bf16 (global expert, source token).
#pragma once

#include <cstdint>
#include <string>
#include <cuda_runtime.h>

#include "../kernels/low_latency.cuh"

namespace moe_a2a::nvshmem_ll {

using moe_a2a::LLCombineArgs;
using moe_a2a::LLDispatchArgs;
using moe_a2a::LLHostError;

constexpr int kMaxRanks = kLLMaxExperts;      // every rank holds at least one expert
constexpr int kMaxTokens = 65535;             // a count shares its signal with a 16-bit tag
constexpr int kSigDispatch = 0;               // [E] (local expert, source) counts
constexpr int kSigCombine = kLLMaxExperts;    // [R] combine flags

struct Ctx {
    char* sym;                 // this PE's symmetric allocation (a symmetric address: valid for every PE)
    int* workspace;            // this rank's local workspace (kLLWorkspaceInts, same layout as intranode)
    LLHostError* host;         // device pointer of the pinned host error record
    uint64_t timeout_ns;
    int64_t set_bytes;         // bytes of one set (send + recv area)
    int64_t recv_offset;       // offset of the recv area inside a set
    int rank, num_ranks, set, call;
    int use_nvlink;            // store directly to peers NVSHMEM maps (nvshmem_ptr), else always put
    int* mask;                 // [num_ranks] local, 1 = masked rank: neither waited for nor sent to
    int shrink;                // a peer that times out is masked instead of failing the call
    LLHostError* probe;        // the host record whose block_step the blocks write, or nullptr (probe off)
};

struct CombineArgs {
    LLCombineArgs a;           // x, layout_range, topk_idx, topk_weights, out, wait_stats, shape
    const int* src_info;       // [L, R * M] source token of each slot (send phase)
};

// phases: kLLSend, kLLRecv or both. Return an error message, empty on success.
std::string launch_dispatch(const Ctx& c, const LLDispatchArgs& a, int phases, int num_sms, cudaStream_t stream);
std::string launch_combine(const Ctx& c, const CombineArgs& a, int phases, int num_sms, cudaStream_t stream);

}  // namespace moe_a2a::nvshmem_ll
