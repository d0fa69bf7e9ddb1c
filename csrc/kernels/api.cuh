// Kernel launchers of moe_a2a._C. Plain C++ types only: the .cu files do not include torch headers,
// which keeps them fast to compile; csrc/bindings.cpp turns tensors into these arguments.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moe_a2a {

// ---------------------------------------------------------------- layout
// topk_idx [T, K] int64 (-1 = none). Outputs must be zeroed by the caller except is_token_in_rank,
// which the kernel writes completely. num_tokens_per_node may be null (intranode groups).
void launch_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                            int num_ranks_per_node, int* num_tokens_per_rank, int* num_tokens_per_node,
                            int* num_tokens_per_expert, bool* is_token_in_rank, cudaStream_t stream);

}  // namespace moe_a2a

namespace moe_a2a {

// ---------------------------------------------------------------- intranode
constexpr int kMaxRanks = 8;          // NVLink peers of one intranode group
constexpr int kMaxChannels = 64;      // channels of channel_prefix_matrix (num_sms / 2)
constexpr int kMaxExperts = 4096;     // experts whose counts the notify step exchanges
constexpr int kMaxLocalExperts = 1024;
constexpr int kDispatchThreads = 512;   // threads of a dispatch block (one block per SM, 128 registers each)
constexpr int kMaxCombineWindows = 32; // token windows of a pipelined combine (CombineArgs::num_windows)
constexpr int kMinWindowTokens = 128;  // fewer tokens per window cost more in waits than they overlap
constexpr int kMinWindowSms = 16;      // fewer SMs stage slower than the copy engine: no pipeline then
constexpr int kCombineThreads = 512;    // combine keeps a register per rank and lane: fewer, fatter threads
// Dispatch's bulk pull: rows move global -> shared -> global by bulk copies (TMA), never through
// registers, so a block keeps about as many bytes in flight as kBulkSmemBytes.
constexpr int kBulkSmemBytes = 192 * 1024;
constexpr int kDispatchBulkSlots = 4;     // per warp: ring of row pieces (loads in flight, then stored)

// Int offsets of the header at the start of every rank's NVL allocation (same layout on every rank).
// Peers write only kSignal and kPeerDone; everything else is written by the owner and read by peers after
// a barrier.
namespace hdr {
constexpr int kSignal = 0;            // [kMaxRanks] barrier epoch last signalled by each peer
constexpr int kEpoch = 8;             // barriers this rank has entered
constexpr int kGridArrive = 9;        // blocks arrived at the current grid barrier
constexpr int kGridGen = 10;          // grid barrier generation
constexpr int kAborted = 11;          // set on the first error: later kernels exit at once
constexpr int kErrorClaim = 12;       // first error wins this flag and writes the host record
constexpr int kNumTokens = 13;        // tokens of the current operation (dispatch: sent, combine: combined)
constexpr int kStagedRows = 14;       // combine: received rows staged in arrival order (copy engine), or -1
constexpr int kDoneArrive = 15;       // blocks that finished the current dispatch/combine kernel
constexpr int kSendCounts = 16;       // [kMaxRanks] tokens sent to each rank
constexpr int kChannelPrefix = 32;    // [kMaxRanks][kMaxChannels] this rank's channel_prefix_matrix
constexpr int kPeerDone = 600;        // [kMaxRanks] each peer's kEpoch when it last finished a dispatch/combine
constexpr int kSignature = 700;       // [kSignatureInts] what every rank's current operation must agree on
constexpr int kWindowArrive = 720;    // [kMaxCombineWindows] blocks that staged their share of each window
constexpr int kWindowReady = 760;     // [kMaxCombineWindows] epoch of the operation whose window is staged
constexpr int kExpertCounts = 1024;   // [kMaxExperts] this rank's num_tokens_per_expert
constexpr int kInts = 8192;           // header size in ints (32 KiB); the staging area follows
}  // namespace hdr
constexpr int64_t kHeaderBytes = hdr::kInts * 4;

enum ErrorCode : int { kErrNone = 0, kErrPeerTimeout = 1, kErrGridTimeout = 2, kErrRecvOverflow = 3, kErrBadHandle = 4,
                        kErrCopyTimeout = 5, kErrMismatch = 6 };

// What the ranks of one operation must agree on, published by each rank with its first barrier and compared
// after it: the operation (1 dispatch, 2 combine), bytes per row (hidden size and dtype: BF16 or FP8), scales
// per row (FP8 or not), top-k width, number of experts (0 where the operation has none), windows of a
// combine's pipeline (0 for every other operation).
constexpr int kSignatureInts = 6;
enum Phase : int { kPhaseNotify = 1, kPhaseDispatchStart = 2, kPhaseDispatchStaged = 3, kPhaseCombineStart = 4,
                   kPhaseCombineStaged = 5, kPhaseCombineInput = 6 };

// Pinned, device-mapped host memory: what the host reads without a device synchronisation.
struct HostInfo {
    volatile int notify_seq;       // set to the launch's sequence number once the fields below are written
    volatile int num_recv_tokens;
    volatile int max_recv_tokens;  // the most rows any rank receives in this dispatch (fits a receive area?)
    volatile int error_code;       // ErrorCode; written last, after the other error fields
    volatile int error_peer;       // rank waited for (or -1)
    volatile int error_phase;      // Phase
    volatile int error_expected;   // counter value waited for (or rows allocated, for an overflow)
    volatile int error_seen;       // counter value seen (or rows received)
    volatile int error_round;
    volatile int recv_tokens_per_expert[kMaxLocalExperts];
};

// What every intranode kernel needs to reach its peers; passed by value.
struct PeerCtx {
    int* peers[kMaxRanks];         // base of each rank's allocation (header first, then staging)
    HostInfo* host;                // device pointer of this rank's HostInfo
    uint64_t timeout_ns;
    int rank;
    int num_ranks;
    int signature[kSignatureInts];  // this rank's, see kSignatureInts
};

// One block: publish this rank's token count (and, for combine, its staged rows), then meet every peer.
// Runs before the host stages rows with the copy engine: no peer still reads the buffer afterwards.
void launch_prologue(const PeerCtx& ctx, int num_tokens, int staged_rows, int phase, cudaStream_t stream);

// One thread, on the stream of a producer about to write this rank's staging area between operations (the
// zero-copy combine input): wait until every peer finished the operations this rank finished, so none
// still reads rows of an earlier operation from here.
void launch_wait_peers_done(const PeerCtx& ctx, cudaStream_t stream);

void launch_notify(const PeerCtx& ctx, const int* num_tokens_per_expert, int num_experts, const bool* is_token_in_rank,
                   int num_tokens, int num_channels, int expert_alignment, int num_worst_tokens, int seq,
                   int* send_head, int* channel_prefix, int* rank_prefix, int* recv_channel_prefix,
                   cudaStream_t stream);

struct DispatchArgs {
    const void* x; int hidden_int4;                 // [T, hidden] rows of hidden_int4 * 16 bytes
    const float* x_scales; int num_scales;          // [T, num_scales] or null
    const int64_t* topk_idx; const float* topk_weights; int num_topk;  // [T, K] or null
    const int* send_head; const int* rank_prefix; int num_tokens;
    void* recv_x; float* recv_x_scales; int64_t* recv_topk_idx; float* recv_topk_weights;
    int* recv_src_idx;                              // null in cached mode
    int num_alloc_rows;                             // rows of the outputs (received, or num_worst_tokens)
    int num_experts_per_rank;
    int capacity;                                   // tokens staged per round
    int data_staged;                                // x already copied to the buffer (one round, copy engine)
    int bulk;                                       // pull rows with bulk copies through shared memory
    // Rows written by their senders (recv_x is the receive area at the start of every rank's staging area):
    // the per-token fields are staged at byte `small_base` of the staging area (layout without data rows),
    // and the receive area holds `recv_rows` rows. 0: the receivers pull the rows.
    int recv_x_in_buffer; int64_t small_base; int recv_rows;
};

void launch_dispatch(const PeerCtx& ctx, const DispatchArgs& a, int num_blocks, cudaStream_t stream);
int64_t dispatch_staging_bytes(int capacity, int hidden_int4, int num_ranks, int num_scales, int num_topk);
// Where the per-token fields go when senders write the rows (`recv_x_in_buffer`): the end of a staging area of
// `staging_bytes`, aligned down to 128 bytes; the receive rows fill the area before it.
int64_t dispatch_in_buffer_fields_base(int64_t staging_bytes, int capacity, int num_ranks, int num_scales, int num_topk);

struct CombineArgs {
    const void* x; int hidden_int4;                 // [N, hidden] bf16
    const float* topk_weights; int num_topk;        // [N, K] or null
    const int* recv_src_idx; const int* rank_prefix;
    const bool* is_token_in_rank; int num_tokens;   // [T, R]
    const int* send_head;                           // [T, R]: row of token t among those sent to r
    int staged_rows;                                // >= 0: x's first rows staged in arrival order
    int stage_in_kernel;                            // with staged_rows >= 0: this kernel stages them (and the
                                                    // weights), else the copy engine did before it
    const void* bias_0; const void* bias_1;         // [T, hidden] bf16 or null
    void* out; float* out_weights;                  // [T, hidden], [T, K]
    int capacity;                                   // tokens per source rank staged per round
    int format;                                     // rows as kLLFormatBF16Combine or kLLFormatFP8Combine
                                                    // (encoded by launch_encode_rows; wire_format.cuh)
    int num_windows;                                // > 0: when every token fits one round, stage and pull
                                                    // in this many token windows, a flag per window instead
                                                    // of a barrier (same on every rank: in the signature)
};

void launch_combine(const PeerCtx& ctx, const CombineArgs& a, int num_blocks, cudaStream_t stream);
// Encodes `rows` BF16 rows of `hidden` channels from src into the first bytes of the same rows of dst
// (2 * hidden bytes apart; dst may be src) in combine format `format` (wire_format.cuh). One warp a row.
void launch_encode_rows(const void* src, void* dst, int rows, int hidden, int format, cudaStream_t stream);
int64_t combine_staging_bytes(int capacity, int hidden_int4, int num_ranks, int num_topk);

// The benchmark's SM copy probe (never used by the buffer's operations): `num_blocks` blocks move `n` 16-byte
// words between this rank's `local` words and the staging areas, through the mappings the kernels use.
// Multicast / reduce take `fanout` ranks per row.
enum CopyProbe : int {
    kProbeWrite = 0, kProbeRead = 1, kProbeScatter = 2, kProbeGather = 3, kProbeMulticast = 4, kProbeReduce = 5
};
void launch_copy_probe(const PeerCtx& ctx, void* local, int64_t n, int peer, int pattern, int row_int4, int fanout,
                       int num_blocks, cudaStream_t stream);

}  // namespace moe_a2a
