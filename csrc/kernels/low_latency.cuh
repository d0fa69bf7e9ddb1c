// Low-latency dispatch/combine launchers (plain C++ types; csrc/low_latency.cpp turns tensors into these).
//
// Every rank owns one IPC-shared allocation, the same layout on every rank:
//
//   [signals: kLLSignalBytes]  [set 0: send area | recv area]  [set 1: send area | recv area]
//
// Signals of set b: dispatch flags [kLLMaxExperts] ints at b * kLLSetSignalInts, indexed
// (local expert * num_ranks + source rank), and combine flags [kLLMaxExperts] ints after them, indexed by
// global expert. A flag is 0 while empty; writers store with release, the one reader that consumes it
// waits with acquire and stores 0 again, so a set is clean for its next use two calls later.
//
// Send area (local only): the zero-copy combine input [L, R * M, hidden] bf16.
// Recv area (written by peers): dispatch messages [L][R][M] of msg_bytes (16-byte header holding the
// source token index, then the token, then FP8 scales), or combine rows [E][M][hidden] bf16.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#if defined(__CUDACC__)
#define MOE_A2A_LL_HD __host__ __device__
#else
#define MOE_A2A_LL_HD
#endif

namespace moe_a2a {

constexpr int kLLMaxRanks = 8;
constexpr int kLLMaxExperts = 1024;
constexpr int kLLMaxTopk = 32;
constexpr int kLLThreads = 1024;
constexpr int kLLSetSignalInts = 2 * kLLMaxExperts;
constexpr int64_t kLLSignalBytes = 2LL * kLLSetSignalInts * 4;
// Local (not shared) workspace ints: per set a finished counter per expert and a done counter, then
// the abort flag and the error claim.
constexpr int kLLWorkspaceSetInts = kLLMaxExperts + 32;
constexpr int kLLWorkspaceAbort = 2 * kLLWorkspaceSetInts;
constexpr int kLLWorkspaceClaim = kLLWorkspaceAbort + 1;
constexpr int kLLWorkspaceInts = kLLWorkspaceClaim + 31;

enum LLPhase : int { kLLPhaseDispatchRecv = 1, kLLPhaseCombineRecv = 2 };

// Pinned, device-mapped host record of the first timeout.
struct LLHostError {
    volatile int code;      // 0 none, 1 peer timeout; written last
    volatile int phase;     // LLPhase
    volatile int peer;      // rank waited for
    volatile int index;     // local expert (dispatch) or global expert (combine) whose flag was missing
    volatile int set;       // buffer set
    volatile int call;      // host call number of the launch (repeats under graph replay)
};

struct LLCtx {
    char* peers[kLLMaxRanks];  // base of every rank's allocation
    int* workspace;            // this rank's local workspace (kLLWorkspaceInts)
    LLHostError* host;         // device pointer of the host record
    uint64_t timeout_ns;
    int64_t set_bytes;         // bytes of one set (send + recv area)
    int64_t recv_offset;       // offset of the recv area inside a set
    int rank, num_ranks, set, call;
};

// Bytes of a dispatch message: header, token (bf16 or FP8), FP8 scales.
MOE_A2A_LL_HD inline int64_t ll_msg_bytes(int hidden, bool fp8) {
    const int64_t payload = fp8 ? hidden + (hidden / 128) * 4 : 2LL * hidden;
    return (16 + payload + 15) / 16 * 16;
}

MOE_A2A_LL_HD inline int64_t ll_align(int64_t n) { return (n + 127) / 128 * 128; }

// Send and recv area sizes of one set for a call shape.
MOE_A2A_LL_HD inline int64_t ll_send_bytes(int64_t num_experts, int64_t max_tokens, int64_t hidden) {
    return ll_align(num_experts * max_tokens * hidden * 2);
}
MOE_A2A_LL_HD inline int64_t ll_recv_bytes(int64_t num_experts, int64_t max_tokens, int64_t hidden) {
    const int64_t dispatch = num_experts * max_tokens * ll_msg_bytes(static_cast<int>(hidden), false);
    const int64_t combine = num_experts * max_tokens * hidden * 2;
    return ll_align(dispatch > combine ? dispatch : combine);
}

struct LLDispatchArgs {
    const void* x;             // [T, hidden] bf16
    const int64_t* topk_idx;   // [T, K]
    int num_tokens, num_topk, hidden, num_experts, max_tokens;
    bool fp8, round_scale, ue8m0;
    // Receive side
    void* recv_x;              // [L, R * M, hidden] bf16 or FP8
    void* recv_scales;         // float [L, hidden / 128, R * M] or int [L, hidden / 512, R * M]
    int* recv_count;           // [L]
    int* src_info;             // [L, R * M]
    int64_t* layout_range;     // [L, R]
    int* cumulative_stats;     // [L] or null
    int64_t* wait_stats;       // [R] (this rank's row) or null
};

struct LLCombineArgs {
    const void* x;             // [L, R * M, hidden] bf16
    const int* src_info;       // [L, R * M]
    const int64_t* layout_range;  // [L, R]
    const int64_t* topk_idx;   // [T, K]
    const float* topk_weights; // [T, K]
    void* out;                 // [T, hidden] bf16
    int64_t* wait_stats;       // [R] or null
    int num_tokens, num_topk, hidden, num_experts, max_tokens;
};

void launch_ll_dispatch_send(const LLCtx& c, const LLDispatchArgs& a, int num_sms, cudaStream_t stream);
void launch_ll_dispatch_recv(const LLCtx& c, const LLDispatchArgs& a, int num_sms, cudaStream_t stream);
void launch_ll_combine_send(const LLCtx& c, const LLCombineArgs& a, int num_sms, cudaStream_t stream);
void launch_ll_combine_recv(const LLCtx& c, const LLCombineArgs& a, int num_sms, cudaStream_t stream);

}  // namespace moe_a2a
