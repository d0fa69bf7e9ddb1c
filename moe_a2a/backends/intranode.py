"""Intranode CUDA kernels (``moe_a2a._C``): layout now; the runtime and dispatch/combine kernels plug in here."""
from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError:  # built without CUDA: the reference backend serves every call
    _C = None


def extension_available() -> bool:
    """Whether the compiled extension ``moe_a2a._C`` is importable."""
    return _C is not None


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int):
    """The layout kernel (see ``moe_a2a.layout.compute_layout`` for the definition)."""
    if _C is None:
        raise RuntimeError("moe_a2a._C is not built: install with CUDA torch and nvcc available")
    return _C.get_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)
