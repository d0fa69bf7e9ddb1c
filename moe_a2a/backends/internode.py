"""Internode kernels: NVSHMEM (RDMA) between nodes, then the intranode kernels (NVLink) inside each node.

Design: two stages, each token crosses the network once
-------------------------------------------------------
A group of ``R = num_nodes * L`` ranks (``L = num_ranks_per_node``) splits into *teams*: the ranks with
the same local index ``l``, one per node. NVSHMEM runs over the team (``moe_a2a._nvshmem``, bootstrapped
by NVSHMEM's unique id over the Buffer's group), as in DeepEP's internode mode: a token crosses the
network once per destination node, to the rank with its own local index there, which forwards it over
NVLink to the ranks of its node that hold its experts.

1. **RDMA stage** (``_nvshmem``): notify puts each rank's token count, per-node counts and per-expert
   counts of the node's experts to every team peer, so every member knows the team's count matrix. Then
   rounds of at most ``window`` rows per (source node, destination node) move each token once to every
   node that holds one of its experts, packed with its FP8 scales, top-k ids and weights, source index
   and the node's slice of ``is_token_in_rank``. A receiver writes the rows in (source node, source
   token) order and maps top-k ids to node-local ids (-1 for other nodes).
2. **NVLink stage**: the received rows go through ``IntranodeBackend`` over the node's ``L`` ranks,
   routed by the carried ``is_token_in_rank`` slice; its per-expert counts are the sums of the team's
   counts, so ``num_recv_tokens_per_expert_list`` is what the reference gives.
3. **Order**: the NVLink stage delivers rows by forwarder, then (source node, token); the project's
   contract is (source rank, token). A cached NVLink dispatch of one 16-byte row per token carries each
   row's origin (source rank, source token); a sort gives the permutation, kept in the handle.
   This costs one extra local pass over the received rows; dispatching into final positions
   directly needs the intranode kernels to take output offsets.

Combine runs the stages backwards: the intranode combine sums each token's copies inside a node
(float32, rounded to BF16: a node-level partial, as DeepEP sends), the RDMA stage puts each partial
back to its source rank into the slot of its source token, and the source sums the node partials in
float32, adds the biases and writes BF16. Results therefore differ from the reference's single float32
sum by at most one BF16 rounding of each node partial. ``topk_weights`` are summed the same way (exact:
each (token, k) is non-zero on one rank only).

All internode calls run on the caller's stream (the NVLink stage uses the intranode comm stream and
joins back). Dispatch reads the count matrix on the host (as DeepEP's non-cached dispatch does);
``num_worst_tokens`` is intranode only. Every wait times out after ``timeout_s`` and names the rank,
step and round; the buffer then refuses further calls. Ranks whose calls differ (bytes or scales per row,
top-k width, experts, dispatch against combine) are told so: the notify records and every round
barrier's arrival carry each rank's call, and every team member compares them before it uses anything
else, naming the field, both ranks and both values.

NVSHMEM is one runtime per process: the first internode buffer of a process initialises it for its
team; later buffers must have the same team (their symmetric buffers come from the same heap). A buffer
in low-latency mode (``nvshmem_over_group=True``) runs NVSHMEM over the whole group instead, as the
internode low-latency kernels need every rank reachable; these kernels then address team member ``m``
as PE ``m * L + local_rank``.
"""
from __future__ import annotations

import os
import socket
from typing import List, Optional

import torch

from ..event import EventHandle
from ..handles import InternodeHandle
from ..limits import MAX_NODES, MAX_NVL_PEERS
from . import intranode, residency
from .base import CombineRequest, CombineResult, DispatchRequest, DispatchResult, LayoutRequest, LayoutResult

from .. import _native

# NVSHMEM's host library is loaded only by a group that spans nodes; absent when built without NVSHMEM (the
# reference backend serves internode calls then).
_nvshmem = _native.Lazy("_nvshmem")

_FP8 = getattr(torch, "float8_e4m3fn", None)
_TEAM = None  # the NVSHMEM team of this process: (group ranks of the team, this rank's index in it)


def available() -> bool:
    """Whether ``moe_a2a._nvshmem`` (internode kernels) and ``moe_a2a._C`` (NVLink stage) are importable."""
    return bool(_nvshmem) and intranode.extension_available()


def _init_nvshmem(team: List[int], team_index: int, all_gather_object, heap_bytes: int) -> None:
    """Start NVSHMEM over ``team`` (collective over the whole group: every rank joins the exchange)."""
    global _TEAM
    uid, err = _nvshmem.unique_id() if team_index == 0 and _TEAM is None else (None, "")
    if err:
        raise RuntimeError(f"moe_a2a internode: {err}")
    ids = all_gather_object((_TEAM is None, uid))
    if _TEAM is not None:
        if any(fresh for fresh, _ in ids) or _TEAM != (team, team_index):
            raise RuntimeError(f"moe_a2a internode: NVSHMEM already runs in this process over team {_TEAM[0]}; "
                               f"a buffer over team {team} needs a new process")
        return
    if not all(fresh for fresh, _ in ids):
        raise RuntimeError("moe_a2a internode: NVSHMEM runs in some processes of the group but not in others")
    # The symmetric heap is reserved at start-up: leave room for a few buffers unless the user chose.
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(1 << 30, 2 * heap_bytes + (256 << 20))))
    uid = ids[team[0]][1]
    # Teams whose PEs share GPUs (virtual nodes under MPS) start one after the other: starting four
    # NVSHMEM jobs on one GPU at once failed in NVSHMEM's bootstrap (multi-PE-per-GPU detection).
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpus = all_gather_object((socket.gethostname(), str(getattr(props, "uuid", torch.cuda.current_device()))))
    num_teams = len(gpus) // len(team)
    turns = range(num_teams) if len(set(gpus)) < len(gpus) else [None]
    err = ""
    for turn in turns:
        if turn is None or turn == team[0]:
            err = _nvshmem.init(uid, team_index, len(team))
        if turn is not None:
            all_gather_object(None)  # the next team starts once this one is up
    if err:
        raise RuntimeError(f"moe_a2a internode: NVSHMEM initialisation failed: {err}")
    _TEAM = (team, team_index)


def init_nvshmem_over_group(rank: int, num_ranks: int, all_gather_object, heap_bytes: int) -> None:
    """Start NVSHMEM over the whole group (PE = group rank), as low-latency mode across nodes needs; nothing
    to do where it already runs so (collective over the group)."""
    _init_nvshmem(list(range(num_ranks)), rank, all_gather_object, heap_bytes)


def _exclusive_prefix(values: List[int]) -> List[int]:
    out, acc = [], 0
    for v in values:
        out.append(acc)
        acc += v
    return out


class InternodeBackend:
    """Normal-mode kernels across nodes; a ``NormalModeKernels`` (``base``)."""

    def __init__(self, rank: int, num_ranks: int, num_ranks_per_node: int, num_nvl_bytes: int, num_rdma_bytes: int,
                 all_gather_object, timeout_s: float, nvshmem_over_group: bool = False):
        if not available():
            raise RuntimeError("moe_a2a internode kernels are not built: they need NVSHMEM headers at build time "
                               "(nvidia-nvshmem-cu13 or NVSHMEM_HOME) and the CUDA extension moe_a2a._C")
        L = num_ranks_per_node
        if num_ranks % L or num_ranks // L < 2:
            raise ValueError(f"internode kernels need a group of several nodes: {num_ranks} ranks, {L} per node")
        if L > MAX_NVL_PEERS:
            raise NotImplementedError(f"internode kernels support up to {MAX_NVL_PEERS} ranks per node, "
                                      f"got {L}")
        if num_ranks // L > MAX_NODES:
            raise NotImplementedError(f"internode kernels support up to {MAX_NODES} nodes, "
                                      f"got {num_ranks // L}")
        sizes = all_gather_object((int(num_nvl_bytes), int(num_rdma_bytes)))
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must pass the same num_nvl_bytes and num_rdma_bytes, got {sizes}")
        if num_rdma_bytes <= 0:
            raise ValueError("internode kernels need num_rdma_bytes > 0 (Config.get_rdma_buffer_size_hint)")
        self.rank, self.num_ranks, self.num_local_ranks = rank, num_ranks, L
        self.num_nodes = num_ranks // L
        self.node, self.local_rank = divmod(rank, L)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_s = float(timeout_s)
        team = [m * L + self.local_rank for m in range(self.num_nodes)]
        slot_bytes = int(num_rdma_bytes) // 16 * 16
        if nvshmem_over_group:  # low-latency mode shares the process's NVSHMEM: team member m is PE m * L + l
            init_nvshmem_over_group(rank, num_ranks, all_gather_object, slot_bytes)
        else:
            _init_nvshmem(team, self.node, all_gather_object, slot_bytes)
        self.runtime = _nvshmem.Runtime()
        if nvshmem_over_group:
            self.runtime.set_pe_map(self.local_rank, L)
        err = self.runtime.allocate(rank, self.num_nodes, self.node, self.local_rank, L, slot_bytes, self.timeout_s)
        if err:
            raise RuntimeError(f"moe_a2a internode: rank {rank}: {err}")
        self.slot_bytes = slot_bytes
        first = self.node * L

        def node_gather(obj):
            return all_gather_object(obj)[first:first + L]

        self.intra = intranode.IntranodeBackend(self.local_rank, L, None, num_nvl_bytes, node_gather, timeout_s)
        # The NVLink stage counts only its node's ranks per GPU; nodes may share GPUs too (virtual nodes under
        # MPS), and every rank's blocks, of both stages, must be resident together: count the whole group.
        devices = all_gather_object(residency.device_id(self.device))
        #: most SMs (blocks) per kernel of either stage such that every rank's blocks fit on its GPU at once.
        self.max_num_sms = min(self.intra.max_num_sms,
                               residency.sm_budget(self.intra.runtime.num_device_sms(),
                                                   residency.most_ranks_per_device(devices)))
        self.intra.max_num_sms = self.max_num_sms
        self._error: Optional[str] = None
        _native.track(self)

    # ------------------------------------------------------------------ helpers
    def _poll(self) -> None:
        text = self.runtime.error()
        if text:
            self._error = f"moe_a2a internode: {text}; the buffer cannot be used again: rebuild it"
            raise RuntimeError(self._error)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)
        if not self.runtime.is_available():
            raise RuntimeError("moe_a2a internode: this buffer was destroyed")
        self._poll()

    def check(self) -> None:
        """Raise ``RuntimeError`` if a kernel of this buffer timed out (no device sync)."""
        self._check_usable()
        self.intra.check()

    def _nvlink(self, fn, *args):
        """Run an NVLink-stage call, naming the global ranks in its errors."""
        try:
            return fn(*args)
        except RuntimeError as e:
            first = self.node * self.num_local_ranks
            self._error = (f"moe_a2a internode, NVLink stage of node {self.node} (local rank i is rank {first} + i): "
                           f"{e}")
            raise RuntimeError(self._error) from None

    def _window(self, stride: int) -> int:
        window = self.slot_bytes // (2 * self.num_nodes * stride)
        if window < 1:
            raise ValueError(f"num_rdma_bytes={self.slot_bytes} cannot hold one {stride}-byte row per node and "
                             f"direction ({self.num_nodes} nodes); use Config.get_rdma_buffer_size_hint")
        return window

    def _error_check(self, err: str) -> None:
        if err:
            self._error = f"moe_a2a internode: {err}"
            raise RuntimeError(self._error)

    # ------------------------------------------------------------------ dispatch
    def get_dispatch_layout(self, request: LayoutRequest) -> LayoutResult:
        """The layout kernel on the current stream, over the whole group (``num_tokens_per_rdma_rank`` per node)."""
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        layout = intranode.get_dispatch_layout(request.topk_idx, request.num_experts, self.num_ranks,
                                               self.num_local_ranks)
        return LayoutResult(*layout, EventHandle() if request.async_finish else None)

    def dispatch(self, request: DispatchRequest) -> DispatchResult:
        """Dispatch ``x`` ``[T, hidden]`` (bf16, or fp8 e4m3 with ``x_scales`` ``[T, hidden // 128]`` f32), in the
        reference's row order. ``recv_x_in_buffer`` is accepted and ignored: the rows end in a reordered ordinary
        tensor. ``num_worst_tokens`` is 0 (intranode only).
        """
        self._check_usable()
        x, x_scales, handle, config = request.x, request.x_scales, request.handle, request.config
        intranode.check_device("x", x, self.device)
        dev, N, L = self.device, self.num_nodes, self.num_local_ranks
        row_bytes = x.size(1) * x.element_size()
        num_scales = x_scales.size(1) if x_scales is not None else 0
        T = x.size(0)
        cached = request.cached
        if cached:
            is_token_in_rank = handle.is_token_in_rank
            topk_idx = topk_weights = None
        else:
            is_token_in_rank, num_tokens_per_expert = request.is_token_in_rank, request.num_tokens_per_expert
            topk_idx, topk_weights = request.topk_idx, request.topk_weights
            num_experts = request.num_experts
            if 1 + N + num_experts // N > _nvshmem.max_notify_ints // N - _nvshmem.notify_signature_ints:
                raise ValueError(f"{num_experts} experts on {N} nodes exceed the notify area")
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        stride = _nvshmem.dispatch_slot_bytes(row_bytes, num_scales, num_topk, L)
        window = self._window(stride)
        # What every team member's call must match (compared by the notify and round kernels).
        self.runtime.set_signature(1, row_bytes, num_scales, num_topk, 0 if cached else num_experts)

        if request.previous_event is not None:
            request.previous_event.current_stream_wait()
        x = x.contiguous()
        x_scales = x_scales.contiguous() if x_scales is not None else None
        i32 = dict(dtype=torch.int32, device=dev)
        if cached:
            send_pos, counts, team_tokens = handle.send_pos, handle.rdma_counts, handle.team_num_tokens
            per_expert2 = None
        else:
            topk_idx = topk_idx.contiguous() if topk_idx is not None else None
            topk_weights = topk_weights.contiguous() if topk_weights is not None else None
            is_token_in_rank = is_token_in_rank.contiguous()
            in_node = is_token_in_rank.view(T, N, L).any(2)
            position = in_node.to(torch.int32).cumsum(0, dtype=torch.int32) - 1
            send_pos = torch.where(in_node, position, torch.full_like(position, -1)).contiguous()
            e2 = num_experts // N
            records = torch.empty(N, 1 + N + e2, **i32)
            records[:, 0] = T
            records[:, 1:1 + N] = in_node.sum(0, dtype=torch.int32).view(1, N)
            records[:, 1 + N:] = num_tokens_per_expert.view(N, e2)
            received = torch.empty_like(records)
            self._error_check(self.runtime.notify(records, received, records.size(1)))
            host = received.cpu()  # waits for the count exchange (or its timeout)
            self._poll()
            team_tokens = tuple(int(v) for v in host[:, 0].tolist())
            counts = tuple(tuple(int(v) for v in row) for row in host[:, 1:1 + N].tolist())
            per_expert2 = received[:, 1 + N:].sum(0, dtype=torch.int32)
        recv_count = [counts[m][self.node] for m in range(N)]
        out_prefix = _exclusive_prefix(recv_count)
        num_rows = sum(recv_count)
        num_rounds = max(1, -(-max(max(row) for row in counts) // window))

        # Stage 1: one round per window of positions.
        rx = torch.empty(num_rows, row_bytes, dtype=torch.uint8, device=dev)
        rscales = torch.empty(num_rows, num_scales, dtype=torch.float32, device=dev) if x_scales is not None else None
        rtopk = rweights = origin = rin_rank = None
        if not cached:
            rtopk = torch.empty(num_rows, num_topk, dtype=torch.int64, device=dev) if topk_idx is not None else None
            rweights = (torch.empty(num_rows, num_topk, dtype=torch.float32, device=dev)
                        if topk_weights is not None else None)
            origin = torch.empty(num_rows, 4, **i32)
            rin_rank = torch.empty(num_rows, L, dtype=torch.bool, device=dev)
        experts_per_node = num_experts // N if not cached else 0
        x_bytes = x.view(torch.uint8) if x.numel() else torch.empty(T, row_bytes, dtype=torch.uint8, device=dev)
        for k in range(num_rounds):
            self._error_check(self.runtime.dispatch_round(
                x_bytes, row_bytes, x_scales, num_scales, topk_idx, topk_weights, num_topk, is_token_in_rank,
                send_pos, recv_count, out_prefix, self.node * experts_per_node, experts_per_node, k, k * window,
                window, config.num_sms, rx, rscales, rtopk, rweights, origin, rin_rank))
        torch.cuda.current_stream(dev).synchronize()  # a timed-out RDMA stage must not feed the NVLink stage
        self._poll()

        # Stage 2: forward inside the node.
        rx_tokens = rx.view(x.dtype) if num_rows else torch.empty(0, x.size(1), dtype=x.dtype, device=dev)
        if cached:
            recv2 = self._nvlink(self.intra.dispatch, DispatchRequest(rx_tokens, config, rscales,
                                                                      handle=handle.intra_handle))
            perm, out_handle, expert_list = handle.recv_perm, None, None
        else:
            recv2 = self._nvlink(self.intra.dispatch, DispatchRequest(
                rx_tokens, config, rscales, is_token_in_rank=rin_rank, num_tokens_per_expert=per_expert2,
                topk_idx=rtopk, topk_weights=rweights, expert_alignment=request.expert_alignment))
            h2 = recv2.handle
            origin_rows = origin.view(torch.bfloat16) if num_rows else torch.empty(0, 8, dtype=torch.bfloat16,
                                                                                     device=dev)
            origin2 = self._nvlink(self.intra.dispatch, DispatchRequest(origin_rows, config, handle=h2)
                                   ).recv_x.view(torch.int32).view(-1, 4)
            key = (origin2[:, 0].to(torch.int64) << 32) | origin2[:, 1].to(torch.int64)
            perm = torch.argsort(key)
            inv_perm = torch.empty_like(perm)
            inv_perm[perm] = torch.arange(perm.numel(), device=dev)
            recv_src_idx = origin2[:, 1].index_select(0, perm).contiguous()
            recv_src_rank = origin2[:, 0].index_select(0, perm).contiguous()
            out_handle = InternodeHandle(is_token_in_rank, send_pos, counts, team_tokens, origin, h2, perm, inv_perm,
                                         recv_src_idx, recv_src_rank)
            expert_list = recv2.num_recv_tokens_per_expert_list

        def reorder(t):
            if t is None:
                return None
            if t.dtype == _FP8:
                return t.view(torch.uint8).index_select(0, perm).view(_FP8)
            return t.index_select(0, perm)

        recv_x, recv_scales = reorder(recv2.recv_x), reorder(recv2.recv_x_scales)
        recv_topk_idx, recv_topk_weights = ((None, None) if cached else
                                            (reorder(recv2.recv_topk_idx), reorder(recv2.recv_topk_weights)))
        event = EventHandle(device=dev) if request.async_finish else None
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, expert_list, out_handle, event)

    # ------------------------------------------------------------------ combine
    def combine(self, request: CombineRequest) -> CombineResult:
        """Sum the copies of every token ``[N, hidden]`` bf16 back on its source rank (float32 accumulation).

        ``use_fp8``: both hops move FP8 rows with per-128 scales: each copy to its node's forwarder (the
        intranode combine's FP8 rows), then each node's partial sum to the source rank (encoded in front of its
        RDMA slot; only those bytes and the weights are put). Per token the error is at most half an e4m3 step
        of every copy plus half a step of every partial sum.
        """
        self._check_usable()
        x, handle, topk_weights, config = request.x, request.handle, request.topk_weights, request.config
        intranode.check_device("x", x, self.device)
        dev = self.device
        hidden = x.size(1)
        T = handle.num_sent_tokens
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        biases = [b.contiguous() if b is not None else None for b in (request.bias_0, request.bias_1)]
        window = self._window(_nvshmem.combine_slot_bytes(hidden, num_topk))
        # FP8 rows carry hidden / 128 scales: ranks that disagree on the format are told so at the barrier.
        self.runtime.set_signature(2, hidden * 2, hidden // 128 if request.use_fp8 else 0, num_topk, 0)
        if request.previous_event is not None:
            request.previous_event.current_stream_wait()

        # Stage 2 backwards: rows back into the NVLink stage's order, node-level partial sums on the forwarders.
        x2 = x.index_select(0, handle.recv_inv_perm)
        w2 = topk_weights.index_select(0, handle.recv_inv_perm) if topk_weights is not None else None
        partial, partial_w, _ = self._nvlink(self.intra.combine, CombineRequest(x2, handle.intra_handle, config, w2,
                                                                                use_fp8=request.use_fp8))
        partial = partial.contiguous()
        partial_w = partial_w.contiguous() if partial_w is not None else None

        # Stage 1 backwards: partials to their source rank, summed per token there.
        out = torch.empty(T, hidden, dtype=torch.bfloat16, device=dev)
        out_w = torch.empty(T, num_topk, dtype=torch.float32, device=dev) if topk_weights is not None else None
        num_rounds = max(1, -(-max(handle.team_num_tokens) // window))
        for k in range(num_rounds):
            self._error_check(self.runtime.combine_round(
                partial, partial_w, num_topk, handle.rdma_origin, handle.send_pos, biases[0], biases[1], k,
                k * window, window, config.num_sms, out, out_w, "fp8" if request.use_fp8 else "bf16"))
        event = EventHandle(device=dev) if request.async_finish else None
        return CombineResult(out, out_w, event)

    def get_next_combine_buffer(self, handle: InternodeHandle, hidden: int) -> torch.Tensor:
        """A fresh ``[N, hidden]`` bf16 tensor: the NVLink stage reads its input reordered, so no registered area
        can hold it in place; the combine takes it as any input."""
        return torch.empty(handle.num_recv_tokens, hidden, dtype=torch.bfloat16, device=self.device)

    # ------------------------------------------------------------------ resources
    def get_comm_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def get_local_buffer_tensor(self, dtype: torch.dtype, offset: int = 0, use_rdma_buffer: bool = False):
        """The NVL staging area (or, with ``use_rdma_buffer``, the RDMA slot area) from ``offset`` bytes on."""
        if not use_rdma_buffer:
            return self.intra.get_local_buffer_tensor(dtype, offset, False)
        self._check_usable()
        raw = self.runtime.local_buffer(int(offset))
        size = torch.empty((), dtype=dtype).element_size()
        return raw[: raw.numel() // size * size].view(dtype)

    def destroy(self, at_exit: bool = False) -> None:
        """Free both stages' buffers (collective over the team: NVSHMEM frees with a barrier).

        ``at_exit``, or after a kernel failed (the CUDA context is gone): only the NVLink stage is released; the
        collective free is skipped (peers may have exited, and NVSHMEM ends the process when a free fails) and
        the process's exit returns the symmetric memory.
        """
        self.intra.destroy()
        if not at_exit and _native.cuda_context_usable(self.intra.device):
            self.runtime.destroy()
