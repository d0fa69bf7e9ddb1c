"""``AllReduce`` and ``MoEAllReduce``: all-reduce with the residual add, RMSNorm and FP8 quantization fused.

Paths (chosen alike on every rank from what every rank knows: strategy, device, dtype, shape, build):

* CPU tensors: the reference (``reference.py``: all-gather, sum in rank order) for every strategy but
  ``NCCL``, which runs ``torch.distributed.all_reduce`` and then the fusion as torch ops;
* CUDA tensors: the Lamport kernels over CUDA IPC (``workspace.py``) for ``ONESHOT``/``TWOSHOT``/``AUTO``,
  where they apply (extension built, at most 8 ranks on one host, float16/bfloat16/float32, rows of a
  multiple of 16 bytes); ``AUTO`` falls back to the ``NCCL`` path elsewhere, ``ONESHOT``/``TWOSHOT`` raise.

Inputs are checked on every rank before any data moves. On the reference and NCCL paths the ranks then
exchange one small signature (dtype, fusion op, shape, and whether the rank rejected its input), so a
mismatch raises on every rank instead of leaving some waiting. The kernels check sizes themselves: every
message carries its shape, a receiver that sees a different one records an error naming both ranks.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..backends import waits
from ..limits import MAX_NVL_PEERS
from . import reference
from .autograd import FusedAllReduceFunction
from .types import (FP8_OPS, NORM_OPS, NVFP4_OPS, AllReduceFusionOp, AllReduceParams, AllReduceStrategy,
                    MoEAllReduceParams)
from .workspace import KERNEL_DTYPES, LamportWorkspace, choose_strategy, kernels_available

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

_ALIASES = {AllReduceStrategy.MIN_LATENCY: AllReduceStrategy.ONESHOT,
            AllReduceStrategy.MNNVL: AllReduceStrategy.AUTO,
            AllReduceStrategy.SYMM_MEM: AllReduceStrategy.AUTO,
            AllReduceStrategy.NCCL_SYMMETRIC: AllReduceStrategy.NCCL}


def _check_tensor(name, t, dtype, shape, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (like the input), got {t.dtype}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (like the input), got {t.device}")


def check_params(x, params: AllReduceParams, dtype: Optional[torch.dtype] = None) -> AllReduceFusionOp:
    """Validate one call's input and params on this rank; returns the fusion op. Raises TypeError,
    ValueError or NotImplementedError naming the bad value and the expected one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in reference.DTYPES:
        raise TypeError(f"input must have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"input has dtype {x.dtype}, but this AllReduce was built for {dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"input must have a non-empty last (hidden) dimension, got shape {list(x.shape)}")
    if not isinstance(params, AllReduceParams):
        raise TypeError(f"all_reduce_params must be AllReduceParams, got {type(params).__name__}")
    try:
        op = AllReduceFusionOp(params.fusion_op)
    except ValueError:
        raise ValueError(f"unknown fusion_op {params.fusion_op!r}; expected an AllReduceFusionOp") from None
    if op in NVFP4_OPS:
        raise NotImplementedError(f"{op.name}: NVFP4 output needs FP4 conversion (Blackwell kernels), which this "
                                  "build does not have; use RESIDUAL_RMS_NORM_QUANT_FP8 or RESIDUAL_RMS_NORM")
    if op not in NORM_OPS and op != AllReduceFusionOp.NONE:
        raise NotImplementedError(f"fusion op {op.name} is not implemented by AllReduce "
                                  "(MOE_FINALIZE_ALLREDUCE_RESIDUAL_RMS_NORM is MoEAllReduce)")
    if params.norm_pre_residual_weight is not None:
        raise NotImplementedError("norm_pre_residual_weight (pre/post norm) is not implemented; pass None")
    hidden = x.shape[-1]
    if params.bias is not None:
        _check_tensor("bias", params.bias, x.dtype, [hidden], x.device)
    if op in NORM_OPS:
        if params.residual is None or params.norm_weight is None:
            raise ValueError(f"{op.name} needs residual and norm_weight, got "
                             f"residual={'set' if params.residual is not None else None}, "
                             f"norm_weight={'set' if params.norm_weight is not None else None}")
        _check_tensor("residual", params.residual, x.dtype, x.shape, x.device)
        _check_tensor("norm_weight", params.norm_weight, x.dtype, [hidden], x.device)
        if isinstance(params.eps, bool) or not isinstance(params.eps, (int, float)) or not \
                (math.isfinite(params.eps) and params.eps >= 0):
            raise ValueError(f"eps must be a finite float >= 0, got {params.eps!r}")
    if op in FP8_OPS:
        if reference.FP8 is None:
            raise NotImplementedError("this torch has no torch.float8_e4m3fn")
        if not isinstance(params.scale, torch.Tensor):
            raise TypeError(f"{op.name} needs scale, a [1] float32 tensor, got {type(params.scale).__name__}")
        _check_tensor("scale", params.scale.reshape(-1) if params.scale.dim() == 0 else params.scale,
                      torch.float32, [1], x.device)
    return op


class AllReduce(torch.nn.Module):
    """Sum a tensor over the ranks of ``group``, then apply the fusion op of ``AllReduceParams``.

    Args:
        group: a ``torch.distributed`` process group (None: the default group).
        strategy: an ``AllReduceStrategy`` (see the module docstring for what runs where).
        dtype: the input dtype, when known (inputs of another dtype are rejected); None accepts any.
        timeout_s: seconds a kernel waits on a peer before it records an error (CUDA path), and a host
            collective of the reference and NCCL paths on a gloo group before it raises ``CollectiveError``
            naming the missing rank (this AllReduce then refuses further calls).
        num_blocks: blocks per kernel launch (0: ``min(tokens, SMs / ranks sharing the GPU)``, one block per
            SM at most, so the blocks of every rank on a GPU are resident together).
    """

    def __init__(self, group=None, strategy: AllReduceStrategy = AllReduceStrategy.AUTO,
                 dtype: Optional[torch.dtype] = None, *, timeout_s: float = 30.0, num_blocks: int = 0):
        super().__init__()
        try:
            strategy = AllReduceStrategy(strategy)
        except ValueError:
            raise ValueError(f"unknown strategy {strategy!r}; expected an AllReduceStrategy") from None
        if strategy in (AllReduceStrategy.UB, AllReduceStrategy.LOWPRECISION):
            raise NotImplementedError(f"AllReduceStrategy.{strategy.name} is not implemented; use AUTO, NCCL, "
                                      "ONESHOT or TWOSHOT")
        if dtype is not None and dtype not in reference.DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32, float64 or None, got {dtype}")
        if not dist.is_initialized():
            raise RuntimeError("AllReduce needs torch.distributed to be initialized (init_process_group)")
        self.group = group
        self.strategy = _ALIASES.get(strategy, strategy)
        self.dtype = dtype
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._workspaces = {}  # element size -> LamportWorkspace (created on first CUDA use)
        # The host collectives of the reference and NCCL paths on gloo wait at most timeout_s (naming a missing
        # rank); after a failure this AllReduce refuses further calls (an abandoned collective may still complete).
        self._deadline = waits.Deadline(group, self.timeout_s, "AllReduce", "AllReduce(timeout_s=...)")

    # ------------------------------------------------------------------ public
    def forward(self, input: torch.Tensor, *, all_reduce_params: Optional[AllReduceParams] = None) -> Outputs:
        """All-reduce ``input`` (``[..., hidden]``, same shape and dtype on every rank) and fuse.

        Returns, by ``all_reduce_params.fusion_op`` (tensors of the input's shape; ``quant`` is float8_e4m3fn):
            NONE: ``hidden_states`` (a tensor)
            RESIDUAL_RMS_NORM: ``(norm, residual_out)``
            RESIDUAL_RMS_NORM_QUANT_FP8: ``(norm_quant, residual_out)``
            RESIDUAL_RMS_NORM_OUT_QUANT_FP8: ``(norm, norm_quant, residual_out)``
            NVFP4 variants: NotImplementedError.
        ``residual_out`` is ``sum + bias + residual``, the residual stream of the next layer (the bias,
        residual and norm weight are the same on every rank, as ``AllReduceParams`` says). With
        ``enable_allreduce=False`` the input itself is returned; with one rank the fusion still runs. On
        the kernel path a call can be captured in a CUDA graph once an eager call of that size (or larger)
        has sized the workspace.
        """
        params = AllReduceParams() if all_reduce_params is None else all_reduce_params
        if isinstance(params, AllReduceParams) and not params.enable_allreduce:
            return input
        error, op = None, AllReduceFusionOp.NONE
        try:
            op = check_params(input, params, self.dtype)
        except (TypeError, ValueError, NotImplementedError) as e:
            error = e
        path = self._path(input, op) if error is None else self._path_of_rejected(input)
        if path in ("oneshot", "twoshot"):
            if error is not None:  # the peers' kernels time out waiting for this rank, naming it
                raise error
        elif self.world_size > 1:
            # Every rank learns whether any rank rejected its input or disagrees, before data moves.
            sig = None if error is not None else reference.signature(input, op)
            device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
            reference.agree("AllReduce", sig, error, self.group, device, self._deadline)
        elif error is not None:
            raise error
        x = input.contiguous()
        run = self._runner(path, op, params)
        tensors = (x, params.bias, params.residual, params.norm_weight, params.scale)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors[:4]):
            outputs = FusedAllReduceFunction.apply(run, int(op), float(params.eps), *tensors)
        else:
            outputs = run(*tensors)
        outputs = tuple(o if o.shape == input.shape else o.view(input.shape) for o in outputs)
        return outputs[0] if op == AllReduceFusionOp.NONE else outputs

    def workspace(self, element_size: int) -> Optional[LamportWorkspace]:
        """The Lamport workspace for inputs of ``element_size`` bytes, or None before the first CUDA call."""
        return self._workspaces.get(element_size)

    def destroy(self) -> None:
        """Free the workspaces (collective over the group when any exists)."""
        for ws in self._workspaces.values():
            ws.destroy()
        self._workspaces.clear()

    # ------------------------------------------------------------------ internals
    def _path(self, x: torch.Tensor, op: AllReduceFusionOp) -> str:
        """'reference', 'nccl', 'oneshot' or 'twoshot' (the same on every rank for the same input)."""
        if self.strategy == AllReduceStrategy.NCCL:
            return "nccl"
        if x.device.type != "cuda":
            return "reference"
        why = self._kernels_unusable(x)
        if why is not None:
            if self.strategy == AllReduceStrategy.AUTO:
                return "nccl"
            raise ValueError(f"AllReduceStrategy.{self.strategy.name} cannot run: {why}; use AUTO or NCCL")
        if self.strategy == AllReduceStrategy.ONESHOT:
            return "oneshot"
        if self.strategy == AllReduceStrategy.TWOSHOT:
            return "twoshot"
        tokens = x.numel() // x.shape[-1]
        return choose_strategy(self.world_size, tokens, x.shape[-1], x.dtype)

    def _path_of_rejected(self, x) -> str:
        """The path the peers take when this rank's ``x`` was rejected (they must meet in the same place)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] < 1:
            return "reference"
        try:
            return self._path(x, AllReduceFusionOp.NONE)
        except ValueError:
            return "reference"

    def reject(self, error: BaseException, like: Optional[torch.Tensor]) -> None:
        """Raise ``error`` (this rank's bad input) so that the peers raise too instead of waiting: through the
        signature exchange where they meet there, else at once (their kernels then time out naming this rank).
        ``like``: a tensor shaped like the input the peers all-reduce, when known."""
        path = self._path_of_rejected(like)
        if path not in ("oneshot", "twoshot") and self.world_size > 1:
            reference.agree("AllReduce", None, error, self.group,
                            like.device if isinstance(like, torch.Tensor) else torch.device("cpu"), self._deadline)
        raise error

    def _kernels_unusable(self, x: torch.Tensor) -> Optional[str]:
        if not kernels_available():
            return "moe_a2a._C is not built with the all-reduce kernels"
        if self.world_size > MAX_NVL_PEERS:
            return f"the kernels serve at most {MAX_NVL_PEERS} ranks, the group has {self.world_size}"
        if x.dtype not in KERNEL_DTYPES:
            return f"the kernels take float16, bfloat16 or float32, got {x.dtype}"
        if (x.shape[-1] * x.element_size()) % 16:
            return f"the kernels need rows of a multiple of 16 bytes, got hidden {x.shape[-1]} of {x.dtype}"
        if x.numel() == 0:
            return "empty input"
        return None

    def _runner(self, path: str, op: AllReduceFusionOp, params: AllReduceParams):
        eps = float(params.eps)

        def compose(summed, bias, residual, norm_weight, scale):
            p = AllReduceParams(fusion_op=op, bias=bias, residual=residual, norm_weight=norm_weight, scale=scale,
                                eps=eps)
            return reference.epilogue(summed, p)

        if path == "reference":
            def run(x, bias, residual, norm_weight, scale):
                summed = (reference.ordered_sum(x, self.group, self._deadline) if self.world_size > 1
                          else x.detach().clone())
                return compose(summed, bias, residual, norm_weight, scale)
        elif path == "nccl":
            def run(x, bias, residual, norm_weight, scale):
                summed = (reference.nccl_sum(x, self.group, self._deadline) if self.world_size > 1
                          else x.detach().clone())
                return compose(summed, bias, residual, norm_weight, scale)
        else:
            two_shot = path == "twoshot"

            def run(x, bias, residual, norm_weight, scale):
                ws = self._get_workspace(x)
                return ws.allreduce(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), op, bias, residual,
                                    norm_weight, scale, eps, two_shot, self.num_blocks)
        return run

    def _get_workspace(self, x: torch.Tensor) -> LamportWorkspace:
        tokens, hidden = x.numel() // x.shape[-1], x.shape[-1]
        ws = self._workspaces.get(x.element_size())
        if ws is None:
            ws = LamportWorkspace(self.group, max_num_tokens=tokens, hidden_dim=hidden, dtype=x.dtype,
                                  timeout_s=self.timeout_s)
            self._workspaces[x.element_size()] = ws
        return ws


# ---------------------------------------------------------------------------- MoE finalize
def moe_local_reduction(input: torch.Tensor, params: MoEAllReduceParams) -> torch.Tensor:
    """This rank's share of each token before the all-reduce, ``[num_tokens, hidden]`` in the input's dtype:
    the expert outputs times their scales, summed in top-k (or expert) order in float32, plus the shared
    expert output, rounded once."""
    acc = reference.accumulate_dtype(input.dtype)
    if params.is_cutlass_min_latency:
        num_experts = input.shape[0]
        active = params.device_num_experts
        active = torch.as_tensor(active, device=input.device).reshape(-1)[:1]
        mask = (torch.arange(num_experts, device=input.device) < active).to(acc)  # no host read of the count
        out = None
        for e in range(num_experts):
            term = input[e].to(acc) * (params.expert_scale_factor[e].to(acc) * mask[e]).unsqueeze(-1)
            out = term if out is None else out + term
    else:
        idx = params.expanded_idx_to_permuted_idx.long()
        valid = (idx >= 0).to(acc)
        rows = idx.clamp(min=0)
        out = None
        for k in range(idx.shape[1]):
            term = input[rows[:, k]].to(acc) * (params.expert_scale_factor[:, k].to(acc) * valid[:, k]).unsqueeze(-1)
            out = term if out is None else out + term
    if params.shared_expert_output is not None:
        out = params.shared_expert_output.to(acc) if out is None else out + params.shared_expert_output.to(acc)
    return out.to(input.dtype)


def check_moe_params(input, params: MoEAllReduceParams) -> None:
    """Validate ``MoEAllReduce.forward``'s arguments on this rank (TypeError/ValueError)."""
    if not isinstance(params, MoEAllReduceParams):
        raise TypeError(f"all_reduce_params must be MoEAllReduceParams, got {type(params).__name__}")
    if not isinstance(input, torch.Tensor) or input.dtype not in reference.DTYPES:
        raise TypeError(f"input must be a float16/bfloat16/float32/float64 tensor, got "
                        f"{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}")
    if not params.is_valid():
        need = "device_num_experts" if params.is_cutlass_min_latency else "expanded_idx_to_permuted_idx"
        raise ValueError(f"MoEAllReduceParams needs residual, norm_weight, expert_scale_factor and {need}")
    residual = params.residual
    if residual.dim() != 2:
        raise ValueError(f"residual must be [num_tokens, hidden], got {list(residual.shape)}")
    tokens, hidden = residual.shape
    float_dtypes = (input.dtype, torch.float32)
    if params.is_cutlass_min_latency:
        if input.dim() != 3 or input.shape[1:] != residual.shape:
            raise ValueError(f"input must be [num_experts, {tokens}, {hidden}] (min-latency layout), "
                             f"got {list(input.shape)}")
        want = [input.shape[0], tokens]
        if isinstance(params.device_num_experts, torch.Tensor):
            if params.device_num_experts.numel() != 1 or params.device_num_experts.is_floating_point():
                raise ValueError("device_num_experts must be an int or a [1] integer tensor")
        elif isinstance(params.device_num_experts, bool) or not isinstance(params.device_num_experts, int):
            raise TypeError(f"device_num_experts must be an int or a [1] integer tensor, got "
                            f"{type(params.device_num_experts).__name__}")
        elif not 0 <= params.device_num_experts <= input.shape[0]:
            raise ValueError(f"device_num_experts must be in [0, {input.shape[0]}], got {params.device_num_experts}")
    else:
        if input.dim() != 2 or input.shape[1] != hidden:
            raise ValueError(f"input must be [num_rows, {hidden}] (regular layout), got {list(input.shape)}")
        idx = params.expanded_idx_to_permuted_idx
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError("expanded_idx_to_permuted_idx must be an int32 or int64 tensor")
        if idx.dim() != 2 or idx.shape[0] != tokens:
            raise ValueError(f"expanded_idx_to_permuted_idx must be [{tokens}, top_k], got {list(idx.shape)}")
        want = list(idx.shape)
        if idx.numel() and not (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -1 or hi >= input.shape[0]:
                raise ValueError(f"expanded_idx_to_permuted_idx holds {lo if lo < -1 else hi}; expected -1 or a "
                                 f"row in [0, {input.shape[0]})")
    esf = params.expert_scale_factor
    if not isinstance(esf, torch.Tensor) or esf.dtype not in float_dtypes:
        raise TypeError(f"expert_scale_factor must be a {input.dtype} or float32 tensor")
    if list(esf.shape) != want:
        raise ValueError(f"expert_scale_factor must have shape {want}, got {list(esf.shape)}")
    if params.shared_expert_output is not None:
        _check_tensor("shared_expert_output", params.shared_expert_output, input.dtype, [tokens, hidden], input.device)


class MoEAllReduce(torch.nn.Module):
    """MoE finalize + all-reduce + residual + RMSNorm.

    Per token: ``local = sum_k expert_output_k * scale_k (+ shared_expert_output)`` on each rank (regular
    or min-latency layout, see ``MoEAllReduceParams``), then ``AllReduce`` with ``RESIDUAL_RMS_NORM``.
    Returns ``(hidden_states, residual_out)``, each ``[num_tokens, hidden]``.

    Args: as ``AllReduce``.
    """

    def __init__(self, group=None, strategy: AllReduceStrategy = AllReduceStrategy.AUTO,
                 dtype: Optional[torch.dtype] = None, *, timeout_s: float = 30.0):
        super().__init__()
        self.allreduce = AllReduce(group, strategy, dtype, timeout_s=timeout_s)

    def forward(self, input: torch.Tensor, *, all_reduce_params: MoEAllReduceParams) -> Tuple[torch.Tensor, ...]:
        try:
            check_moe_params(input, all_reduce_params)
        except (TypeError, ValueError) as e:
            residual = getattr(all_reduce_params, "residual", None)
            self.allreduce.reject(e, residual if isinstance(residual, torch.Tensor) else None)
        p = all_reduce_params
        local = moe_local_reduction(input, p)
        return self.allreduce(local, all_reduce_params=AllReduceParams(
            fusion_op=AllReduceFusionOp.RESIDUAL_RMS_NORM, residual=p.residual, norm_weight=p.norm_weight, eps=p.eps))

    def destroy(self) -> None:
        self.allreduce.destroy()
