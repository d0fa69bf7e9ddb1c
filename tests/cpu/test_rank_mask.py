"""Rank masking on low-latency buffers (reference backend): masked ranks are skipped, lost ranks survived.

Ranks that end early leave with ``os._exit(0)`` once the survivors are done with them, and the survivors
too (after a handshake), since the harness's closing barrier would wait for the dead rank.
"""
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a import Buffer

HIDDEN, MAX_TOKENS, EXPERTS_PER_RANK, TOPK = 128, 8, 2, 3


@functools.lru_cache(maxsize=None)
def _inputs(src, round_):
    """Rank ``src``'s tokens, routing and weights of ``round_``: every rank can rebuild any rank's inputs."""
    gen = torch.Generator().manual_seed(1000 * round_ + src)
    num_experts = EXPERTS_PER_RANK * dist.get_world_size()
    num_tokens = MAX_TOKENS - src % 3
    x = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16()
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(TOPK, dim=1).indices
    idx[torch.rand(num_tokens, TOPK, generator=gen) < 0.15] = -1
    return x, idx, torch.rand(num_tokens, TOPK, generator=gen)


def _make_buffer(**kw):
    n = dist.get_world_size()
    return Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, n,
                                                                            EXPERTS_PER_RANK * n),
                  low_latency_mode=True, **kw)


def _round(buffer, round_, live, device="cpu"):
    """One dispatch + combine on this rank (tensors on ``device``); checks both against the inputs of the ``live``
    ranks only."""
    me, n = dist.get_rank(), dist.get_world_size()
    num_experts = EXPERTS_PER_RANK * n
    x, idx, w = _inputs(me, round_)
    recv, recv_count, handle, _, _ = buffer.low_latency_dispatch(x.to(device), idx.to(device), MAX_TOKENS,
                                                                 num_experts, use_fp8=False)
    recv, recv_count, src_info = recv.cpu(), recv_count.cpu(), handle.src_info.cpu()
    for local in range(EXPERTS_PER_RANK):
        expert = me * EXPERTS_PER_RANK + local
        want = [(s, t) for s in range(n) if s in live and me in live
                for t, row in enumerate(_inputs(s, round_)[1].tolist()) if expert in row]
        assert int(recv_count[local]) == len(want), (round_, local, int(recv_count[local]), len(want))
        for slot, (s, t) in enumerate(want):
            assert torch.equal(recv[local, slot], _inputs(s, round_)[0][t])
            assert int(src_info[local, slot]) == t
    # Each expert returns its input times (expert + 1).
    y = torch.zeros_like(recv)
    for local in range(EXPERTS_PER_RANK):
        c = int(recv_count[local])
        y[local, :c] = (recv[local, :c].float() * (me * EXPERTS_PER_RANK + local + 1)).bfloat16()
    combined, _, _ = buffer.low_latency_combine(y.to(device), idx.to(device), w.to(device), handle)
    combined = combined.cpu()
    want = torch.zeros(x.shape)
    for t in range(x.size(0)):
        for k, e in enumerate(idx[t].tolist()):
            if e >= 0 and e // EXPERTS_PER_RANK in live and me in live:
                want[t] += w[t, k] * (x[t].float() * (e + 1)).bfloat16().float()
    torch.testing.assert_close(combined.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)


def _leave_together(survivors):
    """Survivors make sure every one of them is done, then leave without the harness's barrier."""
    me = dist.get_rank()
    works = []
    for p in survivors:
        if p != me:
            works += [dist.isend(torch.ones(1), p, tag=999), dist.irecv(torch.empty(1), p, tag=999)]
    for work in works:
        work.wait()
    os._exit(0)


def _manual_body(rank, num_ranks):
    buffer = _make_buffer()
    everyone = set(range(num_ranks))
    _round(buffer, 0, everyone)
    assert buffer.low_latency_query_mask_buffer().tolist() == [0] * num_ranks
    # Every rank (the masked one too) masks the last rank: it exchanges with no one, the others skip it.
    buffer.low_latency_update_mask_buffer(num_ranks - 1, True)
    status = torch.empty(num_ranks, dtype=torch.int32)
    assert buffer.low_latency_query_mask_buffer(status) is status
    assert status.tolist() == [0] * (num_ranks - 1) + [1]
    _round(buffer, 1, everyone - {num_ranks - 1})
    buffer.low_latency_update_mask_buffer(num_ranks - 1, mask=False)  # it kept step: unmask it
    _round(buffer, 2, everyone)
    buffer.low_latency_update_mask_buffer(0, mask=True)
    buffer.low_latency_clean_mask_buffer()
    _round(buffer, 3, everyone)
    with pytest.raises(ValueError, match="rank_to_mask"):
        buffer.low_latency_update_mask_buffer(num_ranks, True)
    with pytest.raises(ValueError, match="low_latency_mode"):
        Buffer(dist.group.WORLD, 1 << 20).low_latency_update_mask_buffer(0)
    with pytest.raises(ValueError, match="low_latency_mode"):
        Buffer(dist.group.WORLD, 1 << 20, enable_shrink=True)


def test_mask_and_unmask():
    run_distributed(_manual_body, 3)


def _killed_body(rank, num_ranks, auto):
    timeout_s = 5.0
    buffer = _make_buffer(enable_shrink=auto, timeout_s=timeout_s)
    dead = num_ranks - 1
    _round(buffer, 0, set(range(num_ranks)))
    dist.barrier()  # nothing of round 0 is still in flight to the rank that dies
    if rank == dead:
        time.sleep(0.2)
        os._exit(0)
    survivors = set(range(num_ranks)) - {dead}
    time.sleep(0.5)
    started = time.monotonic()
    if not auto:
        # Without enable_shrink the call raises (it does not hang); the caller masks the rank and goes on.
        with pytest.raises(RuntimeError):
            _round(buffer, 1, survivors)
        assert time.monotonic() - started < timeout_s + 2
        buffer.low_latency_update_mask_buffer(dead, True)
        started = time.monotonic()
    _round(buffer, 1, survivors)  # with enable_shrink the lost rank is masked during this call
    assert time.monotonic() - started < timeout_s + 2
    assert buffer.low_latency_query_mask_buffer().tolist() == [int(r == dead) for r in range(num_ranks)]
    _round(buffer, 2, survivors)
    _leave_together(survivors)


@pytest.mark.parametrize("auto", [True, False], ids=["enable_shrink", "manual"])
def test_killed_rank(auto):
    run_distributed(_killed_body, 3, auto, timeout=120)


def _hung_body(rank, num_ranks):
    timeout_s = 2.0
    buffer = _make_buffer(enable_shrink=True, timeout_s=timeout_s)
    hung = 1
    _round(buffer, 0, set(range(num_ranks)))
    if rank == hung:
        time.sleep(timeout_s + 2)  # alive, but silent past the others' deadline
        os._exit(0)
    survivors = set(range(num_ranks)) - {hung}
    started = time.monotonic()
    _round(buffer, 1, survivors)
    took = time.monotonic() - started
    assert timeout_s * 0.9 < took < timeout_s * 2 + 1, took  # one wait for the silent rank, not a hang
    assert buffer.low_latency_query_mask_buffer().tolist() == [int(r == hung) for r in range(num_ranks)]
    _round(buffer, 2, survivors)
    _leave_together(survivors)


def test_silent_rank_is_masked_after_timeout():
    run_distributed(_hung_body, 3, timeout=120)


def _mid_call_body(rank, num_ranks):
    buffer = _make_buffer(enable_shrink=True, timeout_s=5.0)
    dead = 0  # the rank that hosts the store: the others must not need it once it is gone
    _round(buffer, 0, set(range(num_ranks)))
    dist.barrier()
    if rank == dead:
        # Dies inside the next dispatch, after the counts went out and before any token row: the others
        # already expect its rows and must drop them from the layout they return.
        def die(*args, **kwargs):
            time.sleep(0.2)
            os._exit(0)
        buffer._reference_ll.peers.rows = die
    survivors = set(range(num_ranks)) - {dead}
    _round(buffer, 1, survivors)
    assert buffer.low_latency_query_mask_buffer().tolist() == [int(r == dead) for r in range(num_ranks)]
    _round(buffer, 2, survivors)
    _leave_together(survivors)


def test_rank_lost_inside_a_call():
    run_distributed(_mid_call_body, 3, timeout=120)
