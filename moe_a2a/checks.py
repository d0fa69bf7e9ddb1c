"""Input validation shared by the public entry points.

Every check runs on the rank that holds the bad input, before any communication, and raises
``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, size, device or value) naming the
argument, what it got and what was expected. ``Buffer`` runs them once per call; the backends it hands the
call to do not check again (``moe_a2a.backends.base``). ``kernel_rows`` and ``at_most`` with a limit of
``moe_a2a.limits`` hold for calls that run on the CUDA kernels.
"""
from __future__ import annotations

import weakref
from typing import Iterable, Optional, Sequence

import torch

from .limits import ROW_ALIGN_BYTES


class CheckedTensors:
    """Tensors whose values were checked, held weakly with their version counters: ``same(*tensors)`` tells
    whether a later call got exactly those tensors (``None`` where ``None`` was), none modified in place since,
    so that call may skip checking their values again (a host sync each). Inference-mode tensors keep no
    version counter and never match."""

    def __init__(self, *tensors: Optional[torch.Tensor]) -> None:
        self._refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._versions = tuple(_version(t) for t in tensors)

    def same(self, *tensors: Optional[torch.Tensor]) -> bool:
        if len(tensors) != len(self._refs):
            return False
        for t, ref, version in zip(tensors, self._refs, self._versions):
            if (t is None) != (ref is None):
                return False
            if t is not None and (ref() is not t or version is None or _version(t) != version):
                return False
        return True


def _version(t: Optional[torch.Tensor]) -> Optional[int]:
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # an inference tensor
        return None


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


def at_most(name: str, value: int, limit: int, who: str) -> None:
    """``value`` does not exceed ``limit``, what ``who`` (e.g. "the CUDA kernels") can take."""
    if value > limit:
        raise ValueError(f"{name} is {value}; {who} take at most {limit}")


def kernel_rows(name: str, hidden: int, element_size: int) -> None:
    """Rows of ``hidden`` elements of ``element_size`` bytes are whole ``ROW_ALIGN_BYTES`` pieces, as the
    kernels load and store them."""
    if hidden * element_size % ROW_ALIGN_BYTES:
        raise ValueError(f"{name}: rows of hidden size {hidden} ({hidden * element_size} bytes) must be a multiple "
                         f"of {ROW_ALIGN_BYTES} bytes on the CUDA kernels (hidden a multiple of "
                         f"{ROW_ALIGN_BYTES // element_size} for {element_size}-byte elements)")


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


def routing_metadata(topk_idx: Optional[torch.Tensor], num_experts: int, num_ranks: int, num_ranks_per_node: int,
                     num_tokens_per_rank: torch.Tensor, is_token_in_rank: torch.Tensor,
                     num_tokens_per_expert: torch.Tensor,
                     num_tokens_per_rdma_rank: Optional[torch.Tensor] = None) -> None:
    """The counts and mask a caller passes to dispatch agree with each other and with ``topk_idx``.

    Recomputes the layout from ``topk_idx`` (when given) on the device the tensors live on, compares every
    field there, and reads one small flag tensor back to the host: O(num_tokens * (num_topk + num_ranks))
    device work and one host sync. Without ``topk_idx`` only ``num_tokens_per_rank`` (and
    ``num_tokens_per_rdma_rank``) against ``is_token_in_rank`` can be checked.
    """
    from .layout import compute_layout  # plain torch; imported here to keep this module's imports minimal

    sent = is_token_in_rank.sum(0, dtype=torch.int32)
    flags = [(sent == num_tokens_per_rank).all()]
    want = None
    if topk_idx is not None:
        want = compute_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
        flags += [(want[3] == is_token_in_rank).all(), (want[2] == num_tokens_per_expert).all()]
    if num_tokens_per_rdma_rank is not None and num_ranks > num_ranks_per_node:
        num_nodes = num_ranks // num_ranks_per_node
        per_node = is_token_in_rank.view(is_token_in_rank.size(0), num_nodes, num_ranks_per_node).any(2)
        per_node = per_node.sum(0, dtype=torch.int32)
        flags.append((per_node == num_tokens_per_rdma_rank).all())
    ok = torch.stack(flags).tolist()  # the one read back to the host
    if not ok[0]:
        raise ValueError(f"num_tokens_per_rank {num_tokens_per_rank.tolist()} disagrees with is_token_in_rank, "
                         f"which sends {sent.tolist()}")
    if want is not None and not ok[1]:
        bad = (want[3] != is_token_in_rank).any(1).nonzero().view(-1)
        t = int(bad[0])
        raise ValueError(f"is_token_in_rank disagrees with topk_idx on {bad.numel()} tokens, first token {t}: "
                         f"is_token_in_rank[{t}] = {is_token_in_rank[t].int().tolist()}, topk_idx[{t}] = "
                         f"{topk_idx[t].tolist()} routes it to ranks {want[3][t].nonzero().view(-1).tolist()}")
    if want is not None and not ok[2]:
        raise ValueError(f"num_tokens_per_expert {num_tokens_per_expert.tolist()} disagrees with topk_idx, which "
                         f"routes {want[2].tolist()} tokens to the experts")
    if not ok[-1] and len(ok) > (3 if want is not None else 1):
        raise ValueError(f"num_tokens_per_rdma_rank {num_tokens_per_rdma_rank.tolist()} disagrees with "
                         f"is_token_in_rank, which sends {per_node.tolist()} tokens to the nodes")
