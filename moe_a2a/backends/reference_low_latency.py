"""Reference low-latency dispatch/combine on ``all_to_all_single``: the oracle for the fixed-shape kernels.

Each (token, expert) pair travels once. Received tokens land in fixed slots
``[num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]``; inside one local expert the
slots are filled source rank by source rank, each source's tokens by increasing index, and
``layout_range[l, s]`` records where source ``s``'s block starts and how long it is.

Rank masking: once a rank is masked (or with ``auto_mask``, where a peer that fails is masked on the spot)
the calls run on ``PeerExchanger``'s point-to-point messages with the live ranks only: masked ranks'
tokens are neither sent nor waited for, and their experts' outputs count as zero in the combine.

Combine payload formats: ``"bf16"`` (the expert outputs as given), ``"fp8"`` (e4m3 with one float32 scale
per 128 channels) or ``"logfmt"`` (``moe_a2a.formats.logfmt``), decoded to float32 before the weighted sum.
"""
from __future__ import annotations

import time

import torch

from .. import agreement
from ..formats.logfmt import logfmt_decode, logfmt_encode
from ..fp8 import fp8_to_float, pack_ue8m0, per_token_cast_to_fp8
from ..handles import LowLatencyHandle, unpack_layout_range
from .base import (LowLatencyCombineRequest, LowLatencyCombineResult, LowLatencyDispatchRequest,
                   LowLatencyDispatchResult)
from .peer_exchange import PeerExchanger
from .reference import DEFAULT_TIMEOUT_S, Exchanger


class ReferenceLowLatency:
    """Low-latency entry points of the reference backend for one rank of ``group``; a ``LowLatencyModeBackend``
    (``base``), with rank masking besides."""

    def __init__(self, rank: int, num_ranks: int, group, timeout_s: float = DEFAULT_TIMEOUT_S,
                 auto_mask: bool = False):
        self.rank = rank
        self.num_ranks = num_ranks
        self.collective = Exchanger(group, timeout_s)
        self.mask = torch.zeros(num_ranks, dtype=torch.int32)  # 1 = masked rank
        self.peers = PeerExchanger(group, rank, self.mask, timeout_s, auto_mask)

    @property
    def exchanger(self):
        """Point-to-point with the live ranks once masking is in play, else one collective per exchange."""
        return self.peers if self.peers.auto_mask or bool(self.mask.any()) else self.collective

    def _rows(self, ex, payload, send_splits, recv_splits, operation: str):
        """Start a row exchange; returns ``finish() -> (tensors, kept)`` where ``kept`` is the ``[num_ranks]``
        list of rows kept from each source (None when every row arrived)."""
        if ex is self.collective:
            unpack, work = ex.rows(payload, send_splits, recv_splits, async_op=True, operation=operation)

            def finish():
                work.wait()
                return unpack(), None
            return finish
        unpack, wait = ex.rows(payload, send_splits, recv_splits, async_op=True)

        def finish():
            wait()
            return unpack()
        return finish

    def dispatch(self, request: LowLatencyDispatchRequest) -> LowLatencyDispatchResult:
        """``hook`` is None without ``return_recv_hook``, else the data is only valid after calling it."""
        x, topk_idx, num_experts = request.x, request.topk_idx, request.num_experts
        num_max_dispatch_tokens_per_rank = request.num_max_dispatch_tokens_per_rank
        use_fp8, round_scale, use_ue8m0 = request.use_fp8, request.round_scale, request.use_ue8m0
        cumulative_local_expert_recv_stats = request.cumulative_local_expert_recv_stats
        dispatch_wait_recv_cost_stats = request.dispatch_wait_recv_cost_stats
        ex, num_ranks, device = self.exchanger, self.num_ranks, x.device
        ex.step = "dispatch"
        num_tokens, hidden = x.shape
        num_local_experts = num_experts // num_ranks
        num_slots = num_max_dispatch_tokens_per_rank * num_ranks

        # One message per valid (token, expert) pair, ordered by expert (so by rank, then local expert), then token.
        token, slot = (topk_idx >= 0).nonzero(as_tuple=True)
        expert = topk_idx[token, slot]
        order = torch.argsort(expert * max(num_tokens, 1) + token)
        token, expert = token[order], expert[order]
        if ex is self.peers:  # nothing for masked ranks' experts
            live = self.mask.to(device)[expert // num_local_experts] == 0
            token, expert = token[live], expert[live]
        dst_rank, local_expert = expert // num_local_experts, expert % num_local_experts
        send_counts = torch.zeros(num_ranks, num_local_experts, dtype=torch.int64, device=device)
        send_counts.index_put_((dst_rank, local_expert), torch.ones_like(dst_rank), accumulate=True)
        if ex is self.collective:  # the live ranks' calls are not compared once masking is in play
            ex.header(agreement.signature("low-latency dispatch", hidden, x.dtype, use_fp8, num_experts,
                                          topk_idx.size(1), num_max_tokens=num_max_dispatch_tokens_per_rank),
                      None, "low-latency dispatch")
            recv_counts = ex.counts(send_counts.cpu(), "low-latency dispatch (count exchange)")  # [src, local expert]
        else:
            recv_counts = ex.counts(send_counts.cpu())

        rows = x[token]
        payload = [token.to(torch.int32).view(-1, 1), local_expert.to(torch.int32).view(-1, 1)]
        if use_fp8:
            rows, scales = per_token_cast_to_fp8(rows, round_scale)
            payload += [rows, scales]
        else:
            payload.append(rows)
        started = time.perf_counter_ns()
        finish = self._rows(ex, payload, send_counts.sum(1).tolist(), recv_counts.sum(1).tolist(),
                            "low-latency dispatch (rows)")

        recv_x = torch.zeros(num_local_experts, num_slots, hidden, dtype=rows.dtype, device=device)
        recv_scales = None
        if use_fp8:
            # Column-major in the last two dims, as TMA-based GEMMs read them.
            num_scale_cols = hidden // 512 if use_ue8m0 else hidden // 128
            recv_scales = torch.zeros(num_local_experts, num_scale_cols, num_slots,
                                      dtype=torch.int32 if use_ue8m0 else torch.float32, device=device).transpose(1, 2)
        recv_count = recv_counts.sum(0).to(torch.int32).to(device)
        begin = torch.cat([torch.zeros(1, num_local_experts, dtype=torch.int64), recv_counts.cumsum(0)[:-1]])
        layout_range = ((begin << 32) | recv_counts).t().contiguous().to(device)  # [local expert, src]
        src_info = torch.full((num_local_experts, num_slots), -1, dtype=torch.int32, device=device)
        handle = LowLatencyHandle(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)

        def receive() -> None:
            got, kept = finish()
            if kept is not None and kept != recv_counts.sum(1).tolist():
                # Sources that failed during this call (masked now) delivered nothing: drop them from the layout.
                for src, n in enumerate(kept):
                    if n == 0:
                        recv_counts[src] = 0
                recv_count.copy_(recv_counts.sum(0).to(torch.int32))
                begin = torch.cat([torch.zeros(1, num_local_experts, dtype=torch.int64), recv_counts.cumsum(0)[:-1]])
                layout_range.copy_(((begin << 32) | recv_counts).t())
            if dispatch_wait_recv_cost_stats is not None:
                waited = time.perf_counter_ns() - started
                dispatch_wait_recv_cost_stats[self.rank] += torch.where(
                    recv_counts.sum(1) > 0, waited, 0).to(dispatch_wait_recv_cost_stats.device)
            src_token, dst_local = got[0].view(-1).to(torch.int64), got[1].view(-1).to(torch.int64)
            # Arrival order is (src, local expert, token); a stable sort by local expert gives (expert, src, token).
            by_expert = torch.sort(dst_local, stable=True).indices
            dst_local = dst_local[by_expert]
            starts = torch.cumsum(recv_count.to(torch.int64), 0) - recv_count.to(torch.int64)
            position = torch.arange(dst_local.numel(), device=device) - starts[dst_local]
            recv_x[dst_local, position] = got[2][by_expert]
            src_info[dst_local, position] = src_token[by_expert].to(torch.int32)
            if use_fp8:
                scales = got[3][by_expert]
                recv_scales[dst_local, position] = pack_ue8m0(scales) if use_ue8m0 else scales
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.device))

        if request.return_recv_hook:
            return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, receive)
        receive()
        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, handle, None)

    def combine(self, request: LowLatencyCombineRequest) -> LowLatencyCombineResult:
        """Weighted sum over experts of the expert outputs ``x``; the rows travel as ``wire_format``: ``"bf16"``,
        ``"fp8"`` or ``"logfmt"`` (module doc)."""
        x, topk_idx, topk_weights, handle = request.x, request.topk_idx, request.topk_weights, request.handle
        wire_format, combine_wait_recv_cost_stats = request.wire_format, request.combine_wait_recv_cost_stats
        out = request.out
        ex, num_ranks, device = self.exchanger, self.num_ranks, x.device
        ex.step = "combine"
        num_local_experts = x.size(0)
        begin, count = unpack_layout_range(handle.layout_range.cpu())
        # Rows back to their source ranks, ordered by source rank, then local expert, then slot.
        slot_expert, slot_index, back_counts = [], [], []
        for src in range(num_ranks):
            for local in range(num_local_experts):
                b, c = int(begin[local, src]), int(count[local, src])
                slot_expert.append(torch.full((c,), local, dtype=torch.int64))
                slot_index.append(torch.arange(b, b + c, dtype=torch.int64))
            back_counts.append(int(count[:, src].sum()))
        slot_expert = torch.cat(slot_expert).to(device)
        slot_index = torch.cat(slot_index).to(device)
        first_expert = self.rank * num_local_experts
        rows = x[slot_expert, slot_index]
        if wire_format == "fp8":
            encoded = list(per_token_cast_to_fp8(rows))
        elif wire_format == "logfmt":
            encoded = list(logfmt_encode(rows))
        else:
            encoded = [rows]
        payload = [handle.src_info[slot_expert, slot_index].view(-1, 1),
                   (slot_expert + first_expert).to(torch.int32).view(-1, 1), *encoded]
        if ex is self.collective:
            signature = agreement.signature("low-latency combine", x.size(2), x.dtype, wire_format != "bf16",
                                            handle.num_experts, topk_idx.size(1), topk_weights.dtype,
                                            num_max_tokens=handle.num_max_dispatch_tokens_per_rank)
            home_counts = ex.header(signature, torch.tensor(back_counts, dtype=torch.int64),
                                    "low-latency combine")[:, 0]
        else:
            home_counts = ex.counts(torch.tensor(back_counts, dtype=torch.int64).view(num_ranks, 1)).view(-1)
        started = time.perf_counter_ns()
        finish = self._rows(ex, payload, back_counts, home_counts.tolist(), "low-latency combine (rows)")
        num_tokens, hidden = topk_idx.size(0), x.size(2)
        combined = out if out is not None else torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)

        def receive() -> None:
            got, _ = finish()  # rows of sources that failed are left out: their experts count as zero
            if combine_wait_recv_cost_stats is not None:
                waited = time.perf_counter_ns() - started
                combine_wait_recv_cost_stats[self.rank] += torch.where(
                    home_counts > 0, waited, 0).to(combine_wait_recv_cost_stats.device)
            token, expert = got[0], got[1]
            if wire_format == "fp8":
                rows = fp8_to_float(got[2], got[3])
            elif wire_format == "logfmt":
                rows = logfmt_decode(got[2], got[3])
            else:
                rows = got[2]
            token, expert = token.view(-1).to(torch.int64), expert.view(-1).to(torch.int64)
            # The weight of each returned copy is the weight of the slot that chose its expert.
            match = topk_idx[token] == expert.unsqueeze(1)
            weight = (topk_weights[token].float() * match).sum(1)
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
            acc.index_add_(0, token, rows.float() * weight.unsqueeze(1))
            combined.copy_(acc)

        if request.return_recv_hook:
            return LowLatencyCombineResult(combined, receive)
        receive()
        return LowLatencyCombineResult(combined, None)
