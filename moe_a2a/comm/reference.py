"""The oracle of the fused collectives: torch.distributed collectives and torch math, on any device.

Definitions every implementation follows (the CUDA kernels compute the same values):

* the sum of ``x`` over ranks is accumulated in float32 (float64 for float64 inputs) in rank order
  ``((x_0 + x_1) + x_2) + ...`` and rounded once to the input's dtype, so it is bitwise identical run to
  run and on every rank (an all-gather of the inputs, then the sum in rank order);
* ``bias`` and ``residual`` are added one after the other, each add rounded to the dtype (as torch adds
  two tensors of that dtype): ``residual_out = (sum + bias) + residual``;
* ``norm = residual_out * rsqrt(mean(residual_out ** 2) + eps) * norm_weight``, computed in float32 from
  the rounded ``residual_out`` and rounded once;
* FP8: ``saturate_e4m3(float(norm) * (1 / scale))``, round to nearest even.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..backends.waits import Deadline
from .types import NORM_OPS, NVFP4_OPS, AllReduceFusionOp, AllReduceParams

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
#: Input dtypes of the collectives (float64 on the reference path only, for gradcheck).
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIMS = 8


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., hidden]`` RMSNorm in float32 (float64 for float64), rounded to ``r``'s dtype."""
    acc = accumulate_dtype(r.dtype)
    r32 = r.to(acc)
    inv = torch.rsqrt(r32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (r32 * inv * weight.to(acc)).to(r.dtype)


def quantize_fp8(norm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm * (1 / scale)`` saturated to the e4m3 range, as ``torch.float8_e4m3fn``."""
    inv = torch.reciprocal(scale.to(torch.float32).reshape(()))
    return (norm.to(torch.float32) * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def epilogue(summed: torch.Tensor, params: AllReduceParams) -> Tuple[torch.Tensor, ...]:
    """Apply ``params.fusion_op`` to the all-reduced ``summed``; outputs in ``AllReduce.forward``'s order."""
    op = AllReduceFusionOp(params.fusion_op)
    x = summed if params.bias is None else summed + params.bias.to(summed.dtype)
    if op == AllReduceFusionOp.NONE:
        return (x,)
    if op in NVFP4_OPS:
        raise NotImplementedError(f"{op.name}: NVFP4 output needs FP4 conversion, which this build does not have")
    if op not in NORM_OPS:
        raise NotImplementedError(f"fusion op {op.name} is not implemented")
    residual_out = x + params.residual.reshape(x.shape)
    norm = rms_norm(residual_out, params.norm_weight, params.eps)
    if op == AllReduceFusionOp.RESIDUAL_RMS_NORM:
        return norm, residual_out
    quant = quantize_fp8(norm, params.scale)
    if op == AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8:
        return quant, residual_out
    return norm, quant, residual_out


# ---------------------------------------------------------------------------- collectives
def _group_size(group) -> int:
    return dist.get_world_size(group)


def _comm_device(group, tensor_device: torch.device) -> torch.device:
    """Where tensors of ``group``'s collectives live: CUDA for NCCL groups, CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return tensor_device if tensor_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run(collective, deadline: Optional[Deadline], operation: str) -> None:
    """``collective(async_op)``, waited for at most the deadline's seconds. Without a deadline, and on NCCL
    groups (whose collectives stay asynchronous to the host and capturable; NCCL's watchdog bounds them), as
    long as it takes."""
    if deadline is None or dist.get_backend(deadline.group) == "nccl":
        collective(False)
    else:
        deadline.check_usable()
        deadline.wait(collective(True), operation)


def ordered_sum(x: torch.Tensor, group=None, deadline: Optional[Deadline] = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, in rank order (see the module docstring), same shape/dtype.
    ``deadline``: bounds the wait for the peers (a ``CollectiveError`` names the missing rank)."""
    world = _group_size(group)
    flat = x.detach().contiguous().reshape(-1).view(torch.uint8)
    device = _comm_device(group, x.device)
    parts = [torch.empty_like(flat, device=device) for _ in range(world)]
    _run(lambda a: dist.all_gather(parts, flat.to(device), group=group, async_op=a), deadline, "AllReduce (sum)")
    acc_dtype = accumulate_dtype(x.dtype)
    acc = None
    for p in parts:  # rank order: the reduction order is fixed
        v = p.view(x.dtype).to(x.device, acc_dtype)
        acc = v.clone() if acc is None else acc.add_(v)
    return acc.to(x.dtype).view(x.shape)


def nccl_sum(x: torch.Tensor, group=None, deadline: Optional[Deadline] = None) -> torch.Tensor:
    """``torch.distributed.all_reduce`` of a copy of ``x`` (the backend's own order; float32 on gloo);
    ``deadline`` as for ``ordered_sum``."""
    device = _comm_device(group, x.device)
    native = dist.get_backend(group) == "nccl"
    y = x.detach().to(device, x.dtype if native else accumulate_dtype(x.dtype), copy=True)
    _run(lambda a: dist.all_reduce(y, group=group, async_op=a), deadline, "AllReduce (backend all_reduce)")
    return y.to(x.device, x.dtype)


# ---------------------------------------------------------------------------- argument agreement
_DTYPE_CODES = {d: i + 1 for i, d in enumerate(DTYPES)}
_ERR_CODES = {TypeError: 1, ValueError: 2, NotImplementedError: 3}


def signature(x: torch.Tensor, op: int) -> List[int]:
    """What every rank must agree on: dtype, fusion op and shape."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"input must have at most {_MAX_DIMS} dimensions, got {x.dim()}")
    return [_DTYPE_CODES.get(x.dtype, 0), int(op), x.dim()] + list(x.shape) + [0] * (_MAX_DIMS - x.dim())


def _describe(sig: Sequence[int]) -> str:
    dtype = {v: k for k, v in _DTYPE_CODES.items()}.get(sig[0])
    shape = list(sig[3:3 + sig[2]])
    try:
        op = AllReduceFusionOp(sig[1]).name
    except ValueError:
        op = str(sig[1])
    return f"{shape} {dtype} {op}"


def agree(what: str, sig: Optional[List[int]], error: Optional[BaseException], group=None,
          device: torch.device = torch.device("cpu"), deadline: Optional[Deadline] = None) -> None:
    """Exchange this rank's ``sig`` (None when ``error``) and raise on every rank when any rank's input was
    rejected or the signatures differ. One small all-gather; no rank is left waiting in a later collective.
    ``deadline`` as for ``ordered_sum``."""
    world = _group_size(group)
    width = 3 + _MAX_DIMS + 1
    code = 0 if error is None else _ERR_CODES.get(type(error), 2)
    row = [code] + (sig if sig is not None else [0] * (width - 1))
    mine = torch.tensor(row, dtype=torch.int64, device=_comm_device(group, device))
    rows = [torch.empty_like(mine) for _ in range(world)]
    _run(lambda a: dist.all_gather(rows, mine, group=group, async_op=a), deadline, f"{what} (argument exchange)")
    rows = [r.tolist() for r in rows]
    if any(r[0] for r in rows):
        if error is not None:
            raise error
        bad = [i for i, r in enumerate(rows) if r[0]]
        raise ValueError(f"{what}: rank(s) {bad} rejected their input (see their error); no data was exchanged")
    if any(r != rows[0] for r in rows):
        listing = ", ".join(f"rank {i}: {_describe(r[1:])}" for i, r in enumerate(rows))
        raise ValueError(f"{what}: inputs differ across ranks ({listing}); every rank must pass the same shape, "
                         "dtype and fusion op")
