"""Low-latency dispatch/combine kernels inside one node over CUDA IPC (``moe_a2a._C.LowLatencyRuntime``).

Fixed shapes, no host synchronization: a dispatch plus a combine can be captured in one CUDA graph.

* Every rank owns one IPC-shared buffer with two alternating sets; each call uses the next set, so a
  rank may run one call ahead of its peers without touching data they still read. With
  ``return_recv_hook`` call each hook before issuing the call after next.
* Receivers pull. Dispatch: the send phase casts each token once (FP8 e4m3 with per-128 scales on the
  fly, or BF16) into this rank's own buffer, with one list per expert of the tokens routed to it, and
  releases one flag per rank. The receive phase waits for the flags and copies every received token
  straight from its source's buffer into its final slot of ``[num_local_experts,
  num_max_dispatch_tokens_per_rank * num_ranks, hidden]``, source rank by source rank, each source's tokens
  by increasing index (the reference backend's order).
* Combine: the send phase puts the expert outputs in this rank's buffer (nothing to do for zero-copy
  combine) and publishes where each source's rows start; the receive phase reads each token's top-k rows
  straight from the experts' buffers and reduces them with the top-k weights in float32.
* Without a hook both phases run in one kernel. Hook mode: the call launches only the send phase and
  returns; the hook launches the receive phase, so no SM waits on peers while compute runs in between.
* Every wait times out after ``timeout_s``; the next call raises naming the rank, step and peer.
* Ranks that disagree are told so: every flag carries its sender's call (hidden size, tokens per rank,
  number of experts, wire format), and a receiver compares it with its own call before it reads anything
  of that sender. A difference stops the kernel; the next call raises on every rank that compared with the
  odd one out, naming the field, both ranks and both values (``error_text``).

Debug probes (used by ``python -m benchmarks low-latency``, never by ``Buffer``): ``empty_kernel`` and
``flag_round_trip`` launch measuring kernels of their own; ``set_phase_clock(clock)`` makes the following
launches stamp their phases (start, sends done, waits done, end) on the GPU clock into ``clock``, and
``set_phase_clock(None)``, the default, turns the stamps off.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..config import get_low_latency_rdma_size_hint
from ..handles import LowLatencyHandle
from ..limits import MAX_NVL_PEERS
from . import residency
from .base import (LowLatencyCombineRequest, LowLatencyCombineResult, LowLatencyDispatchRequest,
                   LowLatencyDispatchResult)

from .. import _native

_C = _native.Lazy("_C")  # loaded at first use; absent without CUDA

_SEND, _RECV = 1, 2  # kernel phases (csrc/kernels/low_latency.cuh)


#: Fields of the call signature the kernels compare (``ll_signature`` in csrc/kernels/ll_device.cuh), in order.
SIGNATURE_FIELDS = ("hidden size", "tokens per rank (num_max_dispatch_tokens_per_rank)", "number of experts",
                    "wire format")
#: Wire formats by code (``LLFormat``); the format also names the operation.
WIRE_FORMATS = {1: "BF16 dispatch", 2: "FP8 dispatch", 3: "FP8 dispatch with power-of-two scales (round_scale)",
                4: "BF16 combine", 5: "FP8 combine", 6: "LogFMT combine"}


def error_text(record, rank: int, timeout_s: float) -> str:
    """The message of a low-latency error record, or ``""`` when there is none.

    ``record``: ``(code, phase, peer, index, set, call, mine, theirs)`` from ``error_record()`` of either
    low-latency runtime (``LLHostError``): code 0 none, 1 a timeout waiting for rank ``peer`` (flag tag
    ``index``), 2 rank ``peer``'s call differs from this rank's in signature field ``index``
    (``SIGNATURE_FIELDS``: this rank has ``mine``, the peer ``theirs``); phase 1 dispatch receive, 2 combine
    receive, 3 the flag round-trip probe.
    """
    code, phase, peer, index, set_, call, mine, theirs = record
    if code == 0:
        return ""
    if code == 2:
        operation = {1: "dispatch", 2: "combine"}.get(phase, f"phase {phase}")
        field = SIGNATURE_FIELDS[index] if 0 <= index < len(SIGNATURE_FIELDS) else f"signature field {index}"

        def show(value: int) -> str:
            return WIRE_FORMATS.get(value, f"format code {value}") if index == 3 else str(value)

        return (f"rank {rank} and rank {peer} disagree on the {field} of low-latency {operation} (call {call}, "
                f"buffer set {set_}): rank {rank} has {show(mine)}, rank {peer} has {show(theirs)} (every rank "
                f"must make the same call in the same order)")
    step, what = {1: ("dispatch receive", "tokens"), 2: ("combine receive", "expert outputs")}.get(
        phase, ("flag round trip", "flag"))
    return (f"rank {rank} timed out after {timeout_s:g} s in low-latency {step} (call {call}, buffer set {set_}) "
            f"waiting for rank {peer}'s {what} (tag {index})")


def available() -> bool:
    """Whether the extension was built with the low-latency kernels."""
    return bool(_C) and hasattr(_C, "LowLatencyRuntime")


def _run_phases(launch: Callable[[int], None], return_recv_hook: bool, what: str) -> Optional[Callable[[], None]]:
    """Both phases now (returns None), or the send phase now and a hook that launches the receive phase
    once (``return_recv_hook``)."""
    if not return_recv_hook:
        launch(_SEND | _RECV)
        return None
    launch(_SEND)
    pending = [True]

    def receive() -> None:
        if not pending:
            raise RuntimeError(f"this low-latency {what} hook was already called")
        pending.clear()
        launch(_RECV)

    return receive


class LowLatencyBackend:
    """Low-latency kernels for one rank of an intranode group (all ranks construct it together); a
    ``LowLatencyModeKernels`` (``base``).

    Arguments:
        rank, num_ranks: this rank and the group size (at most 8).
        group: the process group (used by ``clean``).
        num_rdma_bytes: bytes of the IPC buffer, at least ``get_low_latency_rdma_size_hint(...)`` of the calls.
        all_gather_object: ``obj -> [obj of rank 0, ..., obj of rank num_ranks - 1]`` over the group.
        timeout_s: seconds a kernel waits for a peer before giving up and recording the error.
        num_sms: blocks per kernel; default: the device's SMs divided by the ranks sharing the device, so
            every rank's kernels are resident together.
        shrink: a peer that times out is masked (``mask``) and the call completes without it, instead of the
            error; otherwise ranks are masked only through ``update_mask``.
    """

    def __init__(self, rank: int, num_ranks: int, group, num_rdma_bytes: int,
                 all_gather_object: Callable[[object], List[object]], timeout_s: float,
                 num_sms: Optional[int] = None, shrink: bool = False) -> None:
        if not available():
            raise NotImplementedError("the low-latency kernels are not built: moe_a2a._C has no LowLatencyRuntime")
        if not 1 <= num_ranks <= MAX_NVL_PEERS:
            raise NotImplementedError(f"low-latency kernels run inside one node of at most {MAX_NVL_PEERS} ranks, "
                                      f"got {num_ranks} ranks")
        self.rank, self.num_ranks, self.group = rank, num_ranks, group
        self.num_rdma_bytes, self.timeout_s = num_rdma_bytes, float(timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._rt = _C.LowLatencyRuntime(rank, num_ranks, num_rdma_bytes, float(timeout_s))
        peers = all_gather_object((residency.device_id(self.device), self._rt.ipc_handle()))
        self.num_sms = residency.low_latency_num_sms(self._rt.num_device_sms(), [dev for dev, _ in peers], num_sms)
        self._rt.connect([h for _, h in peers])
        self._rt.set_shrink(bool(shrink))
        self.shrink = bool(shrink)
        #: ``[num_ranks]`` int32 CUDA view of the kernels' rank mask (1 = masked): masked ranks are neither waited
        #: for nor sent flags, their experts' outputs count as zero; with ``shrink`` the kernels mask a rank that
        #: times out. Set on the current stream, so it takes effect for the calls enqueued after it.
        self.mask = self._rt.rank_mask()
        self._set = 0
        self._calls = 0
        _native.track(self)

    # ------------------------------------------------------------------ resources
    def destroy(self, at_exit: bool = False) -> None:
        """Free the buffer (views from ``get_next_combine_buffer`` become invalid); local, also at exit."""
        self._rt.destroy()

    def error(self) -> str:
        """The first error a kernel recorded (a timeout, or a peer whose call differs), as text; empty while
        none (reads pinned memory, no sync)."""
        return error_text(self._rt.error_record(), self.rank, self.timeout_s)

    _failure: Optional[str] = None  # a launch that failed: every later call raises it

    def _guard(self, op: str, fn, *args):
        """``fn(*args)``, a call that launches kernels; if it fails (a CUDA error at launch), the peers may wait on
        this rank already, so the buffer refuses every later call with a message naming the rank and the step."""
        try:
            return fn(*args)
        except RuntimeError as e:
            if self._failure is None:
                self._failure = f"rank {self.rank} failed to launch the low-latency {op}: {e}"
            raise RuntimeError(f"moe_a2a low-latency: {self._failure}; the buffer cannot be used again") from e

    def raise_if_error(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this rank timed out, met a peer whose call differs, or failed to
        launch (the buffer is then unusable)."""
        message = self._failure or self.error()
        if message:
            raise RuntimeError(f"moe_a2a low-latency: {message}; the buffer cannot be used again")

    def update_mask(self, rank: int, masked: bool) -> None:
        """Mask or unmask ``rank`` for the calls enqueued after this on the current stream (local)."""
        self.raise_if_error()
        self.mask[rank] = int(bool(masked))

    def query_mask(self) -> torch.Tensor:
        """``[num_ranks]`` int32 CPU copy of the mask as of the calls enqueued so far (waits for them)."""
        return self.mask.cpu()

    def clean_mask(self) -> None:
        """Unmask every rank (current stream)."""
        self.mask.zero_()

    def clean(self) -> None:
        """Zero every flag and counter on all ranks (collective); the rank mask stays."""
        dist.barrier(self.group)
        self._rt.clean()
        self._set = 0
        dist.barrier(self.group)

    def _next_set(self):
        self.raise_if_error()
        s, call = self._set, self._calls
        self._set ^= 1
        # The kernels take the call number (it names the call in error records) as a 32-bit int: wrap it, or
        # the 2^31-th call of a long-running server would be refused by the binding.
        self._calls = (self._calls + 1) % (1 << 31)
        return s, call

    def _check_allocation(self, num_max: int, hidden: int, num_experts: int) -> None:
        """This rank's buffer holds calls of this shape (``Buffer`` checked the shape against the kernels' limits)."""
        need = get_low_latency_rdma_size_hint(num_max, hidden, self.num_ranks, num_experts)
        if need > self.num_rdma_bytes:
            raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small for {num_max} tokens per rank, "
                             f"hidden {hidden}, {num_experts} experts: need {need}")

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """``recv_x``: ``[L, M * R, hidden]`` bf16 or float8_e4m3fn (rows past ``recv_count`` are undefined);
        ``recv_x_scales``: ``[L, M * R, hidden // 128]`` float32 or ``[..., hidden // 512]`` int32 (UE8M0),
        column-major in the last two dims, or None; ``recv_count``: ``[L]`` int32.
        """
        hidden = request.x.size(1)
        num_max, num_experts, R = request.num_max_dispatch_tokens_per_rank, request.num_experts, self.num_ranks
        use_fp8, round_scale, use_ue8m0 = request.use_fp8, request.round_scale, request.use_ue8m0
        self._check_allocation(num_max, hidden, num_experts)
        L, slots = num_experts // R, num_max * R
        x, topk_idx = request.x.contiguous(), request.topk_idx.contiguous()
        cumulative_stats, wait_stats = request.cumulative_local_expert_recv_stats, request.dispatch_wait_recv_cost_stats
        set_, call = self._next_set()
        dev = x.device
        recv_x = torch.empty((L, slots, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        recv_scales = None
        if use_fp8:
            cols = hidden // 512 if use_ue8m0 else hidden // 128
            recv_scales = torch.empty((L, cols, slots), dtype=torch.int32 if use_ue8m0 else torch.float32,
                                      device=dev).transpose(1, 2)
        recv_count = torch.empty(L, dtype=torch.int32, device=dev)
        src_info = torch.empty((L, slots), dtype=torch.int32, device=dev)
        layout_range = torch.empty((L, R), dtype=torch.int64, device=dev)
        handle = LowLatencyHandle(src_info, layout_range, num_max, hidden, num_experts)

        def launch(phases: int) -> None:
            self._guard("dispatch", self._rt.dispatch, x, topk_idx, num_experts, num_max, use_fp8, round_scale,
                        use_ue8m0, recv_x, recv_scales, recv_count, src_info, layout_range, cumulative_stats,
                        wait_stats, set_, self.num_sms, call, phases)

        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle,
                                        _run_phases(launch, request.return_recv_hook, "dispatch"))

    # ------------------------------------------------------------------ combine
    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Weighted sum over experts of ``x`` ``[L, M * R, hidden]`` bf16 into ``[T, hidden]`` bf16 (``out`` when
        given, written in place). The rows travel in ``wire_format``: ``"bf16"``, ``"fp8"`` or ``"logfmt"``
        (encoded into the send area by the send phase, decoded to float32 before the weighted sum; a zero-copy
        ``x`` is encoded in place, so its contents are gone after the call)."""
        handle = request.handle
        self._check_allocation(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        x, topk_idx = request.x.contiguous(), request.topk_idx.contiguous()
        topk_weights = request.topk_weights.contiguous()
        set_, call = self._next_set()
        combined = request.out if request.out is not None else torch.empty(
            (topk_idx.size(0), handle.hidden), dtype=torch.bfloat16, device=x.device)

        def launch(phases: int) -> None:
            self._guard("combine", self._launch_combine, x, handle, topk_idx, topk_weights, combined,
                        request.combine_wait_recv_cost_stats, set_, call, phases, request.wire_format)

        return LowLatencyCombineResult(combined, _run_phases(launch, request.return_recv_hook, "combine"))

    def _launch_combine(self, x, handle: LowLatencyHandle, topk_idx, topk_weights, combined, wait_stats, set_: int,
                        call: int, phases: int, wire_format: str) -> None:
        self._rt.combine(x, handle.layout_range, topk_idx, topk_weights, combined, wait_stats, handle.num_experts,
                         handle.num_max_dispatch_tokens_per_rank, set_, self.num_sms, call, phases, wire_format)

    # ------------------------------------------------------------------ debug probes (benchmarks)
    def empty_kernel(self) -> None:
        """Launch an empty kernel of the kernels' launch shape (``num_sms`` blocks) on the current stream."""
        self.raise_if_error()
        self._rt.empty_kernel(self.num_sms)

    def flag_round_trip(self, peer: int, iters: int = 1000, warmup: int = 100) -> torch.Tensor:
        """Launch ``iters`` flag round trips with ``peer`` (which must call this at the same time, with the
        same counts) on the current stream; returns a ``[2]`` int64 device tensor: nanoseconds over the
        rounds after ``warmup``, and that number of rounds."""
        if not (0 <= peer < self.num_ranks and peer != self.rank):
            raise ValueError(f"peer={peer}: expected another rank in [0, {self.num_ranks})")
        if not 0 <= warmup < iters:
            raise ValueError(f"need 0 <= warmup < iters, got warmup={warmup}, iters={iters}")
        self.raise_if_error()
        out = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._rt.ping(peer, iters, warmup, out)
        return out

    def set_phase_clock(self, clock: Optional[torch.Tensor]) -> None:
        """Stamp the phases of the next launches into ``clock``: a ``[4]`` int64 CUDA tensor set to
        ``[-1, 0, 0, 0]`` (GPU clock, ns: the earliest block's start, the send phase's last arrival, block 0 past
        its waits, the latest block's end) that the caller keeps alive until they ran; ``None`` stops. A debug
        option: off by default."""
        self._rt.set_phase_clock(clock)

    def get_next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, M * R, hidden]`` bf16 view of the registered buffer: fill it with the expert outputs and pass
        it as ``x`` to ``combine`` (zero copy; valid until ``destroy``, refilled by the caller every time)."""
        num_max, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        self._check_allocation(num_max, hidden, num_experts)
        self.raise_if_error()
        return self._rt.send_buffer(self._set, num_experts, num_max, hidden)
