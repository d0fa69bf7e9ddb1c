"""Autograd functions for expert-parallel dispatch and combine, with megatron-core's ``fused_a2a`` API.

Megatron's flex token dispatcher calls these functions unchanged (same names, arguments and return
structures as ``megatron.core.transformer.moe.fused_a2a``), on top of ``moe_a2a.Buffer``.

Two families:

* DeepEP style (``fused_dispatch`` / ``fused_combine``): tokens travel with their top-k expert ids and
  weights; the caller permutes the received tokens to experts. Dispatch's backward is a combine of the
  gradients (and of the gradient of the received weights); combine's backward is a cached dispatch.
* HybridEP style (``hybrid_ep_dispatch`` / ``hybrid_ep_combine``): a multi-hot ``routing_map`` in, tokens
  out already grouped by local expert and padded per expert to ``pad_multiple``, so a grouped GEMM reads
  them directly. With ``num_permuted_tokens`` given, the output shape is known up front and this module
  reads no count back to the host.

Buffer-resident variants (moe_a2a's own, same arguments): ``fused_dispatch_resident`` leaves the received
rows in the communication buffer, and ``fused_combine_resident``'s backward leaves the gradient there; the
combine input can be written in place (``combine_input``). Such views are overwritten by the buffer's next
operation, so they are held in ``moe_a2a.resident`` and read through ``resident.claim``; every operation
here first copies out any view still held. ``reserve_receive_rows`` sizes the buffer for the rows.

Gradient of the routing weights: a received weight is the sender's weight for an expert of this rank,
or 0 for a slot whose expert lives elsewhere. Only the former carries gradient back; the rank owning
the expert is the one that sends it, so the combined gradient of every routed slot is exact and
unrouted slots (``-1`` / ``False``) get 0.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _native, checks, resident
from .buffer import Buffer
from .config import Config, combine_input_bytes, default_combine_config, default_dispatch_config
from .event import EventHandle, EventOverlap
from .fp8 import fp8_to_float, per_token_cast_to_fp8
from .handles import DispatchHandle
from .limits import MAX_TOPK

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# float32 as DeepEP/HybridEP require; float64 so gradients can be checked in double precision.
_PROB_DTYPES = (torch.float32, torch.float64)

# The buffer caches Megatron's API implies: one normal-mode Buffer per group (``get_buffer``), and the
# buffer of the HybridEP functions (``init_hybrid_ep_buffer``).
_buffers: Dict[dist.ProcessGroup, Buffer] = {}
_receive_rows: Dict[dist.ProcessGroup, int] = {}  # rows ``get_buffer`` keeps room for (reserve_receive_rows)
_hybrid_ep_buffer: Optional["_HybridEPState"] = None


# ---------------------------------------------------------------------------------------------- buffers
def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes of one row of ``x`` ``[num_tokens, hidden]`` as the buffers size it (at least 2 per element)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [num_tokens, hidden], got {list(x.shape)}")
    return x.size(1) * max(x.element_size(), 2)


def _resolve_group(group) -> dist.ProcessGroup:
    if group is None:
        if not dist.is_initialized():
            raise ValueError("group is None and torch.distributed is not initialized")
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return group


def _fit_buffer(buffer: Optional[Buffer], group: dist.ProcessGroup, hidden_bytes: int,
                configs: Sequence[Config], receive_rows: int = 0) -> Buffer:
    """``buffer`` if it serves ``group`` with rows of ``hidden_bytes`` under ``configs``, else a larger one.

    A replacement never shrinks, so alternating row sizes do not reallocate on every call. Every rank
    makes the same decision (same sizes, same history), so the collective constructor stays in step.
    """
    num_ranks = group.size()
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    if receive_rows:
        # Beyond what the rings need: the rows themselves (where received rows and the combine input live) and,
        # per row, the fields a dispatch stages behind them (top-k ids and weights, scales, source index, one
        # slot per rank), generously.
        nvl += combine_input_bytes(receive_rows, hidden_bytes, MAX_TOPK) + receive_rows * (256 + 4 * num_ranks)
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    if buffer is not None and buffer.group is group:
        if buffer.num_nvl_bytes >= nvl and buffer.num_rdma_bytes >= rdma:
            return buffer
        nvl, rdma = max(nvl, buffer.num_nvl_bytes), max(rdma, buffer.num_rdma_bytes)
    return Buffer(group, nvl, rdma)


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> Buffer:
    """The cached ``Buffer`` of ``group``, (re)allocated when rows of ``hidden_bytes`` need a larger one.

    Sized with ``Config.get_nvl_buffer_size_hint`` / ``get_rdma_buffer_size_hint`` of the default dispatch
    and combine configs at ``Buffer.num_sms`` SMs, as Megatron sizes DeepEP's buffer.
    """
    group = _resolve_group(group)
    checks.positive_int("hidden_bytes", hidden_bytes)
    num_ranks = group.size()
    configs = (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks))
    old = _buffers.get(group)
    buffer = _fit_buffer(old, group, hidden_bytes, configs, _receive_rows.get(group, 0))
    if old is not None and buffer is not old:
        resident.begin(old)  # views of the old buffer still held are copied out before it goes
    _buffers[group] = buffer
    return buffer


def set_deepep_num_sms(num_sms: int) -> None:
    """Set the SMs the normal-mode kernels use (``Buffer.set_num_sms``; even, at least 2)."""
    Buffer.set_num_sms(num_sms)


def _previous_event(async_finish: bool) -> Optional[EventOverlap]:
    # An event on the current stream, so a kernel on the comm stream waits for the producer of its input.
    return EventOverlap(EventHandle()) if async_finish else None


def _pending(event: Optional[EventOverlap]) -> Optional[EventOverlap]:
    """``event`` if it holds an event to wait on, else None (a synchronous call returns an empty one)."""
    return event if event is not None and event.event is not None else None


def _wait(event: Optional[EventOverlap]) -> None:
    """Order the current stream after ``event`` (CPU calls finish synchronously and carry no event)."""
    if event is not None and event.event is not None:
        event.current_stream_wait()


# ------------------------------------------------------------------------------------- DeepEP style
class FusedDispatch(torch.autograd.Function):
    """Dispatch tokens with their top-k routing (DeepEP ``Buffer.dispatch``); backward combines gradients."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        """Send each token to the ranks of its experts.

        Arguments:
            x: ``[num_tokens, hidden]`` bf16 (float16/32/64 on the reference backend).
            token_indices: ``[num_tokens, topk]`` int64 expert ids, ``-1`` for none.
            token_probs: ``[num_tokens, topk]`` float32 routing weights (float64 for gradient checks), or None.
            num_experts: experts in the group, divisible by the group size.
            group: the EP process group.

        Returns:
            recv_x: ``[num_recv, hidden]``, ordered by source rank then source token index.
            recv_token_indices: ``[num_recv, topk]`` int64 local expert ids, ``-1`` where not local.
            recv_token_probs: ``[num_recv, topk]``, 0 where the expert is not local (None without probs).
            tokens_per_expert: ``[num_local_experts]`` int64 on the CPU, received (token, expert) pairs.
            handle: the ``DispatchHandle`` for ``fused_combine``.
        """
        return _dispatch_forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish,
                                 allocate_on_comm_stream, False)

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        """Combine the gradients back to the source tokens (float32 sums); weights' gradient likewise."""
        return _dispatch_backward(ctx, grad_output, grad_token_probs)


def _dispatch_forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish, allocate_on_comm_stream,
                      recv_x_in_buffer: bool):
    group = _resolve_group(group)
    _check_fused_dispatch(x, token_indices, token_probs, num_experts, group)
    buffer = get_buffer(group, get_hidden_bytes(x))
    resident.begin(buffer)  # before the event the communication waits for: it must cover any copy
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(token_indices, num_experts, previous_event=_previous_event(async_finish),
                                   async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
    recv_x, recv_indices, recv_probs, tokens_per_expert_list, handle, after = buffer.dispatch(
        x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=_pending(event), async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream, recv_x_in_buffer=recv_x_in_buffer)
    if async_finish:
        _wait(after)
    ctx.group, ctx.handle = group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    ctx.has_probs = token_probs is not None
    ctx.save_for_backward(recv_indices)
    ctx.mark_non_differentiable(recv_indices)
    tokens_per_expert = torch.tensor(tokens_per_expert_list, dtype=torch.int64)
    return recv_x, recv_indices, recv_probs, tokens_per_expert, handle


def _dispatch_backward(ctx, grad_output, grad_token_probs):
    (recv_indices,) = ctx.saved_tensors
    grad_output = resident.claim(grad_output)  # may be the buffer's combine input, written in place
    buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
    resident.begin(buffer)
    weights = None
    if ctx.has_probs and ctx.needs_input_grad[2]:
        # A slot whose expert is not on this rank received a constant 0: no gradient flows through it.
        weights = grad_token_probs.masked_fill(recv_indices < 0, 0).contiguous()
    grad_x, grad_probs, after = buffer.combine(
        grad_output.contiguous(), ctx.handle, topk_weights=weights,
        previous_event=_previous_event(ctx.async_finish), async_finish=ctx.async_finish,
        allocate_on_comm_stream=ctx.allocate_on_comm_stream)
    if ctx.async_finish:
        _wait(after)
    return grad_x, None, grad_probs, None, None, None, None


class FusedDispatchResident(FusedDispatch):
    """``FusedDispatch`` receiving the rows in the buffer (``Buffer.dispatch(recv_x_in_buffer=True)``): ``recv_x``
    may be a view of the buffer, valid until its next operation; ``fused_dispatch_resident`` holds it in
    ``moe_a2a.resident``, read it through ``resident.claim``. Backward takes a gradient written in the
    combine input (``combine_input``), held likewise."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        """``FusedDispatch.forward`` with ``recv_x`` left in the buffer."""
        return _dispatch_forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish,
                                 allocate_on_comm_stream, True)


class FusedCombine(torch.autograd.Function):
    """Send expert outputs back and sum the copies per token; backward is a cached dispatch."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """Combine ``x`` ``[num_recv, hidden]`` (rows as dispatched) into ``[num_tokens, hidden]``.

        ``x`` may be the buffer's combine input (``combine_input``), held in ``moe_a2a.resident``.

        Returns ``(combined_x, None)``; the second slot is where DeepEP returns combined weights.
        """
        return _combine_forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream)

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        # ``previous_event`` (Megatron's name) receives the gradient of the ``None`` output: always None.
        """Send each token's gradient to every rank that got a copy (cached dispatch)."""
        return _combine_backward(ctx, grad_output) + (None,) * 4


class FusedCombineFP8(torch.autograd.Function):
    """``FusedCombine`` whose rows travel as FP8 e4m3 with per-128 scales (``Buffer.combine(use_fp8=True)``);
    the gradients' cached dispatch too with ``use_fp8_backward`` (BF16 otherwise)."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False, use_fp8_backward=False):
        return _combine_forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream, use_fp8=True,
                                use_fp8_backward=use_fp8_backward)

    @staticmethod
    def backward(ctx, grad_output, previous_event=None):
        return _combine_backward(ctx, grad_output) + (None,) * 5


class FusedCombineResident(FusedCombine):
    """``FusedCombine`` whose backward (a cached dispatch) receives the gradient in the buffer and holds it in
    ``moe_a2a.resident``: only for a consumer that reads it through ``resident.claim``."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        """``FusedCombine.forward``; the backward's gradient stays in the buffer."""
        return _combine_forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream, grad_in_buffer=True)


def _combine_forward(ctx, x, group, handle, async_finish, allocate_on_comm_stream, use_fp8=False,
                     use_fp8_backward=False, grad_in_buffer=False):
    group = _resolve_group(group)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle returned by fused_dispatch, got "
                        f"{type(handle).__name__}")
    checks.tensor("x", x, _FLOAT_DTYPES, (handle.num_recv_tokens, None))
    x = resident.claim(x)
    buffer = get_buffer(group, get_hidden_bytes(x))
    resident.begin(buffer)
    fp8 = {"use_fp8": True} if use_fp8 else {}
    combined_x, _, after = buffer.combine(
        x.contiguous(), handle=handle, previous_event=_previous_event(async_finish), async_finish=async_finish,
        allocate_on_comm_stream=allocate_on_comm_stream, **fp8)
    if async_finish:
        _wait(after)
    ctx.group, ctx.handle = group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream
    ctx.use_fp8_backward = bool(use_fp8_backward)
    ctx.grad_in_buffer = grad_in_buffer and not use_fp8_backward  # FP8 gradients are decoded into a new tensor
    return combined_x, None


def _combine_backward(ctx, grad_output):
    """The gradient of a combine's input: ``(grad_x,)``."""
    buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
    resident.begin(buffer)
    grad = grad_output.contiguous()
    if ctx.use_fp8_backward:
        grad = per_token_cast_to_fp8(grad)
    grad_x, _, _, _, _, after = buffer.dispatch(
        grad, handle=ctx.handle, previous_event=_previous_event(ctx.async_finish),
        async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate_on_comm_stream,
        recv_x_in_buffer=ctx.grad_in_buffer)
    if ctx.async_finish:
        _wait(after)
    if ctx.use_fp8_backward:
        grad_x = fp8_to_float(*grad_x).to(grad_output.dtype)
    if ctx.grad_in_buffer:
        resident.hold(buffer, grad_x)
    return (grad_x,)


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False):
    """Differentiable dispatch; see ``FusedDispatch.forward`` for shapes.

    ``x`` may also be NVFP4 parts ``(packed [T, hidden // 2] uint8, block_scales [T, hidden // 16]
    float8_e4m3fn, global_scale float32)`` (``moe_a2a.formats.nvfp4``) for grouped GEMMs that take NVFP4:
    ``recv_x`` is then ``(packed, block_scales, global_scale [num_recv])`` and only ``token_probs`` has a
    gradient.

    Returns ``(recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle)``.
    """
    if isinstance(x, tuple) and len(x) == 3:
        *recv_x, recv_indices, recv_probs, tokens_per_expert, handle = NVFP4Dispatch.apply(
            *x, token_indices, token_probs, num_experts, group)
        return tuple(recv_x), recv_indices, recv_probs, tokens_per_expert, handle
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or NVFP4 parts (packed, block_scales, global_scale), got "
                        f"{type(x).__name__}")
    return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group, async_finish,
                               allocate_on_comm_stream)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """Differentiable combine with the handle of ``fused_dispatch``; returns ``(combined_x, None)``."""
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def fused_combine_fp8(x, group, handle, async_finish=False, allocate_on_comm_stream=False, use_fp8_backward=False):
    """``fused_combine`` sending the rows as FP8 e4m3 with per-128 scales (hidden divisible by 128): about half
    of BF16's bytes, each copy within 2**-4 of its value (README, "Formats"; across nodes each node's partial
    sum is cast again).
    ``use_fp8_backward``: the gradients go back to the experts as FP8 too (BF16 by default)."""
    return FusedCombineFP8.apply(x, group, handle, async_finish, allocate_on_comm_stream, use_fp8_backward)


class NVFP4Dispatch(torch.autograd.Function):
    """Dispatch of NVFP4 tokens with their routing; the values carry no gradient, the routing weights do."""

    @staticmethod
    def forward(ctx, packed, block_scales, global_scale, token_indices, token_probs, num_experts, group):
        group = _resolve_group(group)
        checks.tensor("token_indices", token_indices, (torch.int64,), (packed.size(0), None), packed.device)
        if token_probs is not None:
            checks.tensor("token_probs", token_probs, _PROB_DTYPES, tuple(token_indices.shape), packed.device)
        checks.experts_divisible(num_experts, group.size())
        buffer = get_buffer(group, get_hidden_bytes(packed))
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(token_indices, num_experts)
        recv, recv_indices, recv_probs, counts, handle, _ = buffer.dispatch(
            (packed, block_scales, global_scale), topk_idx=token_indices, topk_weights=token_probs,
            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert)
        ctx.group, ctx.handle, ctx.has_probs = group, handle, token_probs is not None
        ctx.save_for_backward(recv_indices)
        ctx.mark_non_differentiable(*recv, recv_indices)
        return (*recv, recv_indices, recv_probs, torch.tensor(counts, dtype=torch.int64), handle)

    @staticmethod
    def backward(ctx, grad_packed, grad_scales, grad_global, grad_indices, grad_probs, grad_counts, grad_handle):
        """Combine the routing weights' gradient back (the values are not differentiable)."""
        grad_token_probs = None
        if ctx.has_probs and ctx.needs_input_grad[4] and grad_probs is not None:
            (recv_indices,) = ctx.saved_tensors
            weights = grad_probs.masked_fill(recv_indices < 0, 0).contiguous()
            # The combine moves token rows too: send the narrowest ones the buffer takes (zeros).
            zeros = torch.zeros(ctx.handle.num_recv_tokens, 16, dtype=weights.dtype, device=weights.device)
            buffer = get_buffer(ctx.group, get_hidden_bytes(zeros))
            _, grad_token_probs, _ = buffer.combine(zeros, ctx.handle, topk_weights=weights)
        return None, None, None, None, grad_token_probs, None, None


def fused_dispatch_resident(x, token_indices, token_probs, num_experts, group, async_finish=False,
                            allocate_on_comm_stream=False):
    """``fused_dispatch`` with the received rows left in the buffer (moe_a2a extension, same arguments).

    ``recv_x`` is held in ``moe_a2a.resident``: read it through ``resident.claim(recv_x)``, which gives a copy
    when another operation on the buffer came first. Size the buffer for the rows with
    ``reserve_receive_rows``; rows that do not fit arrive in an ordinary tensor.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    out = FusedDispatchResident.apply(x.contiguous(), token_indices, token_probs, num_experts, group, async_finish,
                                      allocate_on_comm_stream)
    # Held as the autograd graph's tensor, so a copy made on a later operation keeps its gradient path.
    resident.hold(get_buffer(group, get_hidden_bytes(x)), out[0])
    return out


def fused_combine_resident(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    """``fused_combine`` whose backward receives the gradient in the buffer, held in ``moe_a2a.resident``
    (moe_a2a extension, same arguments): for a consumer of that gradient that claims it."""
    return FusedCombineResident.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def reserve_receive_rows(group: dist.ProcessGroup, num_rows: int) -> None:
    """Size the cached buffer of ``group`` so ``num_rows`` received rows live in it (``fused_dispatch_resident``)
    and as many are written in place as combine input. Collective in effect (the buffer may be rebuilt):
    every rank passes the same ``num_rows``, e.g. tokens per rank x group size, the most a rank can receive.
    Never shrinks."""
    group = _resolve_group(group)
    checks.positive_int("num_rows", num_rows, minimum=0)
    _receive_rows[group] = max(_receive_rows.get(group, 0), num_rows)


def _check_fused_dispatch(x, token_indices, token_probs, num_experts, group) -> None:
    checks.tensor("x", x, _FLOAT_DTYPES, (None, None))
    checks.tensor("token_indices", token_indices, (torch.int64,), (x.size(0), None), x.device)
    if token_probs is not None:
        checks.tensor("token_probs", token_probs, _PROB_DTYPES, tuple(token_indices.shape), x.device)
    checks.experts_divisible(num_experts, group.size())
    # Expert id values are checked by Buffer.get_dispatch_layout (it reads them from the device only once).


# ------------------------------------------------------------------------------------ HybridEP style
class _HybridEPState(NamedTuple):
    """The HybridEP functions' buffer and the sizes it was made for."""

    group: dist.ProcessGroup
    buffer: Buffer
    hidden_dim: int
    max_num_tokens_per_rank: int
    num_local_experts: int
    num_sms_dispatch_api: int
    num_sms_combine_api: int


class HybridEPHandle(NamedTuple):
    """What ``hybrid_ep_combine`` and the backward passes need from ``hybrid_ep_dispatch``.

    Fields (N = rows received, L = local experts, P = permuted rows):
        buffer: the ``Buffer`` that ran the dispatch.
        dispatch_handle: the ``DispatchHandle`` of the underlying dispatch.
        permuted_src: ``[P]`` int64; permuted row ``p`` is received row ``permuted_src[p] // L`` for local
            expert ``permuted_src[p] % L``; the value ``N * L`` marks a padding row.
        num_recv_rows: N, received rows including any ``num_worst_tokens`` padding.
        num_worst_tokens: the receive padding asked of the dispatch (0: exact counts).
        num_experts: experts in the group.
        num_local_experts: L.
        pad_multiple: per-expert padding multiple (1: none).
        dispatch_config / combine_config: the ``Config``s of the SM counts given to the dispatch.
    """

    buffer: Buffer
    dispatch_handle: DispatchHandle
    permuted_src: torch.Tensor
    num_recv_rows: int
    num_worst_tokens: int
    num_experts: int
    num_local_experts: int
    pad_multiple: int
    dispatch_config: Config
    combine_config: Config

    @property
    def num_permuted_tokens(self) -> int:
        return self.permuted_src.numel()


def init_hybrid_ep_buffer(group: dist.ProcessGroup, hidden_dim: int, seq_len: int, num_local_experts: int,
                          num_sms_dispatch_api: int, num_sms_combine_api: int, fp8_dispatch: bool) -> None:
    """Allocate the buffer of the HybridEP functions for BF16 rows of ``hidden_dim``.

    A later call with wider rows (or float32/64 tokens) reallocates it. ``seq_len`` (tokens per rank) is
    recorded but does not size anything: the ring buffers stream tokens in chunks of any count.
    """
    global _hybrid_ep_buffer
    group = _resolve_group(group)
    if fp8_dispatch:
        raise NotImplementedError("FP8 dispatch is not implemented for the HybridEP functions; pass "
                                  "fp8_dispatch=False (use Buffer.dispatch with FP8 tokens instead)")
    checks.positive_int("hidden_dim", hidden_dim)
    checks.positive_int("seq_len", seq_len, minimum=0)
    checks.positive_int("num_local_experts", num_local_experts)
    configs = _hybrid_configs(group.size(), num_sms_dispatch_api, num_sms_combine_api)
    old = _hybrid_ep_buffer.buffer if _hybrid_ep_buffer is not None else None
    buffer = _fit_buffer(old, group, hidden_dim * 2, configs)
    _hybrid_ep_buffer = _HybridEPState(group, buffer, hidden_dim, seq_len, num_local_experts,
                                       num_sms_dispatch_api, num_sms_combine_api)


def reset_hybrid_ep_buffer() -> None:
    """Drop the HybridEP buffer; the next ``hybrid_ep_dispatch`` allocates a new one."""
    global _hybrid_ep_buffer
    _hybrid_ep_buffer = None


# The cached buffers hold their process groups: release both at exit, before interpreter teardown.
_native.clear_at_exit(_buffers.clear)
_native.clear_at_exit(reset_hybrid_ep_buffer)


def _hybrid_configs(num_ranks: int, num_sms_dispatch_api: int, num_sms_combine_api: int):
    checks.positive_int("num_sms_dispatch_api", num_sms_dispatch_api, minimum=2)
    checks.positive_int("num_sms_combine_api", num_sms_combine_api, minimum=2)
    return default_dispatch_config(num_ranks, num_sms_dispatch_api), \
        default_combine_config(num_ranks, num_sms_combine_api)


def _hybrid_buffer(group, x, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, configs) -> Buffer:
    """The HybridEP buffer, created on first use and grown when ``x``'s rows need more room."""
    global _hybrid_ep_buffer
    state = _hybrid_ep_buffer
    if state is None or state.group is not group:
        init_hybrid_ep_buffer(group, x.size(1), x.size(0), num_local_experts, num_sms_dispatch_api,
                              num_sms_combine_api, False)
        state = _hybrid_ep_buffer
    buffer = _fit_buffer(state.buffer, group, get_hidden_bytes(x), configs)
    if buffer is not state.buffer:
        _hybrid_ep_buffer = state._replace(buffer=buffer)
    return buffer


def _count(name: str, value) -> Optional[int]:
    """``None``, or a non-negative int given as an int or a one-element integer tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an int or a one-element integer tensor, got a {value.dtype} "
                             f"tensor of shape {list(value.shape)}")
        value = int(value.item())  # a CPU tensor (Megatron's tokens_per_expert.sum()) costs no sync
    checks.positive_int(name, value, minimum=0)
    return value


def _pad_multiple(value) -> int:
    if value is None:
        return 1
    checks.positive_int("pad_multiple", value)
    return value


def _padded_counts(local_map: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    """``[L]`` int64: rows per local expert, rounded up to ``pad_multiple``."""
    counts = local_map.sum(0, dtype=torch.int64)
    return (counts + pad_multiple - 1) // pad_multiple * pad_multiple


def _permutation(local_map: torch.Tensor, padded_counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[num_rows]`` int64 source of each expert-grouped row (see ``HybridEPHandle.permuted_src``).

    Expert ``e`` owns rows ``[offset_e, offset_e + padded_count_e)``; its tokens come first, in received
    order (source rank, then source token), the rest is padding. Fixed shapes only: no host sync.
    """
    n, num_local = local_map.shape
    offsets = padded_counts.cumsum(0) - padded_counts
    position = offsets + local_map.to(torch.int64).cumsum(0) - 1  # [N, L]
    # Unrouted pairs, and any overflow past num_rows (reported by the caller), land in a dropped slot.
    position = torch.where(local_map & (position < num_rows), position, num_rows)
    src = torch.full((num_rows + 1,), n * num_local, dtype=torch.int64, device=local_map.device)
    src.scatter_(0, position.reshape(-1), torch.arange(n * num_local, device=local_map.device))
    return src[:num_rows]


def _check_fits(padded_counts: torch.Tensor, num_rows: int) -> None:
    total = padded_counts.sum()
    message = (f"num_permuted_tokens={num_rows} is smaller than the padded count of (token, local expert) pairs "
               "this rank received")
    if total.is_cuda:
        torch._assert_async(total <= num_rows, message)  # checked on the device: no host sync
    elif int(total) > num_rows:
        raise ValueError(f"{message} ({int(total)}; per expert {padded_counts.tolist()})")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _permute(recv: torch.Tensor, src: torch.Tensor, num_local: int) -> torch.Tensor:
    """``[P, hidden]`` expert-grouped copies of the ``[N, hidden]`` received rows (zeros for padding)."""
    padded = F.pad(recv, (0, 0, 0, 1))  # row N is the zero row padding slots point to
    return padded.index_select(0, src // num_local)


def _unpermute(y: torch.Tensor, src: torch.Tensor, num_local: int, num_recv: int,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[N, hidden]`` sum over local experts of each received token's rows of ``y`` ``[P, hidden]``.

    With ``out`` (``[n, hidden]``, ``n <= N``), its first ``n`` rows are rounded into ``out`` instead.
    """
    acc = torch.zeros(num_recv + 1, y.size(1), dtype=_acc_dtype(y.dtype), device=y.device)
    acc.index_add_(0, src // num_local, y.to(acc.dtype))
    if out is not None:
        return out.copy_(acc[:out.size(0)])
    return acc[:num_recv].to(y.dtype)


def combine_input(buffer: Buffer, dispatch_handle, x: torch.Tensor, num_topk: int = 0) -> Optional[torch.Tensor]:
    """The buffer's zero-copy combine input for rows like ``x`` (bf16), or None where it does not fit.

    Written by the un-permute, it spares the combine the copy of every received row into the buffer.
    """
    if x.dtype != torch.bfloat16:
        return None
    rows = dispatch_handle.num_recv_tokens
    if buffer.num_nvl_bytes < combine_input_bytes(rows, x.size(1) * 2, num_topk):
        return None
    resident.begin(buffer)  # the area is where received rows of a recv_x_in_buffer dispatch live
    return buffer.get_next_combine_buffer(dispatch_handle, x.size(1))


def _fit_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` cut or zero-padded to ``rows`` rows (cached dispatch may pad to ``num_worst_tokens``)."""
    if t.size(0) >= rows:
        return t[:rows]
    return F.pad(t, (0, 0, 0, rows - t.size(0)))


def _routing_to_topk(routing_map: torch.Tensor, probs: Optional[torch.Tensor], can_sync: bool):
    """The multi-hot ``routing_map`` ``[T, E]`` as top-k lists: ``([T, k]`` int64 routed expert ids, -1
    padded, ``[T, k]`` weights from ``probs`` or None``)``, ``k = min(E, MAX_TOPK)`` on every rank.

    The kernels carry at most ``MAX_TOPK`` expert ids per token, so the map travels as lists of its routed
    experts rather than one column per expert; ``k`` must be the same on every rank. A token routed to more
    than ``k`` experts raises ValueError when the host may read the counts (``can_sync``), else fails a
    device-side assertion.
    """
    num_tokens, num_experts = routing_map.shape
    k = min(num_experts, MAX_TOPK)
    if num_experts > k and num_tokens:
        most = routing_map.sum(1).max()
        if can_sync:
            if int(most) > k:
                raise ValueError(f"routing_map routes a token to {int(most)} experts; at most {k} are supported")
        else:
            torch._assert_async(most <= k, f"routing_map routes a token to more than {k} experts")
    routed, idx = routing_map.to(torch.float32).topk(k, dim=1)
    topk_idx = torch.where(routed > 0, idx, -1)
    topk_weights = None
    if probs is not None:
        topk_weights = torch.where(topk_idx >= 0, probs.gather(1, idx), 0)
    return topk_idx, topk_weights


def _scatter_local(recv_idx: torch.Tensor, values: torch.Tensor, num_local: int) -> torch.Tensor:
    """``[N, L]`` from ``[N, k]`` top-k ``values``: entry ``(n, l)`` is the value of the slot whose received
    expert id is ``l`` (each expert at most once per token), 0 where none is."""
    slot = torch.where(recv_idx >= 0, recv_idx, num_local)
    out = values.new_zeros(recv_idx.size(0), num_local + 1)
    return out.scatter_(1, slot, values)[:, :num_local]


class HybridEPDispatch(torch.autograd.Function):
    """Dispatch with a multi-hot routing map, returning tokens grouped and padded by local expert."""

    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
        """Send each token to the ranks of its experts and lay the copies out expert by expert.

        Arguments:
            x: ``[num_tokens, hidden]`` bf16 (float16/32/64 on the reference backend).
            routing_map: ``[num_tokens, num_experts]`` bool, ``num_experts = num_local_experts * group size``.
            probs: ``[num_tokens, num_experts]`` float32 (float64 for gradient checks); read where routed.
            group: the EP process group.
            num_local_experts: experts per rank.
            num_sms_dispatch_api / num_sms_combine_api: SMs of the dispatch / combine kernels (even).
            num_permuted_tokens: rows of the output (int or one-element integer tensor); at least the sum
                of the padded per-expert counts. Given, no count is read back to the host; else it is
                that sum.
            pad_multiple: each local expert's rows are padded with zero rows to a multiple of this.

        Returns:
            dispatched_x: ``[num_permuted_tokens, hidden]``, expert 0's tokens, then expert 1's, ...
            dispatched_probs: ``[num_permuted_tokens]`` weight of each row's (token, expert); 0 on padding.
            scaling_factor: None (no FP8 dispatch).
            tokens_per_expert: ``[num_local_experts]`` int64 padded counts; on the CPU when
                ``num_permuted_tokens`` is None, else on ``x``'s device (not read back).
            handle: a ``HybridEPHandle``.
        """
        group = _resolve_group(group)
        num_ranks = group.size()
        checks.tensor("x", x, _FLOAT_DTYPES, (None, None))
        checks.positive_int("num_local_experts", num_local_experts)
        num_experts = num_local_experts * num_ranks
        num_tokens = x.size(0)
        checks.tensor("routing_map", routing_map, (torch.bool,), (num_tokens, num_experts), x.device)
        if probs is not None:
            checks.tensor("probs", probs, _PROB_DTYPES, (num_tokens, num_experts), x.device)
        num_rows = _count("num_permuted_tokens", num_permuted_tokens)
        pad = _pad_multiple(pad_multiple)
        configs = _hybrid_configs(num_ranks, num_sms_dispatch_api, num_sms_combine_api)
        buffer = _hybrid_buffer(group, x, num_local_experts, num_sms_dispatch_api, num_sms_combine_api, configs)

        topk_idx, topk_weights = _routing_to_topk(routing_map, probs, can_sync=num_rows is None)
        resident.begin(buffer)
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
            buffer.get_dispatch_layout(topk_idx, num_experts)
        # Every received token feeds at least one output row, so num_permuted_tokens bounds the receive count.
        # The received rows are permuted right away, so the senders may write them into the buffer itself.
        num_worst = num_rows if num_rows else 0
        recv_x, recv_idx, recv_weights, aligned_counts, dispatch_handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, expert_alignment=pad, num_worst_tokens=num_worst,
            config=configs[0], recv_x_in_buffer=True)
        local_map = _scatter_local(recv_idx, torch.ones_like(recv_idx, dtype=torch.bool), num_local_experts)
        padded_counts = _padded_counts(local_map, pad)
        if num_rows is None:
            tokens_per_expert = torch.tensor(aligned_counts, dtype=torch.int64)  # host counts of the dispatch
            num_rows = int(tokens_per_expert.sum())
        else:
            _check_fits(padded_counts, num_rows)
            tokens_per_expert = padded_counts
        src = _permutation(local_map, padded_counts, num_rows)
        dispatched_x = _permute(recv_x, src, num_local_experts)
        dispatched_probs = None
        if probs is not None:
            local_weights = _scatter_local(recv_idx, recv_weights, num_local_experts)  # [N, L]
            dispatched_probs = F.pad(local_weights.reshape(-1), (0, 1)).index_select(0, src)

        handle = HybridEPHandle(buffer, dispatch_handle, src, recv_x.size(0), num_worst, num_experts,
                                num_local_experts, pad, *configs)
        ctx.handle, ctx.has_probs = handle, probs is not None
        ctx.topk_idx, ctx.recv_idx = topk_idx, recv_idx
        ctx.mark_non_differentiable(tokens_per_expert)
        return dispatched_x, dispatched_probs, None, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_x, grad_probs, grad_scaling_factor, grad_tokens_per_expert, grad_handle):
        """Sum each token's rows per received copy, then combine to the source ranks (weights likewise)."""
        h = ctx.handle
        num_local, num_recv = h.num_local_experts, h.num_recv_rows
        weights = None
        if ctx.has_probs and ctx.needs_input_grad[2]:
            flat = torch.zeros(num_recv * num_local + 1, dtype=grad_probs.dtype, device=grad_probs.device)
            flat.index_add_(0, h.permuted_src, grad_probs)  # padding rows fall into the dropped last slot
            per_local = flat[:-1].view(num_recv, num_local)  # gradient of each (received token, local expert)
            # Back in the top-k form of the dispatch: slot j of a received token is local expert recv_idx[:, j].
            recv_idx = ctx.recv_idx
            weights = torch.where(recv_idx >= 0, per_local.gather(1, recv_idx.clamp(min=0)), 0)
        # With num_worst_tokens the receive padding is not part of the handle's exchange.
        n = h.dispatch_handle.num_recv_tokens
        grad_recv = combine_input(h.buffer, h.dispatch_handle, grad_x, weights.size(1) if weights is not None else 0)
        if grad_recv is not None:
            _unpermute(grad_x, h.permuted_src, num_local, num_recv, out=grad_recv)
        else:
            grad_recv = _unpermute(grad_x, h.permuted_src, num_local, num_recv)[:n].contiguous()
        resident.begin(h.buffer)
        grad_in, grad_topk, _ = h.buffer.combine(
            grad_recv, h.dispatch_handle,
            topk_weights=weights[:n].contiguous() if weights is not None else None, config=h.combine_config)
        grad_probs_in = None
        if grad_topk is not None:
            # Each (token, slot) came back from the one rank holding its expert: scatter to the dense map.
            topk_idx = ctx.topk_idx
            slot = torch.where(topk_idx >= 0, topk_idx, h.num_experts)
            dense = grad_topk.new_zeros(topk_idx.size(0), h.num_experts + 1)
            grad_probs_in = dense.scatter_(1, slot, grad_topk)[:, :h.num_experts].to(grad_probs.dtype)
        return grad_in, None, grad_probs_in, None, None, None, None, None, None


class HybridEPCombine(torch.autograd.Function):
    """Sum the expert rows of each token and send them back; backward is a cached dispatch + permute."""

    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens=None, pad_multiple=None):
        """Combine ``x`` ``[num_permuted_tokens, hidden]`` (dispatch's layout) into ``[num_tokens, hidden]``.

        Padding rows are ignored. ``num_permuted_tokens`` and ``pad_multiple``, when given, must match
        the dispatch that made ``handle``.
        """
        _check_hybrid_handle(handle, num_permuted_tokens, pad_multiple)
        checks.tensor("x", x, _FLOAT_DTYPES, (handle.num_permuted_tokens, None), handle.permuted_src.device)
        n = handle.dispatch_handle.num_recv_tokens
        recv = combine_input(handle.buffer, handle.dispatch_handle, x)  # the un-permute writes into the buffer
        if recv is not None:
            _unpermute(x, handle.permuted_src, handle.num_local_experts, handle.num_recv_rows, out=recv)
        else:
            recv = _unpermute(x, handle.permuted_src, handle.num_local_experts, handle.num_recv_rows)[:n].contiguous()
        resident.begin(handle.buffer)
        combined, _, _ = handle.buffer.combine(recv, handle.dispatch_handle, config=handle.combine_config)
        ctx.handle = handle
        return combined

    @staticmethod
    def backward(ctx, grad_x):
        """Send each token's gradient to every rank that holds its experts, then lay it out by expert."""
        h = ctx.handle
        resident.begin(h.buffer)
        recv, _, _, _, _, _ = h.buffer.dispatch(grad_x.contiguous(), handle=h.dispatch_handle,
                                                num_worst_tokens=h.num_worst_tokens, config=h.dispatch_config,
                                                recv_x_in_buffer=True)
        recv = _fit_rows(recv, h.num_recv_rows)
        return _permute(recv, h.permuted_src, h.num_local_experts), None, None, None


def _check_hybrid_handle(handle, num_permuted_tokens, pad_multiple) -> None:
    if not isinstance(handle, HybridEPHandle):
        raise TypeError(f"handle must be the HybridEPHandle returned by hybrid_ep_dispatch, got "
                        f"{type(handle).__name__}")
    rows = _count("num_permuted_tokens", num_permuted_tokens)
    if rows is not None and rows != handle.num_permuted_tokens:
        raise ValueError(f"num_permuted_tokens={rows} does not match the dispatch, which produced "
                         f"{handle.num_permuted_tokens} rows")
    if _pad_multiple(pad_multiple) != handle.pad_multiple:
        raise ValueError(f"pad_multiple={pad_multiple} does not match the dispatch's {handle.pad_multiple}")


def hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                       num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None):
    """Differentiable dispatch + permute to local experts; see ``HybridEPDispatch.forward``.

    Returns ``(dispatched_x, dispatched_probs, None, tokens_per_expert, handle)``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return HybridEPDispatch.apply(x.contiguous(), routing_map, probs, group, num_local_experts,
                                  num_sms_dispatch_api, num_sms_combine_api, num_permuted_tokens, pad_multiple)


def hybrid_ep_combine(x, handle, num_permuted_tokens, pad_multiple):
    """Differentiable unpermute + combine with the handle of ``hybrid_ep_dispatch``; ``[num_tokens, hidden]``."""
    return HybridEPCombine.apply(x, handle, num_permuted_tokens, pad_multiple)
