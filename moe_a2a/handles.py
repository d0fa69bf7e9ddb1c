"""Handles returned by dispatch and consumed by combine and cached dispatch.

They are ``NamedTuple``s: indexable and unpackable like DeepEP's tuples, with names for each field.
Callers treat them as opaque; only the backend that made a handle reads its fields.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class HandleIdentity(NamedTuple):
    """Which dispatch made a handle: the same on every rank for the same dispatch.

    Fields:
        epoch: the number of non-cached dispatches the ``Buffer`` completed before this one (every rank
            runs the same sequence of dispatches, so every rank stamps the same epoch).
        fingerprint: a hash of the rank-to-rank token counts (``rank_prefix_matrix``) where they are on the
            host at no cost (the reference backend on CPU); ``-1`` elsewhere.

    Combine and cached dispatch compare it across ranks before moving data, so ranks that pass handles of
    different dispatches are refused instead of summing mismatched rows.
    """

    epoch: int
    fingerprint: int = -1


class DispatchHandle(NamedTuple):
    """What combine and cached dispatch need from a normal-mode dispatch.

    Fields (R = num_ranks, C = num_channels, T = tokens sent, N = tokens received):
        rank_prefix_matrix: ``[R, R]`` int32; ``[i, j]`` = tokens ranks ``0..i`` send to rank ``j``.
        channel_prefix_matrix: ``[R, C]`` int32; ``[j, c]`` = tokens this rank sends to rank ``j`` from channels
            ``0..c`` (inclusive prefix over the channel split of the token range).
        recv_channel_prefix_matrix: ``[R, C]`` int32; ``[i, c]`` = rank ``i``'s ``channel_prefix_matrix[me, c]``.
        recv_src_idx: ``[N]`` int32; index of each received token in its source rank's input.
        is_token_in_rank: ``[T, R]`` bool; whether each sent token went to each rank.
        send_head: ``[T, R]`` int32; position of token ``t`` among the tokens this rank sends to rank ``j``,
            ``-1`` where it is not sent.
        identity: the ``HandleIdentity`` ``Buffer.dispatch`` stamps (a trailing field: indices 0-5 are
            DeepEP's six).
    """

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor
    identity: Optional[HandleIdentity] = None

    @property
    def num_recv_tokens(self) -> int:
        return self.recv_src_idx.size(0)

    @property
    def num_sent_tokens(self) -> int:
        return self.is_token_in_rank.size(0)


class LowLatencyHandle(NamedTuple):
    """What low-latency combine needs from a low-latency dispatch (DeepEP's 5-tuple).

    Fields (L = num_local_experts, R = num_ranks, M = num_max_dispatch_tokens_per_rank):
        src_info: ``[L, M * R]`` int32; source token index of each received slot.
        layout_range: ``[L, R]`` int64; ``(begin << 32) | count`` of the slots each source rank filled.
        num_max_dispatch_tokens_per_rank: M.
        hidden: hidden size of the dispatched tokens.
        num_experts: number of experts in the group.
    """

    src_info: torch.Tensor
    layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int


def unpack_layout_range(layout_range: torch.Tensor):
    """Split a ``layout_range`` into ``(begin, count)`` int64 tensors of the same shape."""
    return layout_range >> 32, layout_range & 0xFFFFFFFF


class InternodeHandle(NamedTuple):
    """What combine and cached dispatch need from an internode dispatch (RDMA stage, then NVLink stage).

    Fields (T = tokens sent, N = nodes, M = rows this rank received over RDMA and forwarded, n = rows
    received in the end):
        is_token_in_rank: ``[T, R]`` bool; whether each sent token went to each rank.
        send_pos: ``[T, N]`` int32; position of token ``t`` among the tokens this rank sends to node ``b``,
            ``-1`` where it is not sent there.
        rdma_counts: ``N x N`` nested tuple of ints; ``[a][b]`` = tokens the rank of this rank's local index
            on node ``a`` sends to node ``b``.
        team_num_tokens: ``N`` ints; tokens of the rank of this rank's local index on each node.
        rdma_origin: ``[M, 4]`` int32; per forwarded row: source rank, source token, source node, 0.
        intra_handle: the ``DispatchHandle`` of the NVLink stage over this node's ranks.
        recv_perm: ``[n]`` int64; received row ``i`` is row ``recv_perm[i]`` of the NVLink stage.
        recv_inv_perm: ``[n]`` int64; the inverse permutation.
        recv_src_idx: ``[n]`` int32; index of each received token in its source rank's input.
        recv_src_rank: ``[n]`` int32; source rank of each received token.
        identity: the ``HandleIdentity`` ``Buffer.dispatch`` stamps.
    """

    is_token_in_rank: torch.Tensor
    send_pos: torch.Tensor
    rdma_counts: tuple
    team_num_tokens: tuple
    rdma_origin: torch.Tensor
    intra_handle: DispatchHandle
    recv_perm: torch.Tensor
    recv_inv_perm: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_src_rank: torch.Tensor
    identity: Optional[HandleIdentity] = None

    @property
    def num_recv_tokens(self) -> int:
        return self.recv_src_idx.size(0)

    @property
    def num_sent_tokens(self) -> int:
        return self.is_token_in_rank.size(0)
