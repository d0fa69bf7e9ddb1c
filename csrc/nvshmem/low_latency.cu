// Low-latency dispatch/combine across nodes over NVSHMEM (layout in low_latency.cuh). Senders push.
// Masked ranks (Ctx::mask) are left out of every put, count, flag and wait; with Ctx::shrink a wait that times
// out masks the ranks it waited for and the call goes on without them.
//
// Dispatch send: every block loads the routing into shared memory and counts the pairs per expert. Block
// b casts tokens b, b + G, ... once (FP8 with per-128 scales, or BF16) into this rank's send area behind
// a 16-byte header (the token index); then warp k puts the message of pair (t, k) into slot
// [local expert][this rank][j] of the expert's rank, j = the rank of the pair among this rank's pairs to
// that expert (by token, then top-k slot). Puts go through NVSHMEM (RDMA across nodes), or as plain
// stores where NVSHMEM maps the peer (NVLink). Each thread then completes its puts (nvshmem_quiet); the
// last block to arrive sends every (expert's rank, local expert) its count, tagged with the call's epoch:
// data, then quiet, then signal.
// Dispatch receive: one thread per (local expert, source) waits for its signal, the block scans the
// counts into the packed slot layout ([expert][source][token], the reference order) and copies the
// messages from this rank's recv area to their slots, scales into their column-major slots.
// Combine send: every valid slot's row goes back to its source rank, into [global expert][source token]
// of its recv area; the last block then flags every rank. Combine receive: wait for every rank's flag,
// then sum each token's top-k rows, weighted, in float32.
// Signatures: block 0 of a send phase puts this call's signature (ll_signature, 16 bytes) into every rank's
// slot for this rank before the quiet that precedes the counts or flags, so a receiver that saw them
// compares each source's call with its own before it uses any count (send_signature, signatures_agree).
#include <nvshmem.h>
#include <nvshmemx.h>

#include "../kernels/ll_device.cuh"
#include "low_latency.cuh"

namespace moe_a2a::nvshmem_ll {

namespace {

constexpr int kWarps = kLLThreads / 32;

__device__ __forceinline__ int* signals(const Ctx& c) {
    return reinterpret_cast<int*>(c.sym) + c.set * kLLSetSignalInts;
}
__device__ __forceinline__ char* set_base(const Ctx& c) {
    return c.sym + kLLSignalBytes + static_cast<int64_t>(c.set) * c.set_bytes;
}
__device__ __forceinline__ char* recv_area(const Ctx& c) { return set_base(c) + c.recv_offset; }
__device__ __forceinline__ int* set_workspace(const Ctx& c) { return c.workspace + c.set * kLLWorkspaceSetInts; }

// Whether this rank leaves rank r (itself included) out of this call: r is masked, or this rank is (a masked
// rank exchanges with no one). Left-out ranks are neither waited for nor sent rows, counts or flags.
__device__ __forceinline__ bool skips(const Ctx& c, int r) {
    return ld_volatile(c.mask + r) != 0 || ld_volatile(c.mask + c.rank) != 0;
}

// With the probe on, thread 0 of the block records the step it reached (see LLHostError::block_step).
__device__ __forceinline__ void probe_step(const Ctx& c, int step) {
    if (c.probe != nullptr && threadIdx.x == 0 && blockIdx.x < kLLProbeBlocks)
        c.probe->block_step[blockIdx.x] = (c.call << 4) | step;
}

// The peer's copy of symmetric address `p` when NVSHMEM maps it into this process (NVLink / same GPU).
__device__ __forceinline__ char* peer_ptr(const Ctx& c, void* p, int pe) {
    return c.use_nvlink ? static_cast<char*>(nvshmem_ptr(p, pe)) : nullptr;
}

// Sets a peer's int signal after this rank's earlier data (which the caller completed with quiet).
__device__ __forceinline__ void signal_set(const Ctx& c, int* sig, int value, int pe) {
    if (int* mapped = reinterpret_cast<int*>(peer_ptr(c, sig, pe))) st_release_sys(mapped, value);
    else nvshmem_int_atomic_set(sig, value, pe);
}

// Waits (one thread) until the flag has reached `tag` (wrap-safe): relaxed polling, one acquire fence.
// False after a timeout or once this rank aborted. Adds the nanoseconds waited to *wait_ns when given.
__device__ bool wait_flag(const Ctx& c, const int* flag, int tag, int phase, int peer,
                          unsigned long long* wait_ns) {
    if (skips(c, peer)) return false;
    const uint64_t start = global_timer_ns();
    uint64_t now = start;
    while (!counter_reached(ld_relaxed_sys(flag), tag)) {
        now = global_timer_ns();
        if (ld_volatile(c.workspace + kLLWorkspaceAbort)) return false;
        if (ld_volatile(c.mask + peer)) return false;  // masked meanwhile (by another block's timeout)
        if (now - start > c.timeout_ns) {
            if (c.shrink) atomicExch(c.mask + peer, 1);
            else record_timeout(c, phase, peer, tag);
            return false;
        }
    }
    fence_acq_rel_sys();
    if (wait_ns != nullptr) atomicAdd(wait_ns, static_cast<unsigned long long>(now - start));
    return true;
}

// Block-wide, in one block of a send phase: this call's signature `sig` into this rank's slot of the set on
// every rank (the slot is a symmetric address). Plain stores where NVSHMEM maps the peer, else a put from
// this rank's own slot; each thread's quiet before the arrival completes them before any count or flag.
__device__ void send_signature(const Ctx& c, const int4& sig) {
    int* mine = signature_slot(c.sym, c.set, c.rank);
    if (threadIdx.x == 0) {
        *reinterpret_cast<int4*>(mine) = sig;
        __threadfence_system();  // the source of the puts below, which the NIC reads
    }
    __syncthreads();
    for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) {
        if (r == c.rank || skips(c, r)) continue;
        if (int* mapped = reinterpret_cast<int*>(peer_ptr(c, mine, r))) st_na_v4(reinterpret_cast<int4*>(mapped), sig);
        else nvshmem_putmem_nbi(mine, mine, sizeof(int4), r);
    }
}

// Warp 0 of a block waits for the dispatch counts sig[0..n) of this call (signal i from source i % R):
// each lane polls every 32nd signal with relaxed loads, the warp sleeps briefly between rounds, and one
// acquire fence follows. values[i] gets signal i, or 0 (no rows) for one that timed out. One polling warp
// per block instead of one thread per signal keeps the pollers from crowding out the senders' stores
// while the other ranks are still sending. Adds, in block 0, the nanoseconds waited for source s's first
// signal to stats[s] when given. At the timeout, the sources whose first count came are compared with
// `mine` first: a source whose call has fewer experts never sends some counts, and the difference is the
// error to report, not the wait.
__device__ void warp_wait_counts(const Ctx& c, const int* sig, int n, int tag, unsigned long long* stats,
                                 int* values, const int4& mine) {
    const int lane = threadIdx.x & 31, R = c.num_ranks;
    const uint32_t want = static_cast<uint32_t>(tag) & 0xFFFFu;
    uint32_t pending = 0;  // bit j: signal lane + 32 j not seen yet (signals of left-out sources: 0 at once)
    for (int j = 0, i = lane; i < n; ++j, i += 32) {
        if (skips(c, i % R)) values[i] = 0;
        else pending |= 1u << j;
    }
    // Lane 0's clock for the whole warp, and every decision to stop taken by the warp as one: the lanes meet at
    // warp-synchronous calls (the ballot below, __syncwarp), where a lane that stopped alone would leave the
    // others waiting forever (lanes can leave the loop above at different times, so their clocks differ).
    const uint64_t start = __shfl_sync(0xFFFFFFFFu, global_timer_ns(), 0);
    uint32_t nap_ns = 32;
    while (true) {
        const uint64_t now = global_timer_ns();
        for (int j = 0, i = lane; i < n; ++j, i += 32) {
            if (!((pending >> j) & 1u)) continue;
            const int v = ld_relaxed_sys(sig + i);
            if ((static_cast<uint32_t>(v) >> 16) != want) continue;
            values[i] = v;
            pending &= ~(1u << j);
            if (stats != nullptr && i < R) atomicAdd(stats + i, static_cast<unsigned long long>(now - start));
        }
        const unsigned waiting = __ballot_sync(0xFFFFFFFFu, pending != 0);
        if (waiting == 0) break;
        const bool aborted = __any_sync(0xFFFFFFFFu, ld_volatile(c.workspace + kLLWorkspaceAbort) != 0);
        const bool late = __any_sync(0xFFFFFFFFu, global_timer_ns() - start > c.timeout_ns);
        if (aborted || late) {
            if (late && !aborted) {
                fence_acq_rel_sys();
                for (int j = 0, i = lane; i < R && i < n; ++j, i += 32)  // signal i < R: source i's first
                    if (!((pending >> j) & 1u) && !skips(c, i))
                        signatures_agree(c, mine, signature_slot(c.sym, c.set, i), kLLPhaseDispatchRecv, i);
            }
            if (late && c.shrink) {
                // Every source with a count still missing is masked; all of its counts then read as 0 (also
                // those that came), so the call goes on without it as a whole.
                for (int j = 0, i = lane; i < n; ++j, i += 32)
                    if ((pending >> j) & 1u) atomicExch(c.mask + i % R, 1);
                __syncwarp();
                for (int j = 0, i = lane; i < n; ++j, i += 32)
                    if (ld_volatile(c.mask + i % R)) values[i] = 0;
                break;
            }
            if (late && lane == __ffs(waiting) - 1)  // name the first source still missing
                record_timeout(c, kLLPhaseDispatchRecv, (lane + 32 * (__ffs(pending) - 1)) % R, tag);
            for (int j = 0, i = lane; i < n; ++j, i += 32)
                if ((pending >> j) & 1u) values[i] = 0;
            break;
        }
        __nanosleep(nap_ns);
        nap_ns = min(nap_ns * 2, 256u);  // short naps: this is the low-latency path
    }
    fence_acq_rel_sys();
    __syncwarp();
}

// arrive_last once this block's puts are complete (every thread ran quiet) and each thread's stores are
// fenced; the last block fences again before it signals the peers (puts may travel through the NIC).
__device__ bool arrive_last_after_quiet(int* arrive, int* epoch, int tag, int* s_flag) {
    nvshmem_quiet();
    __threadfence_system();
    const bool last = arrive_last(arrive, epoch, tag, s_flag);
    if (last) __threadfence_system();
    return last;
}

// ------------------------------------------------------------------------------------------ dispatch
struct DispatchShared {
    int scan[kLLMaxExperts + 1];   // send: pairs per global expert; receive: rows before (l, s) pair i
    int warp[32];
    int flag;
    const char* src[kLLThreads];   // receive: message payload of each row of a round
    int dst[kLLThreads];           // its slot l * R * M + j
};

template <bool kFp8>
__device__ void dispatch_send(const Ctx& c, const LLDispatchArgs& a, int tag, int* s_idx, DispatchShared& sh) {
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, M = a.max_tokens, R = c.num_ranks, L = E / R;
    const int n = T * K, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < E; i += blockDim.x) sh.scan[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x) {
        const int64_t e = __ldg(a.topk_idx + i);
        const int v = e >= 0 && e < E ? static_cast<int>(e) : -1;
        s_idx[i] = v;
        if (v >= 0) atomicAdd(sh.scan + v, 1);
    }
    __syncthreads();

    if (blockIdx.x == 0) send_signature(c, ll_signature(a));

    char* stage = set_base(c);  // the send area starts the set
    char* recv = recv_area(c);
    const int64_t msg = ll_msg_bytes(a.hidden, kFp8);
    const int chunks = a.hidden / 8;  // 16-byte chunks of a BF16 row
    const int4* x = reinterpret_cast<const int4*>(a.x);
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        char* row = stage + t * msg;
        if (tid == 0) *reinterpret_cast<int*>(row) = t;
        char* payload = row + 16;
        // Uniform trip count: the FP8 path shuffles across lanes (16 lanes per 128 channels).
        for (int ch0 = 0; ch0 < chunks; ch0 += blockDim.x) {
            const int ch = ch0 + tid;
            const bool active = ch < chunks;
            const int4 v = active ? ld_nc_v4(x + static_cast<int64_t>(t) * chunks + ch) : make_int4(0, 0, 0, 0);
            if constexpr (kFp8) {
                float scale;
                const uint2 packed = cast_fp8_chunk(v, a.round_scale, &scale);
                if (active) {
                    *reinterpret_cast<uint2*>(payload + ch * 8) = packed;
                    if ((lane & 15) == 0) reinterpret_cast<float*>(payload + a.hidden)[ch / 16] = scale;
                }
            } else {
                if (active) reinterpret_cast<int4*>(payload)[ch] = v;
            }
        }
        __threadfence_system();  // the staged message is visible to the NIC and to peers' loads
        __syncthreads();
        for (int k = warp; k < K; k += kWarps) {
            const int flat = t * K + k, e = s_idx[flat];
            if (e < 0) continue;
            int pos = 0;
            for (int base = 0; base < flat; base += 32)
                pos += __popc(__ballot_sync(0xFFFFFFFFu, base + lane < flat && s_idx[base + lane] == e));
            if (pos >= M) continue;  // more than M pairs of one rank to one expert: dropped (not reachable
                                     // with distinct top-k ids)
            const int dst = e / L, l = e - dst * L;
            if (skips(c, dst)) continue;
            char* remote = recv + (static_cast<int64_t>(l * R + c.rank) * M + pos) * msg;
            if (char* mapped = peer_ptr(c, remote, dst))
                warp_copy<true>(reinterpret_cast<int4*>(mapped), reinterpret_cast<const int4*>(row),
                                static_cast<int>(msg / 16), lane);
            else
                nvshmemx_putmem_nbi_warp(remote, row, msg, dst);
        }
    }

    // Data of every block complete, then one count per (expert's rank, local expert).
    probe_step(c, kLLStepSent);
    int* ws = set_workspace(c);
    const bool last = arrive_last_after_quiet(ws + kLLWsDispatchArrive, ws + kLLWsDispatchEpoch, tag, &sh.flag);
    probe_step(c, kLLStepArrived);
    if (last) {
        for (int e = tid; e < E; e += blockDim.x) {
            const int dst = e / L, l = e - dst * L;
            if (skips(c, dst)) continue;
            const int value = static_cast<int>((static_cast<uint32_t>(tag) << 16) | static_cast<uint32_t>(min(sh.scan[e], M)));
            signal_set(c, signals(c) + kSigDispatch + l * R + c.rank, value, dst);
        }
    }
}

__device__ void dispatch_recv(const Ctx& c, const LLDispatchArgs& a, int tag, DispatchShared& sh) {
    const int R = c.num_ranks, E = a.num_experts, M = a.max_tokens, RM = R * M;
    const int tid = threadIdx.x, G = gridDim.x;
    // Pair i = l * R + s: messages of source s for local expert l (0 for a source that timed out). The
    // signals land in sh.scan, which the scan below overwrites only after every thread read its count.
    const int4 mine = ll_signature(a);
    if (tid < 32) {
        unsigned long long* stats =
            blockIdx.x == 0 && a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats) : nullptr;
        warp_wait_counts(c, signals(c) + kSigDispatch, E, tag, stats, sh.scan, mine);
    }
    __syncthreads();
    probe_step(c, kLLStepWaited);
    // Every source's counts came (its signature was put before them): compare before using any.
    if (!ld_volatile(c.workspace + kLLWorkspaceAbort))
        for (int s = tid; s < R; s += blockDim.x)
            if (!skips(c, s)) signatures_agree(c, mine, signature_slot(c.sym, c.set, s), kLLPhaseDispatchRecv, s);
    __syncthreads();
    const int count = tid < E ? min(static_cast<int>(static_cast<uint32_t>(sh.scan[tid]) & 0xFFFFu), M) : 0;
    const int num_rows = scan_received_counts(a, count, R, sh.scan, sh.warp);

    // This block's contiguous share of the rows, in rounds of one row per thread.
    const int per = (num_rows + G - 1) / G;
    const int first = min(num_rows, static_cast<int>(blockIdx.x) * per), last = min(num_rows, first + per);
    const int64_t msg = ll_msg_bytes(a.hidden, a.fp8);
    const char* recv = recv_area(c);
    for (int r0 = first; r0 < last; r0 += blockDim.x) {
        const int n = min(static_cast<int>(blockDim.x), last - r0);
        if (tid < n) {
            const int w = r0 + tid;
            const int p = find_range(sh.scan, E, w);
            const int l = p / R, j = w - sh.scan[p];
            const char* m = recv + (static_cast<int64_t>(p) * M + j) * msg;
            const int slot = sh.scan[p] - sh.scan[l * R] + j;
            a.src_info[static_cast<int64_t>(l) * RM + slot] = ld_cg(reinterpret_cast<const int*>(m));
            sh.src[tid] = m + 16;
            sh.dst[tid] = l * RM + slot;
        }
        __syncthreads();
        copy_received_rows(a, sh.src, sh.dst, n, RM);
    }
}

// One kernel (one name in a profile) for every phase split, as DeepEP's: `phases` is kLLSend, kLLRecv or both.
template <bool kFp8>
__global__ void __launch_bounds__(kLLThreads, 1) dispatch_kernel(const __grid_constant__ Ctx c,
                                                                 const __grid_constant__ LLDispatchArgs a,
                                                                 const int phases) {
    extern __shared__ int s_idx[];  // [T * K] expert ids (send phase)
    __shared__ DispatchShared sh;
    const int* epoch = set_workspace(c) + kLLWsDispatchEpoch;
    // A send phase starts the next epoch; a receive alone waits for the one its send phase started.
    const int tag = counter_add(ld_volatile(epoch), (phases & kLLSend) ? 1 : 0);
    probe_step(c, kLLStepStart);
    if ((phases & kLLSend) != 0) dispatch_send<kFp8>(c, a, tag, s_idx, sh);
    if ((phases & kLLRecv) != 0) dispatch_recv(c, a, tag, sh);
    probe_step(c, kLLStepDone);
}

// ------------------------------------------------------------------------------------------ combine
struct CombineShared {
    int scan[kLLMaxExperts + 1];   // send: rows before (l, s) pair i
    int begin[kLLMaxExperts];      // send: first slot of pair i
    int ok[kMaxRanks];             // receive: rank r's flag arrived
    int warp[32];
    int flag;
};

template <int kFormat>
__device__ void combine_send(const Ctx& c, const CombineArgs& ca, int tag, CombineShared& sh) {
    const LLCombineArgs& a = ca.a;
    const int R = c.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, RM = R * M;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (blockIdx.x == 0) send_signature(c, ll_signature(a));
    int count = 0;
    if (tid < E) {
        const int64_t range = __ldg(a.layout_range + tid);
        const int b = min(max(static_cast<int>(range >> 32), 0), RM);
        count = min(max(static_cast<int>(range & 0xFFFFFFFFLL), 0), min(M, RM - b));
        sh.begin[tid] = b;
    }
    int num_rows;
    const int before = block_exclusive_scan(count, sh.warp, &num_rows);
    if (tid <= E) sh.scan[tid] = tid < E ? before : num_rows;
    __syncthreads();

    const int row_int4 = a.hidden / 8;
    const int64_t row_bytes = 2LL * a.hidden;  // slot stride
    constexpr bool encode = kFormat != kLLFormatBF16Combine;
    const int64_t wire_bytes = ll_combine_row_bytes(a.hidden, kFormat);  // what travels of a slot
    char* send = set_base(c);
    char* recv = recv_area(c);
    const int4* x = static_cast<const int4*>(a.x);
    for (int w = blockIdx.x * kWarps + warp; w < num_rows; w += gridDim.x * kWarps) {
        const int p = find_range(sh.scan, E, w);
        const int l = p / R, s = p - l * R;
        const int slot = sh.begin[p] + (w - sh.scan[p]);
        const int t = __ldg(ca.src_info + static_cast<int64_t>(l) * RM + slot);
        if (t < 0 || t >= M || skips(c, s)) continue;
        char* remote = recv + (static_cast<int64_t>(c.rank * L + l) * M + t) * row_bytes;
        const int64_t at = (static_cast<int64_t>(l) * RM + slot) * row_int4;
        if (char* mapped = peer_ptr(c, remote, s)) {
            if constexpr (encode) encode_row_warp<kFormat>(x + at, mapped, a.hidden, lane);
            else warp_copy<false>(reinterpret_cast<int4*>(mapped), x + at, row_int4, lane);
        } else {
            int4* staged = reinterpret_cast<int4*>(send) + at;
            // RDMA reads from registered (symmetric) memory: stage the row there (encoded in place for a
            // zero-copy input).
            if (encode || a.copy_rows) {
                if constexpr (encode) encode_row_warp<kFormat>(x + at, reinterpret_cast<char*>(staged), a.hidden, lane);
                else warp_copy<false>(staged, x + at, row_int4, lane);
                __syncwarp();
                __threadfence_system();
            }
            nvshmemx_putmem_nbi_warp(remote, staged, wire_bytes, s);
        }
    }
    probe_step(c, kLLStepSent);
    int* ws = set_workspace(c);
    const bool last = arrive_last_after_quiet(ws + kLLWsCombineArrive, ws + kLLWsCombineEpoch, tag, &sh.flag);
    probe_step(c, kLLStepArrived);
    if (last)
        for (int r = tid; r < R; r += blockDim.x)
            if (!skips(c, r)) signal_set(c, signals(c) + kSigCombine + c.rank, tag, r);
}

template <int kFormat>
__device__ void combine_recv(const Ctx& c, const CombineArgs& ca, int tag, CombineShared& sh, int* dyn) {
    const LLCombineArgs& a = ca.a;
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, R = c.num_ranks, L = E / R, M = a.max_tokens;
    const int G = gridDim.x, tid = threadIdx.x;
    for (int r = tid; r < R; r += blockDim.x) {
        unsigned long long* stat =
            blockIdx.x == 0 && a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats + r) : nullptr;
        bool ok = wait_flag(c, signals(c) + kSigCombine + r, tag, kLLPhaseCombineRecv, r, stat);
        if (ok) ok = signatures_agree(c, ll_signature(a), signature_slot(c.sym, c.set, r), kLLPhaseCombineRecv, r);
        sh.ok[r] = ok;
    }
    __syncthreads();
    probe_step(c, kLLStepWaited);
    const int my_tokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + G - 1) / G : 0;
    if (my_tokens == 0) return;
    const int row_int4 = a.hidden / 8;
    const int4** s_row = reinterpret_cast<const int4**>(dyn);                  // [my_tokens * K]
    float* s_w = reinterpret_cast<float*>(dyn + 2 * my_tokens * K);            // [my_tokens * K]
    const int4* recv = reinterpret_cast<const int4*>(recv_area(c));
    for (int p = tid; p < my_tokens * K; p += blockDim.x) {
        const int q = p / K, k = p - q * K, t = blockIdx.x + q * G;
        const int64_t e = __ldg(a.topk_idx + static_cast<int64_t>(t) * K + k);
        const bool valid = e >= 0 && e < E && sh.ok[e / L];
        s_row[p] = valid ? recv + (e * M + t) * row_int4 : nullptr;
        s_w[p] = __ldg(a.topk_weights + static_cast<int64_t>(t) * K + k);
    }
    __syncthreads();
    reduce_topk_rows<kFormat>(s_row, s_w, my_tokens, K, a.hidden, a.out);
}

// Like dispatch_kernel: one kernel for every phase split; one instance per wire format (a.a.format).
template <int kFormat>
__global__ void __launch_bounds__(kLLThreads, 1) combine_kernel(const __grid_constant__ Ctx c,
                                                                const __grid_constant__ CombineArgs a,
                                                                const int phases) {
    extern __shared__ int dyn[];
    __shared__ CombineShared sh;
    const int* epoch = set_workspace(c) + kLLWsCombineEpoch;
    const int tag = counter_add(ld_volatile(epoch), (phases & kLLSend) ? 1 : 0);
    probe_step(c, kLLStepStart);
    if ((phases & kLLSend) != 0) combine_send<kFormat>(c, a, tag, sh);
    if ((phases & kLLRecv) != 0) combine_recv<kFormat>(c, a, tag, sh, dyn);
    probe_step(c, kLLStepDone);
}

std::string launch_error(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return "";
    return std::string("moe_a2a internode low-latency: ") + what + ": " + cudaGetErrorString(e);
}

// Dynamic shared memory beyond the default needs opting in.
std::string allow_smem(const void* kernel, size_t smem) {
    if (smem > 16 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess)
        return launch_error("cudaFuncSetAttribute");
    return "";
}

}  // namespace

std::string launch_dispatch(const Ctx& c, const LLDispatchArgs& a, int phases, int num_sms, cudaStream_t stream) {
    const size_t smem = (phases & kLLSend) ? sizeof(int) * static_cast<size_t>(a.num_tokens) * a.num_topk : 0;
    // The receive phase reads the format from the arguments; it runs the send's instance all the same, so
    // a hooked call's two launches carry one kernel name.
    void (*kernel)(Ctx, LLDispatchArgs, int) = a.fp8 ? dispatch_kernel<true> : dispatch_kernel<false>;
    std::string err = allow_smem(reinterpret_cast<const void*>(kernel), smem);
    if (!err.empty()) return err;
    kernel<<<num_sms, kLLThreads, smem, stream>>>(c, a, phases);
    return launch_error("dispatch launch");
}

std::string launch_combine(const Ctx& c, const CombineArgs& a, int phases, int num_sms, cudaStream_t stream) {
    size_t smem = 0;
    if (phases & kLLRecv) {
        const size_t pairs = static_cast<size_t>((a.a.num_tokens + num_sms - 1) / num_sms) * a.a.num_topk;
        smem = pairs * (sizeof(void*) + sizeof(float));
    }
    const int format = a.a.format;
    void (*kernel)(Ctx, CombineArgs, int) = format == kLLFormatFP8Combine      ? combine_kernel<kLLFormatFP8Combine>
                                          : format == kLLFormatLogFMTCombine ? combine_kernel<kLLFormatLogFMTCombine>
                                                                             : combine_kernel<kLLFormatBF16Combine>;
    std::string err = allow_smem(reinterpret_cast<const void*>(kernel), smem);
    if (!err.empty()) return err;
    kernel<<<num_sms, kLLThreads, smem, stream>>>(c, a, phases);
    return launch_error("combine launch");
}

}  // namespace moe_a2a::nvshmem_ll
