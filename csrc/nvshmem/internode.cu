// NVSHMEM set-up and the internode (RDMA) kernels of moe_a2a. See internode.cuh for the buffer layout.
//
// Every kernel works in rounds of `window` rows per (node, direction), one launch per round:
//   1. barrier: block 0 adds 1 to `arrive[me]` on every team peer; every block waits until each peer
//      has entered this round (so each peer has finished reading its receive slots of the last round);
//   2. each warp packs rows into this PE's send slots (one slot per destination node and position) and
//      puts the slot to the peer with one nbi put (rows for its own node go straight to its receive slots);
//   3. nvshmem_quiet, then every block adds 1 to `data[me]` on every peer;
//   4. every block waits until each peer's blocks are all done (data_expect), then reads its receive slots.
// Waits time out after `timeout_ns` (globaltimer) and record the phase, round and peer in host memory.
// Ranks that disagree: block 0's arrival in step 1 (and every notify record) carries this rank's signature
// (kSignatureInts); once a peer's arrival is there, its signature is too, and a difference is recorded
// (field, both values, the peer) instead of moving rows of another size or layout.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>

#include "../kernels/utils.cuh"
#include "../kernels/wire_format_device.cuh"
#include "internode.cuh"

namespace moe_a2a::internode {

namespace {

// NVSHMEM PE of team member m (the team may be the whole NVSHMEM job or a strided part of it).
__device__ __forceinline__ int team_pe(int pe_offset, int pe_stride, int m) { return pe_offset + m * pe_stride; }

__device__ __forceinline__ unsigned long long ld_acquire_u64(const uint64_t* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// The first error claims the flag in this PE's header; every later wait (and kernel) gives up at once.
__device__ __forceinline__ bool aborted(const char* sym) {
    return ld_volatile(reinterpret_cast<const int*>(sym + kOffClaim)) != 0;
}

// The first error claims the flag in this PE's header and fills the host record (code last); false if an
// earlier error holds the claim.
__device__ bool record_error(char* sym, ErrorRecord* err, int code, int phase, int peer, int round,
                             unsigned long long expected, unsigned long long seen, int field) {
    if (atomicCAS(reinterpret_cast<int*>(sym + kOffClaim), 0, 1) != 0) return false;
    err->phase = phase;
    err->peer = peer;
    err->round = round;
    err->expected = expected;
    err->seen = seen;
    err->field = field;
    __threadfence_system();
    err->code = code;
    __threadfence_system();
    return true;
}

// Spin until *p >= expect; false (with the error recorded) on timeout or if another wait failed.
__device__ bool wait_signal(char* sym, const uint64_t* p, unsigned long long expect, ErrorRecord* err,
                            unsigned long long timeout_ns, int phase, int peer, int round) {
    const uint64_t start = global_timer_ns();
    for (uint32_t it = 0;; ++it) {
        const unsigned long long v = ld_acquire_u64(p);
        if (v >= expect) return true;
        if ((it & 1023) == 1023) {
            if (aborted(sym)) return false;
            if (global_timer_ns() - start > timeout_ns) {
                if (record_error(sym, err, kErrTimeout, phase, peer, round, expect, v, -1))
                    trap_after_error("internode", nvshmem_my_pe(), kErrTimeout, phase, peer);
                return false;
            }
        }
    }
}

// One thread, once every team member's signature arrived (slot m of `slots` from member m, slot_ints
// apart): compare each with this rank's. A difference is recorded with the first field that differs and
// the peer; `trap` then ends the kernel (where the host would not look before using the outputs).
// False on a difference.
__device__ bool signatures_agree(char* sym, ErrorRecord* err, const int* mine, const int* slots, int slot_ints,
                                 int num_nodes, int phase, int round, bool trap) {
    for (int m = 0; m < num_nodes; ++m) {
        for (int i = 0; i < kSignatureInts; ++i) {
            const int theirs = ld_cg(slots + m * slot_ints + i);
            if (theirs == mine[i]) continue;
            if (record_error(sym, err, kErrMismatch, phase, m, round,
                             static_cast<unsigned long long>(static_cast<long long>(mine[i])),
                             static_cast<unsigned long long>(static_cast<long long>(theirs)), i) && trap)
                trap_after_error("internode", nvshmem_my_pe(), kErrMismatch, phase, m);
            return false;
        }
    }
    return true;
}

// Step 1 for one block: the barrier, which also compares the team members' calls. Returns false if the
// kernel must stop. A mismatch traps in combine, whose outputs the host does not check before returning
// them; dispatch's host code synchronizes and raises the recorded error before it uses any output.
__device__ bool round_barrier(const Common& c, int phase, int* ok) {
    if (threadIdx.x == 0) {
        int good = !aborted(c.sym);
        auto* arrive = reinterpret_cast<uint64_t*>(c.sym + kOffArrive);
        int* slots = reinterpret_cast<int*>(c.sym + kOffSignatureRecv);
        if (good && blockIdx.x == 0) {
            // The arrival carries this rank's signature: a put-with-signal lands its data before its signal.
            // The last round's puts from `send` completed at that round's quiet (this thread, round_data).
            int* send = reinterpret_cast<int*>(c.sym + kOffSignatureSend);
            for (int i = 0; i < kSignatureInts; ++i) send[i] = c.signature[i];
            __threadfence_system();
            for (int pe = 0; pe < c.num_nodes; ++pe)
                nvshmem_putmem_signal_nbi(slots + c.me * kSignatureSlotInts, send, 4 * kSignatureInts, arrive + c.me, 1,
                                          NVSHMEM_SIGNAL_ADD, team_pe(c.pe_offset, c.pe_stride, pe));
        }
        for (int pe = 0; pe < c.num_nodes && good; ++pe)
            good = wait_signal(c.sym, arrive + pe, c.arrive_expect, c.err, c.timeout_ns, phase, pe, c.round);
        // A member's slot changes only at its next arrival, after this block's data signal of this round.
        if (good)
            good = signatures_agree(c.sym, c.err, c.signature, slots, kSignatureSlotInts, c.num_nodes, phase, c.round,
                                    phase == kPhaseCombineBarrier);
        *ok = good;
    }
    __syncthreads();
    return *ok;
}

__device__ bool round_data(const Common& c, int phase, int* ok) {
    __syncthreads();  // every warp of the block has issued its puts and local stores
    if (threadIdx.x == 0) {
        auto* data = reinterpret_cast<uint64_t*>(c.sym + kOffData);
        nvshmem_quiet();
        __threadfence_system();
        for (int pe = 0; pe < c.num_nodes; ++pe) nvshmemx_signal_op(data + c.me, 1, NVSHMEM_SIGNAL_ADD, team_pe(c.pe_offset, c.pe_stride, pe));
        int good = 1;
        for (int pe = 0; pe < c.num_nodes && good; ++pe)
            good = wait_signal(c.sym, data + pe, c.data_expect, c.err, c.timeout_ns, phase, pe, c.round);
        *ok = good;
    }
    __syncthreads();
    return *ok;
}

__device__ __forceinline__ char* send_slot(const Common& c, int node, int j) {
    return c.sym + kHeaderBytes + (static_cast<size_t>(node) * c.window + j) * c.stride;
}

__device__ __forceinline__ char* recv_slot(const Common& c, int node, int j) {
    return c.sym + kHeaderBytes + (static_cast<size_t>(c.num_nodes + node) * c.window + j) * c.stride;
}

// Rows of both notify areas are notify_row_ints apart: this rank's signature slot, then its record. A
// mismatch does not trap: the host reads the outputs only after it checked the error record.
__global__ void __launch_bounds__(kThreads, 1) notify_kernel(const __grid_constant__ NotifyArgs a) {
    __shared__ int ok;
    auto* sig = reinterpret_cast<uint64_t*>(a.sym + kOffNotifySig);
    int* send = reinterpret_cast<int*>(a.sym + kOffNotifySend);
    int* recv = reinterpret_cast<int*>(a.sym + kOffNotifyRecv) + a.parity * kNotifyInts;
    const int row = notify_row_ints(a.num_nodes), put_ints = kSignatureSlotInts + a.record_ints;
    if (threadIdx.x == 0) ok = !aborted(a.sym);
    __syncthreads();
    if (!ok) return;
    const int total = a.num_nodes * a.record_ints;
    for (int i = threadIdx.x; i < a.num_nodes * kSignatureInts; i += blockDim.x)
        send[(i / kSignatureInts) * row + i % kSignatureInts] = a.signature[i % kSignatureInts];
    for (int i = threadIdx.x; i < total; i += blockDim.x)
        send[(i / a.record_ints) * row + kSignatureSlotInts + i % a.record_ints] = a.records[i];
    __syncthreads();
    if (threadIdx.x < a.num_nodes) {
        const int pe = threadIdx.x;
        nvshmem_putmem_signal_nbi(recv + a.me * row, send + pe * row, 4 * put_ints, sig + a.me, 1, NVSHMEM_SIGNAL_ADD,
                                  team_pe(a.pe_offset, a.pe_stride, pe));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        nvshmem_quiet();
        int good = 1;
        for (int pe = 0; pe < a.num_nodes && good; ++pe)
            good = wait_signal(a.sym, sig + pe, a.expect, a.err, a.timeout_ns, kPhaseNotify, pe, 0);
        // Before anything reads counts whose meaning could differ.
        if (good) good = signatures_agree(a.sym, a.err, a.signature, recv, row, a.num_nodes, kPhaseNotify, 0, false);
        ok = good;
    }
    __syncthreads();
    if (!ok) return;
    for (int i = threadIdx.x; i < total; i += blockDim.x)
        a.out[i] = ld_cg(recv + (i / a.record_ints) * row + kSignatureSlotInts + i % a.record_ints);
}

__global__ void __launch_bounds__(kThreads, 1) dispatch_round_kernel(const __grid_constant__ DispatchArgs a) {
    __shared__ int ok;
    const Common& c = a.c;
    const DispatchLayout& l = a.l;
    if (!round_barrier(c, kPhaseDispatchBarrier, &ok)) return;
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int gwarp = blockIdx.x * warps + threadIdx.x / 32;
    const int num_gwarps = gridDim.x * warps;
    const int N = c.num_nodes;

    // Send: every (token, node) pair whose position falls in this round's window.
    for (int t = gwarp; t < a.num_tokens; t += num_gwarps) {
        for (int b = 0; b < N; ++b) {
            const int p = __ldg(a.send_pos + static_cast<size_t>(t) * N + b);
            if (p < c.lo || p >= c.lo + c.window) continue;
            const int j = p - c.lo;
            char* dst = b == c.me ? recv_slot(c, c.me, j) : send_slot(c, b, j);
            warp_copy<false>(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(a.x + static_cast<size_t>(t) * l.row_bytes),
                             l.row_bytes / 16, lane);
            if (a.scales)
                warp_copy_words<false>(reinterpret_cast<int*>(dst + l.off_scales),
                                       reinterpret_cast<const int*>(a.scales + static_cast<size_t>(t) * l.num_scales),
                                       l.num_scales, lane);
            if (a.topk_idx) {
                warp_copy_words<false>(reinterpret_cast<int*>(dst + l.off_idx),
                                       reinterpret_cast<const int*>(a.topk_idx + static_cast<size_t>(t) * l.num_topk),
                                       2 * l.num_topk, lane);
                if (a.topk_weights)
                    warp_copy_words<false>(reinterpret_cast<int*>(dst + l.off_weights),
                                           reinterpret_cast<const int*>(a.topk_weights + static_cast<size_t>(t) * l.num_topk),
                                           l.num_topk, lane);
            }
            if (lane == 0) *reinterpret_cast<int*>(dst + l.off_src) = t;
            if (lane < l.num_local_ranks)
                dst[l.off_mask + lane] =
                    a.is_token_in_rank[static_cast<size_t>(t) * a.num_ranks + b * l.num_local_ranks + lane] ? 1 : 0;
            __syncwarp();
            if (b != c.me) nvshmemx_putmem_nbi_warp(recv_slot(c, c.me, j), dst, l.stride, team_pe(c.pe_offset, c.pe_stride, b));
        }
    }
    if (!round_data(c, kPhaseDispatchData, &ok)) return;

    // Receive: rows [lo, lo + window) of each source node go to out_prefix[m] + position.
    for (int m = 0; m < N; ++m) {
        const int count = min(max(a.recv_count[m] - c.lo, 0), c.window);
        for (int j = gwarp; j < count; j += num_gwarps) {
            const char* src = recv_slot(c, m, j);
            const size_t row = static_cast<size_t>(a.out_prefix[m]) + c.lo + j;
            warp_copy<true>(reinterpret_cast<int4*>(a.out_x + row * l.row_bytes), reinterpret_cast<const int4*>(src),
                            l.row_bytes / 16, lane);
            if (a.out_scales)
                warp_copy_words<true>(reinterpret_cast<int*>(a.out_scales + row * l.num_scales),
                                      reinterpret_cast<const int*>(src + l.off_scales), l.num_scales, lane);
            if (a.out_topk_idx && lane < l.num_topk) {
                const int64_t e = __ldcg(reinterpret_cast<const long long*>(src + l.off_idx) + lane);
                const int64_t local = e - a.node_expert_first;
                a.out_topk_idx[row * l.num_topk + lane] = (e >= 0 && local >= 0 && local < a.num_node_experts) ? local : -1;
                if (a.out_topk_weights)
                    a.out_topk_weights[row * l.num_topk + lane] = __ldcg(reinterpret_cast<const float*>(src + l.off_weights) + lane);
            }
            if (a.out_origin && lane == 0) {
                int* o = a.out_origin + row * 4;
                o[0] = m * l.num_local_ranks + a.local_rank;
                o[1] = __ldcg(reinterpret_cast<const int*>(src + l.off_src));
                o[2] = m;
                o[3] = 0;
            }
            if (a.out_in_rank && lane < l.num_local_ranks)
                a.out_in_rank[row * l.num_local_ranks + lane] = __ldcg(reinterpret_cast<const signed char*>(src + l.off_mask) + lane) != 0;
        }
    }
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Round-to-nearest-even float -> bf16 bits (inputs are finite sums of bf16 values).
__device__ __forceinline__ uint32_t to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return (u >> 16) | ((u & 0xffffu) ? 0x40u : 0u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

// kFormat: how the partial rows travel (a.format): BF16, or FP8 encoded in front of the slot by the sending
// warp (only those bytes and the weights are put), decoded by the reducing one.
template <int kFormat>
__global__ void __launch_bounds__(kThreads, 1) combine_round_kernel(const __grid_constant__ CombineArgs a) {
    __shared__ int ok;
    const Common& c = a.c;
    if (!round_barrier(c, kPhaseCombineBarrier, &ok)) return;
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    const int gwarp = blockIdx.x * warps + threadIdx.x / 32;
    const int num_gwarps = gridDim.x * warps;
    const int N = c.num_nodes;
    const int row_int4 = a.hidden / 8;

    // Send each partial row back to its source node, into the slot of its source token.
    for (int r = gwarp; r < a.num_recv_rows; r += num_gwarps) {
        const int s = __ldg(a.origin + static_cast<size_t>(r) * 4 + 1);
        if (s < c.lo || s >= c.lo + c.window) continue;
        const int m = __ldg(a.origin + static_cast<size_t>(r) * 4 + 2);
        const int j = s - c.lo;
        char* dst = m == c.me ? recv_slot(c, c.me, j) : send_slot(c, m, j);
        const int4* row = reinterpret_cast<const int4*>(a.x + static_cast<size_t>(r) * a.hidden);
        if constexpr (kFormat == kLLFormatBF16Combine) warp_copy<false>(reinterpret_cast<int4*>(dst), row, row_int4, lane);
        else encode_row_warp<kFormat>(row, dst, a.hidden, lane);
        if (a.weights)
            warp_copy_words<false>(reinterpret_cast<int*>(dst + a.off_weights),
                                   reinterpret_cast<const int*>(a.weights + static_cast<size_t>(r) * a.num_topk), a.num_topk,
                                   lane);
        __syncwarp();
        if (m == c.me) continue;
        const int pe = team_pe(c.pe_offset, c.pe_stride, m);
        if constexpr (kFormat == kLLFormatBF16Combine) {
            nvshmemx_putmem_nbi_warp(recv_slot(c, c.me, j), dst, c.stride, pe);
        } else {  // the encoded bytes, then the weights: the rest of the slot stays behind
            nvshmemx_putmem_nbi_warp(recv_slot(c, c.me, j), dst, ll_combine_row_bytes(a.hidden, kFormat), pe);
            if (a.weights)
                nvshmemx_putmem_nbi_warp(recv_slot(c, c.me, j) + a.off_weights, dst + a.off_weights,
                                         c.stride - a.off_weights, pe);
        }
    }
    if (!round_data(c, kPhaseCombineData, &ok)) return;

    // Reduce: token t sums its copies from every node it was sent to, in node order, in float32.
    const int end = min(c.lo + c.window, a.num_tokens);
    for (int t = c.lo + gwarp; t < end; t += num_gwarps) {
        const int j = t - c.lo;
        int sent[kMaxNodes];
#pragma unroll 4
        for (int b = 0; b < N; ++b) sent[b] = __ldg(a.send_pos + static_cast<size_t>(t) * N + b) >= 0;
        for (int q = lane; q < row_int4; q += 32) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int b = 0; b < N; ++b) {
                if (!sent[b]) continue;
                if constexpr (kFormat == kLLFormatBF16Combine) {
                    const int4 v = ld_cg_v4(reinterpret_cast<const int4*>(recv_slot(c, b, j)) + q);
                    const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                                           static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        acc[2 * k] += bf16_lo(w[k]);
                        acc[2 * k + 1] += bf16_hi(w[k]);
                    }
                } else {
                    float f[8];
                    decode_chunk<kFormat>(load_chunk<kFormat>(reinterpret_cast<const int4*>(recv_slot(c, b, j)), q), f);
#pragma unroll
                    for (int k = 0; k < 8; ++k) acc[k] += f[k];
                }
            }
            for (int which = 0; which < 2; ++which) {
                const uint16_t* bias = which == 0 ? a.bias0 : a.bias1;
                if (!bias) continue;
                const int4 v = ld_nc_v4(reinterpret_cast<const int4*>(bias + static_cast<size_t>(t) * a.hidden) + q);
                const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                                       static_cast<uint32_t>(v.w)};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    acc[2 * k] += bf16_lo(w[k]);
                    acc[2 * k + 1] += bf16_hi(w[k]);
                }
            }
            int4 o;
            o.x = static_cast<int>(to_bf16(acc[0]) | (to_bf16(acc[1]) << 16));
            o.y = static_cast<int>(to_bf16(acc[2]) | (to_bf16(acc[3]) << 16));
            o.z = static_cast<int>(to_bf16(acc[4]) | (to_bf16(acc[5]) << 16));
            o.w = static_cast<int>(to_bf16(acc[6]) | (to_bf16(acc[7]) << 16));
            reinterpret_cast<int4*>(a.out + static_cast<size_t>(t) * a.hidden)[q] = o;
        }
        if (a.out_weights && lane < a.num_topk) {
            float w = 0.f;
            for (int b = 0; b < N; ++b)
                if (sent[b]) w += __ldcg(reinterpret_cast<const float*>(recv_slot(c, b, j) + a.off_weights) + lane);
            a.out_weights[static_cast<size_t>(t) * a.num_topk + lane] = w;
        }
    }
}

int align16(int n) { return (n + 15) / 16 * 16; }

std::string cuda_error(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return "";
    return std::string("moe_a2a internode: ") + what + ": " + cudaGetErrorString(e);
}

bool g_initialized = false;

}  // namespace

DispatchLayout dispatch_layout(int row_bytes, int num_scales, int num_topk, int num_local_ranks) {
    DispatchLayout l{};
    l.row_bytes = row_bytes;
    l.num_scales = num_scales;
    l.num_topk = num_topk;
    l.num_local_ranks = num_local_ranks;
    l.off_scales = align16(row_bytes);
    l.off_idx = l.off_scales + align16(4 * num_scales);
    l.off_weights = l.off_idx + align16(8 * num_topk);
    l.off_src = l.off_weights + align16(4 * num_topk);
    l.off_mask = l.off_src + 4;
    l.stride = align16(l.off_mask + num_local_ranks);
    return l;
}

std::string get_unique_id(std::string* id) {
    nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
    if (nvshmemx_get_uniqueid(&uid) != 0) return "nvshmemx_get_uniqueid failed";
    id->assign(reinterpret_cast<const char*>(&uid), sizeof(uid));
    return "";
}

std::string init(const std::string& id, int rank, int num_ranks) {
    if (g_initialized) return "NVSHMEM is already initialised in this process";
    nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
    if (id.size() != sizeof(uid)) return "bad NVSHMEM unique id size";
    std::memcpy(&uid, id.data(), sizeof(uid));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    if (nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &uid, &attr) != 0) return "nvshmemx_set_attr_uniqueid_args failed";
    if (nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr) != 0) return "nvshmemx_init_attr failed";
    g_initialized = true;
    if (nvshmem_my_pe() != rank || nvshmem_n_pes() != num_ranks)
        return "NVSHMEM started with PE " + std::to_string(nvshmem_my_pe()) + " of " + std::to_string(nvshmem_n_pes()) +
               ", expected " + std::to_string(rank) + " of " + std::to_string(num_ranks);
    return "";
}

bool is_initialized() { return g_initialized; }
int my_pe() { return nvshmem_my_pe(); }
int num_pes() { return nvshmem_n_pes(); }

std::string sym_malloc(size_t bytes, void** ptr) {
    *ptr = nvshmem_malloc(bytes);
    if (*ptr == nullptr)
        return "nvshmem_malloc of " + std::to_string(bytes) + " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)";
    if (cudaMemset(*ptr, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return cuda_error("memset");
    nvshmem_barrier_all();  // nobody signals into a peer's header before the peer has zeroed it
    return "";
}

void sym_free(void* ptr) {
    cudaDeviceSynchronize();
    nvshmem_free(ptr);
}

void barrier_all() { nvshmem_barrier_all(); }

std::string launch_notify(const NotifyArgs& args, cudaStream_t stream) {
    notify_kernel<<<1, kThreads, 0, stream>>>(args);
    return cuda_error("notify launch");
}

std::string launch_dispatch_round(const DispatchArgs& args, int num_blocks, cudaStream_t stream) {
    dispatch_round_kernel<<<num_blocks, kThreads, 0, stream>>>(args);
    return cuda_error("dispatch launch");
}

std::string launch_combine_round(const CombineArgs& args, int num_blocks, cudaStream_t stream) {
    if (args.format == kLLFormatFP8Combine)
        combine_round_kernel<kLLFormatFP8Combine><<<num_blocks, kThreads, 0, stream>>>(args);
    else
        combine_round_kernel<kLLFormatBF16Combine><<<num_blocks, kThreads, 0, stream>>>(args);
    return cuda_error("combine launch");
}

}  // namespace moe_a2a::internode
