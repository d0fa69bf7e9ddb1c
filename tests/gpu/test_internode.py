"""Internode kernels (NVSHMEM between nodes, NVLink inside) against the reference backend.

Virtual nodes on one GPU: 2 nodes of 2 ranks and 2 nodes of 4 ranks (``num_ranks_per_node``), every rank
a process under CUDA MPS. NVSHMEM joins the ranks with the same local index; the intranode kernels join
the ranks of a node. Every rank runs the same cases in lockstep: kernels on its GPU, the reference backend
on CPU over gloo. Dispatch must be bit-exact, in the reference's row order; combine may differ from the
reference's single float32 sum by one BF16 rounding of each node-level partial sum. Ranks whose calls
differ must be told how, by every rank that compares with them.
"""
import faulthandler
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from harness import (as_bytes, assert_same, Case, check_repeats, dispatch_request, expect_fault, gather, rank_num_sms,
                     round_trip_cases, routing, run_ranks, set_rank_device, skip_reason, synchronize_after_fault)
from moe_a2a import Buffer
from moe_a2a.backends import internode, intranode
from moe_a2a.backends.base import CombineRequest
from moe_a2a.backends.reference import ReferenceBackend
from moe_a2a.config import default_combine_config, default_dispatch_config
from moe_a2a.handles import InternodeHandle

pytestmark = pytest.mark.gpu



def _skip(num_ranks):
    reason = skip_reason(num_ranks)
    if reason is None and not internode.available():
        reason = "moe_a2a._nvshmem is not built (no NVSHMEM headers at build time)"
    return reason


def _nvshmem_env():
    """All virtual nodes share one host: peer-to-peer transport only, bootstrap over loopback.

    ``MOE_A2A_TEST_WATCHDOG=S`` dumps every rank's Python stack after S seconds (to find a stuck rank);
    ``MOE_A2A_TEST_VERBOSE=1`` prints rank 0's progress.
    """
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    watchdog = float(os.environ.get("MOE_A2A_TEST_WATCHDOG", "0"))
    if watchdog > 0:
        faulthandler.dump_traceback_later(watchdog, exit=False)


_START = time.monotonic()


def _progress(rank, what):
    if rank == 0 and os.environ.get("MOE_A2A_TEST_VERBOSE") == "1":
        print(f"[rank 0, {time.monotonic() - _START:.1f} s] {what}", flush=True)


def _assert_combine_close(name, got, want, magnitude):
    """Within one BF16 rounding of each node partial (bounded by the sum of |copies|) and of the result."""
    g, w = got.cpu().float(), want.float()
    assert g.shape == w.shape, f"{name}: {g.shape} vs {w.shape}"
    tol = (w.abs() + magnitude.float()) * 2 ** -7 + 1e-6
    bad = (g - w).abs() > tol
    assert not bad.any(), f"{name} differs at {bad.nonzero()[:5].tolist()}: max |diff| {(g - w).abs().max().item()}"


def _round_trip(kern, ref, case, config, expert_alignment=1, num_bias=0):
    dev = kern.device
    R, L = kern.num_ranks, kern.num_local_ranks
    layout_gpu = intranode.get_dispatch_layout(case.topk_idx.to(dev), case.num_experts, R, L)
    for name, w, g in zip(("per_rank", "per_node", "per_expert", "in_rank"), case.layout, layout_gpu):
        assert_same(f"layout.{name}", g, w)
    want = ref.dispatch(dispatch_request(as_bytes(case.x), case.x_scales, config, case.layout, case.topk_idx,
                                         case.topk_weights, expert_alignment=expert_alignment))
    xs = None if case.x_scales is None else case.x_scales.to(dev)
    got = kern.dispatch(dispatch_request(case.x.to(dev), xs, config, layout_gpu, case.topk_idx.to(dev),
                                         case.topk_weights.to(dev), expert_alignment=expert_alignment))
    torch.cuda.synchronize()
    for i, name in enumerate(("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights")):
        if want[i] is None:
            assert got[i] is None, name
        else:
            assert_same(name, got[i], want[i])
    assert got[4] == want[4], f"num_recv_tokens_per_expert_list {got[4]} != {want[4]}"
    gh, wh = got[5], want[5]
    assert isinstance(gh, InternodeHandle)
    assert_same("handle.recv_src_idx", gh.recv_src_idx, wh.recv_src_idx)
    column = wh.rank_prefix_matrix[:, kern.rank].to(torch.int64)
    counts = torch.cat([column[:1], column[1:] - column[:-1]])
    assert_same("handle.recv_src_rank", gh.recv_src_rank.to(torch.int64),
                  torch.repeat_interleave(torch.arange(R), counts))

    cached = kern.dispatch(dispatch_request(case.x.to(dev), xs, config, handle=gh, expert_alignment=expert_alignment))
    torch.cuda.synchronize()
    assert_same("cached recv_x", cached[0], got[0])
    if xs is not None:
        assert_same("cached recv_x_scales", cached[1], got[1])
    assert cached[5] is None

    rows = got[0].size(0)
    y = torch.randn(rows, case.x.size(1), generator=case.gen).to(torch.bfloat16)
    biases = [torch.randn(case.x.size(0), case.x.size(1), generator=case.gen).to(torch.bfloat16)
              for _ in range(num_bias)] + [None] * (2 - num_bias)
    w_in = got[3].cpu() if got[3] is not None else None
    want_c = ref.combine(CombineRequest(y, wh, config, w_in, *biases))
    magnitude = ref.combine(CombineRequest(y.float().abs(), wh, config)).combined_x
    got_c = kern.combine(CombineRequest(y.to(dev), gh, config, None if w_in is None else w_in.to(dev),
                                        *[None if b is None else b.to(dev) for b in biases]))
    torch.cuda.synchronize()
    _assert_combine_close("combine", got_c[0], want_c[0], magnitude)
    if want_c[1] is not None:
        torch.testing.assert_close(got_c[1].cpu(), want_c[1], rtol=1e-6, atol=1e-6)
    if case.x.size(1) % 128 == 0:
        # FP8 on both hops: half an e4m3 step (2**-4 of the value) of every copy, then of every node partial
        # (at most the sum of |copies| again); then BF16 rounding as above.
        got_8 = kern.combine(CombineRequest(y.to(dev), gh, config, None if w_in is None else w_in.to(dev),
                                            *[None if b is None else b.to(dev) for b in biases], use_fp8=True))
        torch.cuda.synchronize()
        g, w = got_8[0].cpu().float(), want_c[0].float()
        excess = (g - w).abs() - (magnitude.float() * 2 ** -3 + (w.abs() + magnitude.float()) * 2 ** -7 + 1e-3)
        assert not bool((excess > 0).any()), f"FP8 combine beyond its bound by {float(excess.max())}"
        if want_c[1] is not None:  # the weights travel as float32 either way
            torch.testing.assert_close(got_8[1].cpu(), want_c[1], rtol=1e-6, atol=1e-6)
    return got, got_c


def _buffer_bytes(num_ranks, per_node, num_sms, hidden_bytes=7168 * 2):
    dcfg, ccfg = default_dispatch_config(num_ranks, num_sms), default_combine_config(num_ranks, num_sms)
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in (dcfg, ccfg))
    rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, per_node) for c in (dcfg, ccfg))
    return dcfg, ccfg, nvl, rdma


def _correctness(rank, num_ranks, per_node):
    _nvshmem_env()
    device = set_rank_device(rank)
    num_sms = rank_num_sms(num_ranks)
    group = dist.group.WORLD
    ref = ReferenceBackend(rank, num_ranks, group, per_node)
    dcfg, ccfg, nvl, rdma = _buffer_bytes(num_ranks, per_node, num_sms)
    assert rdma > 0
    _progress(rank, "start")
    kern = internode.InternodeBackend(rank, num_ranks, per_node, nvl, rdma, gather, 30.0)
    assert kern.device == device
    _progress(rank, "buffer ready")

    for i, spec in enumerate(round_trip_cases(rank, num_ranks, 7, 3000)):
        case = Case(rank, num_ranks, i, per_node=per_node, **spec)
        for align, bias in ((1, 0), (128, 2)):
            _round_trip(kern, ref, case, dcfg, align, bias)
            _progress(rank, f"case {i} {spec} alignment {align} biases {bias} ok")

    # An RDMA buffer of a few rows per node: many rounds, same answers.
    small = internode.InternodeBackend(rank, num_ranks, per_node, nvl, 2 * (num_ranks // per_node) * 5 * 15 * 1024,
                                       gather, 30.0)
    case = Case(rank, num_ranks, 99, per_node=per_node,
                num_tokens=300 + 50 * rank, hidden=7168, num_experts=256, topk=8)
    _round_trip(small, ref, case, dcfg, 1, 1)
    case = Case(rank, num_ranks, 98, per_node=per_node, num_tokens=200, hidden=7168, num_experts=256, topk=8, fp8=True)
    _round_trip(small, ref, case, dcfg, 1, 0)
    small.destroy()
    _progress(rank, "small RDMA buffer ok")

    _repeat(rank, num_ranks, per_node, kern, ref, dcfg, ccfg)
    kern.check()
    kern.destroy()
    _progress(rank, "repeat ok")
    _public_api(rank, num_ranks, per_node, ref)
    _progress(rank, "public API ok")


def _repeat(rank, num_ranks, per_node, kern, ref, dcfg, ccfg):
    """Repeated round trips on one buffer: no drift, no device memory growth."""
    dev = kern.device
    case = Case(rank, num_ranks, 5, per_node=per_node, num_tokens=128 + rank, hidden=2048, num_experts=64, topk=4)
    _round_trip(kern, ref, case, dcfg)
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)

    def once():
        layout = intranode.get_dispatch_layout(idx, case.num_experts, num_ranks, per_node)
        recv = kern.dispatch(dispatch_request(x, None, dcfg, layout, idx, w))
        out = kern.combine(CombineRequest(recv.recv_x, recv.handle, ccfg, recv.recv_topk_weights))
        return recv.recv_x, out.combined_x

    check_repeats(once, 200, 50)


def _public_api(rank, num_ranks, per_node, ref):
    """Buffer routes CUDA tensors of a multi-node group to the internode kernels; with the default SM count
    (no set_num_sms), which the buffer fits to the ranks sharing the GPU."""
    dev = torch.device("cuda", torch.cuda.current_device())
    _, _, nvl, rdma = _buffer_bytes(num_ranks, per_node, Buffer.num_sms)
    buf = Buffer(dist.group.WORLD, nvl, rdma, num_ranks_per_node=per_node, explicitly_destroy=True, timeout_s=30.0)
    assert buf.backend == "cuda" and isinstance(buf._kernels, internode.InternodeBackend)
    case = Case(rank, num_ranks, 11, per_node=per_node, num_tokens=257 + 3 * rank, hidden=4096, num_experts=128, topk=8)
    idx, w, x = case.topk_idx.to(dev), case.topk_weights.to(dev), case.x.to(dev)
    per_rank, per_node_counts, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, case.num_experts)
    assert_same("num_tokens_per_rdma_rank", per_node_counts, case.layout[1])
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.internode_dispatch(
        x, None, per_rank, per_node_counts, in_rank, per_expert, idx, w)
    want = ref.dispatch(dispatch_request(case.x, None, buf.get_dispatch_config(num_ranks), case.layout,
                                         case.topk_idx, case.topk_weights))
    assert_same("Buffer recv_x", recv_x, want[0])
    assert_same("Buffer recv_topk_idx", recv_idx, want[2])
    assert counts == want[4]
    again = buf.dispatch(x, handle=handle)[0]
    assert_same("Buffer cached recv_x", again, recv_x)
    y = recv_x * 2
    combined, combined_w, _ = buf.internode_combine(y, handle, recv_w)
    ccfg = buf.get_combine_config(num_ranks)
    want_c = ref.combine(CombineRequest(y.cpu(), want.handle, ccfg, want.recv_topk_weights))
    magnitude = ref.combine(CombineRequest(y.cpu().float().abs(), want.handle, ccfg)).combined_x
    _assert_combine_close("Buffer combine", combined, want_c[0], magnitude)
    torch.testing.assert_close(combined_w.cpu(), want_c[1], rtol=1e-6, atol=1e-6)
    # float32 tokens run on the reference path; an internode handle does not serve it.
    with pytest.raises(ValueError, match="internode kernels"):
        buf.combine(y.float(), handle)
    # Bad input raises before any communication (every rank raises the same error): num_worst_tokens is
    # intranode only.
    with pytest.raises(ValueError, match="num_worst_tokens"):
        buf.dispatch(x, None, per_rank, per_node_counts, in_rank, per_expert, idx, w, num_worst_tokens=64)
    buf.destroy()


def _timeout(rank, num_ranks, per_node):
    _nvshmem_env()
    set_rank_device(rank)
    num_sms = rank_num_sms(num_ranks)
    dcfg, _, nvl, rdma = _buffer_bytes(num_ranks, per_node, num_sms, 2048 * 2)
    kern = internode.InternodeBackend(rank, num_ranks, per_node, nvl, rdma, gather, 2.0)
    dev = kern.device
    idx = torch.randint(0, 8 * num_ranks, (64, 2), device=dev)
    x = torch.randn(64, 2048, device=dev).to(torch.bfloat16)
    layout = intranode.get_dispatch_layout(idx, 8 * num_ranks, num_ranks, per_node)
    request = dispatch_request(x, None, dcfg, layout, idx)
    kern.dispatch(request)  # everyone present: fine
    torch.cuda.synchronize()
    dist.barrier()
    missing = num_ranks - 1
    if rank != missing:
        start = time.monotonic()
        # The missing rank's team waits for it over RDMA; its node waits for it over NVLink; every other
        # rank then waits for a rank that gave up. Every rank raises: its own timeout, naming a rank it waited
        # for, or (under MPS, where the first trap ends every process's kernels on the GPU) a CUDA error.
        expect_fault(lambda: kern.dispatch(request))
        assert time.monotonic() - start < 3 * 2.0 + 10
        with pytest.raises(RuntimeError):
            kern.dispatch(request)
    dist.barrier()
    synchronize_after_fault()
    kern.destroy()


def _ranks_disagree(rank, num_ranks, per_node, what):
    """Ranks whose calls differ are told so by the RDMA stage's comparison of every team member's call.

    ``hidden``: the last rank dispatches rows of another size. Its team finds out at the count exchange and
    raises at once, naming the field, both ranks and both values; the other ranks then wait for it in the
    NVLink stage and time out. ``operation``: node 0 runs a cached dispatch while node 1 combines: every team
    finds out at the round barrier (the combine side traps, so under MPS some ranks see only a CUDA error;
    the records of those that compared name the difference)."""
    _nvshmem_env()
    set_rank_device(rank)
    num_sms = rank_num_sms(num_ranks)
    dcfg, ccfg, nvl, rdma = _buffer_bytes(num_ranks, per_node, num_sms, 512 * 2)
    kern = internode.InternodeBackend(rank, num_ranks, per_node, nvl, rdma, gather, 5.0)
    dev, E, odd = kern.device, 8 * num_ranks, num_ranks - 1
    gen = torch.Generator().manual_seed(rank)
    idx = routing(64, E, 2, gen).to(dev)
    layout = intranode.get_dispatch_layout(idx, E, num_ranks, per_node)
    x = torch.randn(64, 256, generator=gen).to(torch.bfloat16).to(dev)
    recv = kern.dispatch(dispatch_request(x, None, dcfg, layout, idx))  # everyone agrees
    torch.cuda.synchronize()
    dist.barrier()
    start = time.monotonic()
    message = ""
    try:
        if what == "hidden":
            wide = torch.randn(64, 512 if rank == odd else 256, device=dev).to(torch.bfloat16)
            kern.dispatch(dispatch_request(wide, None, dcfg, layout, idx))
        elif rank // per_node == 0:
            kern.dispatch(dispatch_request(x, None, dcfg, handle=recv.handle))
        else:
            kern.combine(CombineRequest(recv.recv_x, recv.handle, ccfg))
        torch.cuda.synchronize()
    except RuntimeError as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: a call its peers did not match returned without an error")
    assert time.monotonic() - start < 30
    if "disagree" not in message:  # a CUDA error (a trap): the record, if this rank made one, has the text
        try:
            kern.check()
        except RuntimeError as e:
            message = str(e) if "disagree" in str(e) else message
    messages = gather(message)
    for r, text in enumerate(messages):
        assert text, f"rank {r} raised nothing"
        node = r // per_node
        if what == "hidden":
            if r % per_node != odd % per_node:
                continue  # not in the odd rank's team: it timed out waiting for a rank that raised
            mine, theirs = (1024, 512) if r == odd else (512, 1024)
            pattern = (rf"rank {r}: ranks disagree on the bytes per row in internode dispatch \(count exchange\): "
                       rf"rank {r} has {mine}, rank (\d+) \(node \d\) has {theirs}")
        else:
            if "disagree" not in text:
                continue
            op = "dispatch" if node == 0 else "combine"
            mine, theirs = (1, 2) if node == 0 else (2, 1)
            pattern = (rf"rank {r}: ranks disagree on the operation \(1 dispatch, 2 combine\) in internode {op} "
                       rf"\(round barrier\): rank {r} has {mine}, rank (\d+) \(node {1 - node}\) has {theirs}")
        found = re.search(pattern, text)
        assert found and int(found.group(1)) % per_node == r % per_node, (r, text)
    assert any("disagree" in m for m in messages), messages
    dist.barrier()
    synchronize_after_fault()
    kern.destroy(at_exit=True)  # after a failure no collective free: a peer's CUDA context may be gone


@pytest.mark.parametrize("what", ["hidden", "operation"])
def test_ranks_that_disagree_are_told(what):
    reason = _skip(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_ranks_disagree, 4, 2, what, timeout=120.0)


@pytest.mark.parametrize("num_ranks,per_node", [(4, 2), (8, 4)])
def test_internode_matches_reference(num_ranks, per_node):
    reason = _skip(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_correctness, num_ranks, per_node)


def test_internode_timeout_names_the_missing_rank():
    reason = _skip(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_timeout, 4, 2)
