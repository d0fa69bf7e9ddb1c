// The mixed TP x DP one-shot across nodes over NVSHMEM (protocol and layout in mixed.cuh).
//
// Work split: every block takes one contiguous chunk of each destination's message (the same chunk for
// every destination), sends it (stores, or a staged copy and a block put), completes its puts (quiet) and
// arrives; the last block to arrive sets this rank's signal on every rank. Then every block waits for every
// source's signal and header and sums a thread-strided share of the output. Blocks never wait on another
// block of their rank except through the peers' signals, which need every block of every rank to have sent:
// all blocks must be resident at once (the caller launches few enough).
#include <nvshmem.h>
#include <nvshmemx.h>

#include "../comm/allreduce.cuh"
#include "../comm/elem.cuh"
#include "../kernels/ll_device.cuh"
#include "mixed.cuh"

namespace moe_a2a::nvshmem_mixed {

namespace {

using comm::Elem;
using comm::Vec;

__device__ __forceinline__ int* signals(const MixedArgs& a, int set) {
    return reinterpret_cast<int*>(a.sym + set * kSetHeaderBytes);
}
__device__ __forceinline__ int4* headers(const MixedArgs& a, int set) {
    return reinterpret_cast<int4*>(a.sym + set * kSetHeaderBytes + kMaxPes * 4);
}
__device__ __forceinline__ char* send_area(const MixedArgs& a) { return a.sym + kHeaderBytes; }
__device__ __forceinline__ char* recv_area(const MixedArgs& a, int set) {
    return a.sym + kHeaderBytes + (1 + set) * static_cast<int64_t>(a.num_ranks) * a.slot_bytes;
}

// Peer p's copy of symmetric address `sym_addr`, where p is on this rank's node and NVSHMEM maps it; else null.
__device__ __forceinline__ void* mapped(const MixedArgs& a, void* sym_addr, int p) {
    if (p / a.local_size != a.rank / a.local_size) return nullptr;
    return nvshmem_ptr(sym_addr, p);
}

// The first failure fills the host record (code last), aborts this rank's other waits and traps.
__device__ void record_error(const MixedArgs& a, int code, int peer, int call, const int4* mine, const int4* theirs) {
    if (atomicCAS(a.state + kStateAbort, 0, 1) != 0) return;
    ErrorRecord* h = a.host;
    h->peer = peer;
    h->call = call;
    if (mine && theirs) {
        h->mine[0] = mine->x, h->mine[1] = mine->y, h->mine[2] = mine->z;
        h->theirs[0] = theirs->x, h->theirs[1] = theirs->y, h->theirs[2] = theirs->z;
    }
    __threadfence_system();
    h->code = code;
    __threadfence_system();
    trap_after_error("mixed internode", a.rank, code, 0, peer);
}

// One thread: wait until source `src`'s signal reaches `tag`, then check its header; false on a timeout, a
// message of another shape, or an abort.
__device__ bool wait_source(const MixedArgs& a, int set, int src, int tag, const int4& mine) {
    const int* sig = signals(a, set) + src;
    const uint64_t start = global_timer_ns();
    for (int spins = 0; !counter_reached(ld_relaxed_sys(sig), tag); ++spins) {
        if ((spins & 255) == 255) {
            if (ld_volatile(a.state + kStateAbort)) return false;
            if (global_timer_ns() - start > a.timeout_ns) {
                record_error(a, kErrTimeout, src, tag, nullptr, nullptr);
                return false;
            }
        }
    }
    fence_acq_rel_sys();
    const int4 theirs = ld_cg_v4(headers(a, set) + src);
    if (theirs.x != mine.x || theirs.y != mine.y || theirs.z != mine.z || theirs.w != tag) {
        record_error(a, kErrShape, src, tag, &mine, &theirs);
        return false;
    }
    return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mixed_kernel(const __grid_constant__ MixedArgs a) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    __shared__ int s_last, s_bad;
    const int R = a.num_ranks, me = a.rank, G = gridDim.x, tid = threadIdx.x;
    const int tag = counter_add(ld_volatile(a.state + kStateCalls), 1);
    const int set = tag & 1;
    const int64_t row_vecs = a.hidden / N;
    const int64_t msg_vecs = static_cast<int64_t>(a.send_rows) * row_vecs;
    const int64_t slot_vecs = a.slot_bytes / 16;
    const int64_t chunk = (msg_vecs + G - 1) / G;
    const int64_t lo = min(msg_vecs, chunk * blockIdx.x), hi = min(msg_vecs, lo + chunk);
    const int4* x = static_cast<const int4*>(a.x);
    int4* staged = reinterpret_cast<int4*>(send_area(a));
    int4* my_slot = reinterpret_cast<int4*>(recv_area(a, set)) + me * slot_vecs;  // symmetric: the same on every rank
    const int4 my_header = make_int4(a.send_rows, a.hidden, a.dtype, tag);

    // 1. The header (block 0: into this rank's own header slot, the source of the puts), then this block's
    // chunk of every destination's rows.
    int4* my_header_slot = headers(a, set) + me;
    if (blockIdx.x == 0 && tid == 0) {
        *my_header_slot = my_header;
        __threadfence_system();
    }
    __syncthreads();
    if (blockIdx.x == 0)
        for (int p = tid; p < R; p += blockDim.x) {
            if (p == me) continue;
            if (auto* peer = static_cast<int4*>(mapped(a, my_header_slot, p))) *peer = my_header;
            else nvshmem_putmem_nbi(my_header_slot, my_header_slot, sizeof(int4), p);
        }
    // The send area mirrors x (row k at row k), so a range staged again, which a put in flight may still be
    // reading, gets the same values.
    int staged_first = -1;  // the rows this block last staged (destinations often share them)
    for (int p = 0; p < R && lo < hi; ++p) {
        const int4* src = x + a.send_first[p] * row_vecs;
        if (auto* peer = static_cast<int4*>(mapped(a, my_slot, p))) {
            for (int64_t i = lo + tid; i < hi; i += blockDim.x) st_na_v4(peer + i, ld_nc_v4(src + i));
            continue;
        }
        int4* stage = staged + a.send_first[p] * row_vecs;
        if (staged_first != a.send_first[p]) {
            for (int64_t i = lo + tid; i < hi; i += blockDim.x) stage[i] = ld_nc_v4(src + i);
            __threadfence_system();
            __syncthreads();
            staged_first = a.send_first[p];
        }
        nvshmemx_putmem_nbi_block(my_slot + lo, stage + lo, (hi - lo) * 16, p);
    }

    // 2. Complete this block's stores and puts; the last block to arrive signals every rank.
    nvshmem_quiet();
    __threadfence_system();
    __syncthreads();
    if (tid == 0) {
        s_last = atomicAdd(a.state + kStateArrived, 1) == G - 1;
        if (s_last) {
            a.state[kStateArrived] = 0;
            a.state[kStateCalls] = tag;
            __threadfence_system();
        }
    }
    __syncthreads();
    if (s_last) {
        for (int p = tid; p < R; p += blockDim.x) {
            int* sig = signals(a, set) + me;
            if (auto* peer = static_cast<int*>(mapped(a, sig, p))) st_release_sys(peer, tag);
            else nvshmem_int_atomic_set(sig, tag, p);
        }
        nvshmem_quiet();
    }

    // 3. Every source's signal and header.
    if (tid == 0) s_bad = 0;
    __syncthreads();
    for (int r = tid; r < R; r += blockDim.x)
        if (!wait_source(a, set, r, tag, my_header)) s_bad = 1;
    __syncthreads();
    if (s_bad) return;

    // 4. Output block b, piece j: the sum over the sources of block b of their piece j, in rank order.
    const int4* recv = reinterpret_cast<const int4*>(recv_area(a, set));
    int4* out = static_cast<int4*>(a.out);
    const int64_t total = static_cast<int64_t>(a.out_blocks) * msg_vecs;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid; i < total;
         i += static_cast<int64_t>(G) * blockDim.x) {
        const int b = static_cast<int>(i / msg_vecs);
        const int64_t j = i - b * msg_vecs;
        float acc[N];
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] = 0.f;
        constexpr int kBatch = 4;  // loads in flight per thread
        for (int r0 = 0; r0 < R; r0 += kBatch) {
            Vec<T> in[kBatch];
#pragma unroll
            for (int k = 0; k < kBatch; ++k)
                if (r0 + k < R && a.src_block[r0 + k] == b) in[k].v = ld_cg_v4(recv + (r0 + k) * slot_vecs + j);
#pragma unroll
            for (int k = 0; k < kBatch; ++k)
                if (r0 + k < R && a.src_block[r0 + k] == b)
#pragma unroll
                    for (int e = 0; e < N; ++e) acc[e] += E::to_float(in[k].b[e]);
        }
        Vec<T> s;
#pragma unroll
        for (int e = 0; e < N; ++e) s.b[e] = E::from_float(acc[e]);
        st_na_v4(out + i, s.v);
    }
}

}  // namespace

std::string launch_mixed(const MixedArgs& a, int num_blocks, cudaStream_t stream) {
    if (a.dtype == comm::kArFloat16)
        mixed_kernel<__half><<<num_blocks, kThreads, 0, stream>>>(a);
    else
        mixed_kernel<__nv_bfloat16><<<num_blocks, kThreads, 0, stream>>>(a);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? "" : std::string("moe_a2a mixed internode launch: ") + cudaGetErrorString(e);
}

}  // namespace moe_a2a::nvshmem_mixed
