"""Reference low-latency dispatch/combine on ``all_to_all_single``: the oracle for the fixed-shape kernels.

Each (token, expert) pair travels once. Received tokens land in fixed slots
``[num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]``; inside one local expert the
slots are filled source rank by source rank, each source's tokens by increasing index, and
``layout_range[l, s]`` records where source ``s``'s block starts and how long it is.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .. import agreement
from ..fp8 import pack_ue8m0, per_token_cast_to_fp8
from ..handles import LowLatencyHandle, unpack_layout_range
from .reference import DEFAULT_TIMEOUT_S, Exchanger


class ReferenceLowLatency:
    """Low-latency entry points of the reference backend for one rank of ``group``."""

    def __init__(self, rank: int, num_ranks: int, group, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank = rank
        self.num_ranks = num_ranks
        self.exchanger = Exchanger(group, timeout_s)

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, cumulative_local_expert_recv_stats,
                 dispatch_wait_recv_cost_stats, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                 use_fp8: bool, round_scale: bool, use_ue8m0: bool, return_recv_hook: bool):
        """Returns ``(recv_x, recv_x_scales, recv_count, handle, hook)``; ``hook`` is None without
        ``return_recv_hook``, else the data is only valid after calling it."""
        ex, num_ranks, device = self.exchanger, self.num_ranks, x.device
        num_tokens, hidden = x.shape
        num_local_experts = num_experts // num_ranks
        num_slots = num_max_dispatch_tokens_per_rank * num_ranks

        # One message per valid (token, expert) pair, ordered by expert (so by rank, then local expert), then token.
        token, slot = (topk_idx >= 0).nonzero(as_tuple=True)
        expert = topk_idx[token, slot]
        order = torch.argsort(expert * max(num_tokens, 1) + token)
        token, expert = token[order], expert[order]
        dst_rank, local_expert = expert // num_local_experts, expert % num_local_experts
        send_counts = torch.zeros(num_ranks, num_local_experts, dtype=torch.int64, device=device)
        send_counts.index_put_((dst_rank, local_expert), torch.ones_like(dst_rank), accumulate=True)
        ex.header(agreement.signature("low-latency dispatch", hidden, x.dtype, use_fp8, num_experts, topk_idx.size(1),
                                      num_max_tokens=num_max_dispatch_tokens_per_rank), None, "low-latency dispatch")
        recv_counts = ex.counts(send_counts.cpu(), "low-latency dispatch (count exchange)")  # [src, local expert]

        rows = x[token]
        payload = [token.to(torch.int32).view(-1, 1), local_expert.to(torch.int32).view(-1, 1)]
        if use_fp8:
            rows, scales = per_token_cast_to_fp8(rows, round_scale)
            payload += [rows, scales]
        else:
            payload.append(rows)
        started = time.perf_counter_ns()
        unpack, work = ex.rows(payload, send_counts.sum(1).tolist(), recv_counts.sum(1).tolist(), async_op=True,
                               operation="low-latency dispatch (rows)")

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
            work.wait()
            if dispatch_wait_recv_cost_stats is not None:
                waited = time.perf_counter_ns() - started
                dispatch_wait_recv_cost_stats[self.rank] += torch.where(
                    recv_counts.sum(1) > 0, waited, 0).to(dispatch_wait_recv_cost_stats.device)
            got = unpack()
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

        if return_recv_hook:
            return recv_x, recv_scales, recv_count, handle, receive
        receive()
        return recv_x, recv_scales, recv_count, handle, None

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: LowLatencyHandle, out: Optional[torch.Tensor], combine_wait_recv_cost_stats,
                return_recv_hook: bool):
        """Weighted sum over experts of the expert outputs ``x``; returns ``(combined_x, hook)``."""
        ex, num_ranks, device = self.exchanger, self.num_ranks, x.device
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
        payload = [handle.src_info[slot_expert, slot_index].view(-1, 1),
                   (slot_expert + first_expert).to(torch.int32).view(-1, 1),
                   x[slot_expert, slot_index]]
        signature = agreement.signature("low-latency combine", x.size(2), x.dtype, False, handle.num_experts,
                                        topk_idx.size(1), topk_weights.dtype,
                                        num_max_tokens=handle.num_max_dispatch_tokens_per_rank)
        home_counts = ex.header(signature, torch.tensor(back_counts, dtype=torch.int64), "low-latency combine")[:, 0]
        started = time.perf_counter_ns()
        unpack, work = ex.rows(payload, back_counts, home_counts.tolist(), async_op=True,
                               operation="low-latency combine (rows)")
        num_tokens, hidden = topk_idx.size(0), x.size(2)
        combined = out if out is not None else torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)

        def receive() -> None:
            work.wait()
            if combine_wait_recv_cost_stats is not None:
                waited = time.perf_counter_ns() - started
                combine_wait_recv_cost_stats[self.rank] += torch.where(
                    home_counts > 0, waited, 0).to(combine_wait_recv_cost_stats.device)
            token, expert, rows = unpack()
            token, expert = token.view(-1).to(torch.int64), expert.view(-1).to(torch.int64)
            # The weight of each returned copy is the weight of the slot that chose its expert.
            match = topk_idx[token] == expert.unsqueeze(1)
            weight = (topk_weights[token].float() * match).sum(1)
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
            acc.index_add_(0, token, rows.float() * weight.unsqueeze(1))
            combined.copy_(acc)

        if return_recv_hook:
            return combined, receive
        receive()
        return combined, None
