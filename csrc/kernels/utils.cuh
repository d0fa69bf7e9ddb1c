// Device helpers shared by the kernels: error checks, acquire/release accesses across processes,
// vector copies and the timeout clock.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <cuda_runtime.h>

#define MOE_A2A_CUDA_CHECK(expr)                                                                      \
    do {                                                                                              \
        cudaError_t err_ = (expr);                                                                    \
        if (err_ != cudaSuccess)                                                                      \
            throw std::runtime_error(std::string("moe_a2a CUDA error: ") + cudaGetErrorString(err_) + \
                                     " at " __FILE__ ":" + std::to_string(__LINE__));                 \
    } while (0)

#ifdef __CUDACC__
namespace moe_a2a {

// Flags between ranks use system scope: peers are other processes, on this GPU (MPS) or over NVLink.
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
    int v;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ int ld_volatile(const int* p) {
    int v;
    asm volatile("ld.volatile.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Wrap-safe "a >= b" for monotonically increasing 32-bit counters.
__device__ __forceinline__ bool counter_reached(int a, int b) { return a - b >= 0; }

// Streaming 16-byte loads of data that does not change while the kernel runs: skip L1 allocation.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ void st_na_v4(int4* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}

// Loads of data another rank wrote during this kernel (after an acquire): cached in L2 only, so a
// line read in an earlier round is never served stale from L1.
__device__ __forceinline__ int4 ld_cg_v4(const int4* p) {
    int4 v;
    asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ int ld_cg(const int* p) {
    int v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// Copy `num_int4` 16-byte words with one warp, `kUnroll` loads in flight per lane (the tail too, by
// predication). `kShared`: the source was written by another rank during this kernel (L2-only loads);
// otherwise it is read-only input.
template <bool kShared, int kUnroll = 4>
__device__ __forceinline__ void warp_copy(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4,
                                          int lane) {
    for (int base = lane; base < num_int4; base += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + 32 * u < num_int4) v[u] = kShared ? ld_cg_v4(src + base + 32 * u) : ld_nc_v4(src + base + 32 * u);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + 32 * u < num_int4) st_na_v4(dst + base + 32 * u, v[u]);
    }
}

// Like warp_copy, with an unpredicated main loop and a one-word-at-a-time tail: fewer live registers,
// for kernels that are short of them.
template <bool kShared, int kUnroll = 4>
__device__ __forceinline__ void warp_copy_lean(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4,
                                               int lane) {
    int i = lane;
    for (; i + 32 * (kUnroll - 1) < num_int4; i += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = kShared ? ld_cg_v4(src + i + 32 * u) : ld_nc_v4(src + i + 32 * u);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) st_na_v4(dst + i + 32 * u, v[u]);
    }
    for (; i < num_int4; i += 32) st_na_v4(dst + i, kShared ? ld_cg_v4(src + i) : ld_nc_v4(src + i));
}

// 4-byte-granular copy for small pieces (scales, top-k rows).
template <bool kShared>
__device__ __forceinline__ void warp_copy_words(int* __restrict__ dst, const int* __restrict__ src, int num_words,
                                                int lane) {
    for (int i = lane; i < num_words; i += 32) dst[i] = kShared ? ld_cg(src + i) : __ldg(src + i);
}

}  // namespace moe_a2a
#endif  // __CUDACC__
