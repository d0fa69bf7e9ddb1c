"""Permute received rows to their local experts and back, optionally through the communication buffer.

After a top-k dispatch a rank holds ``N`` received rows, each with up to ``K`` local expert ids. The experts
want ``P`` rows grouped by expert (a row per (received token, local expert) pair, padding rows allowed), and
the combine wants each received token's expert outputs summed back into one row:

* ``group_by_expert``: the permutation (``src_rows`` ``[P]``) and each expert row's routing weight;
* ``GatherRows``: the permute; its backward sums gradients per received token, into the buffer's combine
  input when given a target (the dispatch's backward is a combine, which then skips copying them);
* ``SumRows``: the unpermute; sums into the combine input when given a target; its backward reads the
  gradient through ``moe_a2a.resident.claim`` (the combine's backward may leave it in the buffer).

Used by the Megatron dispatcher and the MoE-layer benchmark. Sums run in float32 (float64 for float64 rows).
"""
from __future__ import annotations

import torch

from . import fused_a2a, resident

__all__ = ["group_by_expert", "GatherRows", "SumRows"]


def group_by_expert(recv_indices: torch.Tensor, recv_probs: torch.Tensor, counts: torch.Tensor,
                     num_local_experts: int):
    """Rows for the experts: expert 0's copies, then expert 1's, ..., each in received order.

    Args:
        recv_indices: ``[N, K]`` int64 local expert of each received slot, -1 for none.
        recv_probs: ``[N, K]`` float32 weights of the slots.
        counts: ``[L]`` int64 rows per expert (padded counts when padding; padding rows come last).
    Returns:
        src_rows ``[P]`` int64: received row feeding each expert row, ``N`` for padding (a zero row);
        probs ``[P]`` float32: the slot's weight, 0 on padding.
    """
    n = recv_indices.size(0)
    device = recv_indices.device
    # [N, L] multi-hot map and weights of the local experts.
    valid = recv_indices >= 0
    local_map = torch.zeros(n, num_local_experts + 1, dtype=torch.bool, device=device)
    local_map.scatter_(1, torch.where(valid, recv_indices, num_local_experts), True)
    local_map = local_map[:, :num_local_experts]
    # Out-of-place scatters keep the weights differentiable (the router's gradient flows back here).
    weights = torch.zeros(n, num_local_experts + 1, dtype=recv_probs.dtype, device=device).scatter_add(
        1, torch.where(valid, recv_indices, num_local_experts), recv_probs.masked_fill(~valid, 0))
    weights = weights[:, :num_local_experts]
    counts = counts.to(device)
    total = int(counts.sum())
    offsets = counts.cumsum(0) - counts
    position = offsets + local_map.long().cumsum(0) - 1  # row of each (token, expert) pair
    position = torch.where(local_map, position, total)
    src = torch.full((total + 1,), n, dtype=torch.int64, device=device)
    src.scatter_(0, position.t().reshape(-1), torch.arange(n, device=device).repeat(num_local_experts))
    row_probs = torch.zeros(total + 1, dtype=torch.float32, device=device).scatter(
        0, position.t().reshape(-1), weights.t().reshape(-1).float())
    return src[:total], row_probs[:total]


def _sum_rows(y: torch.Tensor, src_rows: torch.Tensor, num_rows: int, target) -> torch.Tensor:
    """``[num_rows, H]``: row ``n`` is the sum of the rows ``p`` of ``y`` ``[P, H]`` with ``src_rows[p] == n``
    (``src_rows[p] == num_rows`` drops the row), summed in float32 (float64 for float64 ``y``).

    With ``target = (group, handle, num_topk)`` the sums are rounded straight into the buffer's combine input
    where it fits (bf16), so the combine skips copying them there; the caller holds the result in
    ``moe_a2a.resident`` (on other backends it is an ordinary tensor, held all the same).
    """
    acc = torch.zeros(num_rows + 1, y.size(1), dtype=torch.float64 if y.dtype == torch.float64 else torch.float32,
                      device=y.device)
    acc.index_add_(0, src_rows, y.to(acc.dtype))
    if target is not None:
        group, handle, num_topk = target
        buffer = fused_a2a.get_buffer(group, fused_a2a.get_hidden_bytes(y))
        view = fused_a2a.combine_input(buffer, handle, y, num_topk)
        if view is not None and view.size(0) == num_rows:
            return view.copy_(acc[:num_rows])
    return acc[:num_rows].to(y.dtype)


def _gather_rows(x: torch.Tensor, src_rows: torch.Tensor) -> torch.Tensor:
    """``[P, H]`` rows ``x[src_rows]`` of ``x`` ``[N, H]``; ``src_rows == N`` gives a zero row."""
    return torch.nn.functional.pad(x, (0, 0, 0, 1)).index_select(0, src_rows)


class GatherRows(torch.autograd.Function):
    """The permute to experts: ``apply(x [N, H], src_rows [P] int64, target) -> [P, H]``.

    Backward sums each received token's expert-row gradients (``[N, H]``). With ``target = (group, handle,
    num_topk)`` (the dispatch's group and handle, top-k of its weights) they go straight into the combine input
    of the dispatch's backward (a combine), held in ``moe_a2a.resident``; with None, into a fresh tensor.
    """

    @staticmethod
    def forward(ctx, x, src_rows, target):
        ctx.save_for_backward(src_rows)
        ctx.num_rows, ctx.target = x.size(0), target
        return _gather_rows(x, src_rows)

    @staticmethod
    def backward(ctx, grad):
        (src_rows,) = ctx.saved_tensors
        summed = _sum_rows(grad, src_rows, ctx.num_rows, ctx.target)
        if ctx.target is not None:  # read by the dispatch's backward through resident.claim
            resident.hold(fused_a2a.get_buffer(ctx.target[0], fused_a2a.get_hidden_bytes(grad)), summed)
        return summed, None, None


class SumRows(torch.autograd.Function):
    """The unpermute: ``apply(y [P, H], src_rows [P] int64, N, target) -> [N, H]``, each received token's expert
    rows summed; with ``target = (group, handle, 0)`` into the buffer's combine input (hold the result in
    ``moe_a2a.resident`` until the combine). Backward reads the gradient, which the combine's backward may
    leave in the buffer, through ``resident.claim``.
    """

    @staticmethod
    def forward(ctx, y, src_rows, num_rows, target):
        ctx.save_for_backward(src_rows)
        return _sum_rows(y, src_rows, num_rows, target)

    @staticmethod
    def backward(ctx, grad):
        (src_rows,) = ctx.saved_tensors
        return _gather_rows(resident.claim(grad), src_rows), None, None, None
