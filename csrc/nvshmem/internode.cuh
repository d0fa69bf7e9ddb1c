// Internode stage of moe_a2a (module moe_a2a._nvshmem): NVSHMEM set-up and the RDMA kernels that move
// rows between the ranks of one "team" (the ranks with the same local index, one per node). Plain C++
// types only: internode.cu includes NVSHMEM but not torch; bindings.cpp turns tensors into these structs.
//
// Symmetric allocation of every team member (same layout everywhere):
//   [0, kHeaderBytes)   signals and the notify area (see the offsets below)
//   then                send slots [num_nodes][window] and receive slots [num_nodes][window], `stride` bytes each;
//                       the window (rows per node and round) is chosen per call from the slot bytes and stride.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <cuda_runtime.h>

namespace moe_a2a::internode {

constexpr int kMaxNodes = 32;        // team size (nodes) the kernels support
constexpr int kMaxLocalRanks = 8;    // ranks per node (one NVLink domain)
constexpr int kMaxTopk = 32;
constexpr int kThreads = 512;

// What the team members' calls must agree on, as for the intranode kernels (kSignatureInts of
// kernels/api.cuh): the operation (1 dispatch, 2 combine), bytes per row, scales per row, top-k width and
// number of experts (0 where the operation has none). It travels with the notify records and with every
// round barrier's arrival, in a slot of kSignatureSlotInts ints.
constexpr int kSignatureInts = 5;
constexpr int kSignatureSlotInts = 8;

// Byte offsets in the symmetric header.
constexpr size_t kOffArrive = 0;                              // [kMaxNodes] u64: round barriers entered by each peer
constexpr size_t kOffData = kOffArrive + 8 * kMaxNodes;       // [kMaxNodes] u64: blocks of each peer done putting
constexpr size_t kOffNotifySig = kOffData + 8 * kMaxNodes;    // [kMaxNodes] u64: notify records received per peer
constexpr size_t kOffClaim = kOffNotifySig + 8 * kMaxNodes;  // int: set by the first error (local only)
// One notify area: [num_nodes] rows of kNotifyInts / num_nodes int32, a row being a signature slot then the
// record. Rows have a fixed place whatever the record's length, so a peer whose record is longer or shorter
// (another number of experts) still lands its signature where this rank compares it.
constexpr int kNotifyInts = 16384;
constexpr size_t kOffNotifySend = 1024;
constexpr size_t kOffNotifyRecv = kOffNotifySend + 4 * kNotifyInts;   // two areas, alternating per notify
// Round barriers: this PE's signature (the source of its puts), and the one each team member sent with its
// last arrival ([kMaxNodes] slots).
constexpr size_t kOffSignatureSend = kOffNotifyRecv + 2 * 4 * kNotifyInts;
constexpr size_t kOffSignatureRecv = kOffSignatureSend + 4 * kSignatureSlotInts;
constexpr size_t kHeaderBytes = size_t(1) << 18;
static_assert(kOffSignatureRecv + 4 * kSignatureSlotInts * kMaxNodes <= kHeaderBytes, "header overflow");

enum ErrorCode : int { kErrNone = 0, kErrTimeout = 1, kErrMismatch = 2 };
enum Phase : int { kPhaseNotify = 1, kPhaseDispatchBarrier = 2, kPhaseDispatchData = 3, kPhaseCombineBarrier = 4,
                   kPhaseCombineData = 5 };

// Pinned, device-mapped host memory: the first error a kernel hits (later kernels exit at once).
struct ErrorRecord {
    volatile int code;
    volatile int phase;
    volatile int peer;      // team index (node) waited for, or whose signature differs
    volatile int round;
    volatile unsigned long long expected;   // mismatch: this rank's value of the field
    volatile unsigned long long seen;       // mismatch: the peer's value
    volatile int field;     // mismatch: the signature field that differs
};

struct Common {
    char* sym;                      // this PE's symmetric allocation (symmetric address: valid for every PE)
    int me, num_nodes;              // team index (= node) and team size
    int pe_offset, pe_stride;       // PE of team member m: pe_offset + m * pe_stride (NVSHMEM over the team: 0, 1;
                                    // over the whole group: local rank, ranks per node)
    int window, stride;             // rows per node per round, bytes per slot
    int lo, round;                  // first position of this round, round number (for errors)
    unsigned long long arrive_expect, data_expect;
    ErrorRecord* err;               // device pointer of the mapped host record
    unsigned long long timeout_ns;
    int signature[kSignatureInts];  // this rank's call (sent with the round barrier's arrival)
};

// Slot layout of a dispatched row: data, FP8 scales, top-k ids (int64) and weights, source token, node mask.
struct DispatchLayout {
    int row_bytes, num_scales, num_topk, num_local_ranks;
    int off_scales, off_idx, off_weights, off_src, off_mask, stride;
};
DispatchLayout dispatch_layout(int row_bytes, int num_scales, int num_topk, int num_local_ranks);

struct DispatchArgs {
    Common c;
    DispatchLayout l;
    int num_ranks;                  // group size (columns of is_token_in_rank)
    int local_rank;                 // this rank's index in its node (same for the whole team)
    int num_tokens;
    const char* x;                  // [T, row_bytes]
    const float* scales;            // [T, num_scales] or null
    const int64_t* topk_idx;        // [T, K] or null (cached dispatch)
    const float* topk_weights;      // [T, K] or null
    const bool* is_token_in_rank;   // [T, num_ranks]
    const int* send_pos;            // [T, num_nodes]: position among the tokens sent to each node, -1 if not sent
    int recv_count[kMaxNodes];      // rows this rank receives from each node in total
    int out_prefix[kMaxNodes];      // first output row of each source node
    int64_t node_expert_first, num_node_experts;   // experts of this node: [first, first + num)
    char* out_x;                    // [M, row_bytes]
    float* out_scales;              // [M, num_scales] or null
    int64_t* out_topk_idx;          // [M, K] node-local expert ids (-1 elsewhere) or null
    float* out_topk_weights;        // [M, K] or null
    int* out_origin;                // [M, 4]: source rank, source token, source node, 0; or null (cached)
    bool* out_in_rank;              // [M, num_local_ranks] or null (cached)
};

struct CombineArgs {
    Common c;
    int hidden, num_topk, off_weights;
    int num_recv_rows;              // M: rows this rank forwarded in dispatch
    const uint16_t* x;              // [M, hidden] bf16 node-level partial sums
    const float* weights;           // [M, K] or null
    const int* origin;              // [M, 4] from dispatch
    int num_tokens;                 // T: this rank's tokens
    const int* send_pos;            // [T, num_nodes]
    const uint16_t* bias0;          // [T, hidden] or null
    const uint16_t* bias1;
    uint16_t* out;                  // [T, hidden] bf16
    float* out_weights;             // [T, K] or null
    int format;                     // partial rows travel as kLLFormatBF16Combine or kLLFormatFP8Combine
                                    // (kernels/wire_format.cuh: encoded in front of their slot)
};

struct NotifyArgs {
    char* sym;
    int me, num_nodes, record_ints, parity;
    int pe_offset, pe_stride;       // as in Common
    unsigned long long expect;
    const int* records;             // [num_nodes, record_ints]: row b goes to node b
    int* out;                       // [num_nodes, record_ints]: row m came from node m
    ErrorRecord* err;
    unsigned long long timeout_ns;
    int signature[kSignatureInts];  // this rank's call (sent in front of every record)
};

// Int32 per row of a notify area with `num_nodes` rows, and the most record ints a row holds.
constexpr int notify_row_ints(int num_nodes) { return kNotifyInts / num_nodes; }
constexpr int notify_max_record_ints(int num_nodes) { return notify_row_ints(num_nodes) - kSignatureSlotInts; }

// Host side. None of these throws: failures come back as a non-empty message.
std::string get_unique_id(std::string* id);
std::string init(const std::string& id, int rank, int num_ranks);
bool is_initialized();
int my_pe();
int num_pes();
std::string sym_malloc(size_t bytes, void** ptr);
void sym_free(void* ptr);
void barrier_all();

std::string launch_notify(const NotifyArgs& args, cudaStream_t stream);
std::string launch_dispatch_round(const DispatchArgs& args, int num_blocks, cudaStream_t stream);
std::string launch_combine_round(const CombineArgs& args, int num_blocks, cudaStream_t stream);

}  // namespace moe_a2a::internode
