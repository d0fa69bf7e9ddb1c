"""DeepEP as a baseline in the same run: its ``Buffer`` on the inputs and SM counts moe_a2a's kernels get.

``python -m benchmarks intranode`` times it when ``deep_ep`` is importable (``--deepep auto``, the default) or
must be (``--deepep on``). Build one (intranode kernels, NVSHMEM off, sm_90) with
``benchmarks/build_deepep.sh DEEPEP_SRC`` and put ``DEEPEP_SRC`` on ``PYTHONPATH``. The calls are DeepEP's
public API, which ``moe_a2a.Buffer`` shares: the tests drive this module with ``moe_a2a`` in ``deep_ep``'s place.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable, Dict, Optional

import torch


def load(mode: str) -> Optional[ModuleType]:
    """The ``deep_ep`` module for ``mode`` ``"auto"`` (None when it is not importable), ``"on"`` (SystemExit
    when it is not) or ``"off"`` (None)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--deepep must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None
    try:
        return importlib.import_module("deep_ep")
    except ImportError as e:
        if mode == "on":
            raise SystemExit(f"--deepep on: deep_ep is not importable ({e}); build it with "
                             "benchmarks/build_deepep.sh DEEPEP_SRC and put DEEPEP_SRC on PYTHONPATH") from e
        return None


class DeepEPCalls:
    """One rank's DeepEP ``Buffer``, sized for rows of ``max_hidden`` BF16 values on ``num_ranks`` ranks."""

    def __init__(self, ep: ModuleType, group, num_ranks: int, max_hidden: int) -> None:
        self.ep, self.num_ranks = ep, num_ranks
        configs = (ep.Buffer.get_dispatch_config(num_ranks), ep.Buffer.get_combine_config(num_ranks))
        num_nvl_bytes = max(c.get_nvl_buffer_size_hint(max_hidden * 2, num_ranks) for c in configs)
        self.buffer = ep.Buffer(group, num_nvl_bytes, 0)

    def calls(self, x: torch.Tensor, scales: Optional[torch.Tensor], topk_idx: torch.Tensor,
              topk_weights: torch.Tensor, num_experts: int, num_sms: int) -> Dict[str, Callable[[], object]]:
        """The calls to time on one routing, with DeepEP's default configs at ``num_sms`` SMs:
        ``layout``, ``dispatch_full`` (layout + dispatch with its count exchange), ``dispatch`` (cached handle) and
        ``combine`` (BF16 rows with the received weights). Runs one dispatch first (for the handle)."""
        ep, buffer = self.ep, self.buffer
        ep.Buffer.set_num_sms(num_sms)
        dispatch_config = ep.Buffer.get_dispatch_config(self.num_ranks)
        combine_config = ep.Buffer.get_combine_config(self.num_ranks)
        tokens = (x, scales) if scales is not None else x

        def dispatch_full():
            per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            return buffer.dispatch(tokens, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
                                   is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                   topk_weights=topk_weights, config=dispatch_config)

        recv_x, _, recv_weights, _, handle, _ = dispatch_full()
        num_recv = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).size(0)
        y = torch.randn(num_recv, x.size(1), device=x.device).to(torch.bfloat16)
        return {"layout": lambda: buffer.get_dispatch_layout(topk_idx, num_experts),
                "dispatch_full": dispatch_full,
                "dispatch": lambda: buffer.dispatch(tokens, handle=handle, config=dispatch_config),
                "combine": lambda: buffer.combine(y, handle, topk_weights=recv_weights, config=combine_config)}
