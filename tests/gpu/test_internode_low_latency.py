"""Low-latency kernels across nodes (NVSHMEM over the whole group) against the reference backend.

Virtual nodes on one GPU: 2 nodes of 2 ranks and 2 nodes of 4 ranks (``num_ranks_per_node``), every rank
a process under CUDA MPS; NVSHMEM's peer-to-peer transport stands in for RDMA. Every rank runs the same
cases in lockstep as ``test_low_latency.py`` (whose checks are reused): received sets per expert equal to
the reference's through the source info, BF16 rows exact, FP8 within one e4m3 step, combine within BF16
rounding; hook mode, zero copy, ``out=``, CUDA graph replay on new data, 1,000 alternating calls without
drift; NVSHMEM puts only (``allow_nvlink=False``); the public ``Buffer`` with normal internode calls on the
same buffer; a timeout naming the missing rank; and ranks whose calls differ, each told how.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import (assert_same, Case, dispatch_request, expect_fault, gather, rank_num_sms, run_ranks,
                     set_rank_device, skip_reason, synchronize_after_fault)
from moe_a2a import Buffer
from moe_a2a.backends import internode, internode_low_latency
from moe_a2a.backends.base import CombineRequest, LowLatencyDispatchRequest
from moe_a2a.backends.reference import ReferenceBackend
from moe_a2a.backends.reference_low_latency import ReferenceLowLatency
from moe_a2a.config import get_low_latency_rdma_size_hint
from test_internode import _assert_combine_close, _buffer_bytes, _nvshmem_env
from test_low_latency import (DISAGREEMENTS, _disagree, _graph, _inputs, _many_calls, _round_trip, _run_cases,
                              _want_combine)

pytestmark = pytest.mark.gpu


def _skip(num_ranks):
    reason = skip_reason(num_ranks)
    if reason is None and not internode_low_latency.available():
        reason = "moe_a2a._nvshmem has no low-latency kernels (no NVSHMEM headers at build time)"
    return reason


def _env():
    _nvshmem_env()
    # Room for the largest buffer below plus the Buffer test's two buffers (reserved, mapped on use).
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(2 << 30))


def _backend(rank, num_ranks, num_max, hidden, num_experts, timeout_s=10.0, allow_nvlink=True):
    num_bytes = get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
    return internode_low_latency.InternodeLowLatencyBackend(rank, num_ranks, dist.group.WORLD, num_bytes, gather,
                                                            timeout_s, allow_nvlink=allow_nvlink)


def _correctness(rank, num_ranks, per_node):
    _env()
    set_rank_device(rank)
    ref = ReferenceLowLatency(rank, num_ranks, dist.group.WORLD)
    kern = _backend(rank, num_ranks, 32, 7168, 288)
    assert kern.num_sms >= 1
    _run_cases(kern, ref, rank, num_ranks)
    _graph(rank, num_ranks, kern, ref)
    _many_calls(rank, num_ranks, kern, num_pairs=500)
    dist.barrier()
    kern.clean()
    kern.set_step_probe(True)  # the debug probe: every block of the last launch (a combine) reached its end
    _round_trip(kern, ref, rank, num_ranks, "after clean", 999, 16, 16 - rank, 2048, 64, 4, "fp8", False, False, False)
    torch.cuda.synchronize()
    steps = kern.block_steps()
    assert len(steps) == kern.num_sms and len({call for call, _ in steps}) == 1, steps
    assert all(step == "done" for _, step in steps), steps
    kern.destroy()

    # Everything through NVSHMEM puts (what crosses nodes over RDMA), no direct stores.
    puts = _backend(rank, num_ranks, 16, 2048, 16 * num_ranks, allow_nvlink=False)
    for i, (mode, hook, zero_copy, formats) in enumerate((("bf16", False, False, ("logfmt", "fp8")),
                                                          ("fp8", True, True, ("fp8",)),
                                                          ("ue8m0", False, True, ("logfmt",)))):
        _round_trip(puts, ref, rank, num_ranks, f"puts only, {mode}", 300 + i, 16, 16 - (rank + i) % 3, 2048,
                    16 * num_ranks, 5, mode, hook, zero_copy, False, formats)
    puts.destroy()
    _public_api(rank, num_ranks, per_node, ref)


def _public_api(rank, num_ranks, per_node, ref):
    """Buffer(low_latency_mode=True) over virtual nodes: low-latency calls on the NVSHMEM kernels, and
    normal internode calls on the same buffer (their team addressed by whole-group PE ids)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    num_sms = rank_num_sms(num_ranks)
    Buffer.set_num_sms(num_sms)
    dcfg, _, nvl, rdma = _buffer_bytes(num_ranks, per_node, num_sms, 2048 * 2)
    num_max, hidden, num_experts, topk = 24, 2048, 4 * num_ranks, 4
    rdma = max(rdma, Buffer.get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts))
    with pytest.raises(ValueError, match="num_qps_per_rank"):
        Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True, num_qps_per_rank=0, num_ranks_per_node=per_node)
    buf = Buffer(dist.group.WORLD, nvl, rdma, low_latency_mode=True, num_qps_per_rank=4,
                 num_ranks_per_node=per_node, explicitly_destroy=True, timeout_s=30.0)
    assert isinstance(buf._ll_kernels, internode_low_latency.InternodeLowLatencyBackend)
    assert isinstance(buf._kernels, internode.InternodeBackend)
    x, idx, w = _inputs(rank, 41, num_max - rank, hidden, num_experts, topk)
    xd, idxd, wd = x.to(dev), idx.to(dev), w.to(dev)
    cum = torch.zeros(num_experts // num_ranks, dtype=torch.int32, device=dev)
    (recv_x, scales), count, handle, _, hook = buf.low_latency_dispatch(
        xd, idxd, num_max, num_experts, cumulative_local_expert_recv_stats=cum, use_fp8=True, return_recv_hook=True)
    hook()
    want = ref.dispatch(LowLatencyDispatchRequest(x, idx, num_max, num_experts))
    torch.cuda.synchronize()
    assert torch.equal(count.cpu(), want[2]) and torch.equal(cum.cpu(), want[2])
    L = num_experts // num_ranks
    mult = (torch.arange(L, device=dev) + rank * L + 1).float().view(L, 1, 1)
    # Dequantized FP8 rows times (expert id + 1): combine must give sum_k w_k (e_k + 1) deq(x).
    deq = recv_x.float() * scales.repeat_interleave(128, dim=2)
    y = buf.get_next_low_latency_combine_buffer(handle)
    y.copy_((deq * mult).bfloat16())
    out, _, _ = buf.low_latency_combine(y, idxd, wd, handle, zero_copy=True)
    torch.cuda.synchronize()
    assert out.shape == (x.size(0), hidden) and out.dtype == torch.bfloat16
    want32, mag = _want_combine(x, idx, w)
    bad = ((out.cpu().float() - want32).abs() > want32.abs() * 2 ** -3 + mag * 2 ** -4 + 1e-2).sum()
    assert int(bad) == 0, f"Buffer FP8 round trip: {int(bad)} values off"

    # Normal internode dispatch + combine on the same buffer.
    case = Case(rank, num_ranks, 12, per_node=per_node, num_tokens=97 + 5 * rank, hidden=2048, num_experts=64, topk=4)
    cidx, cw, cx = case.topk_idx.to(dev), case.topk_weights.to(dev), case.x.to(dev)
    per_rank, per_node_counts, per_expert, in_rank, _ = buf.get_dispatch_layout(cidx, case.num_experts)
    rx, _, rw, counts, h, _ = buf.internode_dispatch(cx, None, per_rank, per_node_counts, in_rank, per_expert, cidx,
                                                      cw)
    nref = ReferenceBackend(rank, num_ranks, dist.group.WORLD, per_node)
    nwant = nref.dispatch(dispatch_request(case.x, None, dcfg, case.layout, case.topk_idx, case.topk_weights))
    assert_same("normal dispatch on a low-latency buffer", rx, nwant.recv_x)
    assert counts == nwant.num_recv_tokens_per_expert_list
    combined, _, _ = buf.internode_combine(rx, h, rw)
    nwant_c = nref.combine(CombineRequest(rx.cpu(), nwant.handle, dcfg, nwant.recv_topk_weights)).combined_x
    magnitude = nref.combine(CombineRequest(rx.cpu().float().abs(), nwant.handle, dcfg)).combined_x
    _assert_combine_close("normal combine on a low-latency buffer", combined, nwant_c, magnitude)
    # The low-latency path still works after normal calls.
    (recv_x2, _), count2, _, _, _ = buf.low_latency_dispatch(xd, idxd, num_max, num_experts, use_fp8=True)
    torch.cuda.synchronize()
    assert torch.equal(count2.cpu(), want[2])
    buf.destroy()


def _timeout(rank, num_ranks, per_node):
    _env()
    set_rank_device(rank)
    kern = _backend(rank, num_ranks, 8, 2048, 8 * num_ranks, timeout_s=1.0)
    dev = kern.device
    x = torch.randn(8, 2048, device=dev).to(torch.bfloat16)
    idx = torch.randint(0, 8 * num_ranks, (8, 1), device=dev)
    request = LowLatencyDispatchRequest(x, idx, 8, 8 * num_ranks)
    kern.dispatch(request)
    torch.cuda.synchronize()
    kern.raise_if_error()
    dist.barrier()
    missing = num_ranks - 1  # on the other node than rank 0
    if rank != missing:
        start = time.monotonic()
        expect_fault(lambda: kern.dispatch(request))
        assert time.monotonic() - start < 10
    # The first rank to time out records it and traps; under MPS the trap ends the others' kernels too.
    records = gather(kern.error())
    assert any(records) and all(not r or f"waiting for rank {missing}" in r for r in records), records
    if rank != missing:
        match = rf"rank {rank} timed out .* dispatch receive .* cannot be used again" if records[rank] else None
        with pytest.raises(RuntimeError, match=match):
            kern.dispatch(request)
    dist.barrier()
    synchronize_after_fault()
    kern.destroy()


def _masking(rank, num_ranks, per_node, lost):
    """Rank masking on the NVSHMEM kernels: the rounds of ``tests/cpu/test_rank_mask.py`` with CUDA tensors. The
    last rank (on the other node than rank 0) is masked on purpose by every rank and keeps calling, then
    unmasked; with ``lost`` ("exited" or "silent") it leaves instead, or stays alive making no call, and
    ``enable_shrink`` masks it in the survivors' next call."""
    from test_rank_mask import EXPERTS_PER_RANK, HIDDEN, MAX_TOKENS, _leave_together, _round

    _env()
    device = set_rank_device(rank)
    timeout_s = 3.0
    rdma = Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, num_ranks, EXPERTS_PER_RANK * num_ranks)
    buf = Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True, num_ranks_per_node=per_node,
                 enable_shrink=lost is not None, timeout_s=timeout_s)
    assert isinstance(buf._ll_kernels, internode_low_latency.InternodeLowLatencyBackend)
    everyone, last = set(range(num_ranks)), num_ranks - 1
    _round(buf, 0, everyone, device)
    if lost is None:
        buf.low_latency_update_mask_buffer(last, True)
        assert buf.low_latency_query_mask_buffer().tolist() == [int(r == last) for r in range(num_ranks)]
        _round(buf, 1, everyone - {last}, device)
        buf.low_latency_update_mask_buffer(last, False)
        _round(buf, 2, everyone, device)
        torch.cuda.synchronize()
        _leave_together(everyone)  # NVSHMEM's teardown would wait at a barrier: leave as the lost case does
    torch.cuda.synchronize()
    dist.barrier()  # nothing of round 0 is still in flight to the rank that leaves
    if rank == last:
        time.sleep(timeout_s + 3 if lost == "silent" else 0.2)
        os._exit(0)
    survivors = everyone - {last}
    time.sleep(0.5)
    started = time.monotonic()
    _round(buf, 1, survivors, device)
    assert time.monotonic() - started < timeout_s * 2 + 2
    assert buf.low_latency_query_mask_buffer().tolist() == [int(r == last) for r in range(num_ranks)]
    _round(buf, 2, survivors, device)
    assert not buf._ll_kernels.error(), buf._ll_kernels.error()  # masking is not an error
    _leave_together(survivors)


@pytest.mark.parametrize("lost", [None, "exited", "silent"], ids=["masked", "exited", "silent"])
def test_internode_low_latency_rank_masking(lost):
    reason = _skip(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_masking, 4, 2, lost, timeout=100.0)


def _ranks_disagree(rank, num_ranks, per_node, what):
    """As the intranode low-latency test: the last rank (on the other node than rank 0) makes another call;
    every rank that compares with it names the field, both ranks and both values. None waits for the timeout,
    except where the last rank has more experts: the counts it waits for beyond the others' experts never
    come, and at the timeout it compares the calls of the sources whose first counts came."""
    _env()
    set_rank_device(rank)
    timeout_s, within_s = (5.0, 20.0) if what == "experts" else (30.0, 15.0)
    _disagree(rank, num_ranks, _backend(rank, num_ranks, 16, 512, 16 * num_ranks, timeout_s=timeout_s), what,
              within_s)


@pytest.mark.parametrize("what", sorted(DISAGREEMENTS))
def test_ranks_that_disagree_are_told(what):
    reason = _skip(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_ranks_disagree, 4, 2, what, timeout=120.0)


@pytest.mark.parametrize("num_ranks,per_node", [(4, 2), (8, 4)])
def test_internode_low_latency_matches_reference(num_ranks, per_node):
    reason = _skip(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_correctness, num_ranks, per_node, timeout=240.0)


def test_internode_low_latency_timeout_names_the_missing_rank():
    reason = _skip(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_timeout, 4, 2, timeout=120.0)
