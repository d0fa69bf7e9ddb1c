// Device helpers shared by the kernels: error checks, acquire/release accesses across processes,
// vector copies and the timeout clock.
#pragma once

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <cuda_runtime.h>

// Argument checks of the extensions' host code: throw std::runtime_error (RuntimeError in Python) whose
// message joins the arguments. Neither TORCH_CHECK nor an ostringstream: where the extension carries its own
// copy of the C++ library (a compiler that links it statically), formatting a number through a stream reads
// locale facets that copy never initialised and the process crashes instead of raising; std::to_string and
// string appends need no locale. tests/cpu/test_build.py checks that argument errors reach Python.
namespace moe_a2a::detail {
inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, bool flag) { out += flag ? "true" : "false"; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append(std::string& out, T value) { out += std::to_string(value); }

template <typename... Args>
[[noreturn]] void check_failed(const Args&... args) {
    std::string message;
    (append(message, args), ...);
    throw std::runtime_error(message);
}
}  // namespace moe_a2a::detail

#define MOE_A2A_CHECK(cond, ...)                                              \
    do {                                                                      \
        if (!(cond)) ::moe_a2a::detail::check_failed(__VA_ARGS__);            \
    } while (0)

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

// The end of a kernel that recorded an error (timeout, overflow, mismatched handle) in its host record:
// say what happened on stderr, then trap. The trap makes this process's CUDA context fail, so the next
// synchronize, copy to the host or launch raises: the outputs of a failed operation are never read as if
// they were valid. (Ranks sharing one GPU under MPS all get the fault: MPS ends every client of a GPU on a
// fatal error.) Python raises the recorded text, which names the rank, step and peer, from the buffer.
static __device__ __noinline__ void trap_after_error(const char* op, int rank, int code, int phase, int peer) {
    printf("moe_a2a: rank %d: %s kernel failed (error %d, phase %d, peer %d); stopping the kernel\n", rank, op,
           code, phase, peer);
    __threadfence_system();
    __trap();
}

// Epochs, tags and call counts are 32-bit counters that wrap. They advance and compare in unsigned arithmetic,
// where wrapping is defined: with signed ints the overflow is undefined, and the compiler folds "a - b >= 0"
// into "a >= b", which fails once the counter passes INT_MAX (a wait then ends early or never).
__host__ __device__ constexpr int counter_add(int a, int n) {
    return static_cast<int>(static_cast<unsigned>(a) + static_cast<unsigned>(n));
}
// "a >= b" for counters less than 2^31 apart, across the wrap.
__host__ __device__ constexpr bool counter_reached(int a, int b) {
    return static_cast<int>(static_cast<unsigned>(a) - static_cast<unsigned>(b)) >= 0;
}
static_assert(counter_add(INT_MAX, 1) == INT_MIN, "counters wrap");
static_assert(counter_reached(INT_MIN, INT_MAX), "a wrapped counter is past INT_MAX");
static_assert(!counter_reached(INT_MAX, INT_MIN), "INT_MAX has not reached the wrapped value");
static_assert(counter_reached(5, 5) && counter_reached(6, 5) && !counter_reached(4, 5), "plain order");

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

// ---- Hopper bulk copies (cp.async.bulk, the TMA unit) between global and shared memory, completed
// through an mbarrier (loads) or bulk groups (stores). One thread issues a whole row piece; the data
// does not pass through registers, so a block keeps as many bytes in flight as its shared memory holds.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Makes initialised mbarriers visible to the async proxy (the bulk-copy unit).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

// Arrive once on `bar` and add `bytes` to the transaction count its current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    return done != 0;
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to this block's shared memory.
__device__ __forceinline__ void bulk_load(void* dst_smem, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst_smem)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

__device__ __forceinline__ void bulk_store(void* dst, const void* src_smem, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(smem_u32(src_smem)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Wait until at most N bulk store groups still read their shared-memory source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Wait until at most N bulk store groups are incomplete (their writes not yet performed).
template <int N>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// Orders this thread's earlier generic-proxy view of global memory (peers' rows, acquired through a
// barrier) before its later bulk copies.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

}  // namespace moe_a2a
#endif  // __CUDACC__
