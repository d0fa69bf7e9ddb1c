"""Names of the fused collectives: fusion ops, strategies and the parameter records of the calls.

The enums keep TensorRT-LLM's member names (and values), so code written against its ``AllReduce`` reads
the same here. Members this library does not implement raise ``NotImplementedError`` when used.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch


class AllReduceFusionOp(enum.IntEnum):
    """What the all-reduce does with its sum before returning it (outputs in ``AllReduce.forward``)."""
    NONE = 0
    RESIDUAL_RMS_NORM = 1
    LAST_PROCESS_FOR_UB = 2
    RESIDUAL_RMS_PREPOST_NORM = 3
    RESIDUAL_RMS_NORM_QUANT_FP8 = 4
    RESIDUAL_RMS_NORM_QUANT_NVFP4 = 5
    RESIDUAL_RMS_NORM_OUT_QUANT_FP8 = 6
    RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4 = 7
    MOE_FINALIZE_ALLREDUCE_RESIDUAL_RMS_NORM = 8


class AllReduceStrategy(enum.IntEnum):
    """How the sum is computed.

    ``ONESHOT``: every rank reads every peer's whole input (lowest latency, small messages).
    ``TWOSHOT``: reduce-scatter then all-gather (each byte crosses the links twice but every rank reduces
    only its share; large messages). ``AUTO``: one of those two from the measured table, or NCCL where the
    kernels cannot run. ``NCCL``: ``torch.distributed.all_reduce`` followed by the fusion as separate torch
    ops. ``MIN_LATENCY`` is an alias of ``ONESHOT``; ``MNNVL`` and ``SYMM_MEM`` fall back to ``AUTO`` and
    ``NCCL_SYMMETRIC`` to ``NCCL``; ``UB`` and ``LOWPRECISION`` are not implemented.
    """
    NCCL = 0
    MIN_LATENCY = 1
    UB = 2
    AUTO = 3
    ONESHOT = 4
    TWOSHOT = 5
    LOWPRECISION = 6
    MNNVL = 7
    NCCL_SYMMETRIC = 8
    SYMM_MEM = 9


#: Fusion ops with a residual add and an RMSNorm.
NORM_OPS = (AllReduceFusionOp.RESIDUAL_RMS_NORM, AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8,
            AllReduceFusionOp.RESIDUAL_RMS_NORM_OUT_QUANT_FP8, AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_NVFP4,
            AllReduceFusionOp.RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4)
FP8_OPS = (AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8, AllReduceFusionOp.RESIDUAL_RMS_NORM_OUT_QUANT_FP8)
NVFP4_OPS = (AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_NVFP4, AllReduceFusionOp.RESIDUAL_RMS_NORM_OUT_QUANT_NVFP4)


@dataclass
class AllReduceParams:
    """The fused work of one ``AllReduce.forward`` call.

    Attributes:
        fusion_op: what follows the sum (see ``AllReduce.forward`` for the outputs of each).
        bias: ``[hidden]`` in the input's dtype, added to the sum before the residual, or None.
        residual: ``[..., hidden]`` like the input, added to the (biased) sum; required by the norm ops.
            The residual, bias, norm weight and scale are the same on every rank (tensor parallelism
            replicates them): the two-shot kernel adds each row's bias and residual once, on the rank that
            owns the row, and sends the result to every rank (with a fingerprint of the row's first residual
            piece: a rank whose own differs raises).
        norm_weight: ``[hidden]`` in the input's dtype, the RMSNorm gain; required by the norm ops.
        scale: ``[1]`` float32, the FP8 dequantization scale: the FP8 output is
            ``saturate(norm * (1 / scale))`` in e4m3; required by the FP8 ops.
        norm_pre_residual_weight: accepted for compatibility; only ``None`` is supported.
        eps: RMSNorm epsilon.
        enable_allreduce: when False, ``forward`` returns its input untouched.
        trigger_completion_at_end: accepted for compatibility (the kernels always complete at their end).
    """
    fusion_op: AllReduceFusionOp = AllReduceFusionOp.NONE
    bias: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    norm_pre_residual_weight: Optional[torch.Tensor] = None
    eps: float = 1e-6
    enable_allreduce: bool = True
    trigger_completion_at_end: bool = True


@dataclass
class MoEAllReduceParams:
    """Inputs of ``MoEAllReduce.forward`` besides the expert outputs.

    Regular layout (``is_cutlass_min_latency=False``; the expert outputs are ``[num_rows, hidden]`` rows
    permuted by expert):
        expanded_idx_to_permuted_idx: ``[num_tokens, top_k]`` int32/int64, the row of each token's k-th
            expert output, ``-1`` when the token has no k-th output on this rank.
        expert_scale_factor: ``[num_tokens, top_k]``, the router weight of that output.
    Min-latency layout (``is_cutlass_min_latency=True``; expert outputs ``[num_experts, num_tokens, hidden]``):
        device_num_experts: ``[1]`` int32 or an int, how many leading experts of the input are active.
        expert_scale_factor: ``[num_experts, num_tokens]``, each token's weight for each expert (0 when the
            token did not pick it).
    Both:
        shared_expert_output: ``[num_tokens, hidden]`` or None, added before the all-reduce.
        residual: ``[num_tokens, hidden]``; norm_weight: ``[hidden]``; eps: RMSNorm epsilon.
    """
    residual: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    device_num_experts: Optional[object] = None
    expert_scale_factor: Optional[torch.Tensor] = None
    expanded_idx_to_permuted_idx: Optional[torch.Tensor] = None
    shared_expert_output: Optional[torch.Tensor] = None
    eps: float = 1e-6
    is_cutlass_min_latency: bool = False

    def is_valid(self) -> bool:
        """Whether the fields the chosen layout needs are set."""
        common = self.residual is not None and self.norm_weight is not None and self.expert_scale_factor is not None
        if self.is_cutlass_min_latency:
            return common and self.device_num_experts is not None
        return common and self.expanded_idx_to_permuted_idx is not None
