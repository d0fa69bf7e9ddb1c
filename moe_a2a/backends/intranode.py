"""Intranode CUDA kernels (``moe_a2a._C``): routing layout, and dispatch/combine over CUDA IPC.

Design: stage once, pull once
-----------------------------
Every rank owns one allocation of ``num_nvl_bytes`` (plus a 32 KiB header of counters) that all ranks
of the group map over CUDA IPC. A dispatch or combine starts with a one-block prologue kernel (publish
the token counts, meet every peer: from then on no peer reads this buffer for an earlier operation),
then runs, in one kernel of ``config.num_sms`` blocks, rounds of three steps:

1. **stage**: the rank copies the rows it offers into its *own* buffer, once per row, however many
   ranks want the row (dispatch: its input tokens with their ``send_head`` row, scales and top-k;
   combine: its received rows). When everything fits one round, the bulk rows are staged by the copy
   engine (one ``cudaMemcpyAsync`` between the prologue and the kernel, faster than SM copies), with
   sizes known on the host, so CUDA-graph capture still holds: dispatch copies ``x`` as is; combine
   copies its received rows (``recv_src_idx.size(0)`` of them, padding included after a
   ``num_worst_tokens`` dispatch) and their weights in arrival order. Otherwise the kernel stages by
   rounds; a combine then places rows at ``[source rank, source token]`` slots. Each rank publishes
   which layout it used, so ranks may differ;
2. **barrier**: a grid barrier whose last block meets every peer (epoch counters in device memory,
   release/acquire at system scope, so the sequence also holds under CUDA-graph replay);
3. **pull**: every rank reads, from the peers' buffers, exactly the rows it needs and writes them to
   their final place: dispatch writes received row ``rank_prefix[src - 1, me] + send_head[t, me]``
   (source-rank order, then source-token order); combine sums the copies of each of its tokens in
   float32, in rank order, adds the biases and writes BF16. A copy staged in arrival order on rank
   ``r`` is row ``rank_prefix[me - 1, r] + send_head[t, r]`` there (``send_head[t, r]`` for rank 0),
   the row dispatch wrote it to. Dispatch moves rows either through registers (16-byte loads, eight in
   flight per lane) or, when it receives at least ``BULK_MIN_ROWS`` rows, with Hopper bulk copies
   (``cp.async.bulk``, the TMA unit): one lane per warp loads row pieces into a ring of shared-memory
   slots and stores each back out once it landed, so a block keeps about 192 KiB in flight instead of
   what its registers hold, and the other lanes copy the small per-row fields.

Pipelined combine (``set_combine_windows``, ``COMBINE_WINDOWS`` by default): when every token fits one
round and the combine runs on at least ``COMBINE_WINDOWS_MIN_SMS`` SMs, it replaces the barrier by one flag
per token window. The kernel's blocks stage the rows
of source tokens in window ``k + 1`` (in arrival order a source's rows are sorted by token, so that is one
range of rows per source) before they pull window ``k``; the last block to finish a window raises this
rank's flag for it to the epoch the prologue's barrier left (the same on every rank, so replays of a
captured graph never see a stale flag), and a pull of window ``k`` waits for that flag on every rank. One
rank's staging then overlaps another's pulling. The kernel stages the rows itself in this mode (the copy
engine would finish staging before the first pull); the window count is in the operation's signature, so
ranks that disagree get an error, not a hang.

Rows written by their senders (``recv_x_in_buffer``): the receivers' outputs are the start of their own
staging areas, which every peer maps, so the dispatch kernel skips the staging of ``x`` and the pull of the
rows: each sender reads a token once and stores it into the receive row of every rank that gets it (row
``rank_prefix[me - 1, r] + send_head[t, r]`` there), before the barrier; only the small per-token fields
(scales, top-k, source index) are staged, at the end of the area, and pulled as above. ``T + S`` row
transfers instead of ``2T + 2S``. ``recv_x`` is then a view of the buffer until the next operation, which is
why it is opt-in. Whether the rows fit is decided alike on every rank (from the rank prefix matrix every
rank holds, or ``num_worst_tokens``), and the kernel checks it again before writing.

Zero-copy combine input: ``get_next_combine_buffer`` hands out the staging area itself as a
``[num_recv, hidden]`` bf16 tensor, where the copy engine would put the rows; the producer of the combine
input writes there and the combine skips the copy (it recognises the view by where it starts, empty views
included). A peer may still pull rows from this area after this rank is done with them, so each dispatch or
combine kernel, once all its blocks stopped reading, tells every peer the epoch of its last barrier, and
``get_next_combine_buffer`` makes the current stream wait until every peer's mark reached this rank's own
epoch, i.e. every peer finished the operation in which it passed this rank's last barrier. Barrier epochs
agree across ranks by construction (a rank passes barrier ``e`` only once every peer entered it), so the
wait needs no count of operations or kernel launches to match between ranks.

A non-cached dispatch needs no prologue kernel: its notify step already met every peer after they
finished their earlier operations, and published this rank's token count.

Bytes moved per rank, with ``T`` tokens in, ``S`` rows sent (a token counted once per destination) and
``N`` rows received: dispatch reads ``T`` and writes ``T`` rows locally, then moves each received row
once (read ``N`` over NVLink, write ``N``); combine stages ``N`` rows locally and pulls them once.
A token that goes to k ranks is read from the input once. Outputs that are fresh tensors cannot be written
by the peers (no peer maps them): that is why rows written by their senders need ``recv_x_in_buffer``.

When the rows do not fit the buffer in one go the kernel runs several rounds over windows of tokens
(``capacity`` tokens per round, computed from ``num_nvl_bytes``), with one extra barrier per round; any
token count works with any buffer that holds one row per rank.

Handle fields as this backend uses them: ``rank_prefix_matrix[i, j]`` tokens ranks ``0..i`` send to
``j`` (gives each source's first output row); ``send_head[t, j]`` position of token ``t`` among the
tokens this rank sends to ``j`` (``-1`` if not sent; gives the output row); ``recv_src_idx[n]`` source
token of received row ``n`` (``-1`` in ``num_worst_tokens`` padding; combine places row ``n`` by it);
``channel_prefix_matrix`` / ``recv_channel_prefix_matrix`` follow the reference definition (tokens
split evenly into ``config.num_channels`` channels) and are kept for compatibility only.

Failures: every wait on a peer times out after ``timeout_s``; the kernel records the rank, the phase
and the counter it waited for in pinned host memory, marks the buffer aborted, and the host raises a
``RuntimeError`` naming them at the next host check (at once when the host waits for counts, otherwise
at the next call). After that every call raises: the buffer must be rebuilt.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..config import combine_input_bytes
from ..event import EventHandle
from ..handles import DispatchHandle
from ..limits import MAX_NVL_PEERS
from . import residency
from .base import CombineRequest, CombineResult, DispatchRequest, DispatchResult, LayoutRequest, LayoutResult

from .. import _native

_C = _native.Lazy("_C")  # loaded at the first kernel call; absent without CUDA (the reference backend serves)

#: Received rows from which dispatch pulls with bulk copies (override: ``MOE_A2A_BULK_MIN_ROWS``).
BULK_MIN_ROWS = 8192

#: Token windows of a combine whose tokens fit the buffer at once (0: stage, one barrier, pull); windows
#: hold at least 128 tokens. 8 was the fastest of 4 / 8 / 16 on an H100 and an H200 (EP8, 4096 tokens).
#: Combines on fewer than ``COMBINE_WINDOWS_MIN_SMS`` SMs take the copy engine and one barrier whatever the
#: setting: on 8 SMs that was 13% faster than the pipeline on an H200 (its blocks stage slower than the
#: copy engine), on 16 SMs 4% slower.
COMBINE_WINDOWS = 8
COMBINE_WINDOWS_MIN_SMS = 16  # kMinWindowSms in csrc/kernels/api.cuh
MAX_COMBINE_WINDOWS = 32
#: The copy probe's patterns (kProbe* in csrc/kernels/api.cuh).
PROBE_PATTERNS = {"write": 0, "read": 1, "scatter": 2, "gather": 3, "multicast": 4, "reduce": 5}


def extension_available() -> bool:
    """Whether the compiled extension ``moe_a2a._C`` is importable."""
    return bool(_C)


def _require_extension() -> None:
    if not _C:
        raise RuntimeError("moe_a2a._C is not built: install with a CUDA build of torch and nvcc available")


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_ranks_per_node: int):
    """The layout kernel on the current stream (definition: ``moe_a2a.layout.compute_layout``).

    Args:
        topk_idx: ``[num_tokens, num_topk]`` int64 CUDA tensor, ``-1`` for "no expert" (``Buffer`` validates the
            call; the extension's own guards raise ``RuntimeError`` on input it cannot take).
        num_experts: a multiple of ``num_ranks``, at most ``limits.LAYOUT_MAX_EXPERTS``.

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``.
    """
    _require_extension()
    return _C.get_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node)


def start_address(t: torch.Tensor) -> int:
    """Address of ``t``'s first element, also when ``t`` is empty.

    ``Tensor.data_ptr()`` is 0 for an empty tensor, so the view ``get_next_combine_buffer`` hands out for
    0 received rows would not be told from any other input by it; the storage and offset still say
    where the view starts.
    """
    return t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


def is_combine_input_view(x: torch.Tensor, staging_start: int, num_rows: int) -> bool:
    """Whether ``x`` is exactly the view ``get_next_combine_buffer`` gives for ``num_rows`` rows of a staging
    area starting at address ``staging_start`` (empty views included: every rank must take the same path,
    raise or communicate, for the same calls)."""
    return (start_address(x) == staging_start and x.dtype == torch.bfloat16 and x.dim() == 2 and
            x.size(0) == num_rows and x.is_contiguous())


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """``t`` is on the kernels' ``device``. The one tensor check left to the kernel backends: ``Buffer`` checked
    that the call's tensors share one device, but only the backend knows which device its buffer lives on."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but this buffer's kernels run on {device}")


class IntranodeBackend:
    """The normal-mode kernels of one rank inside one node; a ``NormalModeKernels`` (``base``)."""

    def __init__(self, rank: int, num_ranks: int, group, num_nvl_bytes: int, all_gather_object, timeout_s: float):
        _require_extension()
        if num_ranks > MAX_NVL_PEERS:
            raise NotImplementedError(f"intranode kernels support up to {MAX_NVL_PEERS} ranks, got {num_ranks}")
        if not torch.cuda.is_available():
            raise RuntimeError("intranode kernels need a CUDA device")
        self.rank, self.num_ranks, self.group = rank, num_ranks, group
        self.device = torch.device("cuda", torch.cuda.current_device())
        num_nvl_bytes = int(num_nvl_bytes) // 16 * 16
        sizes = all_gather_object(num_nvl_bytes)
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must pass the same num_nvl_bytes, got {sizes}")
        self.num_nvl_bytes = num_nvl_bytes
        self.runtime = _C.Runtime(rank, num_ranks, num_nvl_bytes, float(timeout_s))
        peers = all_gather_object((residency.device_id(self.device), self.runtime.ipc_handle()))
        self.runtime.connect([handle for _, handle in peers])
        #: most SMs (blocks) per kernel such that every rank's blocks are resident together (same on every rank).
        self.max_num_sms = residency.sm_budget(self.runtime.num_device_sms(),
                                               residency.most_ranks_per_device([d for d, _ in peers]))
        # Highest priority (torch maps any lower number to the highest the device has): when SMs free up,
        # the block scheduler places this stream's waiting blocks first.
        self.comm_stream = torch.cuda.Stream(self.device, priority=-100)
        self.set_bulk_min_rows(int(os.environ.get("MOE_A2A_BULK_MIN_ROWS", BULK_MIN_ROWS)))
        self._seq = 0
        self._error: Optional[str] = None
        raw = self.runtime.local_buffer(0)
        self._staging = (raw.data_ptr(), raw.data_ptr() + raw.numel())  # [begin, end) of the staging area
        self._most_received = None  # (rank_prefix_matrix, most rows any rank receives) of the last handle
        # (rows, hidden) of the combine input view handed out and still intact, else None.
        self._combine_input: Optional[tuple] = None
        self.set_combine_windows(COMBINE_WINDOWS)
        _native.track(self)

    def set_bulk_min_rows(self, rows: int) -> None:
        """Dispatches receiving at least ``rows`` rows pull them with bulk copies (0: always, large: never)."""
        if not isinstance(rows, int) or rows < 0:
            raise ValueError(f"bulk_min_rows must be an int >= 0, got {rows!r}")
        self.runtime.set_bulk_min_rows(rows)

    def set_copy_engine_staging(self, on: bool) -> None:
        """Stage a dispatch's (one-round) input rows and a combine's input rows with the copy engine before the
        kernel (True, the default) or with the kernel's own blocks (False). Same bytes, same results."""
        if not isinstance(on, bool):
            raise ValueError(f"copy engine staging must be True or False, got {on!r}")
        self.runtime.set_copy_engine_staging(on)

    def set_combine_windows(self, n: int) -> None:
        """Run combines whose tokens fit the buffer at once, on at least ``COMBINE_WINDOWS_MIN_SMS`` SMs, as a
        pipeline of ``n`` token windows (the kernel stages window k + 1 before it pulls window k, and a pull
        waits only for its window's flag on every rank; the kernel stages the input then, whatever
        ``set_copy_engine_staging`` says) or with one barrier between staging and pulling (``n = 0``). Same
        results; every rank must use the same ``n`` (a difference is reported by the combine)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_COMBINE_WINDOWS:
            raise ValueError(f"combine windows must be an int in [0, {MAX_COMBINE_WINDOWS}], got {n!r}")
        self.runtime.set_combine_windows(n)
        self.combine_windows = n

    # ------------------------------------------------------------------ helpers
    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)
        if not self.runtime.is_available():
            raise RuntimeError("moe_a2a intranode: this buffer was destroyed")
        self._poll()

    def _poll(self) -> None:
        """Raise the error a kernel recorded, if any, and remember it (the buffer stays unusable)."""
        text = self.runtime.error()
        if text:
            self._error = f"moe_a2a intranode: {text}; the buffer cannot be used again: rebuild it"
            raise RuntimeError(self._error)

    def _launch(self, op: str, fn, *args):
        """``fn(*args)``, a runtime call that launches kernels. If it fails (a CUDA error at launch, an argument
        the kernels refuse), the peers may already wait on this rank: the buffer refuses every later call with
        this message, which names the rank and the operation."""
        try:
            return fn(*args)
        except RuntimeError as e:
            if self._error is None:
                self._error = (f"moe_a2a intranode: rank {self.rank} {op} failed: {e}; the buffer cannot be used "
                               "again: rebuild it")
            raise RuntimeError(self._error) from e

    def check(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this buffer timed out or overflowed (no device sync)."""
        self._check_usable()

    def _start(self, previous_event) -> torch.cuda.Stream:
        compute = torch.cuda.current_stream(self.device)
        event = getattr(previous_event, "event", None)
        if event is not None and getattr(event, "event", None) is not None:
            self.comm_stream.wait_event(event.event)
        else:
            self.comm_stream.wait_stream(compute)
        return compute

    def _finish(self, compute, async_finish: bool, tensors) -> Optional[EventHandle]:
        if async_finish:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.comm_stream)
            return EventHandle(stream=self.comm_stream, device=self.device)
        compute.wait_stream(self.comm_stream)
        return None

    def _alloc_stream(self, compute, allocate_on_comm_stream: bool):
        return self.comm_stream if allocate_on_comm_stream else compute

    def _outside_staging(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t``, or a copy of it when its bytes lie in the staging area the call is about to overwrite."""
        if t is None or t.numel() == 0:
            return t
        begin = t.data_ptr()
        end = begin + t.numel() * t.element_size()
        return t.clone() if begin < self._staging[1] and end > self._staging[0] else t

    def dispatch_receive_rows(self, hidden_bytes: int, num_scales: int = 0, num_topk: int = 0) -> int:
        """Rows of ``hidden_bytes`` a ``recv_x_in_buffer`` dispatch can receive on this buffer."""
        return int(self.runtime.dispatch_receive_area(int(hidden_bytes), int(num_scales), int(num_topk))[1])

    def _receive_area_fits(self, rank_prefix: torch.Tensor, num_worst_tokens: int, row_bytes: int, num_scales: int,
                           num_topk: int) -> bool:
        """Whether every rank's received rows fit its receive area: the same answer on every rank (from the
        rank prefix matrix every rank holds, read on the host once per handle, or from num_worst_tokens)."""
        capacity = self.dispatch_receive_rows(row_bytes, num_scales, num_topk)
        if num_worst_tokens:
            return num_worst_tokens <= capacity
        if self._most_received is None or self._most_received[0] is not rank_prefix:
            if torch.cuda.is_current_stream_capturing():
                return False
            self._most_received = (rank_prefix, int(rank_prefix[-1].max()))  # keeps the tensor (and its address)
        return self._most_received[1] <= capacity

    def _staging_rows(self, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
        """``[num_rows, hidden]`` ``dtype`` view of the start of the staging area (where the zero-copy combine
        input and the rows of a ``recv_x_in_buffer`` dispatch live)."""
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        return self.runtime.local_buffer(0)[:num_rows * row_bytes].view(dtype).view(num_rows, hidden)

    def _is_combine_input(self, x: torch.Tensor, num_rows: int) -> bool:
        return is_combine_input_view(x, self._staging[0], num_rows)

    # ------------------------------------------------------------------ layout
    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """The layout kernel on the current stream."""
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        layout = get_dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks, self.num_ranks)
        return LayoutResult(*layout, EventHandle() if request.async_finish else None)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Dispatch ``x`` ``[T, hidden]`` (bf16, or fp8 e4m3 with ``x_scales`` ``[T, hidden // 128]`` f32).

        ``recv_x_in_buffer``: the senders write every received row straight into this rank's registered buffer
        and ``recv_x`` is a view of it, valid until the next dispatch or combine on this buffer (read it, for
        example permute it, before then). Each token crosses memory once (read once, written once per
        receiving rank) instead of being staged and pulled. Every rank must pass the same value. When some
        rank's rows (``num_worst_tokens`` rows when given) do not fit ``dispatch_receive_rows``, every rank
        falls back to an ordinary ``recv_x``; so does a cached dispatch under CUDA graph capture whose handle
        this buffer has not seen (the check reads the handle's counts on the host).
        """
        self._check_usable()
        x, x_scales, handle, config = request.x, request.x_scales, request.handle, request.config
        check_device("x", x, self.device)
        dev, R = self.device, self.num_ranks
        num_tokens_per_expert, topk_idx, topk_weights = (request.num_tokens_per_expert, request.topk_idx,
                                                         request.topk_weights)
        num_worst_tokens, previous_event = request.num_worst_tokens, request.previous_event
        num_tokens = x.size(0)
        cached = request.cached
        is_token_in_rank = handle.is_token_in_rank if cached else request.is_token_in_rank

        x = self._outside_staging(x.contiguous())
        x_scales = self._outside_staging(x_scales.contiguous()) if x_scales is not None else None
        topk_idx = topk_idx.contiguous() if topk_idx is not None and not cached else None
        topk_weights = topk_weights.contiguous() if topk_weights is not None and topk_idx is not None else None
        is_token_in_rank = is_token_in_rank.contiguous()
        # What every rank's call must match (checked by the kernels at the first barrier; see kSignatureInts).
        self.runtime.set_signature(1, x.size(1) * x.element_size(), x_scales.size(1) if x_scales is not None else 0,
                                   topk_idx.size(1) if topk_idx is not None else 0,
                                   0 if cached else num_tokens_per_expert.numel())
        compute = self._start(previous_event)
        alloc = self._alloc_stream(compute, request.allocate_on_comm_stream)
        i32 = dict(dtype=torch.int32, device=dev)
        num_experts, launched = 0, False
        with torch.cuda.stream(self.comm_stream):
            if cached:
                rank_prefix, send_head = handle.rank_prefix_matrix, handle.send_head
                num_rows = num_worst_tokens or handle.recv_src_idx.size(0)
                expert_list = None
            else:
                num_experts = num_tokens_per_expert.numel()
                channels = config.num_channels
                with torch.cuda.stream(alloc):
                    send_head = torch.empty(num_tokens, R, **i32)
                    channel_prefix = torch.empty(R, channels, **i32)
                    rank_prefix = torch.empty(R, R, **i32)
                    recv_channel_prefix = torch.empty(R, channels, **i32)
                self._seq = self._seq % (1 << 30) + 1
                self._launch("dispatch (notify)", self.runtime.notify, num_tokens_per_expert.contiguous(),
                             is_token_in_rank, channels, request.expert_alignment, num_worst_tokens,
                             self._seq if not num_worst_tokens else 0, send_head, channel_prefix, rank_prefix,
                             recv_channel_prefix)
                if not num_worst_tokens:
                    # Wait, allocate and launch in one call: no Python between the notify's end and the dispatch.
                    (num_rows, expert_list, error, most, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
                     recv_src_idx) = self._launch(
                        "dispatch", self.runtime.notified_dispatch, self._seq, num_experts // R, x, x_scales,
                        topk_idx, topk_weights, send_head, rank_prefix, num_experts, config.num_sms,
                        alloc.cuda_stream, request.recv_x_in_buffer)
                    if error:
                        self._error = f"moe_a2a intranode: {error}; the buffer cannot be used again: rebuild it"
                        raise (ValueError if "ranks disagree" in error else RuntimeError)(self._error)
                    self._most_received = (rank_prefix, most)  # a cached dispatch on this handle reads no counts
                    launched = True
                else:
                    num_rows, expert_list = num_worst_tokens, []
            if not launched:  # cached, or num_worst_tokens rows: the sizes are known without a wait
                row_bytes = x.size(1) * x.element_size()
                recv_x_in_buffer = request.recv_x_in_buffer and self._receive_area_fits(
                    rank_prefix, num_worst_tokens, row_bytes, x_scales.size(1) if x_scales is not None else 0,
                    topk_idx.size(1) if topk_idx is not None else 0)
                if recv_x_in_buffer:
                    recv_x = self._staging_rows(num_rows, x.size(1), x.dtype)
                with torch.cuda.stream(alloc):
                    if not recv_x_in_buffer:
                        recv_x = torch.empty(num_rows, x.size(1), dtype=x.dtype, device=dev)
                    recv_x_scales = (torch.empty(num_rows, x_scales.size(1), dtype=torch.float32, device=dev)
                                     if x_scales is not None else None)
                    recv_topk_idx = (torch.empty(num_rows, topk_idx.size(1), dtype=torch.int64, device=dev)
                                     if topk_idx is not None else None)
                    recv_topk_weights = (torch.empty(num_rows, topk_idx.size(1), dtype=torch.float32, device=dev)
                                         if topk_weights is not None else None)
                    recv_src_idx = torch.empty(num_rows, **i32) if not cached else None
                self._launch("dispatch", self.runtime.dispatch, x, x_scales, topk_idx, topk_weights, send_head,
                             rank_prefix, num_experts, config.num_sms, recv_x, recv_x_scales, recv_topk_idx,
                             recv_topk_weights, recv_src_idx, not cached, recv_x_in_buffer)
            self._combine_input = None  # the staged tokens overwrite any combine input written in place
        if cached:
            out_handle = None
        else:
            out_handle = DispatchHandle(rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx,
                                        is_token_in_rank, send_head)
        event = self._finish(compute, request.async_finish,
                             (x, x_scales, topk_idx, topk_weights, is_token_in_rank, send_head, rank_prefix, recv_x,
                              recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx))
        return DispatchResult(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, expert_list, out_handle, event)

    # ------------------------------------------------------------------ combine
    def combine(self, request: CombineRequest) -> CombineResult:
        """Sum the copies of every token ``[N, hidden]`` bf16 back on its source rank (float32 accumulation).

        ``use_fp8``: the rows are first encoded as FP8 e4m3 with per-128 scales (``wire_format.cuh``: into the
        first bytes of each row, in place for the zero-copy input, else into a temporary), and the peers pull
        and decode only those bytes (132 of every 256).
        """
        self._check_usable()
        x, handle, topk_weights = request.x, request.handle, request.topk_weights
        check_device("x", x, self.device)
        dev = self.device
        num_rows = handle.recv_src_idx.size(0)
        num_tokens = handle.is_token_in_rank.size(0)
        biases = [self._outside_staging(b.contiguous()) if b is not None else None
                  for b in (request.bias_0, request.bias_1)]
        in_place = self._is_combine_input(x, num_rows)
        if in_place:
            if self._combine_input != (num_rows, x.size(1)):
                raise ValueError("x is this buffer's combine input area, but get_next_combine_buffer did not hand it "
                                 f"out for [{num_rows}, {x.size(1)}] rows, or a dispatch or a combine of another "
                                 "input ran since and overwrote it: call get_next_combine_buffer again and write "
                                 "the input after it")
            num_topk = topk_weights.size(1) if topk_weights is not None else 0
            need = combine_input_bytes(num_rows, x.size(1) * 2, num_topk)
            if need > self.num_nvl_bytes:
                raise ValueError(f"a combine input written in place with {num_topk} weights per row needs "
                                 f"num_nvl_bytes >= {need}, got {self.num_nvl_bytes} (Config.get_nvl_buffer_size_hint"
                                 f"(..., num_recv_tokens={num_rows}, num_topk={num_topk}))")
        else:
            x = self._outside_staging(x.contiguous())
        topk_weights = self._outside_staging(topk_weights.contiguous()) if topk_weights is not None else None
        wire_format = "fp8" if request.use_fp8 else "bf16"
        # FP8 rows carry hidden / 128 scales: ranks that disagree on the format are told so at the first barrier.
        self.runtime.set_signature(2, x.size(1) * 2, x.size(1) // 128 if request.use_fp8 else 0,
                                   topk_weights.size(1) if topk_weights is not None else 0, 0)
        compute = self._start(request.previous_event)
        alloc = self._alloc_stream(compute, request.allocate_on_comm_stream)
        with torch.cuda.stream(self.comm_stream):
            source = x
            with torch.cuda.stream(alloc):
                out = torch.empty(num_tokens, x.size(1), dtype=torch.bfloat16, device=dev)
                out_weights = (torch.empty(num_tokens, topk_weights.size(1), dtype=torch.float32, device=dev)
                               if topk_weights is not None else None)
                if request.use_fp8 and not in_place:
                    x = torch.empty_like(source)
            if request.use_fp8:
                self._launch("combine (FP8 encode)", self.runtime.encode_rows, source, x, wire_format)
            self._launch("combine", self.runtime.combine, x, topk_weights, handle.recv_src_idx,
                         handle.rank_prefix_matrix, handle.is_token_in_rank.contiguous(),
                         handle.send_head.contiguous(), biases[0], biases[1], request.config.num_sms, out, out_weights,
                         in_place, wire_format)
            if not in_place or request.use_fp8:  # staged rows, or the encoding, overwrote the combine input
                self._combine_input = None
        event = self._finish(compute, request.async_finish,
                             (source, x, topk_weights, *biases, out, out_weights, *handle))
        return CombineResult(out, out_weights, event)

    def get_next_combine_buffer(self, handle: DispatchHandle, hidden: int) -> torch.Tensor:
        """The zero-copy combine input: ``[N, hidden]`` bf16 at the start of this rank's staging area, ``N`` the
        rows ``handle``'s dispatch received.

        Write the expert outputs into it on the current stream, then pass it to ``combine`` as ``x``: the
        combine finds its rows staged already and skips the copy. The view stays valid for any number of
        combines with that handle until a dispatch, or a combine of another input, stages rows here.

        Reuse race: a peer may still pull rows of an earlier operation from this area after this rank
        finished it (a dispatch's tokens sit where the view starts; so do a previous combine's rows). Two
        alternating areas would cover combine-after-combine but not dispatch-then-combine, and the
        barriers of the preceding operation order only its staging, not the peers' last reads. So this
        call orders the current stream after this buffer's operations (comm stream) and enqueues a
        one-thread kernel that waits until every peer finished the operation holding this rank's last
        barrier (each kernel tells its peers its barrier epoch once all its blocks stopped reading):
        afterwards nobody reads this area until the combine's own barrier, whatever the call pattern
        (cached handles, backward passes, repeats, CUDA graph replays).
        """
        self._check_usable()
        num_rows = handle.num_recv_tokens
        need = combine_input_bytes(num_rows, hidden * 2)
        if need > self.num_nvl_bytes:
            raise ValueError(f"a combine input of [{num_rows}, {hidden}] bf16 rows written in place needs "
                             f"num_nvl_bytes >= {need}, got {self.num_nvl_bytes} (Config.get_nvl_buffer_size_hint(..., "
                             f"num_recv_tokens={num_rows}))")
        torch.cuda.current_stream(self.device).wait_stream(self.comm_stream)
        self._launch("get_next_combine_buffer", self.runtime.wait_peers_done)  # on the current stream
        self._combine_input = (num_rows, hidden)
        return self._staging_rows(num_rows, hidden, torch.bfloat16)

    # ------------------------------------------------------------------ debug probe (benchmarks)
    def copy_probe(self, local: torch.Tensor, pattern: str, peer: int = 0, row_bytes: int = 0,
                   num_sms: int = 16, fanout: int = 1) -> None:
        """Launch the SM copy probe on the current stream (``python -m benchmarks sm-copy``; never used by the
        operations): ``num_sms`` blocks move the bytes of ``local`` (contiguous, on this buffer's device, a multiple
        of 16 bytes) through the mappings the kernels use, so its rate is the roofline of SM-driven traffic.
        ``pattern``: ``"write"`` / ``"read"`` one slice to / from ``peer``'s staging area (at byte ``rank *
        local.nbytes``); ``"scatter"`` / ``"gather"`` rows of ``row_bytes``, one warp per row, row ``i`` to / from
        rank ``i % num_ranks``'s area at row ``rank * ceil(rows / num_ranks) + i // num_ranks``; ``"multicast"``
        row ``i`` to each of the ``fanout`` ranks ``(i + j) % num_ranks``, ``j < fanout``, at row ``rank * rows + i``
        of their areas; ``"reduce"`` row ``i`` of ``local`` = the BF16 sum (float32, ``j`` order) of those copies.
        No cross-rank ordering: the caller meets its peers before reading what they wrote."""
        if pattern not in PROBE_PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(PROBE_PATTERNS)}, got {pattern!r}")
        check_device("local", local, self.device)
        self._check_usable()
        self.runtime.copy_probe(local, int(peer), PROBE_PATTERNS[pattern], int(row_bytes), int(num_sms), int(fanout))

    # ------------------------------------------------------------------ resources
    def get_comm_stream(self) -> torch.cuda.Stream:
        return self.comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, offset: int = 0, use_rdma_buffer: bool = False):
        """The NVL staging area from ``offset`` bytes on, as a 1-D tensor of ``dtype`` (shared with the kernels)."""
        if use_rdma_buffer:
            raise NotImplementedError("intranode buffers have no RDMA part (num_rdma_bytes is for internode kernels)")
        self._check_usable()
        raw = self.runtime.local_buffer(int(offset))
        size = torch.empty((), dtype=dtype).element_size()
        return raw[: raw.numel() // size * size].view(dtype)

    def destroy(self, at_exit: bool = False) -> None:
        """Free the buffer and close the peers' mappings (waits for the device first); local, also at exit."""
        self.runtime.destroy()
