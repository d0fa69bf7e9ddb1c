"""Routing layout: which rank and expert each token goes to.

``compute_layout`` is the plain-torch definition that the reference backend uses and that the CUDA
layout kernel is tested against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Count tokens per rank, per node and per expert, and mark which rank each token goes to.

    Args:
        topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for "no expert".
        num_experts: experts in the group; a multiple of ``num_ranks``.
        num_ranks: ranks in the group.
        num_ranks_per_node: ranks in one NVLink domain; more ranks than this make the group internode.

    Returns:
        num_tokens_per_rank: ``[num_ranks]`` int32, tokens sent to each rank (a token counts once per rank).
        num_tokens_per_rdma_rank: ``[num_nodes]`` int32 tokens per node, or ``None`` inside one node.
        num_tokens_per_expert: ``[num_experts]`` int32, (token, expert) pairs per expert.
        is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
    """
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)

    target_rank = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    # One extra column absorbs the "-1" slots and is dropped.
    hits = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.int32, device=topk_idx.device)
    hits.scatter_(1, target_rank, 1)
    is_token_in_rank = hits[:, :num_ranks].bool()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)

    num_tokens_per_rdma_rank = None
    if num_ranks > num_ranks_per_node:
        num_nodes = num_ranks // num_ranks_per_node
        in_node = is_token_in_rank.view(num_tokens, num_nodes, num_ranks_per_node).any(2)
        num_tokens_per_rdma_rank = in_node.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
