"""The contract between ``Buffer`` and its backends: one request per operation, one protocol per mode.

``Buffer`` validates every call once, on the calling rank and before anything is communicated: types,
dtypes, shapes and devices, values where asked (``moe_a2a.checks``), the buffer sizes, and, for a call
that runs on the kernels, what the kernels take (``moe_a2a.limits``). It then hands the backend a frozen
request whose fields already hold. A backend trusts its request and checks only what it alone can know:
that its device matches and is still usable, that its own allocation has room for the call, and that
the peers make the same call.

Backends (every one is built by ``Buffer``, which picks one per call):

* normal mode (``NormalModeBackend``): ``ReferenceBackend`` (any device); ``IntranodeBackend`` and
  ``InternodeBackend``, the CUDA kernels (``NormalModeKernels``);
* low-latency mode (``LowLatencyModeBackend``): ``ReferenceLowLatency`` (any device);
  ``LowLatencyBackend`` and ``InternodeLowLatencyBackend``, the CUDA kernels (``LowLatencyModeKernels``).

Sizes below: T tokens sent, N rows received, R ranks, E experts, L = E // R local experts, K top-k
columns, M = ``num_max_dispatch_tokens_per_rank``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Protocol, Union

import torch

from ..config import Config
from ..event import EventHandle, EventOverlap
from ..handles import DispatchHandle, InternodeHandle, LowLatencyHandle

#: A normal-mode handle: ``DispatchHandle`` (reference and intranode kernels) or ``InternodeHandle``.
NormalHandle = Union[DispatchHandle, InternodeHandle]


# ---------------------------------------------------------------------------------------------- normal mode
@dataclass(frozen=True)
class LayoutRequest:
    """``get_dispatch_layout``: count what each rank and expert receives.

    Fields:
        topk_idx: ``[T, K]`` int64 expert ids in ``[0, num_experts)``, ``-1`` for none.
        num_experts: experts in the group, a multiple of R.
        previous_event: the call waits for this event first (None: nothing to wait for).
        async_finish: return an event of the call instead of ordering the current stream after it.
        allocate_on_comm_stream: allocate the outputs on the communication stream.
    """

    topk_idx: torch.Tensor
    num_experts: int
    previous_event: Optional[EventOverlap] = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False


class LayoutResult(NamedTuple):
    """What ``get_dispatch_layout`` returns (the definition: ``moe_a2a.layout.compute_layout``)."""

    num_tokens_per_rank: torch.Tensor  # [R] int32
    num_tokens_per_rdma_rank: Optional[torch.Tensor]  # [num_nodes] int32, None inside one node
    num_tokens_per_expert: torch.Tensor  # [E] int32
    is_token_in_rank: torch.Tensor  # [T, R] bool
    event: Optional[EventHandle]


@dataclass(frozen=True)
class DispatchRequest:
    """A normal-mode dispatch: send each token to every rank that holds one of its experts.

    Fields:
        x: ``[T, hidden]`` tokens, contiguous or not: bf16, float8_e4m3fn or NVFP4's packed uint8 on the
            kernels (``hidden * element_size`` a multiple of ``limits.ROW_ALIGN_BYTES``); any dtype on the
            reference backend. Both move rows byte for byte.
        config: the chunking config (the kernels read ``num_sms``; the reference ``num_channels``).
        x_scales: ``[T, S]`` travelling with each row, or None: float32 FP8 scales (``S = hidden // 128``,
            exactly when ``x`` is float8_e4m3fn), or NVFP4's side bytes (uint8 on the reference
            backend; on the kernels the same bytes viewed as float32 words, copied bit for bit).
        handle: a handle of an earlier dispatch with the same routing (cached dispatch), made by this
            backend kind; then ``is_token_in_rank``, ``num_tokens_per_expert``, ``topk_idx`` and
            ``topk_weights`` are None and the routing comes from the handle.
        is_token_in_rank: ``[T, R]`` bool (without ``handle``). ``num_tokens_per_rank`` and
            ``num_tokens_per_rdma_rank``, which ``Buffer`` checked against it, follow from it.
        num_tokens_per_expert: ``[E]`` int32 (without ``handle``), E a multiple of R.
        topk_idx: ``[T, K]`` int64 expert ids, ``-1`` for none, or None (only the rows travel); K at most
            ``limits.MAX_TOPK`` on the kernels.
        topk_weights: ``[T, K]`` float32 (float64 too on the reference backend), only with ``topk_idx``.
        expert_alignment: >= 1; each local expert's received count is rounded up to a multiple of it.
        num_worst_tokens: >= 0; if > 0 (groups inside one node only) the outputs have this many rows and no
            count reaches the host.
        previous_event, async_finish, allocate_on_comm_stream: stream ordering, as in ``LayoutRequest``.
        recv_x_in_buffer: the senders may write the received rows into this rank's registered buffer
            (intranode kernels; other backends return an ordinary tensor).
    """

    x: torch.Tensor
    config: Config
    x_scales: Optional[torch.Tensor] = None
    handle: Optional[NormalHandle] = None
    is_token_in_rank: Optional[torch.Tensor] = None
    num_tokens_per_expert: Optional[torch.Tensor] = None
    topk_idx: Optional[torch.Tensor] = None
    topk_weights: Optional[torch.Tensor] = None
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    previous_event: Optional[EventOverlap] = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    recv_x_in_buffer: bool = False

    @property
    def cached(self) -> bool:
        """Whether the routing comes from ``handle``."""
        return self.handle is not None

    @property
    def num_experts(self) -> int:
        """E, or 0 for a cached dispatch."""
        return 0 if self.num_tokens_per_expert is None else self.num_tokens_per_expert.numel()


class DispatchResult(NamedTuple):
    """What a normal-mode dispatch returns; rows ordered by source rank, then source token index."""

    recv_x: torch.Tensor  # [N, hidden], x's dtype (N = num_worst_tokens when given)
    recv_x_scales: Optional[torch.Tensor]  # [N, S], with x_scales
    recv_topk_idx: Optional[torch.Tensor]  # [N, K] int64 local expert ids, -1 where not local; None if cached
    recv_topk_weights: Optional[torch.Tensor]  # [N, K], 0 where not local; None if cached
    # [L] received counts, each rounded up to expert_alignment ([] with num_worst_tokens); None if cached
    num_recv_tokens_per_expert_list: Optional[List[int]]
    handle: Optional[NormalHandle]  # for combine and cached dispatch; None if cached
    event: Optional[EventHandle]


@dataclass(frozen=True)
class CombineRequest:
    """A normal-mode combine: send each received row back to its source rank and sum the copies (float32).

    Fields:
        x: ``[N, hidden]`` rows as dispatch returned them: bf16 on the kernels (hidden a multiple of 8);
            float16/32/64 too on the reference backend.
        handle: the handle of the dispatch, made by this backend kind.
        config: the chunking config.
        topk_weights: ``[N, K]`` float32 (float64 too on the reference backend), summed back like the rows.
        bias_0, bias_1: ``[T, hidden]`` of ``x``'s dtype, added to the result.
        previous_event, async_finish, allocate_on_comm_stream: stream ordering, as in ``LayoutRequest``.
        use_fp8: the rows travel as FP8 e4m3 with per-128 scales (hidden divisible by 128).
    """

    x: torch.Tensor
    handle: NormalHandle
    config: Config
    topk_weights: Optional[torch.Tensor] = None
    bias_0: Optional[torch.Tensor] = None
    bias_1: Optional[torch.Tensor] = None
    previous_event: Optional[EventOverlap] = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    use_fp8: bool = False


class CombineResult(NamedTuple):
    combined_x: torch.Tensor  # [T, hidden], x's dtype
    combined_topk_weights: Optional[torch.Tensor]  # [T, K], with topk_weights
    event: Optional[EventHandle]


class NormalModeBackend(Protocol):
    """What ``Buffer`` calls on a normal-mode backend."""

    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        ...

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        ...

    def combine(self, request: CombineRequest) -> CombineResult:
        ...

    def get_next_combine_buffer(self, handle: NormalHandle, hidden: int) -> torch.Tensor:
        """Where the next combine with ``handle`` may read its input: ``[N, hidden]`` bf16 on the handle's device
        (a view of the kernels' registered buffer, or an ordinary tensor)."""
        ...


class NormalModeKernels(NormalModeBackend, Protocol):
    """A normal-mode backend of CUDA kernels, with a registered buffer and a communication stream."""

    #: Most SMs a kernel may use such that every block of every rank sharing the GPU is resident at once.
    max_num_sms: int

    def check(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this buffer failed (host memory, no device sync)."""
        ...

    def get_comm_stream(self) -> torch.cuda.Stream:
        ...

    def get_local_buffer_tensor(self, dtype: torch.dtype, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """The registered buffer from ``offset`` on, as a 1-D tensor of ``dtype``."""
        ...

    def destroy(self, at_exit: bool = False) -> None:
        ...


# ---------------------------------------------------------------------------------------------- low-latency mode
@dataclass(frozen=True)
class LowLatencyDispatchRequest:
    """A low-latency dispatch into fixed per-expert slots.

    Fields:
        x: ``[T, hidden]`` bf16, ``T <= M``.
        topk_idx: ``[T, K]`` int64 expert ids, ``-1`` for none; on the kernels ``1 <= K <= limits.MAX_TOPK``.
        num_max_dispatch_tokens_per_rank: M, the same on every rank.
        num_experts: E, a multiple of R (at most ``limits.LOW_LATENCY_MAX_EXPERTS`` on the kernels).
        cumulative_local_expert_recv_stats: ``[L]`` int32, incremented by the received counts, or None.
        dispatch_wait_recv_cost_stats: ``[R, R]`` int64; row ``rank`` accumulates nanoseconds waited per
            source, or None.
        use_fp8: cast the rows to FP8 e4m3 with per-128 scales (hidden divisible by 128).
        round_scale: round the scales up to powers of two.
        use_ue8m0: pack the scales as UE8M0 bytes (needs ``use_fp8`` and ``round_scale``; hidden divisible by 512).
        return_recv_hook: issue the sends only; the returned hook completes the receive.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None
    dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    return_recv_hook: bool = False


class LowLatencyDispatchResult(NamedTuple):
    recv_x: torch.Tensor  # [L, M * R, hidden] bf16, or float8_e4m3fn with use_fp8 (rows past recv_count undefined)
    # [L, M * R, hidden // 128] float32 or [..., hidden // 512] int32 (UE8M0), column-major in the last two
    # dims; None without use_fp8
    recv_x_scales: Optional[torch.Tensor]
    recv_count: torch.Tensor  # [L] int32 valid slots per local expert
    handle: LowLatencyHandle
    hook: Optional[Callable[[], None]]  # completes the receive (return_recv_hook), else None


@dataclass(frozen=True)
class LowLatencyCombineRequest:
    """A low-latency combine: expert outputs back to their tokens, reduced with the top-k weights (float32).

    Fields:
        x: ``[L, M * R, hidden]`` bf16 expert outputs in dispatch's slots.
        topk_idx: ``[T, K]`` int64, as given to the dispatch.
        topk_weights: ``[T, K]`` float32.
        handle: the ``LowLatencyHandle`` of the dispatch.
        out: ``[T, hidden]`` bf16 written in place (contiguous on the kernels), or None.
        combine_wait_recv_cost_stats: ``[R, R]`` int64, as in dispatch, or None.
        return_recv_hook: issue the sends only; the returned hook completes the receive.
        wire_format: how the rows travel, ``"bf16"``; ``"fp8"`` or ``"logfmt"`` on the reference backend.
    """

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    handle: LowLatencyHandle
    out: Optional[torch.Tensor] = None
    combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
    return_recv_hook: bool = False
    wire_format: str = "bf16"


class LowLatencyCombineResult(NamedTuple):
    combined_x: torch.Tensor  # [T, hidden] bf16 (out when given)
    hook: Optional[Callable[[], None]]


class LowLatencyModeBackend(Protocol):
    """What ``Buffer`` calls on a low-latency backend."""

    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        ...

    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        ...


class LowLatencyModeKernels(LowLatencyModeBackend, Protocol):
    """A low-latency backend of CUDA kernels, with a registered buffer of two alternating sets."""

    def get_next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """``[L, M * R, hidden]`` bf16 view of the buffer the next combine reads (zero copy)."""
        ...

    def clean(self) -> None:
        """Zero the flags and counters on every rank (collective); the rank mask stays."""
        ...

    def update_mask(self, rank: int, masked: bool) -> None:
        """Mask or unmask ``rank`` for the calls enqueued after this on the current stream (local): masked ranks
        are neither waited for nor sent to, their experts' outputs count as zero."""
        ...

    def query_mask(self) -> torch.Tensor:
        """``[num_ranks]`` int32 CPU copy of the mask (1 = masked; with ``shrink`` the kernels mask a rank that
        timed out), as of the calls enqueued so far."""
        ...

    def clean_mask(self) -> None:
        """Unmask every rank (current stream)."""
        ...

    def raise_if_error(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this rank failed (host memory, no device sync)."""
        ...

    def destroy(self, at_exit: bool = False) -> None:
        ...
