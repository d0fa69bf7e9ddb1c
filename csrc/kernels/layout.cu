// Routing layout kernel: topk_idx -> tokens per rank / node / expert and is_token_in_rank.
// One thread per token; counts go through shared-memory histograms, then one atomicAdd per bin and
// block, so global atomics stay few even with 256 experts.
#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace moe_a2a {

namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads)
dispatch_layout_kernel(const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk, int num_experts,
                       int num_ranks, int num_ranks_per_node, int* num_tokens_per_rank, int* num_tokens_per_node,
                       int* num_tokens_per_expert, bool* __restrict__ is_token_in_rank) {
    // Shared histograms: [experts | ranks | nodes].
    extern __shared__ int hist[];
    const int num_nodes = num_tokens_per_node != nullptr ? num_ranks / num_ranks_per_node : 0;
    int* expert_hist = hist;
    int* rank_hist = hist + num_experts;
    int* node_hist = rank_hist + num_ranks;
    for (int i = threadIdx.x; i < num_experts + num_ranks + num_nodes; i += blockDim.x) hist[i] = 0;
    __syncthreads();

    const int experts_per_rank = num_experts / num_ranks;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < num_tokens) {
        const int64_t* row = topk_idx + static_cast<int64_t>(t) * num_topk;
        bool* out_row = is_token_in_rank + static_cast<int64_t>(t) * num_ranks;
        for (int r = 0; r < num_ranks; ++r) out_row[r] = false;
        for (int k = 0; k < num_topk; ++k) {
            const int64_t e = row[k];
            if (e < 0) continue;
            atomicAdd(&expert_hist[e], 1);
            const int r = static_cast<int>(e / experts_per_rank);
            // A token counts once per rank (and per node): skip ranks seen at an earlier k.
            bool seen_rank = false, seen_node = false;
            for (int j = 0; j < k; ++j) {
                const int64_t f = row[j];
                if (f < 0) continue;
                const int q = static_cast<int>(f / experts_per_rank);
                seen_rank |= q == r;
                if (num_nodes) seen_node |= q / num_ranks_per_node == r / num_ranks_per_node;
            }
            if (!seen_rank) {
                out_row[r] = true;
                atomicAdd(&rank_hist[r], 1);
            }
            if (num_nodes && !seen_node) atomicAdd(&node_hist[r / num_ranks_per_node], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
        if (expert_hist[i]) atomicAdd(&num_tokens_per_expert[i], expert_hist[i]);
    for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
        if (rank_hist[i]) atomicAdd(&num_tokens_per_rank[i], rank_hist[i]);
    for (int i = threadIdx.x; i < num_nodes; i += blockDim.x)
        if (node_hist[i]) atomicAdd(&num_tokens_per_node[i], node_hist[i]);
}

}  // namespace

void launch_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                            int num_ranks_per_node, int* num_tokens_per_rank, int* num_tokens_per_node,
                            int* num_tokens_per_expert, bool* is_token_in_rank, cudaStream_t stream) {
    if (num_tokens == 0) return;
    const int num_nodes = num_tokens_per_node != nullptr ? num_ranks / num_ranks_per_node : 0;
    const size_t smem = sizeof(int) * (num_experts + num_ranks + num_nodes);
    const int blocks = (num_tokens + kLayoutThreads - 1) / kLayoutThreads;
    dispatch_layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(
        topk_idx, num_tokens, num_topk, num_experts, num_ranks, num_ranks_per_node, num_tokens_per_rank,
        num_tokens_per_node, num_tokens_per_expert, is_token_in_rank);
    MOE_A2A_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moe_a2a
