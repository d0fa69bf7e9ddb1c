// Low-latency dispatch/combine launchers (plain C++ types; csrc/low_latency.cpp turns tensors into these).
//
// Every rank owns one IPC-shared allocation, the same layout on every rank:
//
//   [signals: kLLSignalBytes]  [set 0: send area | stage area]  [set 1: send area | stage area]
//
// Receivers pull: each rank stages what it sends in its own allocation once, and every rank that needs a
// piece copies it straight into its output (dispatch) or reduces it into its output (combine).
//
// Signals of set b (kLLSetSignalInts ints at b * kLLSetSignalInts), all written by peers:
//   [kLLSigDispatch + s]  dispatch flag of source rank s: its tokens and lists of this set are staged
//   [kLLSigCombine + r]   combine flag of rank r: its expert outputs of this set are ready
//   [kLLSigPing]          flag round-trip probe (set 0 only)
//   [kLLSigBegins + l * R + s]  written by this rank's combine: first slot of source s in local expert l
// Signatures of set b (kLLSetSignatureInts ints at kLLSignatureBase + b * kLLSetSignatureInts, after both
// sets' signals), written by peers:
//   [s * kLLSignatureInts]  what source s's last call on this set was (ll_signature), written by s in its
//                           send phase before the dispatch or combine flag that releases it; the receiver
//                           compares it with its own call before it reads any count
// A flag holds the tag of the last call that released it: the number of calls of its kind on that set
// since the last clean, which every rank counts alike (local workspace epochs, so graph replays count).
// A waiter waits for its own epoch; nothing is reset, so many blocks may wait on one flag.
//
// Send area (local, read by peers): the combine input [L, R * M, hidden] bf16 (zero copy when the caller
// filled it; else combine copies the valid rows there first). An FP8 or LogFMT combine encodes each valid
// row into the first bytes of its slot (wire_format.cuh), in place for a zero-copy input.
// Stage area (local, read by peers): dispatch tokens [M][stage row] (BF16, or FP8 then float scales),
// then per global expert e the list [E][M + 1] ints: count, then the source token of each pair routed
// to e in (token, top-k slot) order, which is also the order of that source's slots in the expert.
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
constexpr int kLLSigDispatch = 0;
constexpr int kLLSigCombine = kLLMaxRanks;
constexpr int kLLSigPing = 2 * kLLMaxRanks;
constexpr int kLLSigBegins = kLLMaxExperts;
// Signatures: one int4 per source rank and set. Sized for the NVSHMEM kernels' groups (every rank holds an
// expert, so at most kLLMaxExperts ranks), which use every flag int of a set already.
constexpr int kLLSignatureInts = 4;
constexpr int kLLSetSignatureInts = kLLMaxExperts * kLLSignatureInts;
constexpr int kLLSignatureBase = 2 * kLLSetSignalInts;
constexpr int64_t kLLSignalBytes = (2LL * kLLSetSignalInts + 2LL * kLLSetSignatureInts) * 4;
// What ranks of one call must agree on, one int each (ll_signature): the hidden size, the tokens per rank
// (num_max_dispatch_tokens_per_rank), the number of experts and the wire format below, which also names
// the operation. The top-k width is not part of it: the messages carry token indices, not top-k slots.
// Combine formats: wire_format.cuh.
enum LLFormat : int { kLLFormatBF16Dispatch = 1, kLLFormatFP8Dispatch = 2, kLLFormatFP8RoundDispatch = 3,
                      kLLFormatBF16Combine = 4, kLLFormatFP8Combine = 5, kLLFormatLogFMTCombine = 6 };
// Local (not shared) workspace ints: per set the dispatch and combine epochs and the arrival counters of
// their send phases, then the abort flag, the error claim and the ping epoch.
constexpr int kLLWsDispatchEpoch = 0;
constexpr int kLLWsCombineEpoch = 1;
constexpr int kLLWsDispatchArrive = 2;
constexpr int kLLWsCombineArrive = 3;
constexpr int kLLWorkspaceSetInts = 8;
constexpr int kLLWorkspaceAbort = 2 * kLLWorkspaceSetInts;
constexpr int kLLWorkspaceClaim = kLLWorkspaceAbort + 1;
constexpr int kLLWorkspacePing = kLLWorkspaceAbort + 2;
// [kLLMaxRanks] 1 = masked rank: this rank neither waits for it nor releases flags to it (IPC kernels; set by
// the host, or by a kernel with LLCtx::shrink when the rank timed out). clean() keeps it.
constexpr int kLLWorkspaceMask = kLLWorkspaceAbort + 4;
constexpr int kLLWorkspaceInts = kLLWorkspaceAbort + 16;
static_assert(kLLWorkspaceMask + kLLMaxRanks <= kLLWorkspaceInts, "the rank mask must fit the workspace");

// Phases of a launch: send (stage and release), receive (wait and pull), or both in one kernel.
constexpr int kLLSend = 1;
constexpr int kLLRecv = 2;

enum LLPhase : int { kLLPhaseDispatchRecv = 1, kLLPhaseCombineRecv = 2, kLLPhasePing = 3 };

enum LLErrorCode : int { kLLErrNone = 0, kLLErrTimeout = 1, kLLErrMismatch = 2 };

// A debug probe of the NVSHMEM low-latency kernels: the last step each block of the latest launch reached,
// written to pinned host memory, so the host reads it while a kernel hangs.
constexpr int kLLProbeBlocks = 256;
enum LLStep : int { kLLStepStart = 1, kLLStepSent = 2, kLLStepArrived = 3, kLLStepWaited = 4, kLLStepDone = 5 };

// Pinned, device-mapped host record of the first error.
struct LLHostError {
    volatile int code;      // LLErrorCode; written last
    volatile int phase;     // LLPhase
    volatile int peer;      // rank waited for, or whose signature differs
    volatile int index;     // timeout: flag tag waited for; mismatch: the signature field that differs
    volatile int set;       // buffer set
    volatile int call;      // host call number of the launch (repeats under graph replay)
    volatile int mine;      // mismatch: this rank's value of the field
    volatile int theirs;    // mismatch: the peer's value
    volatile int block_step[kLLProbeBlocks];  // probe on: (call << 4) | LLStep of each block's last step
};

struct LLCtx {
    char* peers[kLLMaxRanks];  // base of every rank's allocation
    int* workspace;            // this rank's local workspace (kLLWorkspaceInts)
    LLHostError* host;         // device pointer of the host record
    uint64_t timeout_ns;
    int64_t set_bytes;         // bytes of one set (send + stage area)
    int64_t stage_offset;      // offset of the stage area inside a set
    // Optional phase clock of the call (benchmark): [4] uint64 ns: the earliest block's start (the caller sets
    // it to all ones), the send phase's last arrival, block 0 past its waits, the latest block's end (zero).
    unsigned long long* clock;
    int rank, num_ranks, set, call;
    int shrink;                // a peer that times out is masked (kLLWorkspaceMask) instead of failing the call
};

// Bytes of the old message format (16-byte header, token, FP8 scales): sizes the stage area, which keeps
// the buffer size of earlier releases (config.get_low_latency_rdma_size_hint).
MOE_A2A_LL_HD inline int64_t ll_msg_bytes(int hidden, bool fp8) {
    const int64_t payload = fp8 ? hidden + (hidden / 128) * 4 : 2LL * hidden;
    return (16 + payload + 15) / 16 * 16;
}

// Bytes of one staged token: BF16, or FP8 followed by its float scales, padded to 16.
MOE_A2A_LL_HD inline int64_t ll_stage_row_bytes(int hidden, bool fp8) {
    return fp8 ? (hidden + (hidden / 128) * 4 + 15) / 16 * 16 : 2LL * hidden;
}

// Offset of the expert lists inside the stage area (after M BF16-sized token rows).
MOE_A2A_LL_HD inline int64_t ll_lists_offset(int64_t max_tokens, int64_t hidden) { return max_tokens * hidden * 2; }

MOE_A2A_LL_HD inline int64_t ll_align(int64_t n) { return (n + 127) / 128 * 128; }

// Send and stage area sizes of one set for a call shape. The stage area needs
// M * 2 * hidden + E * (M + 1) * 4 bytes, which the old receive-area size always covers.
MOE_A2A_LL_HD inline int64_t ll_send_bytes(int64_t num_experts, int64_t max_tokens, int64_t hidden) {
    return ll_align(num_experts * max_tokens * hidden * 2);
}
MOE_A2A_LL_HD inline int64_t ll_recv_bytes(int64_t num_experts, int64_t max_tokens, int64_t hidden) {
    const int64_t dispatch = num_experts * max_tokens * ll_msg_bytes(static_cast<int>(hidden), false);
    const int64_t combine = num_experts * max_tokens * hidden * 2;
    const int64_t stage = ll_lists_offset(max_tokens, hidden) + num_experts * (max_tokens + 1) * 4;
    const int64_t most = dispatch > combine ? dispatch : combine;
    return ll_align(most > stage ? most : stage);
}

struct LLDispatchArgs {
    const void* x;             // [T, hidden] bf16 (send phase)
    const int64_t* topk_idx;   // [T, K] (send phase)
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
    const void* x;             // [L, R * M, hidden] bf16 (send phase)
    bool copy_rows;            // x is not this set's send area: copy the valid rows there first
    const int64_t* layout_range;  // [L, R] (send phase)
    const int64_t* topk_idx;   // [T, K] (receive phase)
    const float* topk_weights; // [T, K]
    void* out;                 // [T, hidden] bf16
    int64_t* wait_stats;       // [R] or null
    int num_tokens, num_topk, hidden, num_experts, max_tokens;
    int format;                // how rows travel: kLLFormatBF16Combine, kLLFormatFP8Combine or kLLFormatLogFMTCombine
};

// `phases`: kLLSend, kLLRecv or both (one kernel: its blocks wait for the other ranks in between).
void launch_ll_dispatch(const LLCtx& c, const LLDispatchArgs& a, int phases, int num_sms, cudaStream_t stream);
void launch_ll_combine(const LLCtx& c, const LLCombineArgs& a, int phases, int num_sms, cudaStream_t stream);
// Probes for the benchmark: an empty kernel of the dispatch shape, and `iters` flag round trips with
// `peer` (both ranks call it; out_ns[0] = ns over the rounds after `warmup`, out_ns[1] = those rounds).
void launch_ll_empty(int num_sms, cudaStream_t stream);
void launch_ll_ping(const LLCtx& c, int peer, int iters, int warmup, int64_t* out_ns, cudaStream_t stream);

}  // namespace moe_a2a
