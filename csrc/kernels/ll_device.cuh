// Device helpers shared by the low-latency kernels over CUDA IPC (kernels/low_latency.cu) and over
// NVSHMEM (nvshmem/low_latency.cu): block scans, the copy of received rows into their packed slots, the
// weighted top-k sum of combine (rows in any combine format, wire_format_device.cuh), flag polling, the timeout record, the grid
// arrival and the scan of received counts. Internal linkage: each translation unit gets its own copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "low_latency.cuh"
#include "utils.cuh"
#include "wire_format_device.cuh"

namespace moe_a2a {
namespace {

__device__ __forceinline__ int lanemask_lt() {
    int m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}

// Exclusive prefix sum of one value per thread over the block; *total gets the sum. s_warp: 32 ints.
__device__ int block_exclusive_scan(int v, int* s_warp, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) s_warp[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < num_warps ? s_warp[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xFFFFFFFFu, w, o);
            if (lane >= o) w += y;
        }
        s_warp[lane] = w;
    }
    __syncthreads();
    const int out = x - v + (warp > 0 ? s_warp[warp - 1] : 0);
    *total = s_warp[num_warps - 1];
    __syncthreads();  // s_warp may be reused right away
    return out;
}

// Largest i in [0, n) with scan[i] <= w, for scan[0] <= w < scan[n] (the range holding item w).
__device__ __forceinline__ int find_range(const int* scan, int n, int w) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (scan[mid] <= w) lo = mid;
        else hi = mid;
    }
    return lo;
}

// Block-wide copy of `n` received tokens: row q (BF16, or FP8 followed by its float scales) from src[q] to
// slot dst[q] = l * RM + j of a.recv_x, and for FP8 its scales to the column-major a.recv_scales
// [L, cols, RM] (float, or UE8M0 exponents packed four to an int). 16-byte words flattened over
// (row, word), eight loads in flight per thread. Ends with a block barrier (src/dst may be refilled).
__device__ void copy_received_rows(const LLDispatchArgs& a, const char* const* src, const int* dst, int n, int RM) {
    const int tid = threadIdx.x;
    const int row_int4 = a.fp8 ? a.hidden / 16 : a.hidden / 8;
    const int words = n * row_int4;
    int4* out = static_cast<int4*>(a.recv_x);
    constexpr int kU = 8;
    for (int i0 = tid; i0 < words; i0 += kU * blockDim.x) {
        int4 v[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < words) {
                const int q = i / row_int4;
                v[u] = ld_cg_v4(reinterpret_cast<const int4*>(src[q]) + (i - q * row_int4));
            }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < words) {
                const int q = i / row_int4;
                st_na_v4(out + static_cast<int64_t>(dst[q]) * row_int4 + (i - q * row_int4), v[u]);
            }
        }
    }
    if (a.fp8) {
        // Rows fastest in the scales' layout, so consecutive slots store together.
        const int num_scales = a.hidden / 128, cols = a.ue8m0 ? num_scales / 4 : num_scales;
        for (int i = tid; i < n * cols; i += blockDim.x) {
            const int g = i / n, q = i - g * n;
            const int l = dst[q] / RM, slot = dst[q] - l * RM;
            const char* scales = src[q] + a.hidden;
            int value;
            if (a.ue8m0) {
                const int4 f = ld_cg_v4(reinterpret_cast<const int4*>(scales) + g);
                const uint32_t b0 = (static_cast<uint32_t>(f.x) >> 23) & 0xFFu, b1 = (static_cast<uint32_t>(f.y) >> 23) & 0xFFu;
                const uint32_t b2 = (static_cast<uint32_t>(f.z) >> 23) & 0xFFu, b3 = (static_cast<uint32_t>(f.w) >> 23) & 0xFFu;
                value = static_cast<int>(b0 | (b1 << 8) | (b2 << 16) | (b3 << 24));
            } else {
                value = ld_cg(reinterpret_cast<const int*>(scales) + g);
            }
            static_cast<int*>(a.recv_scales)[(static_cast<int64_t>(l) * cols + g) * RM + slot] = value;
        }
    }
    __syncthreads();
}

// Block-wide weighted top-k sum of this block's tokens t = blockIdx.x + q * gridDim.x, q < my_tokens:
// out[t] = BF16 of the float32 sum over k of s_w[q * K + k] * row s_row[q * K + k] (null rows skipped), in
// slot order; rows in combine format kFormat (decoded to float32 first). 8-channel chunks flattened over
// (token, chunk); all top-k loads of a chunk in flight.
template <int kFormat>
__device__ void reduce_topk_rows(const int4* const* s_row, const float* s_w, int my_tokens, int K, int hidden,
                                 void* out_rows) {
    const int row_int4 = hidden / 8, G = gridDim.x;
    int4* out = static_cast<int4*>(out_rows);
    constexpr int kU = 8;
    for (int i = threadIdx.x; i < my_tokens * row_int4; i += blockDim.x) {
        const int q = i / row_int4, ch = i - q * row_int4;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k0 = 0; k0 < K; k0 += kU) {
            int4 v[kU];
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                const int4* row = k0 + u < K ? s_row[q * K + k0 + u] : nullptr;
                if (row != nullptr) v[u] = load_chunk<kFormat>(row, ch);
            }
#pragma unroll
            for (int u = 0; u < kU; ++u) {
                if (k0 + u >= K || s_row[q * K + k0 + u] == nullptr) continue;
                float f[8];
                decode_chunk<kFormat>(v[u], f);
                const float w = s_w[q * K + k0 + u];
#pragma unroll
                for (int m = 0; m < 8; ++m) acc[m] += w * f[m];
            }
        }
        int4 o;
        __nv_bfloat16* oh = reinterpret_cast<__nv_bfloat16*>(&o);
#pragma unroll
        for (int m = 0; m < 8; ++m) oh[m] = __float2bfloat16_rn(acc[m]);
        out[static_cast<int64_t>(blockIdx.x + q * G) * row_int4 + ch] = o;
    }
}

// Polling a flag another process writes: relaxed loads, then one acquire fence once it is there (a fence
// per poll costs more and buys nothing).
__device__ __forceinline__ int ld_relaxed_sys(const int* p) {
    int v;
    asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// First error wins: it fills the host record (code last), aborts later waits of this rank and traps. `Ctx`: the
// IPC or the NVSHMEM kernels' context (workspace, host record, set, call).
template <typename Ctx>
__device__ void record_error(const Ctx& c, int code, int phase, int peer, int index, int mine, int theirs) {
    int* ws = c.workspace;
    if (atomicCAS(ws + kLLWorkspaceClaim, 0, 1) == 0) {
        c.host->phase = phase;
        c.host->peer = peer;
        c.host->index = index;
        c.host->set = c.set;
        c.host->call = c.call;
        c.host->mine = mine;
        c.host->theirs = theirs;
        __threadfence_system();
        c.host->code = code;
    }
    atomicExch(ws + kLLWorkspaceAbort, 1);
    __threadfence_system();
    trap_after_error("low-latency", c.rank, code, phase, peer);
}

template <typename Ctx>
__device__ void record_timeout(const Ctx& c, int phase, int peer, int index) {
    record_error(c, kLLErrTimeout, phase, peer, index, 0, 0);
}

// This rank's signature of a call (kLLSignatureInts): hidden, tokens per rank, experts, wire format.
__device__ __forceinline__ int4 ll_signature(const LLDispatchArgs& a) {
    const int format = !a.fp8         ? kLLFormatBF16Dispatch
                       : a.round_scale ? kLLFormatFP8RoundDispatch
                                       : kLLFormatFP8Dispatch;
    return make_int4(a.hidden, a.max_tokens, a.num_experts, format);
}

__device__ __forceinline__ int4 ll_signature(const LLCombineArgs& a) {
    return make_int4(a.hidden, a.max_tokens, a.num_experts, a.format);
}

// Signature slot of source rank `src` in set `set` of an allocation whose signal area starts at `base`.
__device__ __forceinline__ int* signature_slot(void* base, int set, int src) {
    return static_cast<int*>(base) + kLLSignatureBase + set * kLLSetSignatureInts + src * kLLSignatureInts;
}

// One thread, after the acquire that made `peer`'s flag (or count) of this call visible: compare the
// signature the peer wrote before it with this rank's `mine`. A difference is an error (recorded with the
// first field that differs, then a trap): rows of another size, format or layout would be copied into
// outputs that look valid. Both ranks of a pair compare, so each reports the other.
template <typename Ctx>
__device__ bool signatures_agree(const Ctx& c, const int4& mine, const int* slot, int phase, int peer) {
    const int4 got = ld_cg_v4(reinterpret_cast<const int4*>(slot));
    const int m[kLLSignatureInts] = {mine.x, mine.y, mine.z, mine.w};
    const int t[kLLSignatureInts] = {got.x, got.y, got.z, got.w};
#pragma unroll
    for (int i = 0; i < kLLSignatureInts; ++i) {
        if (m[i] != t[i]) {
            record_error(c, kLLErrMismatch, phase, peer, i, m[i], t[i]);
            return false;
        }
    }
    return true;
}

// Block-wide arrival at a grid-wide counter; true in the last block of the grid, which resets the counter,
// stores `tag` to `epoch` and sees every block's stores (as a grid barrier does it: the barrier orders
// the block's stores before one thread's system fence and arrival; no fence per thread).
__device__ bool arrive_last(int* arrive, int* epoch, int tag, int* s_flag) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        const int last = atomicAdd(arrive, 1) == static_cast<int>(gridDim.x) - 1;
        if (last) {
            __threadfence_system();  // pairs with the other blocks' fences before their arrivals
            *arrive = 0;
            *epoch = tag;
        }
        *s_flag = last;
    }
    __syncthreads();
    return *s_flag != 0;
}

// Block-wide, from this thread's `count` (pair tid = l * R + s: rows of source s for local expert l; 0 for
// tid >= E): scan[i] = rows before pair i in the packed slot layout ([expert][source][token]) and
// scan[E] = the total, which is returned. Block 0 writes layout_range, recv_count and the cumulative
// stats; every block marks its share of the unused src_info slots with -1.
__device__ int scan_received_counts(const LLDispatchArgs& a, int count, int R, int* scan, int* s_warp) {
    const int tid = threadIdx.x, E = a.num_experts, L = E / R, RM = R * a.max_tokens;
    int num_rows;
    const int before = block_exclusive_scan(count, s_warp, &num_rows);
    if (tid <= E) scan[tid] = tid < E ? before : num_rows;
    __syncthreads();
    if (blockIdx.x == 0) {
        if (tid < E) {
            const int l = tid / R;
            a.layout_range[tid] = (static_cast<int64_t>(before - scan[l * R]) << 32) | static_cast<int64_t>(count);
        }
        if (tid < L) {
            const int rows = scan[(tid + 1) * R] - scan[tid * R];
            a.recv_count[tid] = rows;
            if (a.cumulative_stats) atomicAdd(a.cumulative_stats + tid, rows);
        }
    }
    for (int i = blockIdx.x * blockDim.x + tid; i < L * RM; i += gridDim.x * blockDim.x) {
        const int l = i / RM, j = i - l * RM;
        if (j >= scan[(l + 1) * R] - scan[l * R]) a.src_info[i] = -1;
    }
    return num_rows;
}

}  // namespace
}  // namespace moe_a2a
