"""Run a test body on several ranks (spawned processes joined by a gloo process group), and the autograd
pieces that gradcheck a multi-rank function as one global function."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_a2a.launch import RanksFailed, free_port, spawn

__all__ = ["GatherRanks", "Replicated", "free_port", "run_distributed"]


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; fail the test if any rank fails.

    ``fn`` must be a module-level function (it is pickled into the children). A failure is an
    ``AssertionError`` whose message names every failed rank, the root cause's traceback first.
    """
    try:
        spawn(fn, world_size, *args, backend=backend, timeout=timeout)
    except RanksFailed as exc:
        raise AssertionError(str(exc)) from None


class Replicated(torch.autograd.Function):
    """Identity on a tensor every rank holds identically; its gradient is the sum of every rank's."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GatherRanks(torch.autograd.Function):
    """``[...]`` on each rank -> ``[num_ranks, ...]`` on every rank.

    Backward keeps this rank's slice: under lockstep gradcheck every rank holds the same upstream
    gradient (the global function is replicated), so summing them would count it once per rank.
    """

    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[dist.get_rank()].contiguous()
