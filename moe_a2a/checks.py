"""Input validation shared by the public entry points.

Every check runs on the rank that holds the bad input, before any communication, and raises
``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, size, device or value) naming the
argument, what it got and what was expected.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def tensor(name: str, t, dtypes: Iterable[torch.dtype], shape: Optional[Sequence[Optional[int]]] = None,
           device: Optional[torch.device] = None) -> None:
    """Check ``t`` is a tensor of one of ``dtypes``, of ``shape`` (None = any size), on ``device``."""
    dtypes = tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            pretty = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {pretty}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the tokens), got {t.device}")


def positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def experts_divisible(num_experts: int, num_ranks: int) -> None:
    positive_int("num_experts", num_experts)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by the number of ranks ({num_ranks})")


def expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Every entry of ``topk_idx`` is -1 or an expert id in ``[0, num_experts)``.

    Reading the values synchronises with the device, so the check is skipped while a CUDA graph is being
    captured (shapes and dtypes are still checked).
    """
    if topk_idx.numel() == 0 or (topk_idx.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist()  # one read back to the host
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise ValueError(f"{name} holds expert id {bad}; expected -1 or an id in [0, {num_experts})")


def hidden_divisible(hidden: int, block: int, why: str) -> None:
    if hidden % block:
        raise ValueError(f"hidden size {hidden} must be divisible by {block} for {why}")
