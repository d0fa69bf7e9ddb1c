// Lamport one-shot / two-shot all-reduce kernels with the residual add, RMSNorm and FP8 quantization fused
// (protocol in allreduce.cuh). One kernel per call, no host sync, no barrier kernel.
//
// Values: each element's sum over ranks is accumulated in float32 in rank order and rounded once to the
// element type; bias and residual are then added one at a time, each add rounded (as torch adds tensors of
// that type); the norm is computed in float32 from the rounded residual_out. The sum and residual_out are
// therefore the reference's up to the sign of zero (-0.0 is the sentinel: a value sent between ranks carries
// +0.0 in its place); the norm differs from it by the order of the sum of squares only. The two-shot with the
// norm takes each row's bias and residual from the rank that owns the row (see 4b): equal to the reference
// where they are the same on every rank, as in tensor parallelism.
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

// Refill with the sentinel what the previous call used of the previous buffer (no peer writes there now).
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
            a.flags[kFlagCalls] = counter_add(a.flags[kFlagCalls], 1);
            a.flags[kFlagDone] = 0;
            __threadfence();
        }
    }
}

// The sum of v over the block, returned to every thread (each adds the warps' sums in the same order).
// `red` holds kArMaxThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // `red` may still be read from the previous row
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < num_warps; ++w) total += red[w];
    return total;
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

// A 15-bit fingerprint of a row's first residual piece: the fused two-shot's owner sends it with the row's
// 1/rms and every rank compares it with its own, so a residual that is not the same on every rank (the
// contract) raises instead of silently taking the owner's.
__device__ __forceinline__ int residual_fingerprint(const int4& r) {
    unsigned h = static_cast<unsigned>(r.x) * 0x9e3779b1u;
    h = (h ^ static_cast<unsigned>(r.y)) * 0x85ebca77u;
    h = (h ^ static_cast<unsigned>(r.z)) * 0xc2b2ae3du;
    h = (h ^ static_cast<unsigned>(r.w)) * 0x27d4eb2fu;
    return static_cast<int>((h ^ h >> 15 ^ h >> 30) & 0x7fffu);
}

// The two-shot sends a row's 1/rms and residual fingerprint as one 16-byte piece none of whose 16-bit halves or
// 32-bit words is -0.0 (so the sentinel test of the element type serves it too): the float's bits >> 16, its
// low 15 bits, bit 15, the fingerprint.
__device__ __forceinline__ int4 encode_inv(float inv, int fingerprint) {
    const unsigned b = __float_as_uint(inv);
    return make_int4(static_cast<int>(b >> 16), static_cast<int>(b & 0x7fffu), static_cast<int>(b >> 15 & 1u),
                     fingerprint);
}

__device__ __forceinline__ float decode_inv(const int4& q) {
    return __uint_as_float(static_cast<unsigned>(q.x) << 16 | static_cast<unsigned>(q.z) << 15 |
                           static_cast<unsigned>(q.y));
}

// RMSNorm's output of piece `at` of [tokens, hidden / N] (r: residual_out's values there, w: the weight's,
// inv: the row's 1/rms) into out and, with a scale, its FP8 quantization into quant.
template <typename T>
__device__ __forceinline__ void store_norm_piece(const ArArgs& a, int64_t at, const Vec<T>& r, const Vec<T>& w,
                                                 float inv, float inv_scale) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    Vec<T> o;
#pragma unroll
    for (int i = 0; i < N; ++i) o.b[i] = E::from_float(E::to_float(r.b[i]) * inv * E::to_float(w.b[i]));
    if (a.out) st_na_v4(static_cast<int4*>(a.out) + at, o.v);
    if (a.scale) {
        union {
            uint8_t b[8];
            uint2 u2;
            uint32_t u1;
        } q;
#pragma unroll
        for (int i = 0; i < N; ++i)
            q.b[i] = __nv_cvt_float_to_fp8(E::to_float(o.b[i]) * inv_scale, __NV_SATFINITE, __NV_E4M3);
        uint8_t* dst = a.quant + at * N;
        if constexpr (N == 8) {
            *reinterpret_cast<uint2*>(dst) = q.u2;
        } else {
            *reinterpret_cast<uint32_t*>(dst) = q.u1;
        }
    }
}

__device__ __forceinline__ float inverse_scale(const ArArgs& a) { return a.scale ? 1.0f / __ldg(a.scale) : 0.f; }

// Row t: piece v's sum over ranks (`sums(v, s)` fills s, waiting for it; false when a wait failed) plus bias
// and residual is residual_out's value, handed to keep(at, r) with `at` its index in [tokens, hidden / N];
// after the block sum the row's 1/rms is handed to done(inv) in every thread. Serves the one-shot's rows and
// the two-shot's owner, so both add a row's values and squares in the same order.
template <typename T, typename SumFn, typename KeepFn, typename DoneFn>
__device__ __forceinline__ bool norm_row(const ArArgs& a, int t, int row_vecs, SumFn sums, KeepFn keep, DoneFn done,
                                         float* red) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    const int4* residual = static_cast<const int4*>(a.residual);
    const int64_t row = static_cast<int64_t>(t) * row_vecs;
    float ss = 0.f;
    bool ok = true;
    for (int v = threadIdx.x; v < row_vecs; v += blockDim.x) {
        Vec<T> r, s;
        r.v = ld_nc_v4(residual + row + v);  // before the waits for the peers' data, so its latency overlaps them
        if (!sums(v, s)) {
            ok = false;
            break;
        }
        add_bias_residual<T>(a, v, s, r);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float f = E::to_float(s.b[i]);
            ss += f * f;
        }
        keep(row + v, s);
    }
    // Every thread reaches the block sum, failed or not, so the block never splits at a barrier.
    ss = block_sum(ss, red);
    if (__syncthreads_or(!ok)) return false;
    done(rsqrtf(ss / static_cast<float>(a.hidden) + a.eps));
    return true;
}

// Two blocks per SM (64 registers a thread, a few spilled): built for one (113 registers, no spills, 2 or 4
// rows per pass) the kernel stopped the H100 benchmark (8 ranks sharing the GPU, default blocks) with a
// header timeout in its first calls (all ranks' blocks were not resident together; why was not found). Keep
// two until that is understood.

template <typename T>
__global__ void __launch_bounds__(kArMaxThreads, 2) allreduce_kernel(ArArgs a) {
    using E = Elem<T>;
    constexpr int N = E::kPerVec;
    __shared__ float red[kArMaxThreads / 32];
    const int R = a.num_ranks, me = a.rank, T_ = a.tokens;
    const int row_vecs = a.hidden / N;
    const int buf = a.flags[kFlagBuffer];
    const int prev_used = a.flags[kFlagUsed];
    const int chunk = (T_ + R - 1) / R;
    const int64_t data = R;  // the header's R pieces come first
    const int4* x = static_cast<const int4*>(a.x);
    const int4* weight = static_cast<const int4*>(a.weight);
    const int4* residual = static_cast<const int4*>(a.residual);
    int4* residual_out = static_cast<int4*>(a.residual_out);

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
    const float inv_scale = inverse_scale(a);
    if (ok && !a.two_shot && !norm) {
        // 4a. One-shot: every row of every rank is here; reduce in rank order.
        ok = finish_flat<T>(a, first_piece, stride, total, row_vecs, [&](int64_t i, Vec<T>& s) {
            return reduce_ranks<T>(a, mine + data + i, total, s, kStepOneShot, static_cast<int>(i / row_vecs));
        });
    } else if (ok && !a.two_shot) {
        // 4a'. The same, row by row, with the norm. With at most one piece per thread (rows up to
        // blockDim.x pieces) the thread keeps its residual_out piece in registers across the block sum;
        // otherwise it reads back its own stores.
        const bool one_piece = row_vecs <= static_cast<int>(blockDim.x);
        for (int t = blockIdx.x; t < T_ && ok; t += gridDim.x) {
            Vec<T> kept;
            auto sums = [&](int v, Vec<T>& s) {
                return reduce_ranks<T>(a, mine + data + static_cast<int64_t>(t) * row_vecs + v, total, s,
                                       kStepOneShot, t);
            };
            auto keep = [&](int64_t at, const Vec<T>& r) {
                st_na_v4(residual_out + at, r.v);
                kept = r;
            };
            auto done = [&](float inv) {
                const int64_t row = static_cast<int64_t>(t) * row_vecs;
                for (int v = threadIdx.x; v < row_vecs; v += blockDim.x) {
                    Vec<T> r, w;
                    w.v = ld_nc_v4(weight + v);
                    if (one_piece) {
                        r = kept;
                    } else {
                        r.v = residual_out[row + v];
                    }
                    store_norm_piece<T>(a, row + v, r, w, inv, inv_scale);
                }
            };
            ok = norm_row<T>(a, t, row_vecs, sums, keep, done, red);
        }
    } else if (ok) {
        // 4b. Two-shot: reduce this rank's chunk and send each sum to every rank; then finish every row.
        // With the norm the owner finishes its rows (bias, residual, sum of squares) and sends residual_out's
        // values and each row's 1/rms, so every rank's own rows take no block sum and no residual read: one
        // flat pass as without the norm, and 1/R of the residual's bytes read per rank instead of all. So a
        // row's bias and residual are its owner's: the same on every rank in tensor parallelism (the residual
        // stream and the parameters are replicated), which is the contract of the fused two-shot.
        const int64_t gather = data + static_cast<int64_t>(R) * chunk * row_vecs;
        const int64_t slot = static_cast<int64_t>(chunk) * row_vecs;
        const int64_t inv_at = gather + R * slot;  // one piece per row after the gathered rows: its 1/rms
        const int my_rows = max(0, min(chunk, T_ - me * chunk));
        if (norm) {
            for (int l = blockIdx.x; l < my_rows && ok; l += gridDim.x) {
                const int t = me * chunk + l;
                auto sums = [&](int v, Vec<T>& s) {
                    return reduce_ranks<T>(a, mine + data + static_cast<int64_t>(l) * row_vecs + v, slot, s,
                                           kStepScatter, t);
                };
                auto keep = [&](int64_t at, const Vec<T>& r) {
                    const Vec<T> out = unsentinel<T>(r);
                    for (int p = 0; p < R; ++p) st_volatile_v4(buffer_of(a, p, buf) + gather + at, out.v);
                };
                auto done = [&](float inv) {
                    if (threadIdx.x < R) {
                        const int64_t row = static_cast<int64_t>(t) * row_vecs;
                        const int fingerprint = residual_fingerprint(ld_nc_v4(residual + row));
                        st_volatile_v4(buffer_of(a, threadIdx.x, buf) + inv_at + t, encode_inv(inv, fingerprint));
                    }
                };
                ok = norm_row<T>(a, t, row_vecs, sums, keep, done, red);
            }
        } else {
            for (int64_t i = first_piece; i < static_cast<int64_t>(my_rows) * row_vecs; i += stride) {
                Vec<T> s;
                ok = reduce_ranks<T>(a, mine + data + i, slot, s, kStepScatter, me * chunk + static_cast<int>(i / row_vecs));
                if (!ok) break;
                s = unsentinel<T>(s);
                for (int p = 0; p < R; ++p) st_volatile_v4(buffer_of(a, p, buf) + gather + me * slot + i, s.v);
            }
        }
        ok = !__syncthreads_or(!ok);
        if (ok && !norm) {
            ok = finish_flat<T>(a, first_piece, stride, total, row_vecs, [&](int64_t i, Vec<T>& s) {
                const int t = static_cast<int>(i / row_vecs);
                return wait_vec<T>(a, mine + gather + i, s, kStepGather, t / chunk, t);
            });
        }
        // Every piece of every row: residual_out's value and the row's 1/rms, from their owner. The weight's
        // piece (and, for a row's first piece, this rank's residual, whose fingerprint is checked against the
        // owner's) is loaded before the waits so its latency overlaps them: loaded after, the fused call took
        // 10-12% longer on an H100. One gathered load per piece in flight (two measured slower: more spills).
        for (int64_t i = first_piece; i < total && ok && norm; i += stride) {
            const int t = static_cast<int>(i / row_vecs);
            const int v = static_cast<int>(i - static_cast<int64_t>(t) * row_vecs);
            Vec<T> r, q, w;
            int4 own_residual = make_int4(0, 0, 0, 0);
            w.v = ld_nc_v4(weight + v);
            if (v == 0) own_residual = ld_nc_v4(residual + i);
            r.v = ld_volatile_v4(mine + gather + i);
            q.v = ld_volatile_v4(mine + inv_at + t);
            if ((has_sentinel<T>(r) && !wait_vec<T>(a, mine + gather + i, r, kStepGather, t / chunk, t)) ||
                (has_sentinel<T>(q) && !wait_vec<T>(a, mine + inv_at + t, q, kStepGather, t / chunk, t))) {
                ok = false;
                break;
            }
            if (v == 0 && q.v.w != residual_fingerprint(own_residual))
                record_error(a, kArErrResidual, kStepGather, t / chunk, t, nullptr, nullptr);
            st_na_v4(residual_out + i, r.v);
            store_norm_piece<T>(a, i, r, w, decode_inv(q.v), inv_scale);
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
