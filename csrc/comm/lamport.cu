// Lamport one-shot / two-shot all-reduce kernels with the residual add, RMSNorm and FP8 quantization fused
// (protocol in allreduce.cuh). One kernel per call, no host sync, no barrier kernel.
//
// Values: each element's sum over ranks is accumulated in float32 in rank order and rounded once to the
// element type; bias and residual are then added one at a time, each add rounded (as torch adds tensors of
// that type); the norm is computed in float32 from the rounded residual_out. The sum and residual_out are
// therefore the reference's up to the sign of zero (-0.0 is the sentinel: a value sent between ranks carries
// +0.0 in its place); the norm differs from it by the order of the sum of squares only.
//
// Work split: a block takes whole rows (tokens), block-strided; its threads take the 16-byte pieces of a
// row, thread-strided, and keep the same pieces in every pass, so a thread reads back only what it wrote.
// Blocks never wait on another block of the same rank except through peers' data, and every block sends
// before it waits, so any number of resident blocks makes progress.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "comm/allreduce.cuh"
#include "comm/elem.cuh"
#include "kernels/utils.cuh"

namespace moe_a2a::comm {

namespace {

__device__ __forceinline__ int4 ld_volatile_v4(const int4* p) {
    int4 v;
    asm volatile("ld.volatile.global.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

__device__ __forceinline__ void st_volatile_v4(int4* p, const int4& v) {
    asm volatile("st.volatile.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

template <typename T>
__device__ __forceinline__ bool has_sentinel(const Vec<T>& v) {
    bool any = false;
#pragma unroll
    for (int i = 0; i < Elem<T>::kPerVec; ++i) any |= v.b[i] == Elem<T>::kSentinel;
    return any;
}

// -0.0 is the sentinel: data carries +0.0 in its place (the same value).
template <typename T>
__device__ __forceinline__ Vec<T> unsentinel(Vec<T> v) {
#pragma unroll
    for (int i = 0; i < Elem<T>::kPerVec; ++i)
        if (v.b[i] == Elem<T>::kSentinel) v.b[i] = 0;
    return v;
}

template <typename T>
__device__ __forceinline__ int4 sentinel_vec() {
    Vec<T> v;
#pragma unroll
    for (int i = 0; i < Elem<T>::kPerVec; ++i) v.b[i] = Elem<T>::kSentinel;
    return v.v;
}

// The first failure records itself (the abort flag doubles as the lock), then traps (see trap_after_error).
__device__ void record_error(const ArArgs& a, int code, int step, int peer, int token, const int* mine,
                             const int* theirs) {
    if (atomicCAS(a.flags + kFlagAbort, 0, 1) != 0) return;
    ArHostError* h = a.host;
    h->step = step;
    h->peer = peer;
    h->call = a.flags[kFlagCalls];
    h->token = token;
    for (int i = 0; i < 3; ++i) {
        h->mine[i] = mine ? mine[i] : 0;
        h->theirs[i] = theirs ? theirs[i] : 0;
    }
    __threadfence_system();
    h->code = code;
    __threadfence_system();
    trap_after_error("all-reduce", a.rank, code, step, peer);  // outputs of a failed call are never read
}

__device__ __forceinline__ bool aborted(const ArArgs& a) { return ld_volatile(a.flags + kFlagAbort) != 0; }

// Spin until the piece at `p` holds data (no sentinel); false on timeout or abort (then `out` is junk).
template <typename T>
__device__ __forceinline__ bool wait_vec(const ArArgs& a, const int4* p, Vec<T>& out, int step, int peer, int token) {
    out.v = ld_volatile_v4(p);
    if (!has_sentinel<T>(out)) return true;
    const uint64_t start = global_timer_ns();
    for (int spins = 1;; ++spins) {
        out.v = ld_volatile_v4(p);
        if (!has_sentinel<T>(out)) return true;
        if ((spins & 255) == 0) {
            if (aborted(a)) return false;
            if (global_timer_ns() - start > a.timeout_ns) {
                record_error(a, kArErrTimeout, step, peer, token, nullptr, nullptr);
                return false;
            }
        }
    }
}

__device__ __forceinline__ int4* buffer_of(const ArArgs& a, int rank, int index) {
    return reinterpret_cast<int4*>(static_cast<char*>(a.peers[rank]) + index * a.buffer_bytes);
}

// Block 0 sends this rank's message header (rows, hidden, mode) into slot `me` of every rank's header.
__device__ __forceinline__ void send_header(const ArArgs& a, int buf, int rows, int mode) {
    if (blockIdx.x == 0 && threadIdx.x < a.num_ranks)
        st_volatile_v4(buffer_of(a, threadIdx.x, buf) + a.rank, make_int4(rows, a.hidden, mode, 0x4c414d50));
}

// Refill with the sentinel what the previous call used of the previous buffer (no peer writes there now).
// The send step: every piece i of src[0, n), loaded by the grid with kUnroll loads in flight per thread and
// its -0.0 replaced (unsentinel), handed to store(i, piece), which writes it into the peers' buffers.
template <typename T, typename Store>
__device__ __forceinline__ void send_pieces(const int4* src, int64_t n, Store store) {
    constexpr int kUnroll = 4;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < n;
         base += stride * kUnroll) {
        Vec<T> v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * stride < n) v[u].v = ld_nc_v4(src + base + u * stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            if (base + u * stride < n) store(base + u * stride, unsentinel<T>(v[u]));
    }
}

template <typename T>
__device__ __forceinline__ void clear_previous(const ArArgs& a, int buf, int prev_used) {
    int4* prev = buffer_of(a, a.rank, (buf + kArNumBuffers - 1) % kArNumBuffers);
    const int4 sentinel = sentinel_vec<T>();
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < prev_used;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        prev[i] = sentinel;
}

// Wait for every peer's header in `mine` and compare it with (rows, hidden, mode): a message of another
// shape, a timeout or an abort makes it false in every thread of the block.
template <typename T>
__device__ bool headers_agree(const ArArgs& a, const int4* mine, int rows, int mode) {
    __shared__ int bad_header;
    if (threadIdx.x == 0) bad_header = 0;
    __syncthreads();
    if (threadIdx.x < a.num_ranks) {
        const int p = threadIdx.x;
        const uint32_t sentinel32 = Elem<T>::kSentinel == 0x8000u ? 0x80008000u : 0x80000000u;
        const uint64_t start = global_timer_ns();
        int4 h;
        bool bad = false;
        for (int spins = 0;; ++spins) {
            h = ld_volatile_v4(mine + p);
            if (static_cast<uint32_t>(h.x) != sentinel32 && static_cast<uint32_t>(h.y) != sentinel32 &&
                static_cast<uint32_t>(h.z) != sentinel32 && static_cast<uint32_t>(h.w) != sentinel32)
                break;
            if ((spins & 255) == 255) {
                if (aborted(a)) {
                    bad = true;
                    break;
                }
                if (global_timer_ns() - start > a.timeout_ns) {
                    record_error(a, kArErrTimeout, kStepHeader, p, -1, nullptr, nullptr);
                    bad = true;
                    break;
                }
            }
        }
        if (!bad && (h.x != rows || h.y != a.hidden || h.z != mode)) {
            const int own[3] = {rows, a.hidden, mode}, their[3] = {h.x, h.y, h.z};
            record_error(a, kArErrShape, kStepHeader, p, -1, own, their);
            bad = true;
        }
        if (bad) atomicExch(&bad_header, 1);
    }
    __syncthreads();
    return bad_header == 0;
}

// The last block of the call moves the flags on: next buffer, pieces to clear there, calls made.
__device__ __forceinline__ void advance_flags(const ArArgs& a, int buf, int64_t used) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(a.flags + kFlagDone, 1) == static_cast<int>(gridDim.x) - 1) {
            a.flags[kFlagBuffer] = (buf + 1) % kArNumBuffers;
            a.flags[kFlagUsed] = static_cast<int>(used);
            a.flags[kFlagCalls] += 1;
            a.flags[kFlagDone] = 0;
            __threadfence();
        }
    }
}

// Sums of v[0..K) over the block, in place (every thread gets them; each the same order as for K = 1).
// `red` holds K * kArMaxThreads / 32 floats.
template <int K>
__device__ __forceinline__ void block_sums(float (&v)[K], float* red) {
    constexpr int kWarps = kArMaxThreads / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
    __syncthreads();  // `red` may still be read from the previous rows
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < K; ++k) red[k * kWarps + warp] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float total = 0.f;
        for (int w = 0; w < num_warps; ++w) total += red[k * kWarps + w];  // the same order in every thread
        v[k] = total;
    }
}

// The rounded sum, in rank order, of the pieces at `p0 + r * slot_stride` of every rank r in `sources` (a bit
// per rank); false when a wait failed. Loads go out four ranks at a time before the first wait (more would
// spill registers).
template <typename T>
__device__ __forceinline__ bool reduce_ranks(const ArArgs& a, const int4* p0, int64_t slot_stride, Vec<T>& s,
                                             int step, int token, unsigned sources = ~0u) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec, kBatch = 4;
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    for (int r0 = 0; r0 < a.num_ranks; r0 += kBatch) {
        Vec<T> in[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
            if (r0 + b < a.num_ranks && (sources >> (r0 + b) & 1u)) in[b].v = ld_volatile_v4(p0 + (r0 + b) * slot_stride);
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int r = r0 + b;
            if (r < a.num_ranks && (sources >> r & 1u)) {
                if (has_sentinel<T>(in[b]) && !wait_vec<T>(a, p0 + r * slot_stride, in[b], step, r, token))
                    return false;
#pragma unroll
                for (int i = 0; i < N; ++i) acc[i] += E::to_float(in[b].b[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s.b[i] = E::from_float(acc[i]);
    return true;
}

// s += bias (piece v of the row), rounded per element as torch adds two tensors of the element type.
template <typename T>
__device__ __forceinline__ void add_bias(const ArArgs& a, int64_t v, Vec<T>& s) {
    using E = Elem<T>;
    Vec<T> b;
    b.v = ld_nc_v4(static_cast<const int4*>(a.bias) + v);
#pragma unroll
    for (int i = 0; i < E::kPerVec; ++i) s.b[i] = E::from_float(E::to_float(s.b[i]) + E::to_float(b.b[i]));
}

// The plain all-reduce (no norm) has no per-row work: every piece of every row is finished independently,
// as a flat range over all the kernel's threads.
template <typename T, typename SumFn>
__device__ __forceinline__ bool finish_flat(const ArArgs& a, int64_t first, int64_t stride, int64_t total,
                                            int row_vecs, SumFn sums) {
    for (int64_t i = first; i < total; i += stride) {
        Vec<T> s;
        if (!sums(i, s)) return false;
        if (a.bias) add_bias<T>(a, i % row_vecs, s);
        st_na_v4(static_cast<int4*>(a.out) + i, s.v);
    }
    return true;
}

// s = s + bias (if any) + residual piece r, each add rounded as torch adds two tensors of the element type:
// residual_out's value.
template <typename T>
__device__ __forceinline__ void add_bias_residual(const ArArgs& a, int64_t v, Vec<T>& s, const Vec<T>& r) {
    using E = Elem<T>;
    if (a.bias) add_bias<T>(a, v, s);
#pragma unroll
    for (int i = 0; i < E::kPerVec; ++i) s.b[i] = E::from_float(E::to_float(s.b[i]) + E::to_float(r.b[i]));
}

// Everything after the sums of rows t0 + k * step, k < n <= kRows: bias, residual, RMSNorm, quantization,
// stores. Rows go together so the loads of all of them are in flight at once; each row's values and squares
// are added in the order they would be alone, so the results do not depend on kRows. `sums(v, s)` fills
// s[k] with the rounded sum of piece v of row k (waiting for it); false when a wait failed. With
// kSumsHaveResidual the sums are residual_out's values already (the two-shot's owner added bias and residual).
template <typename T, int kRows, bool kSumsHaveResidual, typename SumFn>
__device__ __forceinline__ bool finish_rows(const ArArgs& a, int t0, int step, int n, int row_vecs, SumFn sums,
                                            float* red) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    const int4* residual = static_cast<const int4*>(a.residual);
    const int4* weight = static_cast<const int4*>(a.weight);
    int64_t row[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) row[k] = static_cast<int64_t>(t0 + k * step) * row_vecs;
    // With at most one piece per thread (rows up to 8 KiB) the thread keeps its residual_out and weight in
    // registers across the block sum; otherwise it reads back its own stores.
    const bool one_piece = row_vecs <= static_cast<int>(blockDim.x);
    Vec<T> kept_r[kRows], kept_w;
    float ss[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) ss[k] = 0.f;
    bool ok = true;
    for (int v = threadIdx.x; v < row_vecs; v += blockDim.x) {
        // The local operands are loaded before the wait for the peers' data, so their latency overlaps it.
        Vec<T> r[kRows], s[kRows], w;
        w.v = ld_nc_v4(weight + v);
        if constexpr (!kSumsHaveResidual) {
#pragma unroll
            for (int k = 0; k < kRows; ++k)
                if (k < n) r[k].v = ld_nc_v4(residual + row[k] + v);
        }
        if (!sums(v, s)) {
            ok = false;
            break;
        }
#pragma unroll
        for (int k = 0; k < kRows; ++k) {
            if (k >= n) break;
            if constexpr (!kSumsHaveResidual) add_bias_residual<T>(a, v, s[k], r[k]);
            r[k] = s[k];
#pragma unroll
            for (int i = 0; i < N; ++i) {
                const float f = E::to_float(r[k].b[i]);
                ss[k] += f * f;
            }
            st_na_v4(static_cast<int4*>(a.residual_out) + row[k] + v, r[k].v);
            kept_r[k] = r[k];
        }
        kept_w = w;
    }
    // Every thread reaches the block sum, failed or not, so the block never splits at a barrier.
    block_sums<kRows>(ss, red);
    if (__syncthreads_or(!ok)) return false;
    const float inv_scale = a.scale ? 1.0f / __ldg(a.scale) : 0.f;
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
        if (k >= n) break;
        const float inv = rsqrtf(ss[k] / static_cast<float>(a.hidden) + a.eps);
        for (int v = threadIdx.x; v < row_vecs; v += blockDim.x) {
            Vec<T> r, w, o;
            if (one_piece) {
                r = kept_r[k];
                w = kept_w;
            } else {
                r.v = static_cast<const int4*>(a.residual_out)[row[k] + v];  // this thread's own store above
                w.v = ld_nc_v4(weight + v);
            }
#pragma unroll
            for (int i = 0; i < N; ++i) o.b[i] = E::from_float(E::to_float(r.b[i]) * inv * E::to_float(w.b[i]));
            if (a.out) st_na_v4(static_cast<int4*>(a.out) + row[k] + v, o.v);
            if (a.scale) {
                union {
                    uint8_t b[8];
                    uint2 u2;
                    uint32_t u1;
                } q;
#pragma unroll
                for (int i = 0; i < N; ++i)
                    q.b[i] = __nv_cvt_float_to_fp8(E::to_float(o.b[i]) * inv_scale, __NV_SATFINITE, __NV_E4M3);
                uint8_t* dst = a.quant + (row[k] + v) * N;
                if constexpr (N == 8) {
                    *reinterpret_cast<uint2*>(dst) = q.u2;
                } else {
                    *reinterpret_cast<uint32_t*>(dst) = q.u1;
                }
            }
        }
    }
    return true;
}

// Rows the two-shot's norm finishes together (finish_rows): two keep twice the loads in flight within the
// registers a thread has at two blocks per SM.
constexpr int kGatherRows = 2;

// Two blocks per SM (64 registers a thread, a few spilled): built for one (113 registers, no spills, 2 or 4
// rows per pass) the kernel stopped the H100 benchmark (8 ranks sharing the GPU, default blocks) with a
// header timeout in its first calls (all ranks' blocks were not resident together; why was not found). Keep
// two until that is understood.

template <typename T>
__global__ void __launch_bounds__(kArMaxThreads, 2) allreduce_kernel(ArArgs a) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    __shared__ float red[kGatherRows * kArMaxThreads / 32];
    const int R = a.num_ranks, me = a.rank, T_ = a.tokens;
    const int row_vecs = a.hidden / N;
    const int buf = a.flags[kFlagBuffer];
    const int prev_used = a.flags[kFlagUsed];
    const int chunk = (T_ + R - 1) / R;
    const int64_t data = R;  // the header's R pieces come first
    const int4* x = static_cast<const int4*>(a.x);

    // 1. Send: the header to every peer (block 0), then this rank's rows.
    send_header(a, buf, T_, 1 + a.two_shot);
    const int64_t total = static_cast<int64_t>(T_) * row_vecs;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first_piece = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    send_pieces<T>(x, total, [&](int64_t i, const Vec<T>& out) {
        if (!a.two_shot) {  // slot `me` of every rank: its row t at t * row_vecs
            const int64_t at = data + static_cast<int64_t>(me) * total + i;
            for (int p = 0; p < R; ++p) st_volatile_v4(buffer_of(a, p, buf) + at, out.v);
        } else {  // slot `me` of the owner of token t: its row t - owner * chunk
            const int owner = static_cast<int>(i / row_vecs) / chunk;
            const int64_t at = data + (static_cast<int64_t>(me) - owner) * chunk * row_vecs + i;
            st_volatile_v4(buffer_of(a, owner, buf) + at, out.v);
        }
    });

    // 2. While the peers' data travels: clear what the previous call used of the previous buffer.
    clear_previous<T>(a, buf, prev_used);

    // 3. Check every peer's header: a message of another shape ends the call with an error.
    const int4* mine = buffer_of(a, me, buf);
    bool ok = headers_agree<T>(a, mine, T_, 1 + a.two_shot);

    const bool norm = a.weight != nullptr;
    if (ok && !a.two_shot && !norm) {
        // 4a. One-shot: every row of every rank is here; reduce in rank order.
        ok = finish_flat<T>(a, first_piece, stride, total, row_vecs, [&](int64_t i, Vec<T>& s) {
            return reduce_ranks<T>(a, mine + data + i, total, s, kStepOneShot, static_cast<int>(i / row_vecs));
        });
    } else if (ok && !a.two_shot) {
        // 4a'. The same, row by row, with the norm.
        for (int t = blockIdx.x; t < T_ && ok; t += gridDim.x) {
            auto sums = [&](int v, Vec<T>* s) {
                return reduce_ranks<T>(a, mine + data + static_cast<int64_t>(t) * row_vecs + v, total, s[0],
                                       kStepOneShot, t);
            };
            ok = finish_rows<T, 1, false>(a, t, 0, 1, row_vecs, sums, red);
        }
    } else if (ok) {
        // 4b. Two-shot: reduce this rank's chunk and send each sum to every rank; then finish every row.
        // With the norm the owner also adds bias and residual (its own rows of them), so every rank gathers
        // residual_out's values and none reads the whole residual: 1/R of the residual's bytes instead of all.
        const int64_t gather = data + static_cast<int64_t>(R) * chunk * row_vecs;
        const int64_t slot = static_cast<int64_t>(chunk) * row_vecs;
        const int64_t my_total = static_cast<int64_t>(max(0, min(chunk, T_ - me * chunk))) * row_vecs;
        const int4* my_residual = norm ? static_cast<const int4*>(a.residual) + me * slot : nullptr;
        for (int64_t i = first_piece; i < my_total; i += stride) {
            Vec<T> s, r;
            if (norm) r.v = ld_nc_v4(my_residual + i);  // before the waits, so its latency overlaps them
            ok = reduce_ranks<T>(a, mine + data + i, slot, s, kStepScatter, me * chunk + static_cast<int>(i / row_vecs));
            if (!ok) break;
            if (norm) add_bias_residual<T>(a, i % row_vecs, s, r);
            s = unsentinel<T>(s);
            for (int p = 0; p < R; ++p) st_volatile_v4(buffer_of(a, p, buf) + gather + me * slot + i, s.v);
        }
        ok = !__syncthreads_or(!ok);
        if (ok && !norm) {
            ok = finish_flat<T>(a, first_piece, stride, total, row_vecs, [&](int64_t i, Vec<T>& s) {
                const int t = static_cast<int>(i / row_vecs);
                return wait_vec<T>(a, mine + gather + i, s, kStepGather, t / chunk, t);
            });
        }
        // Rows t0 + k * gridDim.x, k < kGatherRows, per pass: every row's piece is loaded before any wait.
        const int G = gridDim.x;
        for (int t0 = blockIdx.x; t0 < T_ && ok && norm; t0 += kGatherRows * G) {
            const int n = min(kGatherRows, (T_ - t0 + G - 1) / G);
            auto sums = [&](int v, Vec<T>* s) {
#pragma unroll
                for (int k = 0; k < kGatherRows; ++k)
                    if (k < n) s[k].v = ld_volatile_v4(mine + gather + static_cast<int64_t>(t0 + k * G) * row_vecs + v);
#pragma unroll
                for (int k = 0; k < kGatherRows; ++k) {
                    const int t = t0 + k * G;
                    if (k < n && has_sentinel<T>(s[k]) &&
                        !wait_vec<T>(a, mine + gather + static_cast<int64_t>(t) * row_vecs + v, s[k], kStepGather,
                                     t / chunk, t))
                        return false;
                }
                return true;
            };
            ok = finish_rows<T, kGatherRows, true>(a, t0, G, n, row_vecs, sums, red);
        }
    }

    // 5. The last block to finish moves the flags on to the next call.
    advance_flags(a, buf, ar_used_vecs(R, T_, a.hidden, sizeof(T), a.two_shot));
}

// Mixed TP x DP two-shot (ArArgs::mixed and two_shot): each rank sums one piece of the result over the ranks
// that hold its inputs and sends the sum to the ranks that need it, so a rank receives about (1 + dp) times
// its input instead of the one-shot's world-size times. The sums are the one-shot's (same sources, same
// order, rounded once), up to the sign of zero (-0.0 is the sentinel).
template <typename T>
__device__ __forceinline__ void mixed_two_shot(const ArArgs& a) {
    constexpr int N = Elem<T>::kPerVec;
    const int R = a.num_ranks, me = a.rank;
    const int row_vecs = a.hidden / N;
    const int buf = a.flags[kFlagBuffer];
    const int prev_used = a.flags[kFlagUsed];
    const int64_t data = R;
    const int64_t slot = static_cast<int64_t>(a.send_rows) * row_vecs;  // the largest piece
    const int64_t gather = data + R * slot;
    const int4* x = static_cast<const int4*>(a.x);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first_piece = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

    // 1. Send: the header, then this rank's rows of every owner that sums them, into slot `me` there.
    send_header(a, buf, a.send_rows, kArModeMixedTwoShot);
    for (int p = 0; p < R; ++p) {
        if (!(a.scatter_src[p] >> me & 1u)) continue;
        const int4* src = x + static_cast<int64_t>(a.send_first[p]) * row_vecs;
        int4* dst = buffer_of(a, p, buf) + data + me * slot;
        send_pieces<T>(src, static_cast<int64_t>(a.own_rows[p]) * row_vecs,
                       [&](int64_t i, const Vec<T>& v) { st_volatile_v4(dst + i, v.v); });
    }

    // 2. Clear what the previous call used of the previous buffer; 3. check the peers' headers.
    clear_previous<T>(a, buf, prev_used);
    const int4* mine = buffer_of(a, me, buf);
    bool ok = headers_agree<T>(a, mine, a.send_rows, kArModeMixedTwoShot);

    // 4. This rank's piece: the sum over its sources in rank order, sent to every rank that needs it.
    const int64_t my_n = static_cast<int64_t>(a.own_rows[me]) * row_vecs;
    for (int64_t i = first_piece; ok && i < my_n; i += stride) {
        Vec<T> s;
        ok = reduce_ranks<T>(a, mine + data + i, slot, s, kStepScatter,
                             a.send_first[me] + static_cast<int>(i / row_vecs), a.scatter_src[me]);
        if (!ok) break;
        s = unsentinel<T>(s);
        for (int q = 0; q < R; ++q)
            if (a.gather_dst[me] >> q & 1u) st_volatile_v4(buffer_of(a, q, buf) + gather + me * slot + i, s.v);
    }

    // 5. Every owner's sum this rank needs, into its rows of out.
    int4* out = static_cast<int4*>(a.out);
    for (int64_t i = first_piece; ok && i < R * slot; i += stride) {
        const int o = static_cast<int>(i / slot);
        const int64_t j = i - o * slot;
        if (!(a.gather_dst[o] >> me & 1u) || j >= static_cast<int64_t>(a.own_rows[o]) * row_vecs) continue;
        Vec<T> s;
        ok = wait_vec<T>(a, mine + gather + i, s, kStepGather, o, a.send_first[o] + static_cast<int>(j / row_vecs));
        if (ok) st_na_v4(out + static_cast<int64_t>(a.out_first[o]) * row_vecs + j, s.v);
    }

    // 6. Flags on to the next call.
    advance_flags(a, buf, ar_slots_vecs(R, a.send_rows, a.hidden, sizeof(T), true));
}

// Mixed TP x DP (ArArgs::mixed). One-shot: the all-reduce's steps with a row range per destination and a set
// of sources per output block.
template <typename T>
__global__ void __launch_bounds__(kArMaxThreads, 2) mixed_kernel(ArArgs a) {
    if (a.two_shot) {
        mixed_two_shot<T>(a);
        return;
    }
    constexpr int N = Elem<T>::kPerVec;
    const int R = a.num_ranks, me = a.rank;
    const int row_vecs = a.hidden / N;
    const int buf = a.flags[kFlagBuffer];
    const int prev_used = a.flags[kFlagUsed];
    const int64_t data = R;
    const int64_t slot = static_cast<int64_t>(a.send_rows) * row_vecs;  // pieces of one source's message
    const int4* x = static_cast<const int4*>(a.x);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first_piece = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

    // 1. Send: the header, then rows send_first[p]... of x into slot `me` of every rank p. Where every rank
    // gets the same rows (the gather operations) each piece is loaded once.
    send_header(a, buf, a.send_rows, kArModeMixed);
    bool same = true;
    for (int p = 1; p < R; ++p) same &= a.send_first[p] == a.send_first[0];
    for (int64_t i = first_piece; i < slot; i += stride) {
        Vec<T> v;
        for (int p = 0; p < R; ++p) {
            if (p == 0 || !same) {
                v.v = ld_nc_v4(x + static_cast<int64_t>(a.send_first[p]) * row_vecs + i);
                v = unsentinel<T>(v);
            }
            st_volatile_v4(buffer_of(a, p, buf) + data + me * slot + i, v.v);
        }
    }

    // 2. Clear what the previous call used of the previous buffer; 3. check the peers' headers.
    clear_previous<T>(a, buf, prev_used);
    const int4* mine = buffer_of(a, me, buf);
    bool ok = headers_agree<T>(a, mine, a.send_rows, kArModeMixed);

    // 4. Output block b, piece j: the sum over the sources of block b of their piece j.
    const int64_t total = static_cast<int64_t>(a.out_blocks) * slot;
    for (int64_t i = first_piece; ok && i < total; i += stride) {
        const int b = static_cast<int>(i / slot);
        const int64_t j = i - b * slot;
        unsigned sources = 0;
        for (int r = 0; r < R; ++r) sources |= (a.src_block[r] == b ? 1u : 0u) << r;
        Vec<T> s;
        ok = reduce_ranks<T>(a, mine + data + j, slot, s, kStepOneShot, static_cast<int>(j / row_vecs), sources);
        if (ok) st_na_v4(static_cast<int4*>(a.out) + i, s.v);
    }

    // 5. Flags on to the next call.
    advance_flags(a, buf, ar_slots_vecs(R, a.send_rows, a.hidden, sizeof(T), false));
}

__global__ void fill_kernel(int4* p, int64_t n, int4 value) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
        p[i] = value;
}

}  // namespace

void launch_allreduce(const ArArgs& a, int num_blocks, int num_threads, cudaStream_t stream) {
    if (a.mixed) {  // MixedCommHandler's float16 / bfloat16, and float32 for allgather / reducescatter
        switch (a.dtype) {
            case kArFloat32: mixed_kernel<float><<<num_blocks, num_threads, 0, stream>>>(a); break;
            case kArFloat16: mixed_kernel<__half><<<num_blocks, num_threads, 0, stream>>>(a); break;
            default: mixed_kernel<__nv_bfloat16><<<num_blocks, num_threads, 0, stream>>>(a); break;
        }
        MOE_A2A_CUDA_CHECK(cudaGetLastError());
        return;
    }
    switch (a.dtype) {
        case kArFloat32: allreduce_kernel<float><<<num_blocks, num_threads, 0, stream>>>(a); break;
        case kArFloat16: allreduce_kernel<__half><<<num_blocks, num_threads, 0, stream>>>(a); break;
        default: allreduce_kernel<__nv_bfloat16><<<num_blocks, num_threads, 0, stream>>>(a); break;
    }
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

void launch_fill_sentinel(void* base, int64_t num_vecs, int elem_size, cudaStream_t stream) {
    const int4 value = elem_size == 4 ? make_int4(static_cast<int>(0x80000000u), static_cast<int>(0x80000000u),
                                                  static_cast<int>(0x80000000u), static_cast<int>(0x80000000u))
                                      : make_int4(static_cast<int>(0x80008000u), static_cast<int>(0x80008000u),
                                                  static_cast<int>(0x80008000u), static_cast<int>(0x80008000u));
    fill_kernel<<<256, 256, 0, stream>>>(static_cast<int4*>(base), num_vecs, value);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_a2a::comm
