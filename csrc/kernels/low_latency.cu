// Low-latency dispatch/combine over CUDA IPC (layout in low_latency.cuh).
//
// Dispatch send: each block loads the routing into shared memory, counts tokens per expert, gives every
// (token, top-k slot) pair its position inside its (expert, source) block (pairs ordered by token, then
// slot, as the reference orders them), casts each of its tokens once (FP8 on the fly) and stores it
// straight into the receivers' message slots. Once a block has stored all its tokens it counts them per
// expert, and the thread completing an expert (over all blocks) releases that expert's flag with the
// count; experts with no token are released at once. No wait on any peer or other block.
// Dispatch recv: one block per local expert waits for the R flags (acquire), packs the messages source by
// source into the output slots and writes recv_count, layout_range and src_info.
// Combine send: one block per local expert stores every row into its source rank's [E][M] row table at
// (expert, source token), then releases one flag per (expert, source rank).
// Combine recv: one block per token waits for the flags of its experts and sums the weighted rows in
// float32; the last block to finish waits for every flag and clears them.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "kernels/low_latency.cuh"
#include "kernels/utils.cuh"

namespace moe_a2a {

namespace {

constexpr float kFp8Max = 448.0f;
constexpr float kMinAmax = 1e-4f;

__device__ __forceinline__ int* dispatch_flags(const LLCtx& c, int r) {
    return reinterpret_cast<int*>(c.peers[r]) + c.set * kLLSetSignalInts;
}

__device__ __forceinline__ int* combine_flags(const LLCtx& c, int r) { return dispatch_flags(c, r) + kLLMaxExperts; }

__device__ __forceinline__ char* set_base(const LLCtx& c, int r) {
    return c.peers[r] + kLLSignalBytes + static_cast<int64_t>(c.set) * c.set_bytes;
}

__device__ __forceinline__ char* recv_area(const LLCtx& c, int r) { return set_base(c, r) + c.recv_offset; }

// First timeout wins: it fills the host record (code last) and aborts later waits of this rank.
__device__ void record_timeout(const LLCtx& c, int phase, int peer, int index) {
    int* ws = c.workspace;
    if (atomicCAS(ws + kLLWorkspaceClaim, 0, 1) == 0) {
        c.host->phase = phase;
        c.host->peer = peer;
        c.host->index = index;
        c.host->set = c.set;
        c.host->call = c.call;
        __threadfence_system();
        c.host->code = 1;
    }
    atomicExch(ws + kLLWorkspaceAbort, 1);
    __threadfence_system();
}

// Waits (one thread) until *flag != 0 and returns it; 0 after a timeout or once this rank aborted.
// Adds the nanoseconds waited to *wait_ns when given.
__device__ int wait_flag(const LLCtx& c, const int* flag, int phase, int peer, int index,
                         unsigned long long* wait_ns) {
    int v = ld_acquire_sys(flag);
    if (v != 0) return v;
    const uint64_t start = global_timer_ns();
    uint64_t now = start;
    while (true) {
#pragma unroll 1
        for (int i = 0; i < 64 && v == 0; ++i) v = ld_acquire_sys(flag);
        now = global_timer_ns();
        if (v != 0) break;
        if (ld_volatile(c.workspace + kLLWorkspaceAbort)) return 0;
        if (now - start > c.timeout_ns) {
            record_timeout(c, phase, peer, index);
            return 0;
        }
    }
    if (wait_ns != nullptr) atomicAdd(wait_ns, static_cast<unsigned long long>(now - start));
    return v;
}

// Smallest power of two >= s (s positive and normal): the UE8M0-representable scale.
__device__ __forceinline__ float round_up_pow2(float s) {
    uint32_t bits = __float_as_uint(s);
    if (bits & 0x7FFFFFu) bits = (bits & 0x7F800000u) + 0x800000u;
    return __uint_as_float(bits);
}

__device__ __forceinline__ int warp_count(bool pred) { return __popc(__ballot_sync(0xFFFFFFFFu, pred)); }

// ------------------------------------------------------------------------------------------ dispatch
template <bool kFp8>
__global__ void __launch_bounds__(kLLThreads, 1) dispatch_send_kernel(LLCtx c, LLDispatchArgs a) {
    extern __shared__ int smem[];
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, R = c.num_ranks, L = E / R;
    const int n = T * K;
    int* s_idx = smem;       // [T * K] expert ids
    int* s_hist = smem + n;  // [E] pairs per expert
    // [tokens of this block * K] message address of each of this block's pairs (null for -1 slots)
    char** s_msg = reinterpret_cast<char**>(smem + ((n + E + 1) & ~1));
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, num_warps = blockDim.x >> 5;
    const int64_t msg_bytes = ll_msg_bytes(a.hidden, kFp8);

    for (int i = tid; i < n; i += blockDim.x) s_idx[i] = static_cast<int>(__ldg(a.topk_idx + i));
    for (int e = tid; e < E; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x)
        if (s_idx[i] >= 0) atomicAdd(s_hist + s_idx[i], 1);
    const int my_tokens = T > static_cast<int>(blockIdx.x) ? (T - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    // Position of pair (t, k) = pairs before it (by token, then slot) that chose the same expert.
    for (int p = warp; p < my_tokens * K; p += num_warps) {
        const int t = blockIdx.x + (p / K) * gridDim.x, flat = t * K + p % K, e = s_idx[flat];
        int count = 0;
        if (e >= 0)
            for (int base = 0; base < flat; base += 32) count += warp_count(base + lane < flat && s_idx[base + lane] == e);
        if (lane == 0)
            s_msg[p] = e < 0 ? nullptr
                             : recv_area(c, e / L) +
                                   ((static_cast<int64_t>(e % L) * R + c.rank) * a.max_tokens + count) * msg_bytes;
    }
    __syncthreads();
    // Experts nobody here routes to: release their flags now with a count of 0.
    for (int e = blockIdx.x + gridDim.x * tid; e < E; e += gridDim.x * blockDim.x)
        if (s_hist[e] == 0) st_release_sys(dispatch_flags(c, e / L) + (e % L) * R + c.rank, -1);

    // Each thread owns one 16-byte chunk (8 channels) of every token of this block; the next token's chunk
    // is loaded before the current one is stored, so loads overlap the remote stores.
    const int chunks = a.hidden / 8;
    const int4* x = reinterpret_cast<const int4*>(a.x);
    const int4 zero = make_int4(0, 0, 0, 0);
    if constexpr (kFp8) {
        // 16 lanes hold one 128-channel block: reduce amax among them, cast, store 8 bytes per lane.
        for (int base = warp * 32; base < chunks; base += num_warps * 32) {
            const int ch = base + lane;
            const bool active = ch < chunks;
            int4 next = active && my_tokens > 0 ? ld_nc_v4(x + static_cast<int64_t>(blockIdx.x) * chunks + ch) : zero;
            for (int q = 0; q < my_tokens; ++q) {
                const int4 v = next;
                if (active && q + 1 < my_tokens)
                    next = ld_nc_v4(x + static_cast<int64_t>(blockIdx.x + (q + 1) * gridDim.x) * chunks + ch);
                const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
                float f[8];
                float amax = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    f[i] = __bfloat162float(h[i]);
                    amax = fmaxf(amax, fabsf(f[i]));
                }
#pragma unroll
                for (int m = 8; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, m));
                float scale = fmaxf(amax, kMinAmax) / kFp8Max;
                if (a.round_scale) scale = round_up_pow2(scale);
                const float inv = 1.0f / scale;
                uint32_t packed[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * i] * inv, f[4 * i + 1] * inv),
                                                                 __NV_SATFINITE, __NV_E4M3);
                    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * i + 2] * inv, f[4 * i + 3] * inv),
                                                                 __NV_SATFINITE, __NV_E4M3);
                    packed[i] = lo | (hi << 16);
                }
                if (!active) continue;
                for (int k = 0; k < K; ++k) {
                    char* msg = s_msg[q * K + k];
                    if (msg == nullptr) continue;
                    *reinterpret_cast<uint2*>(msg + 16 + ch * 8) = make_uint2(packed[0], packed[1]);
                    if ((lane & 15) == 0) reinterpret_cast<float*>(msg + 16 + a.hidden)[ch / 16] = scale;
                }
            }
        }
    } else {
        for (int ch = tid; ch < chunks; ch += blockDim.x) {
            int4 next = my_tokens > 0 ? ld_nc_v4(x + static_cast<int64_t>(blockIdx.x) * chunks + ch) : zero;
            for (int q = 0; q < my_tokens; ++q) {
                const int4 v = next;
                if (q + 1 < my_tokens)
                    next = ld_nc_v4(x + static_cast<int64_t>(blockIdx.x + (q + 1) * gridDim.x) * chunks + ch);
                for (int k = 0; k < K; ++k) {
                    char* msg = s_msg[q * K + k];
                    if (msg != nullptr) st_na_v4(reinterpret_cast<int4*>(msg + 16) + ch, v);
                }
            }
        }
    }
    for (int p = tid; p < my_tokens * K; p += blockDim.x)
        if (s_msg[p] != nullptr)
            *reinterpret_cast<int4*>(s_msg[p]) = make_int4(static_cast<int>(blockIdx.x + (p / K) * gridDim.x), 0, 0, 0);

    // All of this block's tokens are stored: count them per expert; the thread that completes an expert
    // (over all blocks) releases its flag with the count.
    int* finished = c.workspace + c.set * kLLWorkspaceSetInts;
    __threadfence_system();
    __syncthreads();
    for (int p = tid; p < my_tokens * K; p += blockDim.x) {
        const int e = s_idx[(blockIdx.x + (p / K) * gridDim.x) * K + p % K];
        if (e < 0) continue;
        __threadfence_system();
        if (atomicAdd(finished + e, 1) + 1 == s_hist[e]) {
            finished[e] = 0;
            __threadfence_system();
            st_release_sys(dispatch_flags(c, e / L) + (e % L) * R + c.rank, -s_hist[e] - 1);
        }
    }
}

__global__ void __launch_bounds__(kLLThreads, 1) dispatch_recv_kernel(LLCtx c, LLDispatchArgs a) {
    __shared__ int s_count[kLLMaxRanks], s_begin[kLLMaxRanks + 1];
    const int R = c.num_ranks, L = a.num_experts / R, M = a.max_tokens, RM = R * M;
    const int tid = threadIdx.x;
    const int64_t msg_bytes = ll_msg_bytes(a.hidden, a.fp8);
    const int row_int4 = a.fp8 ? a.hidden / 16 : a.hidden / 8;
    const int num_scales = a.hidden / 128, cols = a.ue8m0 ? num_scales / 4 : num_scales;
    int* flags = dispatch_flags(c, c.rank);
    const char* staging = recv_area(c, c.rank);
    for (int l = blockIdx.x; l < L; l += gridDim.x) {
        if (tid < R) {
            int* flag = flags + l * R + tid;
            const int v = wait_flag(c, flag, kLLPhaseDispatchRecv, tid, l,
                                    a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats + tid) : nullptr);
            *flag = 0;
            s_count[tid] = v < 0 ? -v - 1 : 0;
        }
        __syncthreads();
        if (tid == 0) {
            int total = 0;
            for (int s = 0; s < R; ++s) {
                s_begin[s] = total;
                total += s_count[s];
            }
            s_begin[R] = total;
            a.recv_count[l] = total;
            if (a.cumulative_stats) atomicAdd(a.cumulative_stats + l, total);
        }
        __syncthreads();
        if (tid < R)
            a.layout_range[l * R + tid] = (static_cast<int64_t>(s_begin[tid]) << 32) | static_cast<int64_t>(s_count[tid]);
        const int total = s_begin[R];
        const int64_t first_slot = static_cast<int64_t>(l) * RM;
        // Message of output slot j: source s with s_begin[s] <= j < s_begin[s + 1].
        auto message = [&](int j) {
            int s = 0;
            while (s + 1 < R && j >= s_begin[s + 1]) ++s;
            return staging + ((static_cast<int64_t>(l) * R + s) * M + (j - s_begin[s])) * msg_bytes;
        };
        for (int j = tid; j < RM; j += blockDim.x)
            a.src_info[first_slot + j] = j < total ? ld_cg(reinterpret_cast<const int*>(message(j))) : -1;
        // Rows: the whole block copies 16-byte words, four loads in flight per thread.
        const int num_words = total * row_int4;
        int4* out = static_cast<int4*>(a.recv_x) + first_slot * row_int4;
        for (int i0 = tid; i0 < num_words; i0 += 4 * blockDim.x) {
            int4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * blockDim.x;
                if (i < num_words) {
                    const int j = i / row_int4;
                    v[u] = ld_cg_v4(reinterpret_cast<const int4*>(message(j) + 16) + (i - j * row_int4));
                }
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * blockDim.x;
                if (i < num_words) st_na_v4(out + i, v[u]);
            }
        }
        if (a.fp8) {
            // Column-major scales: [L, cols, R * M] in memory; j fastest for coalesced stores.
            for (int i = tid; i < total * cols; i += blockDim.x) {
                const int g = i / total, j = i - g * total;
                const int* scales = reinterpret_cast<const int*>(message(j) + 16 + a.hidden);
                int value;
                if (a.ue8m0) {
                    uint32_t word = 0;
#pragma unroll
                    for (int b = 0; b < 4; ++b)
                        word |= ((static_cast<uint32_t>(ld_cg(scales + 4 * g + b)) >> 23) & 0xFFu) << (8 * b);
                    value = static_cast<int>(word);
                } else {
                    value = ld_cg(scales + g);
                }
                static_cast<int*>(a.recv_scales)[(static_cast<int64_t>(l) * cols + g) * RM + j] = value;
            }
        }
        __syncthreads();  // s_count / s_begin are reused by the next expert
    }
}

// ------------------------------------------------------------------------------------------ combine
__global__ void __launch_bounds__(kLLThreads, 1) combine_send_kernel(LLCtx c, LLCombineArgs a) {
    __shared__ int s_count[kLLMaxRanks], s_begin[kLLMaxRanks];
    const int R = c.num_ranks, L = a.num_experts / R, M = a.max_tokens, RM = R * M;
    const int tid = threadIdx.x;
    const int row_int4 = a.hidden / 8;
    const int4* x = reinterpret_cast<const int4*>(a.x);
    for (int l = blockIdx.x; l < L; l += gridDim.x) {
        if (tid < R) {
            const int64_t range = a.layout_range[l * R + tid];
            s_begin[tid] = static_cast<int>(range >> 32);
            s_count[tid] = static_cast<int>(range & 0xFFFFFFFFLL);
        }
        __syncthreads();
        const int total = s_begin[R - 1] + s_count[R - 1];
        const int e = c.rank * L + l;
        const int64_t first_slot = static_cast<int64_t>(l) * RM;
        // Destination row of slot j: its source rank's table at (expert e, source token).
        auto destination = [&](int j) {
            int s = 0;
            while (s + 1 < R && j >= s_begin[s + 1]) ++s;
            const int t = __ldg(a.src_info + first_slot + j);
            return reinterpret_cast<int4*>(recv_area(c, s)) + (static_cast<int64_t>(e) * M + t) * row_int4;
        };
        // The whole block copies 16-byte words, four loads in flight per thread.
        const int num_words = total * row_int4;
        for (int i0 = tid; i0 < num_words; i0 += 4 * blockDim.x) {
            int4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * blockDim.x;
                if (i < num_words) v[u] = ld_nc_v4(x + first_slot * row_int4 + i);
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = i0 + u * blockDim.x;
                if (i < num_words) {
                    const int j = i / row_int4;
                    st_na_v4(destination(j) + (i - j * row_int4), v[u]);
                }
            }
        }
        __threadfence_system();
        __syncthreads();
        if (tid < R) {
            __threadfence_system();
            st_release_sys(combine_flags(c, tid) + e, 1);
        }
        __syncthreads();
    }
}

__global__ void __launch_bounds__(kLLThreads, 1) combine_recv_kernel(LLCtx c, LLCombineArgs a) {
    __shared__ int s_expert[kLLMaxTopk];
    __shared__ float s_weight[kLLMaxTopk];
    __shared__ int s_last;
    const int T = a.num_tokens, K = a.num_topk, E = a.num_experts, R = c.num_ranks, L = E / R, M = a.max_tokens;
    const int tid = threadIdx.x;
    const int row_int4 = a.hidden / 8;
    int* flags = combine_flags(c, c.rank);
    const int4* rows = reinterpret_cast<const int4*>(recv_area(c, c.rank));
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        if (tid < K) {
            const int e = static_cast<int>(__ldg(a.topk_idx + static_cast<int64_t>(t) * K + tid));
            s_expert[tid] = e;
            s_weight[tid] = __ldg(a.topk_weights + static_cast<int64_t>(t) * K + tid);
            if (e >= 0)
                wait_flag(c, flags + e, kLLPhaseCombineRecv, e / L, e,
                          a.wait_stats ? reinterpret_cast<unsigned long long*>(a.wait_stats + e / L) : nullptr);
        }
        __syncthreads();
        for (int ch = tid; ch < row_int4; ch += blockDim.x) {
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            // Four rows in flight per thread; the sum still runs in top-k order.
            for (int k0 = 0; k0 < K; k0 += 4) {
                int4 v[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    const int e = k0 + u < K ? s_expert[k0 + u] : -1;
                    if (e >= 0) v[u] = ld_cg_v4(rows + (static_cast<int64_t>(e) * M + t) * row_int4 + ch);
                }
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    if (k0 + u >= K || s_expert[k0 + u] < 0) continue;
                    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v[u]);
                    const float w = s_weight[k0 + u];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += w * __bfloat162float(h[i]);
                }
            }
            int4 o;
            __nv_bfloat16* oh = reinterpret_cast<__nv_bfloat16*>(&o);
#pragma unroll
            for (int i = 0; i < 8; ++i) oh[i] = __float2bfloat16_rn(acc[i]);
            reinterpret_cast<int4*>(a.out)[static_cast<int64_t>(t) * row_int4 + ch] = o;
        }
        __syncthreads();
    }
    // Every expert released a flag here, whether or not a token of this rank chose it: the last block
    // waits for all of them and clears them for the next use of this set.
    int* done = c.workspace + c.set * kLLWorkspaceSetInts + kLLMaxExperts;
    if (tid == 0) {
        __threadfence();
        s_last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
    }
    __syncthreads();
    if (s_last) {
        __threadfence();
        for (int e = tid; e < E; e += blockDim.x) {
            wait_flag(c, flags + e, kLLPhaseCombineRecv, e / L, e, nullptr);
            flags[e] = 0;
        }
        if (tid == 0) *done = 0;
    }
}

int grid_for(int num_sms, int work) { return work < 1 ? 1 : (work < num_sms ? work : num_sms); }

}  // namespace

void launch_ll_dispatch_send(const LLCtx& c, const LLDispatchArgs& a, int num_sms, cudaStream_t stream) {
    const int grid = grid_for(num_sms, a.num_tokens);
    const int per_block = (a.num_tokens + grid - 1) / grid;
    const size_t ints = (static_cast<size_t>(a.num_tokens) * a.num_topk + a.num_experts + 1) & ~static_cast<size_t>(1);
    const size_t smem = sizeof(int) * ints + sizeof(char*) * static_cast<size_t>(per_block) * a.num_topk;
    auto kernel = a.fp8 ? dispatch_send_kernel<true> : dispatch_send_kernel<false>;
    if (smem > 48 * 1024)
        MOE_A2A_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, kLLThreads, smem, stream>>>(c, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_dispatch_recv(const LLCtx& c, const LLDispatchArgs& a, int num_sms, cudaStream_t stream) {
    dispatch_recv_kernel<<<grid_for(num_sms, a.num_experts / c.num_ranks), kLLThreads, 0, stream>>>(c, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_combine_send(const LLCtx& c, const LLCombineArgs& a, int num_sms, cudaStream_t stream) {
    combine_send_kernel<<<grid_for(num_sms, a.num_experts / c.num_ranks), kLLThreads, 0, stream>>>(c, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_ll_combine_recv(const LLCtx& c, const LLCombineArgs& a, int num_sms, cudaStream_t stream) {
    combine_recv_kernel<<<grid_for(num_sms, a.num_tokens), kLLThreads, 0, stream>>>(c, a);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_a2a
