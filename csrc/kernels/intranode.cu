// Intranode dispatch/combine: every rank stages its rows once in its own IPC-shared buffer, and every
// receiver pulls the rows it needs straight into its outputs (see moe_a2a/backends/intranode.py for the
// design and its cost). Each kernel runs rounds of "stage, barrier, pull" so any token count fits the
// buffer; a barrier is a grid barrier whose last block also meets the peers.
#include <algorithm>

#include <cuda_bf16.h>

#include "kernels/api.cuh"
#include "kernels/utils.cuh"
#include "kernels/wire_format_device.cuh"

namespace moe_a2a {

namespace {

__device__ __forceinline__ int* header(const PeerCtx& c, int r) { return c.peers[r]; }

__device__ __forceinline__ char* staging(const PeerCtx& c, int r) {
    return reinterpret_cast<char*>(c.peers[r]) + kHeaderBytes;
}

// First error wins: it fills the host record (code written last), marks the buffer aborted and traps.
__device__ void record_error(const PeerCtx& c, int code, int peer, int phase, int expected, int seen, int round) {
    int* h = header(c, c.rank);
    if (atomicCAS(h + hdr::kErrorClaim, 0, 1) == 0) {
        c.host->error_peer = peer;
        c.host->error_phase = phase;
        c.host->error_expected = expected;
        c.host->error_seen = seen;
        c.host->error_round = round;
        __threadfence_system();
        c.host->error_code = code;
    }
    atomicExch(h + hdr::kAborted, 1);
    __threadfence_system();
    trap_after_error("intranode", c.rank, code, phase, peer);
}

// One thread: tell every peer "I reached barrier e", then wait until every peer did. Epochs live in
// device memory, so the sequence also holds under CUDA graph replay.
__device__ bool rank_barrier(const PeerCtx& c, int phase, int round) {
    int* h = header(c, c.rank);
    const int e = counter_add(h[hdr::kEpoch], 1);
    h[hdr::kEpoch] = e;
    __threadfence_system();
    for (int p = 0; p < c.num_ranks; ++p)
        if (p != c.rank) st_release_sys(header(c, p) + hdr::kSignal + c.rank, e);
    const uint64_t deadline = global_timer_ns() + c.timeout_ns;
    for (int p = 0; p < c.num_ranks; ++p) {
        if (p == c.rank) continue;
        int seen;
        while (!counter_reached(seen = ld_acquire_sys(h + hdr::kSignal + p), e)) {
            if (global_timer_ns() > deadline) {
                record_error(c, kErrPeerTimeout, p, phase, e, seen, round);
                return false;
            }
        }
    }
    return true;
}

// Barrier of all blocks of this kernel (they are co-resident: one per SM), optionally joined with every
// peer. Returns false (in every thread) once the buffer is aborted.
__device__ bool grid_barrier(const PeerCtx& c, bool with_peers, int phase, int round) {
    __shared__ int s_ok;
    __syncthreads();
    if (threadIdx.x == 0) {
        int* h = header(c, c.rank);
        bool ok = true;
        const int gen = ld_acquire_gpu(h + hdr::kGridGen);
        __threadfence_system();  // this block's staged rows are visible before it arrives
        if (atomicAdd(h + hdr::kGridArrive, 1) == static_cast<int>(gridDim.x) - 1) {
            atomicExch(h + hdr::kGridArrive, 0);
            if (with_peers) ok = rank_barrier(c, phase, round);
            __threadfence_system();
            atomicAdd(h + hdr::kGridGen, 1);
        } else {
            // Longer than the peer timeout, so the peer wait reports first when a peer is missing.
            const uint64_t deadline = global_timer_ns() + 2 * c.timeout_ns + 1000000000ull;
            while (ld_acquire_gpu(h + hdr::kGridGen) == gen) {
                if (global_timer_ns() > deadline) {
                    record_error(c, kErrGridTimeout, -1, phase, gen + 1, gen, round);
                    ok = false;
                    break;
                }
            }
        }
        s_ok = ok && ld_volatile(h + hdr::kAborted) == 0;
    }
    __syncthreads();
    return s_ok != 0;
}

__device__ __forceinline__ bool aborted(const PeerCtx& c) { return ld_volatile(header(c, c.rank) + hdr::kAborted) != 0; }

// End of a dispatch or combine kernel: once every block stopped reading the peers' buffers, tell every
// peer the epoch of this rank's last barrier (kPeerDone[me] on the peer). A peer may still pull this
// operation's rows from a rank that already finished it, so whoever writes a rank's staging area between
// operations (the producer of a zero-copy combine input) first waits for these marks
// (wait_peers_done_kernel). The mark is the barrier epoch, not a count of finished kernels: a rank passes
// barrier e only once every peer entered barrier e, so the value a waiter needs is the same on every rank
// by construction, whatever kernels each rank launched. Not reached after an error: the buffer is
// aborted then.
__device__ void finish_op(const PeerCtx& c) {
    __syncthreads();  // every load of this block returned (its values were stored)
    if (threadIdx.x != 0) return;
    int* h = header(c, c.rank);
    __threadfence_system();
    if (atomicAdd(h + hdr::kDoneArrive, 1) != static_cast<int>(gridDim.x) - 1) return;
    atomicExch(h + hdr::kDoneArrive, 0);  // the next kernel starts after this one ended (stream order)
    __threadfence_system();
    // Every block passed this kernel's last barrier (or the prologue's/notify's, when it has none).
    const int epoch = ld_volatile(h + hdr::kEpoch);
    for (int p = 0; p < c.num_ranks; ++p)
        if (p != c.rank) st_release_sys(header(c, p) + hdr::kPeerDone + c.rank, epoch);
}

// Wait for phase `parity` of a bulk-copy mbarrier; false (error recorded) after the timeout.
__device__ bool mbar_wait(const PeerCtx& c, uint64_t* bar, uint32_t parity, int phase, int round) {
    if (mbar_try_wait(bar, parity)) return true;
    const uint64_t deadline = global_timer_ns() + c.timeout_ns;
    while (!mbar_try_wait(bar, parity))
        if (global_timer_ns() > deadline) {
            record_error(c, kErrCopyTimeout, -1, phase, 0, 0, round);
            return false;
        }
    return true;
}

// Dynamic shared memory of the bulk pulls: mbarriers first, then the data slots.
constexpr int kBulkBarBytes = 1024;
constexpr int kBulkDynSmem = kBulkBarBytes + kBulkSmemBytes;
extern __shared__ __align__(128) char s_dyn[];

// One warp's ring of row pieces, driven by its lane 0: a piece is loaded into a free slot (bulk copy,
// completing on the slot's mbarrier), and stored to its destination once it landed. Up to kBulkLag + 1
// loads are in flight; a slot is reloaded only after its previous store finished reading it.
constexpr int kBulkLag = kDispatchBulkSlots - 2;

struct BulkRing {
    char* slots;
    uint64_t* bars;
    char** dst;
    int* len;
    int slot_bytes;
    uint32_t issued, done;
    bool ok;

    __device__ void init(char* slots_, uint64_t* bars_, char** dst_, int* len_, int slot_bytes_) {
        slots = slots_, bars = bars_, dst = dst_, len = len_, slot_bytes = slot_bytes_;
        issued = done = 0;
        ok = true;
        for (int k = 0; k < kDispatchBulkSlots; ++k) mbar_init(bars + k, 1);
        fence_mbar_init();
    }

    __device__ void complete_one(const PeerCtx& c, int phase, int round) {
        const int s = done % kDispatchBulkSlots;
        if (ok) ok = mbar_wait(c, bars + s, (done / kDispatchBulkSlots) & 1, phase, round);
        if (ok) {
            bulk_store(dst[s], slots + s * slot_bytes, len[s]);
            bulk_commit();
        }
        ++done;
    }

    __device__ void issue(void* d, const void* src, int n, const PeerCtx& c, int phase, int round) {
        while (issued - done > kBulkLag) complete_one(c, phase, round);
        if (!ok) return;
        const int s = issued % kDispatchBulkSlots;
        // The slot's previous piece was stored at least kDispatchBulkSlots - kBulkLag - 1 groups ago.
        if (issued >= kDispatchBulkSlots) bulk_wait_read<kDispatchBulkSlots - kBulkLag - 1>();
        mbar_arrive_expect_tx(bars + s, n);
        bulk_load(slots + s * slot_bytes, src, n, bars + s);
        dst[s] = static_cast<char*>(d);
        len[s] = n;
        ++issued;
    }

    // Every piece stored and written (before a barrier that lets peers reuse their rows, and at exit).
    __device__ void drain(const PeerCtx& c, int phase, int round) {
        while (done < issued) complete_one(c, phase, round);
        bulk_wait<0>();
    }
};

// Before the first barrier of an operation (one thread): publish what the peers' calls must agree with.
__device__ void publish_signature(const PeerCtx& c) {
    int* h = header(c, c.rank);
    for (int i = 0; i < kSignatureInts; ++i) h[hdr::kSignature + i] = c.signature[i];
}

// After that barrier (one thread): every peer published its signature before arriving, and cannot publish
// the next one before this rank passes a later barrier. A peer whose call differs is an error (and a trap):
// copying rows of another size or format would make outputs that look valid and are not.
__device__ void check_signatures(const PeerCtx& c, int phase) {
    for (int p = 0; p < c.num_ranks; ++p) {
        if (p == c.rank) continue;
        for (int i = 0; i < kSignatureInts; ++i) {
            const int theirs = ld_cg(header(c, p) + hdr::kSignature + i);
            if (theirs != c.signature[i]) record_error(c, kErrMismatch, p, phase, c.signature[i], theirs, i);
        }
    }
}

// ------------------------------------------------------------------------------------------ prologue
// The first barrier of a dispatch or combine, as its own kernel so the host can stage rows with the copy
// engine between it and the main kernel: once every peer arrived here, none still reads this buffer for an
// earlier operation. Publishes what the peers need to find this rank's rows.
__global__ void prologue_kernel(PeerCtx c, int num_tokens, int staged_rows, int phase) {
    // No early exit on an aborted buffer: the host stages rows after this kernel whatever happens, and
    // must not overwrite rows a peer may still be reading; a missing peer ends the wait by the timeout.
    if (threadIdx.x == 0) {
        header(c, c.rank)[hdr::kNumTokens] = num_tokens;
        header(c, c.rank)[hdr::kStagedRows] = staged_rows;
        publish_signature(c);
    }
    if (grid_barrier(c, true, phase, 0) && threadIdx.x == 0) check_signatures(c, phase);
}

// Before a producer writes this rank's staging area between operations: every peer finished the
// operation in which it passed this rank's last barrier e (so it stopped reading here). Until then its
// mark is the epoch of an earlier operation, below e. The comm stream's work is ordered before this kernel.
__global__ void wait_peers_done_kernel(PeerCtx c) {
    int* h = header(c, c.rank);
    const int epoch = ld_volatile(h + hdr::kEpoch);
    const uint64_t deadline = global_timer_ns() + c.timeout_ns;
    for (int p = 0; p < c.num_ranks; ++p) {
        if (p == c.rank) continue;
        int seen;
        while (!counter_reached(seen = ld_acquire_sys(h + hdr::kPeerDone + p), epoch)) {
            if (ld_volatile(h + hdr::kAborted)) return;
            if (global_timer_ns() > deadline) {
                record_error(c, kErrPeerTimeout, p, kPhaseCombineInput, epoch, seen, 0);
                return;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------ notify
// One block. Computes send_head and channel_prefix from is_token_in_rank, publishes this rank's counts,
// meets the peers, then builds rank_prefix / recv_channel_prefix and the per-expert receive counts.
constexpr int kNotifyThreads = 1024;

__global__ void __launch_bounds__(kNotifyThreads, 1)
notify_kernel(PeerCtx c, const int* __restrict__ num_tokens_per_expert, int num_experts,
              const bool* __restrict__ is_token_in_rank, int num_tokens, int num_channels, int expert_alignment,
              int num_worst_tokens, int seq, int* send_head, int* channel_prefix, int* rank_prefix,
              int* recv_channel_prefix) {
    __shared__ int s_thread_prefix[kMaxRanks][kNotifyThreads];
    __shared__ int s_warp[kMaxRanks][32];
    __shared__ int s_total[kMaxRanks];
    const int R = c.num_ranks, me = c.rank, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    if (aborted(c)) return;

    // Each thread owns a contiguous segment of tokens; a block scan gives its starting positions.
    const int seg = (num_tokens + kNotifyThreads - 1) / kNotifyThreads;
    const int t0 = min(num_tokens, tid * seg), t1 = min(num_tokens, t0 + seg);
    int run[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) run[r] = 0;
    for (int t = t0; t < t1; ++t)
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r)
            if (r < R) run[r] += is_token_in_rank[static_cast<int64_t>(t) * R + r];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
        int incl = run[r];
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xffffffff, incl, d);
            if (lane >= d) incl += v;
        }
        if (lane == 31) s_warp[r][warp] = incl;
        run[r] = incl - run[r];
    }
    __syncthreads();
    if (warp == 0) {
        for (int r = 0; r < R; ++r) {
            const int w = s_warp[r][lane];
            int incl = w;
            for (int d = 1; d < 32; d <<= 1) {
                const int v = __shfl_up_sync(0xffffffff, incl, d);
                if (lane >= d) incl += v;
            }
            s_warp[r][lane] = incl - w;
            if (lane == 31) s_total[r] = incl;
        }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
        if (r >= R) break;
        run[r] += s_warp[r][warp];
        s_thread_prefix[r][tid] = run[r];
    }
    for (int t = t0; t < t1; ++t)
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r)
            if (r < R) {
                const bool in = is_token_in_rank[static_cast<int64_t>(t) * R + r];
                send_head[static_cast<int64_t>(t) * R + r] = in ? run[r]++ : -1;
            }
    __syncthreads();

    // channel_prefix[r][ch] = tokens sent to r from channels 0..ch; channels split tokens evenly.
    int* h = header(c, me);
    const int per_channel = num_tokens > 0 ? (num_tokens + num_channels - 1) / num_channels : 1;
    for (int i = tid; i < R * num_channels; i += kNotifyThreads) {
        const int r = i / num_channels, ch = i % num_channels;
        const int end = min(num_tokens, (ch + 1) * per_channel);
        int value;
        if (end >= num_tokens) {
            value = s_total[r];
        } else {
            const int owner = end / seg;  // seg > 0 here since end < num_tokens
            value = s_thread_prefix[r][owner];
            for (int t = owner * seg; t < end; ++t) value += is_token_in_rank[static_cast<int64_t>(t) * R + r];
        }
        channel_prefix[i] = value;
        h[hdr::kChannelPrefix + r * kMaxChannels + ch] = value;
    }
    for (int r = tid; r < R; r += kNotifyThreads) h[hdr::kSendCounts + r] = s_total[r];
    // The dispatch that follows reads this instead of running its own first barrier (see launch_dispatch).
    if (tid == 0) {
        h[hdr::kNumTokens] = num_tokens;
        publish_signature(c);
    }
    for (int e = tid; e < num_experts; e += kNotifyThreads) h[hdr::kExpertCounts + e] = num_tokens_per_expert[e];
    if (!grid_barrier(c, true, kPhaseNotify, 0)) return;
    if (tid == 0) check_signatures(c, kPhaseNotify);  // before reading counts whose meaning could differ
    __syncthreads();

    // Everything below reads what the peers published before the barrier.
    __shared__ int s_recv[kMaxRanks];  // rows each rank receives: the last row of rank_prefix
    for (int i = tid; i < R * R; i += kNotifyThreads) {
        const int src = i / R, dst = i % R;
        int sum = 0;
        for (int s = 0; s <= src; ++s) sum += ld_cg(header(c, s) + hdr::kSendCounts + dst);
        rank_prefix[i] = sum;
        if (src == R - 1) s_recv[dst] = sum;
    }
    for (int i = tid; i < R * num_channels; i += kNotifyThreads) {
        const int src = i / num_channels, ch = i % num_channels;
        recv_channel_prefix[i] = ld_cg(header(c, src) + hdr::kChannelPrefix + me * kMaxChannels + ch);
    }
    const int experts_per_rank = num_experts / R;
    for (int l = tid; l < experts_per_rank; l += kNotifyThreads) {
        int sum = 0;
        for (int s = 0; s < R; ++s) sum += ld_cg(header(c, s) + hdr::kExpertCounts + me * experts_per_rank + l);
        c.host->recv_tokens_per_expert[l] = (sum + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
    __syncthreads();  // s_recv
    if (tid == 0) {
        const int num_recv = s_recv[me];
        int most = 0;
        for (int r = 0; r < R; ++r) most = max(most, s_recv[r]);
        c.host->num_recv_tokens = num_recv;
        c.host->max_recv_tokens = most;
        if (num_worst_tokens > 0 && num_recv > num_worst_tokens)
            record_error(c, kErrRecvOverflow, -1, kPhaseNotify, num_worst_tokens, num_recv, 0);
    }
    __syncthreads();
    if (tid == 0) {
        __threadfence_system();
        c.host->notify_seq = seq;
    }
}

// ------------------------------------------------------------------------------------------ dispatch
// Staging layout of one round (structure of arrays, each array 16-byte aligned):
//   data [Q, hidden] | send_head [Q, R] int32 | scales [Q, S] f32 | topk_idx [Q, K] i64 | weights [Q, K] f32
__host__ __device__ __forceinline__ int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

struct DispatchLayout {
    int64_t data, head, scales, idx, weights, end;
    __host__ __device__ DispatchLayout(int q, int hidden_int4, int R, int S, int K) {
        data = 0;
        head = align16(data + static_cast<int64_t>(q) * hidden_int4 * 16);
        scales = align16(head + static_cast<int64_t>(q) * R * 4);
        idx = align16(scales + static_cast<int64_t>(q) * S * 4);
        weights = align16(idx + static_cast<int64_t>(q) * K * 8);
        end = align16(weights + static_cast<int64_t>(q) * K * 4);
    }
};

// Grid-wide copy of `n` 16-byte words (stage a contiguous slice of a local input into the buffer).
__device__ __forceinline__ void grid_copy_int4(int4* dst, const int4* src, int64_t n) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const int4 a = ld_nc_v4(src + i), b = ld_nc_v4(src + i + stride), d = ld_nc_v4(src + i + 2 * stride),
                   e = ld_nc_v4(src + i + 3 * stride);
        st_na_v4(dst + i, a);
        st_na_v4(dst + i + stride, b);
        st_na_v4(dst + i + 2 * stride, d);
        st_na_v4(dst + i + 3 * stride, e);
    }
    for (; i < n; i += stride) st_na_v4(dst + i, ld_nc_v4(src + i));
}

__device__ __forceinline__ void grid_copy_words(int* dst, const int* src, int64_t n) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = __ldg(src + i);
}

// Tokens of every rank (published in the header before the first barrier) and the largest of them.
__device__ int load_peer_tokens(const PeerCtx& c, int* s_tokens) {
    if (threadIdx.x < c.num_ranks) s_tokens[threadIdx.x] = ld_cg(header(c, threadIdx.x) + hdr::kNumTokens);
    __syncthreads();
    int most = 0;
    for (int r = 0; r < c.num_ranks; ++r) most = max(most, s_tokens[r]);
    return most;
}

// One warp reads row `src` (h4 16-byte words) once, four words per lane in flight, and stores it at dst(j) for
// every j < n where dst(j) is not null (the same offsets in each). dst is called by every lane for every j,
// so it may shuffle; lanes past the row's end are predicated off inside (rows narrower than 32 x 16 bytes
// leave most lanes idle). The sender-written dispatch's fan-out, and the copy probe's multicast.
template <typename DstFn>
__device__ __forceinline__ void warp_multicast_row(const int4* src, int h4, int n, DstFn dst, int lane) {
    constexpr int kU = 4;
    for (int w0 = 0; w0 < h4; w0 += 32 * kU) {
        const int w = w0 + lane;
        int4 v[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u)
            if (w + 32 * u < h4) v[u] = ld_nc_v4(src + w + 32 * u);
        for (int j = 0; j < n; ++j) {
            int4* to = dst(j);
            if (to == nullptr) continue;
#pragma unroll
            for (int u = 0; u < kU; ++u)
                if (w + 32 * u < h4) to[w + 32 * u] = v[u];
        }
    }
}

// Senders write the rows: every token is read once and stored into the receive rows of each rank that
// receives it (row rank_prefix[me - 1, d] + send_head[t, d] there), so a row crosses memory once instead of
// being staged and pulled. One warp per token, four 16-byte words per lane in flight.
__device__ void write_rows_in_buffer(const PeerCtx& c, const DispatchArgs& a, int me, int gwarp, int num_warps, int lane) {
    const int R = c.num_ranks, H4 = a.hidden_int4;
    const int64_t row_int4 = H4;
    // Lane d < R: the first receive row on rank d of this rank's tokens (the same for every token).
    const int first_row = lane < R && me > 0 ? __ldg(a.rank_prefix + (me - 1) * R + lane) : 0;
    for (int t = gwarp; t < a.num_tokens; t += num_warps) {
        int row = -1;
        if (lane < R) {
            const int head = __ldg(a.send_head + static_cast<int64_t>(t) * R + lane);
            if (head >= 0) row = first_row + head;
        }
        warp_multicast_row(static_cast<const int4*>(a.x) + static_cast<int64_t>(t) * row_int4, H4, R,
                           [&](int d) -> int4* {
                               const int r = __shfl_sync(0xffffffff, row, d);  // every lane calls for every d
                               return r < 0 ? nullptr
                                            : reinterpret_cast<int4*>(staging(c, d)) + static_cast<int64_t>(r) * row_int4;
                           },
                           lane);
    }
}

// Senders write the rows only if every rank's receive rows fit its area and every rank stages its tokens in
// one round: the same answer on every rank (rank_prefix and the token counts are), so all take the same exit.
__device__ bool in_buffer_fits(const PeerCtx& c, const DispatchArgs& a, int max_tokens) {
    if (max_tokens > a.capacity || a.num_alloc_rows > a.recv_rows) return false;
    for (int d = 0; d < c.num_ranks; ++d)
        if (a.rank_prefix[(c.num_ranks - 1) * c.num_ranks + d] > a.recv_rows) return false;
    return true;
}

__global__ void __launch_bounds__(kDispatchThreads, 1) dispatch_kernel(PeerCtx c, DispatchArgs a) {
    __shared__ int s_tokens[kMaxRanks];
    __shared__ int s_offset[kMaxRanks + 1];  // first output row of each source rank, then the total
    const int R = c.num_ranks, me = c.rank, lane = threadIdx.x % 32;
    // The prologue kernel published the token counts and met the peers: the buffer is free.
    if (aborted(c)) return;

    const int max_tokens = load_peer_tokens(c, s_tokens);
    if (threadIdx.x <= R) s_offset[threadIdx.x] = threadIdx.x == 0 ? 0 : a.rank_prefix[(threadIdx.x - 1) * R + me];
    __syncthreads();
    const int num_recv = s_offset[R];
    if (a.recv_x_in_buffer && !in_buffer_fits(c, a, max_tokens)) {
        if (threadIdx.x == 0 && blockIdx.x == 0)
            record_error(c, kErrRecvOverflow, me, kPhaseDispatchStart, a.recv_rows, max(num_recv, a.num_alloc_rows), 0);
        return;
    }
    const int Q = a.capacity, S = a.num_scales, K = a.num_topk, H4 = a.hidden_int4;
    // With senders writing the rows, the staged per-token fields sit at small_base, after the receive rows.
    const int64_t base = a.recv_x_in_buffer ? a.small_base : 0;
    const DispatchLayout L(Q, a.recv_x_in_buffer ? 0 : H4, R, S, K);
    const int expert_begin = me * a.num_experts_per_rank;
    const int num_warps = gridDim.x * (blockDim.x / 32);
    const int gwarp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int num_rounds = (max_tokens + Q - 1) / Q;
    const bool bulk = a.bulk != 0 && !a.recv_x_in_buffer;
    const int warp = threadIdx.x / 32, row_bytes = H4 * 16;
    __shared__ char* s_bulk_dst[kDispatchThreads / 32][kDispatchBulkSlots];
    __shared__ int s_bulk_len[kDispatchThreads / 32][kDispatchBulkSlots];
    BulkRing ring;
    int piece_bytes = row_bytes;
    if (bulk) {
        const int slot_bytes = kBulkSmemBytes / (kDispatchThreads / 32) / kDispatchBulkSlots / 16 * 16;
        const int pieces = (row_bytes + slot_bytes - 1) / slot_bytes;
        piece_bytes = static_cast<int>(align16((row_bytes + pieces - 1) / pieces));
        if (lane == 0)
            ring.init(s_dyn + kBulkBarBytes + warp * kDispatchBulkSlots * slot_bytes,
                      reinterpret_cast<uint64_t*>(s_dyn) + warp * kDispatchBulkSlots, s_bulk_dst[warp],
                      s_bulk_len[warp], slot_bytes);
        __syncwarp();
    }

    for (int round = 0; round < num_rounds; ++round) {
        const int first = round * Q;
        if (round > 0 && !grid_barrier(c, true, kPhaseDispatchStart, round)) return;
        // Stage this rank's tokens [first, first + n) once; every receiver reads them from here.
        const int n = max(0, min(Q, a.num_tokens - first));
        char* mine = staging(c, me);
        if (!a.data_staged && !a.recv_x_in_buffer)  // the copy engine staged all rows before this kernel, or senders write them
            grid_copy_int4(reinterpret_cast<int4*>(mine + L.data),
                           static_cast<const int4*>(a.x) + static_cast<int64_t>(first) * H4,
                           static_cast<int64_t>(n) * H4);
        grid_copy_words(reinterpret_cast<int*>(mine + base + L.head), a.send_head + static_cast<int64_t>(first) * R,
                        static_cast<int64_t>(n) * R);
        if (a.x_scales)
            grid_copy_words(reinterpret_cast<int*>(mine + base + L.scales),
                            reinterpret_cast<const int*>(a.x_scales) + static_cast<int64_t>(first) * S,
                            static_cast<int64_t>(n) * S);
        if (a.topk_idx) {
            grid_copy_words(reinterpret_cast<int*>(mine + base + L.idx),
                            reinterpret_cast<const int*>(a.topk_idx) + static_cast<int64_t>(first) * K * 2,
                            static_cast<int64_t>(n) * K * 2);
            if (a.topk_weights)
                grid_copy_words(reinterpret_cast<int*>(mine + base + L.weights),
                                reinterpret_cast<const int*>(a.topk_weights) + static_cast<int64_t>(first) * K,
                                static_cast<int64_t>(n) * K);
        }
        if (a.recv_x_in_buffer) write_rows_in_buffer(c, a, me, gwarp, num_warps, lane);
        if (!grid_barrier(c, true, kPhaseDispatchStaged, round)) return;
        if (bulk && lane == 0) fence_proxy_async_global();

        // Pull: batches of 32 staged slots per warp, over all sources; a slot is copied when the
        // source sends that token here, to output row offset[source] + send_head.
        int num_batches = 0;
        for (int s = 0; s < R; ++s) num_batches += (max(0, min(Q, s_tokens[s] - first)) + 31) / 32;
        for (int b = gwarp; b < num_batches; b += num_warps) {
            int s = 0, local = b;
            for (;; ++s) {
                const int nb = (max(0, min(Q, s_tokens[s] - first)) + 31) / 32;
                if (local < nb) break;
                local -= nb;
            }
            const int ns = max(0, min(Q, s_tokens[s] - first));
            const char* src = staging(c, s);
            const int slot = local * 32 + lane;
            const int head = slot < ns ? ld_cg(reinterpret_cast<const int*>(src + base + L.head) + slot * R + me) : -1;
            unsigned mask = __ballot_sync(0xffffffff, head >= 0);
            while (mask) {
                const int l = __ffs(mask) - 1;
                mask &= mask - 1;
                const int i = local * 32 + l;
                const int row = s_offset[s] + __shfl_sync(0xffffffff, head, l);
                if (row >= a.num_alloc_rows) {
                    if (lane == 0) record_error(c, kErrRecvOverflow, s, kPhaseDispatchStaged, a.num_alloc_rows, row + 1, round);
                    continue;
                }
                // The row's top-k fields are loaded before its copy, so their round trip overlaps it.
                int64_t e = -1;
                float w = 0.0f;
                if (a.recv_topk_idx && lane < K) {
                    e = reinterpret_cast<const int64_t*>(src + base + L.idx)[static_cast<int64_t>(i) * K + lane];
                    if (a.recv_topk_weights)
                        w = __int_as_float(
                            ld_cg(reinterpret_cast<const int*>(src + base + L.weights) + static_cast<int64_t>(i) * K + lane));
                }
                if (a.recv_x_in_buffer) {
                    // The sender wrote the row already.
                } else if (bulk) {
                    if (lane == 0) {
                        char* dst = static_cast<char*>(a.recv_x) + static_cast<int64_t>(row) * row_bytes;
                        const char* from = src + L.data + static_cast<int64_t>(i) * row_bytes;
                        for (int off = 0; off < row_bytes; off += piece_bytes)
                            ring.issue(dst + off, from + off, min(piece_bytes, row_bytes - off), c,
                                      kPhaseDispatchStaged, round);
                    }
                } else {
                    warp_copy<true, 8>(static_cast<int4*>(a.recv_x) + static_cast<int64_t>(row) * H4,
                                       reinterpret_cast<const int4*>(src + L.data) + static_cast<int64_t>(i) * H4, H4,
                                       lane);
                }
                if (a.recv_x_scales)
                    warp_copy_words<true>(reinterpret_cast<int*>(a.recv_x_scales) + static_cast<int64_t>(row) * S,
                                          reinterpret_cast<const int*>(src + base + L.scales) + static_cast<int64_t>(i) * S, S,
                                          lane);
                if (a.recv_topk_idx && lane < K) {
                    // Keep the expert only where it lives on this rank, as a local id; its weight likewise.
                    const bool local_expert = e >= expert_begin && e < expert_begin + a.num_experts_per_rank;
                    a.recv_topk_idx[static_cast<int64_t>(row) * K + lane] = local_expert ? e - expert_begin : -1;
                    if (a.recv_topk_weights)
                        a.recv_topk_weights[static_cast<int64_t>(row) * K + lane] = local_expert ? w : 0.0f;
                }
                if (a.recv_src_idx && lane == 0) a.recv_src_idx[row] = first + i;
            }
        }
        // Every row of this round landed before the next barrier lets the peers restage.
        if (bulk && lane == 0) ring.drain(c, kPhaseDispatchStaged, round);
    }

    // num_worst_tokens: rows past the received count are padding (zeros, expert -1, source -1).
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int pad_from = min(num_recv, a.num_alloc_rows);
    const int64_t pad_rows = a.num_alloc_rows - pad_from;
    for (int64_t i = tid; i < pad_rows * H4; i += stride)
        static_cast<int4*>(a.recv_x)[static_cast<int64_t>(pad_from) * H4 + i] = make_int4(0, 0, 0, 0);
    if (a.recv_x_scales)
        for (int64_t i = tid; i < pad_rows * S; i += stride) a.recv_x_scales[static_cast<int64_t>(pad_from) * S + i] = 0.0f;
    if (a.recv_topk_idx)
        for (int64_t i = tid; i < pad_rows * K; i += stride) {
            a.recv_topk_idx[static_cast<int64_t>(pad_from) * K + i] = -1;
            if (a.recv_topk_weights) a.recv_topk_weights[static_cast<int64_t>(pad_from) * K + i] = 0.0f;
        }
    if (a.recv_src_idx)
        for (int64_t i = tid; i < pad_rows; i += stride) a.recv_src_idx[pad_from + i] = -1;
    finish_op(c);
}

// ------------------------------------------------------------------------------------------ combine
// Staging layout of one round: for each source rank s, Q slots indexed by s's token index minus the
// round's first token: data [R, Q, hidden] bf16 | weights [R, Q, K] f32.
struct CombineLayout {
    int64_t data, weights, end;
    __host__ __device__ CombineLayout(int q, int hidden_int4, int R, int K) {
        data = 0;
        weights = align16(static_cast<int64_t>(R) * q * hidden_int4 * 16);
        end = align16(weights + static_cast<int64_t>(R) * q * K * 4);
    }
};

__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(p[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

// One 8-channel chunk of a staged row (as load_chunk<kFormat> loaded it) added to acc in float32.
template <int kFormat>
__device__ __forceinline__ void add_chunk(float* acc, const int4& raw) {
    if constexpr (kFormat == kLLFormatBF16Combine) {
        add_bf16x8(acc, raw);
    } else {
        float f[8];
        decode_chunk<kFormat>(raw, f);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += f[e];
    }
}

// Shared state of one combine block: what the peers published, and per warp the copies of its token.
struct CombineShared {
    int tokens[kMaxRanks];
    int offset[kMaxRanks + 1];  // received rows from sources < r (this rank's arrival order)
    int rows[kMaxRanks];        // rows peer r staged in arrival order, or -1 (slot layout)
    int first[kMaxRanks];       // first row on peer r that came from this rank
    int64_t wbase[kMaxRanks];   // byte offset of peer r's staged weights
    int win_begin[kMaxRanks];   // pipelined arrival-order staging: the current window's rows of source r
    int win_end[kMaxRanks];
    const int4* row_ptr[kCombineThreads / 32][kMaxRanks];
};

// Stage by slots: received row j (from source s, its token t) goes to slot [s, t - first] when t is in
// [lo, hi), a part of this round's window [first, first + Q).
__device__ void stage_slots(const PeerCtx& c, const CombineArgs& a, const CombineShared& s, const CombineLayout& L,
                            int first, int lo, int hi, int gwarp, int num_warps, int lane) {
    const int R = c.num_ranks, Q = a.capacity, K = a.num_topk, H4 = a.hidden_int4;
    char* mine = staging(c, c.rank);
    const int num_recv = s.offset[R];
    for (int b = gwarp; b * 32 < num_recv; b += num_warps) {
        const int j_lane = b * 32 + lane;
        int slot = -1, src_rank = 0;
        if (j_lane < num_recv) {
            const int t = __ldg(a.recv_src_idx + j_lane);
            while (src_rank + 1 < R && j_lane >= s.offset[src_rank + 1]) ++src_rank;
            if (t >= lo && t < hi) slot = src_rank * Q + (t - first);
        }
        unsigned mask = __ballot_sync(0xffffffff, slot >= 0);
        while (mask) {
            const int l = __ffs(mask) - 1;
            mask &= mask - 1;
            const int dst = __shfl_sync(0xffffffff, slot, l);
            const int64_t j = b * 32 + l;
            warp_copy_lean<false, 8>(reinterpret_cast<int4*>(mine + L.data) + static_cast<int64_t>(dst) * H4,
                                     static_cast<const int4*>(a.x) + j * H4, H4, lane);
            if (a.topk_weights && lane < K)
                reinterpret_cast<float*>(mine + L.weights)[static_cast<int64_t>(dst) * K + lane] =
                    __ldg(a.topk_weights + j * K + lane);
        }
    }
}

// Stage in arrival order: rows [begin, end) of x (and their weights) to the same rows of the staging area.
__device__ void stage_rows(const PeerCtx& c, const CombineArgs& a, const CombineShared& s, int64_t begin, int64_t end) {
    if (end <= begin) return;
    char* mine = staging(c, c.rank);
    const int64_t H4 = a.hidden_int4;
    grid_copy_int4(reinterpret_cast<int4*>(mine) + begin * H4, static_cast<const int4*>(a.x) + begin * H4,
                   (end - begin) * H4);
    if (a.topk_weights)
        grid_copy_words(reinterpret_cast<int*>(mine + s.wbase[c.rank]) + begin * a.num_topk,
                        reinterpret_cast<const int*>(a.topk_weights) + begin * a.num_topk, (end - begin) * a.num_topk);
}

// Eight float32 channels rounded to BF16, as one 16-byte chunk.
__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    int4 out;
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = __floats2bfloat162_rn(acc[2 * e], acc[2 * e + 1]);
    return out;
}

// Chunk c of token t's combined row: acc (its copies' sum) plus the biases, rounded to BF16, into out.
__device__ __forceinline__ void store_combined(const CombineArgs& a, float (&acc)[8], int64_t t, int c) {
    const int64_t at = t * a.hidden_int4 + c;
    if (a.bias_0) add_bf16x8(acc, ld_nc_v4(static_cast<const int4*>(a.bias_0) + at));
    if (a.bias_1) add_bf16x8(acc, ld_nc_v4(static_cast<const int4*>(a.bias_1) + at));
    st_na_v4(static_cast<int4*>(a.out) + at, pack_bf16x8(acc));
}

// Token t's row as the sum of its copies at row_ptr[r] (r in `ranks`, rank order, float32, decoded from
// kFormat) plus the biases, into out: two 16-byte chunks per lane and rank in flight, up to 2 * R loads
// before the first add.
template <int kFormat>
__device__ __forceinline__ void sum_row_registers(const CombineArgs& a, const int4* const* row_ptr, unsigned ranks,
                                                  int64_t t, int lane) {
    const int H4 = a.hidden_int4;
    for (int w = lane; w < H4; w += 64) {
        const bool two = w + 32 < H4;
        int4 v[kMaxRanks][2];
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r)
            if (ranks >> r & 1) {
                const int4* row = row_ptr[r];
                v[r][0] = load_chunk<kFormat>(row, w);
                if (two) v[r][1] = load_chunk<kFormat>(row, w + 32);
            }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            if (half == 1 && !two) break;
            float acc[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
            for (int r = 0; r < kMaxRanks; ++r)
                if (ranks >> r & 1) add_chunk<kFormat>(acc, v[r][half]);
            store_combined(a, acc, t, w + 32 * half);
        }
    }
}

// Pull tokens first + [i0, i1): one warp per token; its copies from every rank it went to, summed in f32
// in rank order (the reference's order), plus the biases. A copy is at slot [me, i] of a peer that staged
// by slots, else at its arrival row first[r] + send_head[t, r].
template <int kFormat>
__device__ void pull_tokens(const PeerCtx& c, const CombineArgs& a, CombineShared& s, const CombineLayout& L,
                            int first, int i0, int i1, int gwarp, int num_warps, int lane, int round) {
    const int R = c.num_ranks, me = c.rank, Q = a.capacity, K = a.num_topk, H4 = a.hidden_int4;
    const int4** row_ptr = s.row_ptr[threadIdx.x / 32];
    for (int i = i0 + gwarp; i < i1; i += num_warps) {
        const int64_t t = first + i;
        __syncwarp();  // the previous token's row addresses are no longer read
        int64_t my_row = -1;  // lane r < R: row of token t's copy in rank r's staging
        if (lane < R) {
            // Both loads go out before either is used (the head is read whether or not t went to rank r), so
            // a token waits for one round trip here, not two.
            const bool sent = a.is_token_in_rank[t * R + lane];
            const int head = s.rows[lane] < 0 ? 0 : __ldg(a.send_head + t * R + lane);
            if (sent && s.rows[lane] < 0) {
                my_row = static_cast<int64_t>(me) * Q + i;
            } else if (sent) {
                const int row = s.first[lane] + head;
                if (head >= 0 && row < s.rows[lane])
                    my_row = row;
                else
                    record_error(c, kErrBadHandle, lane, kPhaseCombineStaged, s.rows[lane], row, round);
            }
        }
        const unsigned ranks = __ballot_sync(0xffffffff, my_row >= 0);
        // Row addresses in shared memory: kept in registers they would spill.
        if (my_row >= 0) row_ptr[lane] = reinterpret_cast<const int4*>(staging(c, lane) + L.data) + my_row * H4;
        __syncwarp();
        sum_row_registers<kFormat>(a, row_ptr, ranks, t, lane);
        if (a.out_weights) {
            float sum = 0.0f;
            for (int r = 0; r < R; ++r) {
                const int64_t row = __shfl_sync(0xffffffff, my_row, r);
                if ((ranks >> r & 1) && lane < K)
                    sum += __int_as_float(
                        ld_cg(reinterpret_cast<const int*>(staging(c, r) + s.wbase[r]) + row * K + lane));
            }
            if (lane < K) a.out_weights[t * K + lane] = sum;
        }
    }
}

// Window k of a pipelined combine is staged on this rank: the block that completes it (the last of the
// grid) raises the flag to this operation's epoch, which every rank shares after the prologue's barrier.
__device__ void publish_window(const PeerCtx& c, int k, int epoch) {
    __syncthreads();  // every store of this block's share was issued
    if (threadIdx.x != 0) return;
    int* h = header(c, c.rank);
    __threadfence_system();
    if (atomicAdd(h + hdr::kWindowArrive + k, 1) != static_cast<int>(gridDim.x) - 1) return;
    atomicExch(h + hdr::kWindowArrive + k, 0);  // every block passed window k
    __threadfence_system();
    st_release_sys(h + hdr::kWindowReady + k, epoch);
}

// Before pulling window k: every rank (this one included) staged it. False once the buffer is aborted.
__device__ bool wait_window(const PeerCtx& c, int k, int epoch) {
    __shared__ int s_ok;
    if (threadIdx.x == 0) s_ok = 1;
    __syncthreads();
    if (threadIdx.x < c.num_ranks) {
        const int* flag = header(c, threadIdx.x) + hdr::kWindowReady + k;
        int seen = ld_acquire_sys(flag);
        if (!counter_reached(seen, epoch)) {
            const uint64_t deadline = global_timer_ns() + c.timeout_ns;
            while (!counter_reached(seen = ld_acquire_sys(flag), epoch)) {
                if (aborted(c)) {
                    s_ok = 0;
                    break;
                }
                if (global_timer_ns() > deadline) {
                    s_ok = 0;
                    record_error(c, kErrPeerTimeout, threadIdx.x, kPhaseCombineStaged, epoch, seen, k);
                    break;
                }
            }
        }
    }
    __syncthreads();
    return s_ok != 0;
}

// Stage window k of a pipelined combine: tokens [k * width, (k + 1) * width) of every source. In arrival
// order a source's rows are sorted by token, so there the window is one range of rows per source, found by
// bisection from where the previous window ended.
__device__ void stage_window(const PeerCtx& c, const CombineArgs& a, CombineShared& s, const CombineLayout& L, int k,
                             int width, int max_tokens, bool flat, int lane) {
    const int lo = k * width, hi = min(max_tokens, lo + width);
    const int gwarp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, num_warps = gridDim.x * (blockDim.x / 32);
    if (!flat) {
        stage_slots(c, a, s, L, 0, lo, hi, gwarp, num_warps, lane);
        return;
    }
    const int r = threadIdx.x;
    if (r < c.num_ranks) {
        int b = s.win_begin[r], e = s.offset[r + 1];
        while (b < e) {
            const int m = (b + e) / 2;
            if (__ldg(a.recv_src_idx + m) < hi) b = m + 1; else e = m;
        }
        s.win_end[r] = b;
    }
    __syncthreads();
    for (int src = 0; src < c.num_ranks; ++src) stage_rows(c, a, s, s.win_begin[src], s.win_end[src]);
    __syncthreads();  // every thread read win_begin
    if (r < c.num_ranks) s.win_begin[r] = s.win_end[r];
}

// kFormat: how the staged rows are encoded (a.format); BF16, or FP8 rows from launch_encode_rows, which keep
// their BF16 slots (staging moves whole slots) while the peers' pulls read only the encoded bytes.
//
// Two schedules. Rounds: stage a window of Q tokens per source, meet every peer, pull, repeat (any token
// count). Pipelined (a.num_windows > 0 and every token fits one round): the tokens are cut into windows;
// the blocks stage window k + 1 before they pull window k, and a pull waits only for that window's flag on
// each rank, so one rank's staging overlaps another's pulling and no barrier stops the grid. Rows staged
// before the kernel (zero-copy input) make every window ready at once.
template <int kFormat>
__global__ void __launch_bounds__(kCombineThreads, 1) combine_kernel(PeerCtx c, CombineArgs a) {
    __shared__ CombineShared s;
    const int R = c.num_ranks, me = c.rank, lane = threadIdx.x % 32;
    // The prologue kernel published the token counts and staged rows and met the peers.
    if (aborted(c)) return;

    const int max_tokens = load_peer_tokens(c, s.tokens);
    const int Q = a.capacity, K = a.num_topk, H4 = a.hidden_int4;
    const CombineLayout L(Q, H4, R, K);
    if (threadIdx.x <= R) s.offset[threadIdx.x] = threadIdx.x == 0 ? 0 : a.rank_prefix[(threadIdx.x - 1) * R + me];
    if (threadIdx.x < R) {
        const int r = threadIdx.x, rows = ld_cg(header(c, r) + hdr::kStagedRows);
        s.rows[r] = rows;
        s.first[r] = me == 0 ? 0 : a.rank_prefix[(me - 1) * R + r];
        s.wbase[r] = rows >= 0 ? align16(static_cast<int64_t>(rows) * H4 * 16) : L.weights;
    }
    __syncthreads();
    const int num_warps = gridDim.x * (blockDim.x / 32);
    const int gwarp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const bool flat = a.staged_rows >= 0;

    if (a.num_windows > 0 && max_tokens <= Q) {
        // The prologue's barrier left the same epoch on every rank: it names this operation's windows.
        const int epoch = ld_volatile(header(c, me) + hdr::kEpoch);
        const int width = max(kMinWindowTokens, (max_tokens + a.num_windows - 1) / a.num_windows);
        const int num_windows = (max_tokens + width - 1) / width;
        const bool stage_here = !flat || a.stage_in_kernel;
        if (threadIdx.x < R) s.win_begin[threadIdx.x] = s.offset[threadIdx.x];
        __syncthreads();
        for (int k = 0; k <= num_windows; ++k) {
            if (k < num_windows) {
                if (stage_here) stage_window(c, a, s, L, k, width, max_tokens, flat, lane);
                publish_window(c, k, epoch);
            }
            if (k == 0) continue;
            const int w = k - 1;
            if (!wait_window(c, w, epoch)) return;
            pull_tokens<kFormat>(c, a, s, L, 0, min(a.num_tokens, w * width), min(a.num_tokens, (w + 1) * width),
                                 gwarp, num_warps, lane, w);
        }
        finish_op(c);
        return;
    }

    const int num_rounds = (max_tokens + Q - 1) / Q;
    for (int round = 0; round < num_rounds; ++round) {
        const int first = round * Q;
        if (round > 0 && !grid_barrier(c, true, kPhaseCombineStart, round)) return;
        if (!flat) stage_slots(c, a, s, L, first, first, first + Q, gwarp, num_warps, lane);
        if (flat && a.stage_in_kernel && round == 0) stage_rows(c, a, s, 0, a.staged_rows);
        if (!grid_barrier(c, true, kPhaseCombineStaged, round)) return;
        pull_tokens<kFormat>(c, a, s, L, first, 0, max(0, min(Q, a.num_tokens - first)), gwarp, num_warps, lane,
                             round);
    }
    finish_op(c);
}

template <int kFormat>
__global__ void encode_rows_kernel(const int4* src, char* dst, int rows, int hidden) {
    const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
    const int64_t row_int4 = hidden / 8;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; r < rows;
         r += static_cast<int64_t>(gridDim.x) * warps)
        encode_row_warp<kFormat>(src + r * row_int4, dst + r * row_int4 * 16, hidden, lane);
}

// The SM copy probe: what SM-driven traffic through the mappings costs, apart from any kernel's logic.
// Write/read: one contiguous slice to/from `peer`'s staging area at word rank * n. Scatter/gather: rows of
// `row_int4` words, one warp per row (as the sender-written dispatch and the zero-copy pull move them), row i
// to/from rank i % R's staging area at row rank * ceil(rows / R) + i / R. Multicast: row i read once and
// written to the `fanout` ranks (i + j) % R, j < fanout, at row rank * ceil(rows / R) * fanout + (i / R) *
// fanout + j of their areas: packed per source, as the sender-written dispatch's receive rows are (rows
// spread over the whole area instead ran at a third of the rate on an H100, fan-out 1 included). Reduce: row
// i summed over those ranks' copies as BF16 channels in float32, in j order, and written here (the zero-copy
// combine's fan-in, two 16-byte words per lane and rank in flight as its pull keeps).
__global__ void __launch_bounds__(kDispatchThreads, 1)
    copy_probe_kernel(PeerCtx c, int4* local, int64_t n, int peer, int pattern, int row_int4, int fanout) {
    const int R = c.num_ranks, me = c.rank;
    if (pattern == kProbeWrite || pattern == kProbeRead) {
        int4* area = reinterpret_cast<int4*>(staging(c, peer)) + me * n;
        if (pattern == kProbeWrite)
            grid_copy_int4(area, local, n);
        else
            grid_copy_int4(local, area, n);
        return;
    }
    const int64_t rows = n / row_int4, per_rank = (rows + R - 1) / R;
    const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
    const int lane = threadIdx.x % 32;
    for (int64_t i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; i < rows; i += num_warps) {
        int4* here = local + i * row_int4;
        if (pattern == kProbeScatter || pattern == kProbeGather) {
            int4* there = reinterpret_cast<int4*>(staging(c, static_cast<int>(i % R))) + (me * per_rank + i / R) * row_int4;
            if (pattern == kProbeScatter)
                warp_copy<false, 4>(there, here, row_int4, lane);
            else
                warp_copy<true, 4>(here, there, row_int4, lane);
            continue;
        }
        // Row i's copy j: at row `first + j` of rank (i + j) % R's area.
        const int64_t first = me * per_rank * fanout + (i / R) * fanout;
        if (pattern == kProbeMulticast) {
            warp_multicast_row(here, row_int4, fanout, [&](int j) {
                return reinterpret_cast<int4*>(staging(c, static_cast<int>((i + j) % R))) + (first + j) * row_int4;
            }, lane);
            continue;
        }
        for (int w = lane; w < row_int4; w += 64) {  // kProbeReduce
            const bool two = w + 32 < row_int4;
            int4 v[kMaxRanks][2];
#pragma unroll
            for (int j = 0; j < kMaxRanks; ++j)
                if (j < fanout) {
                    const int4* row =
                        reinterpret_cast<const int4*>(staging(c, static_cast<int>((i + j) % R))) + (first + j) * row_int4;
                    v[j][0] = ld_cg_v4(row + w);
                    if (two) v[j][1] = ld_cg_v4(row + w + 32);
                }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (half == 1 && !two) break;
                float acc[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
                for (int j = 0; j < kMaxRanks; ++j)
                    if (j < fanout) add_bf16x8(acc, v[j][half]);
                st_na_v4(here + w + 32 * half, pack_bf16x8(acc));
            }
        }
    }
}

}  // namespace

int64_t dispatch_staging_bytes(int capacity, int hidden_int4, int num_ranks, int num_scales, int num_topk) {
    return DispatchLayout(capacity, hidden_int4, num_ranks, num_scales, num_topk).end;
}

int64_t dispatch_in_buffer_fields_base(int64_t staging_bytes, int capacity, int num_ranks, int num_scales, int num_topk) {
    const int64_t small = DispatchLayout(capacity, 0, num_ranks, num_scales, num_topk).end;
    return (staging_bytes - small) / 128 * 128;
}

int64_t combine_staging_bytes(int capacity, int hidden_int4, int num_ranks, int num_topk) {
    return CombineLayout(capacity, hidden_int4, num_ranks, num_topk).end;
}

void launch_prologue(const PeerCtx& ctx, int num_tokens, int staged_rows, int phase, cudaStream_t stream) {
    prologue_kernel<<<1, 32, 0, stream>>>(ctx, num_tokens, staged_rows, phase);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_wait_peers_done(const PeerCtx& ctx, cudaStream_t stream) {
    wait_peers_done_kernel<<<1, 1, 0, stream>>>(ctx);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_notify(const PeerCtx& ctx, const int* num_tokens_per_expert, int num_experts, const bool* is_token_in_rank,
                   int num_tokens, int num_channels, int expert_alignment, int num_worst_tokens, int seq,
                   int* send_head, int* channel_prefix, int* rank_prefix, int* recv_channel_prefix,
                   cudaStream_t stream) {
    notify_kernel<<<1, kNotifyThreads, 0, stream>>>(ctx, num_tokens_per_expert, num_experts, is_token_in_rank,
                                                     num_tokens, num_channels, expert_alignment, num_worst_tokens,
                                                     seq, send_head, channel_prefix, rank_prefix, recv_channel_prefix);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_dispatch(const PeerCtx& ctx, const DispatchArgs& a, int num_blocks, cudaStream_t stream) {
    int smem = 0;
    if (a.bulk) {
        smem = kBulkDynSmem;
        static const bool once = [] {  // an attribute of the function: set once, before the first launch
            MOE_A2A_CUDA_CHECK(cudaFuncSetAttribute(dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    kBulkDynSmem));
            return true;
        }();
        (void)once;
    }
    dispatch_kernel<<<num_blocks, kDispatchThreads, smem, stream>>>(ctx, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const PeerCtx& ctx, const CombineArgs& a, int num_blocks, cudaStream_t stream) {
    if (a.format == kLLFormatFP8Combine)
        combine_kernel<kLLFormatFP8Combine><<<num_blocks, kCombineThreads, 0, stream>>>(ctx, a);
    else
        combine_kernel<kLLFormatBF16Combine><<<num_blocks, kCombineThreads, 0, stream>>>(ctx, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_encode_rows(const void* src, void* dst, int rows, int hidden, int format, cudaStream_t stream) {
    if (rows <= 0) return;
    constexpr int kThreads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((rows + kThreads / 32 - 1) / (kThreads / 32), 4096));
    const int4* s = static_cast<const int4*>(src);
    char* d = static_cast<char*>(dst);
    if (format == kLLFormatFP8Combine) encode_rows_kernel<kLLFormatFP8Combine><<<blocks, kThreads, 0, stream>>>(s, d, rows, hidden);
    else encode_rows_kernel<kLLFormatLogFMTCombine><<<blocks, kThreads, 0, stream>>>(s, d, rows, hidden);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_copy_probe(const PeerCtx& ctx, void* local, int64_t n, int peer, int pattern, int row_int4, int fanout,
                       int num_blocks, cudaStream_t stream) {
    copy_probe_kernel<<<num_blocks, kDispatchThreads, 0, stream>>>(ctx, static_cast<int4*>(local), n, peer, pattern,
                                                                   row_int4, fanout);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_a2a
