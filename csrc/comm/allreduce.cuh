// Lamport all-reduce with fused residual add, RMSNorm and FP8 quantization (one-shot and two-shot), over
// CUDA IPC. Shared by the kernels (lamport.cu) and the runtime (allreduce.cpp); no torch here.
//
// Protocol (see moe_a2a/comm/workspace.py for the buffer layout): every rank's workspace holds three
// Lamport buffers pre-filled with -0.0 of the element type (the sentinel). Senders store their data into
// the receivers' buffers with every -0.0 replaced by +0.0; a receiver spins on each 16-byte piece until none
// of its elements is the sentinel. Call k uses buffer k % 3 and clears what call k-1 used of buffer
// (k-1) % 3. The buffer index, the size to clear and an abort flag live in device memory (`flags`), so no
// launch reads anything back on the host. Every spin has a deadline on the global timer; the first wait that
// passes it (or a peer whose message has another shape) records an error in pinned host memory, sets the
// abort flag so every other wait ends at once, and the host raises at its next check.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace moe_a2a::comm {

constexpr int kArMaxRanks = 8;
constexpr int kArNumBuffers = 3;
constexpr int kArMaxThreads = 512;
// flags[]: buffer index of the next call, 16-byte pieces the last call used, blocks done, abort, calls made.
constexpr int kFlagBuffer = 0, kFlagUsed = 1, kFlagDone = 2, kFlagAbort = 3, kFlagCalls = 4, kNumFlags = 8;

// kArErrResidual: the fused two-shot found a row whose residual differs from its owner's (they must be the same
// on every rank).
enum ArErrorCode { kArErrNone = 0, kArErrTimeout = 1, kArErrShape = 2, kArErrResidual = 3 };
enum ArStep { kStepHeader = 0, kStepOneShot = 1, kStepScatter = 2, kStepGather = 3 };
enum ArDtype { kArFloat32 = 0, kArFloat16 = 1, kArBFloat16 = 2 };

// Written by the kernel that failed first; `code` last.
struct ArHostError {
    volatile int code;
    volatile int step;
    volatile int peer;
    volatile int call;
    volatile int token;
    volatile int mine[3];   // this rank's (tokens, hidden, mode) for a shape error
    volatile int theirs[3]; // the peer's
};

struct ArArgs {
    void* peers[kArMaxRanks];   // base of every rank's workspace (three buffers of buffer_bytes)
    int64_t buffer_bytes;
    int* flags;                 // this rank's device flags (kNumFlags ints)
    ArHostError* host;          // device view of the pinned error record
    uint64_t timeout_ns;
    int rank, num_ranks;
    const void* x;              // [tokens, hidden]
    const void* bias;           // [hidden] or null
    const void* residual;       // [tokens, hidden] or null
    const void* weight;         // [hidden] or null (null: no norm)
    const float* scale;         // [1] or null (null: no FP8 output)
    void* out;                  // sum (+ bias) without norm; the norm with it; null: not written
    void* residual_out;         // [tokens, hidden] or null
    uint8_t* quant;             // [tokens, hidden] e4m3 or null
    int tokens, hidden;
    float eps;
    int two_shot;
    int dtype;                  // ArDtype
    // Mixed TP x DP one-shot (moe_a2a.comm.mixed's fused mode; mixed == 0: the all-reduce above, x and out of
    // `tokens` rows). Rank p receives rows [send_first[p], send_first[p] + send_rows) of x into its slot of
    // this rank; output block b (send_rows rows, out_blocks of them) is the sum, in rank order, of the slots
    // of the ranks s with src_block[s] == b.
    //
    // Mixed two-shot (mixed and two_shot): owner p sums rows [send_first[p], send_first[p] + own_rows[p]) of
    // the inputs of the ranks in scatter_src[p] (a bit per rank) and sends the sum to the ranks in
    // gather_dst[p], which store it at row out_first[p] of out. send_rows is the largest own_rows.
    int mixed;
    int send_rows, out_blocks;
    int send_first[kArMaxRanks];
    int src_block[kArMaxRanks];
    int own_rows[kArMaxRanks];
    unsigned scatter_src[kArMaxRanks];
    unsigned gather_dst[kArMaxRanks];
    int out_first[kArMaxRanks];
};

// Header modes of the mixed calls (the all-reduce's are 1 + two_shot).
constexpr int kArModeMixed = 3, kArModeMixedTwoShot = 4;

#ifdef __CUDACC__
#define MOE_A2A_HD __host__ __device__
#else
#define MOE_A2A_HD
#endif

// 16-byte pieces a call uses of a buffer: the header's num_ranks, then one slot of `rows` rows per rank (and
// as many again for the two-shot's gather).
MOE_A2A_HD inline int64_t ar_slots_vecs(int num_ranks, int rows, int hidden, int elem_size, bool two_shot) {
    const int64_t row = static_cast<int64_t>(hidden) * elem_size / 16;
    return num_ranks + (two_shot ? 2 : 1) * static_cast<int64_t>(num_ranks) * rows * row;
}

// The same for an all-reduce of `tokens` rows (the two-shot's slots hold a chunk of ceil(tokens / num_ranks),
// and one piece per gathered row follows them: the row's 1/rms when the norm is fused).
MOE_A2A_HD inline int64_t ar_used_vecs(int num_ranks, int tokens, int hidden, int elem_size, bool two_shot) {
    if (!two_shot) return ar_slots_vecs(num_ranks, tokens, hidden, elem_size, false);
    const int chunk = (tokens + num_ranks - 1) / num_ranks;
    return ar_slots_vecs(num_ranks, chunk, hidden, elem_size, true) + static_cast<int64_t>(num_ranks) * chunk;
}

void launch_allreduce(const ArArgs& a, int num_blocks, int num_threads, cudaStream_t stream);
void launch_fill_sentinel(void* base, int64_t num_vecs, int elem_size, cudaStream_t stream);

}  // namespace moe_a2a::comm
