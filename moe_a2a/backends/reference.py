"""Reference backend: dispatch and combine on ``torch.distributed.all_to_all_single``.

Written for clarity, not speed: it is the oracle every kernel is tested against and the path for
CPU tensors (gloo) or when the CUDA extension is missing (NCCL). Every payload travels as raw bytes,
so any dtype (BF16, FP8, float64 for gradient checks) moves exactly.

Received tokens are ordered by source rank, then by source token index, in every backend.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import agreement
from ..event import EventHandle
from ..fp8 import fp8_to_float, per_token_cast_to_fp8
from ..handles import DispatchHandle
from ..layout import compute_layout
from . import intranode
from .base import (CombineRequest, CombineResult, DispatchRequest, DispatchResult, LayoutRequest, LayoutResult,
                   NormalHandle)
from .waits import Deadline

#: Seconds a collective waits for its peers when no ``timeout_s`` is given (``Buffer`` passes its own).
DEFAULT_TIMEOUT_S = 10.0

# Finished collectives, each kept until 16 newer ones finished, and the last ones for good at exit. A gloo worker
# thread drops its own reference to a work just after completing it. If Python dropped its reference first, that
# thread runs the work's destructor, which releases the tensors' Python objects and so takes the GIL; when this
# happens while the interpreter shuts down, Python ends the thread inside a C++ frame and the process aborts
# ("terminate called without an active exception", from ~AsyncAlltoallWork in ProcessGroupGloo::runLoop).
# Holding the Python reference longer makes the main thread, not the worker, release the work.
_finished_works = collections.deque(maxlen=16)


@atexit.register
def _keep_finished_works() -> None:
    """At exit the works still held are never released (the process ends): no destructor can race shutdown."""
    for work in _finished_works:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(work))


def _comm_device(group) -> torch.device:
    """Where a collective of ``group`` can run: CUDA for NCCL groups, CPU otherwise."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View ``[n, ...]`` as ``[n, row_bytes]`` uint8 (a copy only if ``t`` is not contiguous)."""
    row_bytes = t.element_size() * (t[0].numel() if t.size(0) else int(torch.Size(t.shape[1:]).numel()))
    if t.numel() == 0:  # empty tensors may carry strides that forbid a dtype view
        return torch.empty(t.size(0), row_bytes, dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8).reshape(t.size(0), row_bytes)


class Exchanger:
    """All-to-all of row blocks with known split sizes, over one process group.

    Every wait has a deadline (``timeout_s``): a peer that stalls or dies makes the call raise a
    ``CollectiveError`` naming the operation and, where it can be known, the missing rank (``waits``).
    """

    def __init__(self, group, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.device = _comm_device(group)
        self.deadline = Deadline(group, timeout_s)

    def _all_to_all(self, recv, send, operation: str, recv_splits=None, send_splits=None, async_op=False):
        self.deadline.check_usable()
        try:
            work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        except RuntimeError as exc:  # a transport that fails at once (the peer's socket is gone)
            work = _Failed(exc)
        if async_op:
            return _Pending(self.deadline, work, operation)
        self.deadline.wait(work, operation)
        _finished_works.append(work)
        return None

    def counts(self, send_counts: torch.Tensor, operation: str = "count exchange") -> torch.Tensor:
        """Exchange ``[num_ranks, k]`` int64 rows: row ``j`` goes to rank ``j``; returns row ``i`` from rank ``i``."""
        send = send_counts.to(self.device, torch.int64).contiguous()
        recv = torch.empty_like(send)
        self._all_to_all(recv, send, operation)
        return recv.cpu()

    def header(self, signature: List[int], send_counts: Optional[torch.Tensor], operation: str,
               extra: int = 0) -> torch.Tensor:
        """The first exchange of every operation: the call's ``signature`` and per-destination counts.

        Every operation sends the same shape (``[R, SIGNATURE_LENGTH + 2 + R]`` int64), so ranks that make
        different calls still exchange matching sizes and learn it. Row ``j`` holds the signature,
        ``send_counts[j]``, the whole ``send_counts`` vector (so every rank learns the rank-to-rank
        matrix) and ``extra`` (a per-rank value every rank learns, e.g. its ``num_worst_tokens``). Raises
        ``ValueError`` on every rank when the signatures disagree (``agreement.check``).

        Returns ``[R, 2 + R]``: column 0 what each rank sends here, then each rank's send-count vector, then
        each rank's ``extra``.
        """
        r, k = self.num_ranks, agreement.SIGNATURE_LENGTH
        counts = torch.zeros(r, dtype=torch.int64) if send_counts is None else send_counts.to(torch.int64).cpu()
        meta = torch.cat([torch.tensor(signature, dtype=torch.int64).view(1, k).expand(r, k),
                          counts.view(r, 1), counts.view(1, r).expand(r, r),
                          torch.full((r, 1), int(extra), dtype=torch.int64)], 1)
        recv = self.counts(meta, f"{operation} (count exchange)")
        agreement.check(recv[:, :k].tolist())
        return recv[:, k:]

    def rows(self, tensors: Sequence[torch.Tensor], send_splits: List[int], recv_splits: List[int],
             async_op: bool = False, operation: str = "row exchange"):
        """Send ``tensors`` (same leading size, rows grouped by destination) with the given splits.

        The tensors are packed side by side as bytes into one message per destination. Returns the
        received tensors (and, if ``async_op``, an object whose ``wait()`` completes the exchange within the
        deadline), each with the dtype and trailing shape of its input, on the input's device.
        """
        parts = [_as_bytes(t) for t in tensors]
        widths = [p.size(1) for p in parts]
        packed = torch.cat([p.to(self.device) for p in parts], dim=1) if parts else None
        recv = torch.empty(sum(recv_splits), sum(widths), dtype=torch.uint8, device=self.device)
        pending = self._all_to_all(recv, packed, operation, recv_splits, send_splits, async_op=True)

        def unpack() -> List[torch.Tensor]:
            out, col = [], 0
            for t, w in zip(tensors, widths):
                # A fresh contiguous copy: its storage is aligned for a view as any dtype.
                piece = torch.empty(recv.size(0), w, dtype=torch.uint8, device=t.device)
                piece.copy_(recv[:, col:col + w])
                out.append(piece.view(t.dtype).reshape(recv.size(0), *t.shape[1:]))
                col += w
            return out

        if async_op:
            return unpack, pending
        pending.wait()
        return unpack()


class _Pending:
    """An exchange in flight; ``wait()`` completes it within the exchanger's deadline."""

    def __init__(self, deadline: Deadline, work, operation: str):
        self.deadline, self.work, self.operation = deadline, work, operation

    def wait(self) -> None:
        if self.work is not None:
            work, self.work = self.work, None
            self.deadline.wait(work, self.operation)
            _finished_works.append(work)


class _Failed:
    """A collective that raised when it was issued: waiting on it re-raises (and names the missing peer)."""

    def __init__(self, exc: RuntimeError):
        self.exc = exc

    def wait(self, timeout=None):
        raise self.exc

    def is_completed(self) -> bool:
        raise self.exc


def _channel_prefix(is_token_in_rank: torch.Tensor, num_channels: int) -> torch.Tensor:
    """``[R, C]`` int32: tokens sent to each rank from channels ``0..c``, tokens split evenly into channels."""
    num_tokens, num_ranks = is_token_in_rank.shape
    per_channel = (num_tokens + num_channels - 1) // num_channels if num_tokens else 1
    channel_of = torch.arange(num_tokens, device=is_token_in_rank.device) // per_channel
    counts = torch.zeros(num_channels, num_ranks, dtype=torch.int64, device=is_token_in_rank.device)
    counts.index_add_(0, channel_of, is_token_in_rank.to(torch.int64))
    return counts.cumsum(0).t().contiguous().to(torch.int32)


def _maybe_event(device: torch.device, async_finish: bool) -> Optional[EventHandle]:
    return EventHandle(device=device) if async_finish and device.type == "cuda" else None


class ReferenceBackend:
    """Normal-mode dispatch/combine on ``all_to_all_single`` (any device, any group); a ``NormalModeBackend``."""

    def __init__(self, rank: int, num_ranks: int, group, num_ranks_per_node: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank = rank
        self.num_ranks = num_ranks
        self.group = group
        self.num_ranks_per_node = num_ranks_per_node
        self.timeout_s = timeout_s
        self._exchanger = None

    @property
    def exchanger(self) -> Exchanger:
        if self._exchanger is None:
            self._exchanger = Exchanger(self.group, self.timeout_s)
        return self._exchanger

    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """``compute_layout``; for CUDA tensors the layout kernel where ``moe_a2a._C`` is built: the same counts
        (``tests/gpu/test_layout.py``) without host syncs, so a CUDA graph can capture the call."""
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        topk_idx = request.topk_idx
        if topk_idx.is_cuda and intranode.extension_available():
            layout = intranode.get_dispatch_layout(topk_idx, request.num_experts, self.num_ranks,
                                                   self.num_ranks_per_node)
        else:
            layout = compute_layout(topk_idx, request.num_experts, self.num_ranks, self.num_ranks_per_node)
        return LayoutResult(*layout, _maybe_event(topk_idx.device, request.async_finish))

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        # recv_x_in_buffer asks for rows written into a registered buffer; this backend has none, and an
        # ordinary recv_x meets the contract (valid at least until the next operation).
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        x, x_scales, handle, config = request.x, request.x_scales, request.handle, request.config
        is_token_in_rank, num_tokens_per_expert = request.is_token_in_rank, request.num_tokens_per_expert
        topk_idx, topk_weights = request.topk_idx, request.topk_weights
        expert_alignment, num_worst_tokens = request.expert_alignment, request.num_worst_tokens
        ex, me, num_ranks = self.exchanger, self.rank, self.num_ranks
        device = x.device
        cached = handle is not None
        if cached:
            is_token_in_rank = handle.is_token_in_rank
            rank_prefix_matrix = handle.rank_prefix_matrix
        send_mask = is_token_in_rank.t()  # [R, T]
        send_counts = send_mask.sum(1).cpu()

        # Every operation starts with the same-shaped header: what must agree, and the counts.
        operation = "cached dispatch" if cached else "dispatch"
        num_experts = request.num_experts
        signature = agreement.signature(
            operation, x.size(1), x.dtype, x_scales is not None, num_experts,
            -1 if topk_idx is None else topk_idx.size(1), None if topk_weights is None else topk_weights.dtype,
            handle.identity if cached else None)
        header = ex.header(signature, None if cached else send_counts, operation, num_worst_tokens)
        if not cached:
            experts_per_rank = num_experts // num_ranks
            recv_counts = header[:, 0]
            all_counts = header[:, 1:1 + num_ranks]  # [i, j] = tokens rank i sends to rank j
            rank_prefix_matrix = all_counts.cumsum(0).to(torch.int32).to(device)
            # Every rank holds the whole matrix and every rank's num_worst_tokens, so every rank raises alike
            # before any row moves.
            over = [(j, int(n), int(bound)) for j, (n, bound) in
                    enumerate(zip(all_counts.sum(0).tolist(), header[:, -1].tolist())) if 0 < bound < n]
            if over:
                raise RuntimeError("ranks would receive more tokens than their num_worst_tokens: " +
                                   ", ".join(f"rank {j}: {n} > {bound}" for j, n, bound in over))
            if topk_idx is None:
                # No top-k ids travel with the rows: the per-expert counts come from the caller's
                # num_tokens_per_expert (row j: our counts for rank j's experts).
                per_expert = ex.counts(num_tokens_per_expert.view(num_ranks, experts_per_rank).cpu(),
                                       "dispatch (per-expert counts)").sum(0)
        else:
            column = rank_prefix_matrix[:, me].to(torch.int64).cpu()
            recv_counts = torch.cat([column[:1], column[1:] - column[:-1]])
        send_splits = send_counts.tolist()
        recv_splits = recv_counts.tolist()
        num_recv = sum(recv_splits)

        # Rows in destination order: for each rank j, the tokens it receives, by increasing index.
        dst_rank, src_token = send_mask.nonzero(as_tuple=True)
        payload = [x[src_token]]
        if x_scales is not None:
            payload.append(x_scales[src_token])
        if not cached:
            payload.append(src_token.to(torch.int32).view(-1, 1))
            if topk_idx is not None:
                payload.append(topk_idx[src_token])
            if topk_weights is not None:
                payload.append(topk_weights[src_token])
        received = ex.rows(payload, send_splits, recv_splits, operation=f"{operation} (rows)")
        recv_x = received.pop(0)
        recv_x_scales = received.pop(0) if x_scales is not None else None
        recv_topk_idx = recv_topk_weights = None
        if cached:
            out_list, out_handle = None, None
        else:
            recv_src_idx = received.pop(0).view(-1)
            if topk_idx is not None:
                global_idx = received.pop(0)
                first = me * experts_per_rank
                local = (global_idx >= first) & (global_idx < first + experts_per_rank)
                recv_topk_idx = torch.where(local, global_idx - first, torch.full_like(global_idx, -1))
                # Per-expert counts of what arrived (the truth, whatever num_tokens_per_expert said).
                per_expert = torch.bincount(recv_topk_idx[local].cpu(), minlength=experts_per_rank)
                if topk_weights is not None:
                    recv_topk_weights = torch.where(local, received.pop(0), torch.zeros((), dtype=topk_weights.dtype,
                                                                                    device=device))
            num_recv_tokens_per_expert_list = [
                int((c + expert_alignment - 1) // expert_alignment * expert_alignment) for c in per_expert.tolist()]
            channel_prefix = _channel_prefix(is_token_in_rank, config.num_channels)
            recv_channel_prefix = ex.rows([channel_prefix.cpu()], [1] * num_ranks, [1] * num_ranks,
                                          operation="dispatch (channel prefix)")[0].to(device)
            send_head = torch.full(is_token_in_rank.shape, -1, dtype=torch.int32, device=device)
            position = (is_token_in_rank.to(torch.int32).cumsum(0) - 1).to(torch.int32)
            send_head = torch.where(is_token_in_rank, position, send_head)
            out_handle = DispatchHandle(rank_prefix_matrix, channel_prefix, recv_channel_prefix,
                                        recv_src_idx, is_token_in_rank, send_head)
            out_list = num_recv_tokens_per_expert_list

        if num_worst_tokens:
            recv_x = _pad_rows(recv_x, num_worst_tokens, 0)
            recv_x_scales = _pad_rows(recv_x_scales, num_worst_tokens, 0)
            recv_topk_idx = _pad_rows(recv_topk_idx, num_worst_tokens, -1)
            recv_topk_weights = _pad_rows(recv_topk_weights, num_worst_tokens, 0)
            if out_handle is not None:
                # Padding rows have no source (-1); combine takes its row count from the handle.
                padded_src = _pad_rows(out_handle.recv_src_idx.view(-1, 1), num_worst_tokens, -1).view(-1)
                out_handle = out_handle._replace(recv_src_idx=padded_src)
                out_list = []
        elif cached and handle.num_recv_tokens > num_recv:
            # A handle from a num_worst_tokens dispatch: keep its padded row count.
            recv_x = _pad_rows(recv_x, handle.num_recv_tokens, 0)
            recv_x_scales = _pad_rows(recv_x_scales, handle.num_recv_tokens, 0)
        return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, out_list, out_handle,
                              _maybe_event(device, request.async_finish))

    def combine(self, request: CombineRequest) -> CombineResult:
        """Sum the copies of each token; ``use_fp8``: rows travel as FP8 e4m3 with per-128 scales."""
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        x, handle, topk_weights, use_fp8 = request.x, request.handle, request.topk_weights, request.use_fp8
        ex, me = self.exchanger, self.rank
        device = x.device
        ex.header(agreement.signature("combine", x.size(1), x.dtype, False, 0,
                                      -1 if topk_weights is None else topk_weights.size(1),
                                      None if topk_weights is None else topk_weights.dtype, handle.identity),
                  None, "combine")
        column = handle.rank_prefix_matrix[:, me].to(torch.int64).cpu()
        num_recv = int(column[-1])
        x = x[:num_recv]  # rows past the received count are num_worst_tokens padding
        back_splits = torch.cat([column[:1], column[1:] - column[:-1]]).tolist()
        send_mask = handle.is_token_in_rank.t()
        home_splits = send_mask.sum(1).cpu().tolist()
        payload = list(per_token_cast_to_fp8(x)) if use_fp8 else [x]
        if topk_weights is not None:
            payload.append(topk_weights[:num_recv])
        received = ex.rows(payload, back_splits, home_splits, operation="combine (rows)")
        if use_fp8:
            received[0:2] = [fp8_to_float(received[0], received[1])]
        _, token = send_mask.nonzero(as_tuple=True)  # token of each returned row, in arrival order
        num_tokens = handle.num_sent_tokens
        acc = torch.zeros(num_tokens, *x.shape[1:], dtype=_acc_dtype(x.dtype), device=device)
        acc.index_add_(0, token, received[0].to(acc.dtype))
        for bias in (request.bias_0, request.bias_1):
            if bias is not None:
                acc += bias.to(acc.dtype)
        combined_weights = None
        if topk_weights is not None:
            w = torch.zeros(num_tokens, topk_weights.size(1), dtype=_acc_dtype(topk_weights.dtype), device=device)
            w.index_add_(0, token, received[1].to(w.dtype))
            combined_weights = w.to(topk_weights.dtype)
        return CombineResult(acc.to(x.dtype), combined_weights, _maybe_event(device, request.async_finish))

    def get_next_combine_buffer(self, handle: NormalHandle, hidden: int) -> torch.Tensor:
        """A fresh ``[num_recv, hidden]`` bf16 tensor on the handle's device: this backend has no staging area
        to write into, so the combine that takes it sends it as it sends any input."""
        return torch.empty(handle.recv_src_idx.size(0), hidden, dtype=torch.bfloat16,
                           device=handle.recv_src_idx.device)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float32, or float64 for float64 inputs (gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_rows(t: Optional[torch.Tensor], rows: int, value: int) -> Optional[torch.Tensor]:
    """``t`` extended to ``rows`` rows, the new rows filled with ``value``."""
    if t is None:
        return None
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    if value:
        out.fill_(value)
    out[:t.size(0)] = t
    return out
