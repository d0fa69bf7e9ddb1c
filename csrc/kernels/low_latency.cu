// Low-latency dispatch/combine over CUDA IPC (layout in low_latency.cuh). Receivers pull.
//
// Dispatch send: every block loads the routing into shared memory; warps build, one global expert each,
// the list of this rank's tokens routed to it (by token, then top-k slot); blocks cast their tokens once
// (FP8 with per-128 scales, or BF16) into this rank's stage area. The last block to finish releases one
// flag per destination rank. No per-token flag and no system fence per token.
// Dispatch receive: every block waits for the R flags, reads the counts of its local experts from every
// source, scans them into the packed slot layout ([expert][source][token]), then copies a contiguous share
// of all received rows (16-byte loads, many in flight per thread) from the sources' stage areas straight
// to their final slots, and the scales into their column-major slots.
// Combine send: copy the valid rows of the expert outputs into this rank's send area unless the caller
// wrote them there (zero copy), or encode them there in the call's format (FP8, LogFMT: wire_format.cuh;
// one warp a row, in place for a zero-copy input), publish each (expert, source) first slot, release one
// flag per rank. Receivers read the encoded rows and decode them to float32 before the weighted sum.
// Combine receive: every block waits for the R flags, finds the slot of each of its (token, top-k) pairs
// (the rank of the pair among this rank's pairs to that expert, plus the published first slot) and sums the
// weighted rows in float32 straight from the experts' send areas, all top-k loads of a chunk in flight.
// Without a hook, send and receive run as one kernel (one launch, no drain in between).
// Rank mask (kLLWorkspaceMask, local): masked ranks are skipped by every wait and release, so their rows count
// as absent; with LLCtx::shrink a wait that times out masks its peer instead of failing, and the call goes on.
// Every flag carries the sender's signature (ll_signature, stored at the start of the send phase and
// released by the flag as the staged rows are): a receiver compares it with its own call once the flag is
// there, before it reads anything of that sender, and records a mismatch (naming the field, both values and
// the peer) instead of copying rows of another shape. One 16-byte store per peer on the send side, one load
// per peer and block on the receive side.
#include "kernels/ll_device.cuh"

namespace moe_a2a {

namespace {

constexpr int kWarps = kLLThreads / 32;

__device__ __forceinline__ int* signals(const LLCtx& c, int r) {
    return reinterpret_cast<int*>(c.peers[r]) + c.set * kLLSetSignalInts;
}

__device__ __forceinline__ char* set_base(const LLCtx& c, int r) {
    return c.peers[r] + kLLSignalBytes + static_cast<int64_t>(c.set) * c.set_bytes;
}

__device__ __forceinline__ char* stage_area(const LLCtx& c, int r) { return set_base(c, r) + c.stage_offset; }

__device__ __forceinline__ int* set_workspace(const LLCtx& c) { return c.workspace + c.set * kLLWorkspaceSetInts; }

__device__ __forceinline__ int* rank_mask(const LLCtx& c) { return c.workspace + kLLWorkspaceMask; }

// Whether this rank leaves rank r (itself included) out of this call: r is masked, or this rank is (a masked
// rank exchanges with no one, as the reference backend's). Left-out ranks are neither waited for nor sent
// flags: their rows count as absent, their experts' outputs as zero.
__device__ __forceinline__ bool skips(const LLCtx& c, int r) {
    return ld_volatile(rank_mask(c) + r) != 0 || ld_volatile(rank_mask(c) + c.rank) != 0;
}

// Waits (one thread) until *flag of `peer` has reached `tag` (wrap-safe); false for a masked peer, after a
// timeout (an error, or with c.shrink the peer is masked from then on) or once this rank aborted. Adds the
// nanoseconds waited to *wait_ns when given. Relaxed polling, one acquire fence.
__device__ bool wait_tag(const LLCtx& c, const int* flag, int tag, int phase, int peer,
                         unsigned long long* wait_ns) {
    if (skips(c, peer)) return false;
    if (counter_reached(ld_relaxed_sys(flag), tag)) {
        fence_acq_rel_sys();
        return true;
    }
    const uint64_t start = global_timer_ns();
    uint64_t now = start;
    bool ok = false;
    while (true) {
#pragma unroll 1
        for (int i = 0; i < 64 && !ok; ++i) ok = counter_reached(ld_relaxed_sys(flag), tag);
        now = global_timer_ns();
        if (ok) {
            fence_acq_rel_sys();
            break;
        }
        if (ld_volatile(c.workspace + kLLWorkspaceAbort)) return false;
        if (ld_volatile(rank_mask(c) + peer)) return false;  // masked meanwhile (by another block's timeout)
        if (now - start > c.timeout_ns) {
            if (c.shrink) atomicExch(rank_mask(c) + peer, 1);
            else record_timeout(c, phase, peer, tag);
            return false;
        }
    }
    if (wait_ns != nullptr) atomicAdd(wait_ns, static_cast<unsigned long long>(now - start));
    return true;
}

// Phase clock stamps (one thread): `at` is kClockSent or kClockReady; the start is a minimum over the
// blocks, the end a maximum.
enum { kClockStart = 0, kClockSent = 1, kClockReady = 2, kClockEnd = 3 };
__device__ __forceinline__ void stamp(const LLCtx& c, int at) {
    if (c.clock != nullptr) c.clock[at] = global_timer_ns();
}
__device__ __forceinline__ void stamp_start(const LLCtx& c) {
    if (c.clock != nullptr && threadIdx.x == 0) atomicMin(c.clock + kClockStart, global_timer_ns());
}
__device__ __forceinline__ void stamp_end(const LLCtx& c) {
    __syncthreads();
    if (c.clock != nullptr && threadIdx.x == 0) atomicMax(c.clock + kClockEnd, global_timer_ns());
}

// Block 0 of a send phase, first thing: this call's signature into this rank's slot of the set on every rank.
// The flags released at the end of the send phase order it as they order the staged rows (every block's
// stores, then its system fence and arrival, then the last block's release stores), and it is written long
// before them, so the releases wait for nothing more than before.
__device__ __forceinline__ void send_signature(const LLCtx& c, const int4& sig) {
    if (blockIdx.x == 0 && threadIdx.x < c.num_ranks && !skips(c, threadIdx.x))
        st_na_v4(reinterpret_cast<int4*>(signature_slot(c.peers[threadIdx.x], c.set, c.rank)), sig);
}

// ------------------------------------------------------------------------------------------ dispatch
struct DispatchShared {
    int scan[kLLMaxExperts + 1];   // received rows before (local expert, source) pair i, then the total
    int warp[32];
    int ok[kLLMaxRanks];
    int flag;
    const char* src[kLLThreads];   // staged row of each row of a round
    int dst[kLLThreads];           // its slot l * R * M + j
};

template <bool kFp8>
__device__ void dispatch_send(const LLCtx& c, const LLDispatchArgs& a, int tag, int* s_idx, int* s_flag) {
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, M = a.max_tokens, n = T * K;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    char* stage = stage_area(c, c.rank);
    int* lists = reinterpret_cast<int*>(stage + ll_lists_offset(M, a.hidden));
    const int64_t row_bytes = ll_stage_row_bytes(a.hidden, kFp8);

    send_signature(c, ll_signature(a));
    for (int i = tid; i < n; i += blockDim.x) {
        const int64_t e = __ldg(a.topk_idx + i);
        s_idx[i] = e >= 0 && e < E ? static_cast<int>(e) : -1;
    }
    __syncthreads();
    // One warp per global expert: the sources' tokens routed to it, in (token, slot) order.
    for (int e = blockIdx.x * kWarps + warp; e < E; e += gridDim.x * kWarps) {
        int* list = lists + static_cast<int64_t>(e) * (M + 1);
        int count = 0;
        for (int base = 0; base < n; base += 32) {
            const bool hit = base + lane < n && s_idx[base + lane] == e;
            const unsigned mask = __ballot_sync(0xFFFFFFFFu, hit);
            if (hit) {
                const int pos = count + __popc(mask & lanemask_lt());
                if (pos < M) list[1 + pos] = (base + lane) / K;
            }
            count += __popc(mask);
        }
        if (lane == 0) list[0] = min(count, M);
    }

    // Tokens of this block (t = blockIdx.x + q * gridDim.x), 16-byte chunks flattened over (q, chunk) so
    // every thread has four loads in flight.
    const int chunks = a.hidden / 8;
    const int my_tokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    const int total = my_tokens * chunks;
    const int4* x = reinterpret_cast<const int4*>(a.x);
    constexpr int kU = 4;
    // Uniform trip count: the FP8 path shuffles across lanes.
    for (int i0 = 0; i0 < total; i0 += kU * blockDim.x) {
        int4 v[kU];
        int t[kU], ch[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int i = i0 + u * blockDim.x + tid;
            const int q = i / chunks;
            t[u] = blockIdx.x + q * gridDim.x;
            ch[u] = i - q * chunks;
            v[u] = i < total ? ld_nc_v4(x + static_cast<int64_t>(t[u]) * chunks + ch[u]) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const bool active = i0 + u * blockDim.x + tid < total;
            char* row = stage + t[u] * row_bytes;
            if constexpr (kFp8) {
                // 16 lanes hold one 128-channel block (chunks is a multiple of 16).
                float scale;
                const uint2 packed = cast_fp8_chunk(v[u], a.round_scale, &scale);
                if (active) {
                    *reinterpret_cast<uint2*>(row + ch[u] * 8) = packed;
                    if ((lane & 15) == 0) reinterpret_cast<float*>(row + a.hidden)[ch[u] / 16] = scale;
                }
            } else {
                if (active) st_na_v4(reinterpret_cast<int4*>(row) + ch[u], v[u]);
            }
        }
    }

    // Everything of this rank is staged once the last block arrives: it tells every rank.
    int* ws = set_workspace(c);
    if (arrive_last(ws + kLLWsDispatchArrive, ws + kLLWsDispatchEpoch, tag, s_flag)) {
        if (tid < c.num_ranks && !skips(c, tid)) st_release_sys(signals(c, tid) + kLLSigDispatch + c.rank, tag);
        if (tid == 0) stamp(c, kClockSent);
    }
}

__device__ void dispatch_recv(const LLCtx& c, const LLDispatchArgs& a, int tag, DispatchShared& sh) {
    const int R = c.num_ranks, E = a.num_experts, L = E / R, M = a.max_tokens, RM = R * M;
    const int tid = threadIdx.x, G = gridDim.x;
    if (tid < R) {
        unsigned long long* stat =
            blockIdx.x == 0 && a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats + tid) : nullptr;
        bool ok = wait_tag(c, signals(c, c.rank) + kLLSigDispatch + tid, tag, kLLPhaseDispatchRecv, tid, stat);
        // Source tid's counts and rows are read only if its call matches this one.
        if (ok) ok = signatures_agree(c, ll_signature(a), signature_slot(c.peers[c.rank], c.set, tid),
                                      kLLPhaseDispatchRecv, tid);
        sh.ok[tid] = ok;
    }
    __syncthreads();
    if (blockIdx.x == 0 && tid == 0) stamp(c, kClockReady);
    // Pair i = l * R + s: rows of source s for local expert l (0 for a source that timed out).
    int count = 0;
    if (tid < E) {
        const int l = tid / R, s = tid - (tid / R) * R;
        if (sh.ok[s]) {
            const int* lists = reinterpret_cast<const int*>(stage_area(c, s) + ll_lists_offset(M, a.hidden));
            count = min(max(ld_cg(lists + static_cast<int64_t>(c.rank * L + l) * (M + 1)), 0), M);
        }
    }
    const int num_rows = scan_received_counts(a, count, R, sh.scan, sh.warp);

    // This block's contiguous share of the rows, in rounds of one row per thread.
    const int per = (num_rows + G - 1) / G;
    const int first = min(num_rows, static_cast<int>(blockIdx.x) * per), last = min(num_rows, first + per);
    const int64_t row_bytes = ll_stage_row_bytes(a.hidden, a.fp8);
    for (int r0 = first; r0 < last; r0 += blockDim.x) {
        const int n = min(static_cast<int>(blockDim.x), last - r0);
        if (tid < n) {
            const int w = r0 + tid;
            const int p = find_range(sh.scan, E, w);
            const int l = p / R, s = p - (p / R) * R, j = w - sh.scan[p];
            const int* lists = reinterpret_cast<const int*>(stage_area(c, s) + ll_lists_offset(M, a.hidden));
            const int t = min(max(ld_cg(lists + static_cast<int64_t>(c.rank * L + l) * (M + 1) + 1 + j), 0), M - 1);
            const int slot = sh.scan[p] - sh.scan[l * R] + j;
            a.src_info[static_cast<int64_t>(l) * RM + slot] = t;
            sh.src[tid] = stage_area(c, s) + t * row_bytes;
            sh.dst[tid] = l * RM + slot;
        }
        __syncthreads();
        copy_received_rows(a, sh.src, sh.dst, n, RM);
    }
}

// One kernel (one name in a profile) for every phase split, as DeepEP's: `phases` is kLLSend, kLLRecv or both.
template <bool kFp8>
__global__ void __launch_bounds__(kLLThreads, 1) dispatch_kernel(LLCtx c, LLDispatchArgs a, int phases) {
    extern __shared__ int s_idx[];  // [T * K] expert ids (send phase)
    __shared__ DispatchShared sh;
    const int* epoch = set_workspace(c) + kLLWsDispatchEpoch;
    // A send phase starts the next epoch; a receive alone waits for the one its send phase started.
    stamp_start(c);
    const int tag = counter_add(ld_volatile(epoch), (phases & kLLSend) ? 1 : 0);
    if ((phases & kLLSend) != 0) dispatch_send<kFp8>(c, a, tag, s_idx, &sh.flag);
    if ((phases & kLLRecv) != 0) dispatch_recv(c, a, tag, sh);
    stamp_end(c);
}

// ------------------------------------------------------------------------------------------ combine
struct CombineShared {
    int scan[kLLMaxExperts + 1];   // send: valid rows before local expert l; receive: first slot per expert
    int warp[32];
    int ok[kLLMaxRanks];
    int flag;
    int off[kLLThreads];           // send: row offset l * R * M + j of each row of a round
};

template <int kFormat>
__device__ void combine_send(const LLCtx& c, const LLCombineArgs& a, int tag, CombineShared& sh) {
    const int R = c.num_ranks, E = a.num_experts, L = E / R, RM = R * a.max_tokens;
    const int tid = threadIdx.x, G = gridDim.x;
    send_signature(c, ll_signature(a));
    // Publish where each source's rows start in every local expert (read by the token owners).
    if (blockIdx.x == 0 && tid < E)
        signals(c, c.rank)[kLLSigBegins + tid] = static_cast<int>(__ldg(a.layout_range + tid) >> 32);
    constexpr bool encode = kFormat != kLLFormatBF16Combine;
    if (a.copy_rows || encode) {
        int rows = 0;
        if (tid < L) {
            const int64_t range = __ldg(a.layout_range + tid * R + R - 1);
            rows = min(max(static_cast<int>(range >> 32) + static_cast<int>(range & 0xFFFFFFFFLL), 0), RM);
        }
        int num_rows;
        const int before = block_exclusive_scan(rows, sh.warp, &num_rows);
        if (tid <= L) sh.scan[tid] = tid < L ? before : num_rows;
        __syncthreads();
        if constexpr (encode) {
            // One warp a row: encoded into the first bytes of its slot (over itself for a zero-copy input).
            const int row_int4 = a.hidden / 8, lane = tid & 31;
            const int4* src = static_cast<const int4*>(a.x);
            int4* dst = reinterpret_cast<int4*>(set_base(c, c.rank));
            for (int w = blockIdx.x * kWarps + (tid >> 5); w < num_rows; w += G * kWarps) {
                const int l = find_range(sh.scan, L, w);
                const int64_t at = (static_cast<int64_t>(l) * RM + (w - sh.scan[l])) * row_int4;
                encode_row_warp<kFormat>(src + at, reinterpret_cast<char*>(dst + at), a.hidden, lane);
            }
        }
    }
    if (a.copy_rows && !encode) {
        const int num_rows = sh.scan[L];
        const int per = (num_rows + G - 1) / G;
        const int first = min(num_rows, static_cast<int>(blockIdx.x) * per), last = min(num_rows, first + per);
        const int row_int4 = a.hidden / 8;
        const int4* src = static_cast<const int4*>(a.x);
        int4* dst = reinterpret_cast<int4*>(set_base(c, c.rank));
        for (int r0 = first; r0 < last; r0 += blockDim.x) {
            const int n = min(static_cast<int>(blockDim.x), last - r0);
            if (tid < n) {
                const int w = r0 + tid, l = find_range(sh.scan, L, w);
                sh.off[tid] = l * RM + (w - sh.scan[l]);
            }
            __syncthreads();
            const int words = n * row_int4;
            constexpr int kU = 8;
            for (int i0 = tid; i0 < words; i0 += kU * blockDim.x) {
                int4 v[kU];
                int64_t at[kU];
#pragma unroll
                for (int u = 0; u < kU; ++u) {
                    const int i = i0 + u * blockDim.x;
                    if (i < words) {
                        const int q = i / row_int4;
                        at[u] = static_cast<int64_t>(sh.off[q]) * row_int4 + (i - q * row_int4);
                        v[u] = ld_nc_v4(src + at[u]);
                    }
                }
#pragma unroll
                for (int u = 0; u < kU; ++u)
                    if (i0 + u * blockDim.x < words) st_na_v4(dst + at[u], v[u]);
            }
            __syncthreads();
        }
    }
    int* ws = set_workspace(c);
    if (arrive_last(ws + kLLWsCombineArrive, ws + kLLWsCombineEpoch, tag, &sh.flag)) {
        if (tid < R && !skips(c, tid)) st_release_sys(signals(c, tid) + kLLSigCombine + c.rank, tag);
        if (tid == 0) stamp(c, kClockSent);
    }
}

template <int kFormat>
__device__ void combine_recv(const LLCtx& c, const LLCombineArgs& a, int tag, CombineShared& sh, int* dyn) {
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, R = c.num_ranks, L = E / R, M = a.max_tokens;
    const int RM = R * M, n = T * K, G = gridDim.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int my_tokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + G - 1) / G : 0;
    int* s_idx = dyn;                                                     // [T * K]
    float* s_w = reinterpret_cast<float*>(dyn + n);                       // [my_tokens * K]
    const int4** s_row = reinterpret_cast<const int4**>(dyn + ((n + my_tokens * K + 1) & ~1));  // [my_tokens * K]
    if (tid < R) {
        unsigned long long* stat =
            blockIdx.x == 0 && a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats + tid) : nullptr;
        bool ok = wait_tag(c, signals(c, c.rank) + kLLSigCombine + tid, tag, kLLPhaseCombineRecv, tid, stat);
        if (ok) ok = signatures_agree(c, ll_signature(a), signature_slot(c.peers[c.rank], c.set, tid),
                                      kLLPhaseCombineRecv, tid);
        sh.ok[tid] = ok;
    }
    if (my_tokens == 0) return;  // no block-wide sync follows for this block
    for (int i = tid; i < n; i += blockDim.x) {
        const int64_t e = __ldg(a.topk_idx + i);
        s_idx[i] = e >= 0 && e < E ? static_cast<int>(e) : -1;
    }
    __syncthreads();
    if (blockIdx.x == 0 && tid == 0) stamp(c, kClockReady);
    // First slot of this rank's rows in every expert, as its rank published it (-1: that rank timed out).
    for (int e = tid; e < E; e += blockDim.x) {
        const int r = e / L;
        sh.scan[e] = sh.ok[r] ? ld_cg(signals(c, r) + kLLSigBegins + (e - r * L) * R + c.rank) : -1;
    }
    __syncthreads();
    // Pair (q, k) of token t = blockIdx.x + q * G: its row is the rank of the pair among this rank's pairs
    // to the same expert (by token, then slot), past the expert's first slot for this rank.
    for (int p = warp; p < my_tokens * K; p += kWarps) {
        const int q = p / K, k = p - q * K, flat = (blockIdx.x + q * G) * K + k, e = s_idx[flat];
        int pos = 0;
        if (e >= 0)
            for (int base = 0; base < flat; base += 32)
                pos += __popc(__ballot_sync(0xFFFFFFFFu, base + lane < flat && s_idx[base + lane] == e));
        if (lane == 0) {
            const int begin = e >= 0 ? sh.scan[e] : -1;
            const int slot = begin + pos;
            const bool valid = begin >= 0 && pos < M && slot < RM;
            s_row[p] = valid ? reinterpret_cast<const int4*>(set_base(c, e / L)) +
                                   (static_cast<int64_t>(e % L) * RM + slot) * (a.hidden / 8)
                             : nullptr;
            s_w[p] = __ldg(a.topk_weights + flat);
        }
    }
    __syncthreads();
    reduce_topk_rows<kFormat>(s_row, s_w, my_tokens, K, a.hidden, a.out);
}

// Like dispatch_kernel: one kernel for every phase split; one instance per wire format (a.format), so the
// BF16 combine's code is what it is without the codecs.
template <int kFormat>
__global__ void __launch_bounds__(kLLThreads, 1) combine_kernel(LLCtx c, LLCombineArgs a, int phases) {
    extern __shared__ int dyn[];
    __shared__ CombineShared sh;
    const int* epoch = set_workspace(c) + kLLWsCombineEpoch;
    stamp_start(c);
    const int tag = counter_add(ld_volatile(epoch), (phases & kLLSend) ? 1 : 0);
    if ((phases & kLLSend) != 0) combine_send<kFormat>(c, a, tag, sh);
    if ((phases & kLLRecv) != 0) combine_recv<kFormat>(c, a, tag, sh, dyn);
    stamp_end(c);
}

// ------------------------------------------------------------------------------------------ probes
// Probes for the benchmark. Their names hold neither "dispatch" nor "combine", so profiles matched by
// name (DeepEP's test_low_latency.py) see one kernel per call.
__global__ void __launch_bounds__(kLLThreads, 1) ll_probe_empty_kernel() {}

__global__ void ll_probe_ping_kernel(LLCtx c, int peer, int iters, int warmup, int64_t* out_ns) {
    int* mine = reinterpret_cast<int*>(c.peers[c.rank]) + kLLSigPing;
    int* theirs = reinterpret_cast<int*>(c.peers[peer]) + kLLSigPing;
    const int base = c.workspace[kLLWorkspacePing];
    const bool first = c.rank < peer;
    uint64_t start = global_timer_ns();
    int done = 0;
    for (int i = 1; i <= iters; ++i) {
        if (i == warmup + 1) start = global_timer_ns();
        const int v = base + i;
        if (first) st_release_sys(theirs, v);
        if (!wait_tag(c, mine, v, kLLPhasePing, peer, nullptr)) break;
        if (!first) st_release_sys(theirs, v);
        done = i;
    }
    const uint64_t end = global_timer_ns();
    c.workspace[kLLWorkspacePing] = base + iters;
    out_ns[0] = static_cast<int64_t>(end - start);
    out_ns[1] = done > warmup ? done - warmup : 0;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Dynamic shared memory beyond what fits next to the static part without opting in.
void allow_smem(const void* kernel, size_t smem) {
    if (smem > 16 * 1024)
        MOE_A2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

}  // namespace

void launch_ll_dispatch(const LLCtx& c, const LLDispatchArgs& a, int phases, int num_sms, cudaStream_t stream) {
    const size_t smem = (phases & kLLSend) ? sizeof(int) * static_cast<size_t>(a.num_tokens) * a.num_topk : 0;
    // The receive phase reads the format from the arguments; it runs the send's instance all the same, so
    // a hooked call's two launches carry one kernel name.
    void (*kernel)(LLCtx, LLDispatchArgs, int) = a.fp8 ? dispatch_kernel<true> : dispatch_kernel<false>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<num_sms, kLLThreads, smem, stream>>>(c, a, phases);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_combine(const LLCtx& c, const LLCombineArgs& a, int phases, int num_sms, cudaStream_t stream) {
    size_t smem = 0;
    if (phases & kLLRecv) {
        const size_t n = static_cast<size_t>(a.num_tokens) * a.num_topk;
        const size_t pairs = static_cast<size_t>(ceil_div(a.num_tokens, num_sms)) * a.num_topk;
        smem = sizeof(int) * ((n + pairs + 1) & ~static_cast<size_t>(1)) + sizeof(void*) * pairs;
    }
    void (*kernel)(LLCtx, LLCombineArgs, int) = a.format == kLLFormatFP8Combine      ? combine_kernel<kLLFormatFP8Combine>
                                                : a.format == kLLFormatLogFMTCombine ? combine_kernel<kLLFormatLogFMTCombine>
                                                                                     : combine_kernel<kLLFormatBF16Combine>;
    allow_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<num_sms, kLLThreads, smem, stream>>>(c, a, phases);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_empty(int num_sms, cudaStream_t stream) {
    ll_probe_empty_kernel<<<num_sms, kLLThreads, 0, stream>>>();
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_ping(const LLCtx& c, int peer, int iters, int warmup, int64_t* out_ns, cudaStream_t stream) {
    ll_probe_ping_kernel<<<1, 1, 0, stream>>>(c, peer, iters, warmup, out_ns);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_a2a
