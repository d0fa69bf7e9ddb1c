"""Intranode kernels against the reference backend, N = 2, 4, 8 ranks (one GPU under MPS, or N GPUs).

Every rank runs the same cases in lockstep: the kernels on its GPU, the reference backend on CPU
over the gloo group, then compares. Dispatch must be bit-exact; combine must match the reference's
float32 sum to BF16 rounding.
"""
import time

import pytest
import torch
import torch.distributed as dist

from harness import (as_bytes, assert_same, Case, check_repeats, dispatch_request, gather, rank_num_sms,
                     round_trip_cases, run_ranks, set_rank_device, skip_reason, synchronize_after_fault)
from moe_a2a.backends import intranode
from moe_a2a.backends.base import CombineRequest
from moe_a2a.backends.reference import ReferenceBackend
from moe_a2a.config import Config, combine_input_bytes, default_combine_config, default_dispatch_config

pytestmark = pytest.mark.gpu

#: Seconds a kernel waits on a peer: every wait here lasts milliseconds, so a missing peer fails the test
#: in seconds (with the rank, phase and counters in the error) instead of stalling it.
KERNEL_TIMEOUT_S = 10.0


def _round_trip(kern, ref, case, config, expert_alignment=1, num_worst_tokens=0, num_bias=0, check_layout=True):
    """Dispatch (plain and cached) and combine on both backends; assert they agree. Returns kernel outputs."""
    dev = kern.device
    layout_gpu = intranode.get_dispatch_layout(case.topk_idx.to(dev), case.num_experts, kern.num_ranks, kern.num_ranks)
    if check_layout:
        for name, w, g in zip(("per_rank", "per_node", "per_expert", "in_rank"), case.layout, layout_gpu):
            if w is not None:
                assert_same(f"layout.{name}", g, w)
    options = dict(expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens)
    want = ref.dispatch(dispatch_request(as_bytes(case.x), case.x_scales, config, case.layout, case.topk_idx,
                                         case.topk_weights, **options))
    xs = None if case.x_scales is None else case.x_scales.to(dev)
    got = kern.dispatch(dispatch_request(case.x.to(dev), xs, config, layout_gpu, case.topk_idx.to(dev),
                                         case.topk_weights.to(dev), **options))
    torch.cuda.synchronize()
    for i, name in enumerate(("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights")):
        if want[i] is None:
            assert got[i] is None, name
        else:
            assert_same(name, got[i], want[i])
    assert got[4] == want[4], f"num_recv_tokens_per_expert_list {got[4]} != {want[4]}"
    gh, wh = got[5], want[5]
    num_recv = wh.recv_src_idx.numel()
    for name in ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "is_token_in_rank",
                 "send_head"):
        assert_same(f"handle.{name}", getattr(gh, name), getattr(wh, name))
    assert_same("handle.recv_src_idx", gh.recv_src_idx[:num_recv], wh.recv_src_idx)
    if num_worst_tokens:
        assert (gh.recv_src_idx[num_recv:] == -1).all(), "padding of recv_src_idx must be -1"

    # Cached dispatch reuses the handle: same rows again.
    cached = kern.dispatch(dispatch_request(case.x.to(dev), xs, config, handle=gh, **options))
    torch.cuda.synchronize()
    assert_same("cached recv_x", cached[0], got[0])
    if case.x_scales is not None:
        assert_same("cached recv_x_scales", cached[1], got[1])
    _in_buffer_dispatch(kern, case, layout_gpu, got, expert_alignment, num_worst_tokens, config)

    # Combine BF16 rows derived from what arrived, with the received weights and 0-2 biases.
    rows = got[0].size(0)
    y = torch.randn(rows, case.x.size(1), generator=case.gen).to(torch.bfloat16)
    biases = [torch.randn(case.x.size(0), case.x.size(1), generator=case.gen).to(torch.bfloat16)
              for _ in range(num_bias)] + [None] * (2 - num_bias)
    w_in = got[3].cpu() if got[3] is not None else None
    want_c = ref.combine(CombineRequest(y, wh, config, w_in, *biases))
    got_c = kern.combine(CombineRequest(y.to(dev), gh, config, None if w_in is None else w_in.to(dev),
                                        *[None if b is None else b.to(dev) for b in biases]))
    torch.cuda.synchronize()
    gx, wx = got_c[0].cpu().float(), want_c[0].float()
    assert gx.shape == wx.shape
    # Same float32 sum in the same order, rounded once: at most one BF16 rounding step apart.
    tol = wx.abs() * 2 ** -7 + 1e-6
    assert ((gx - wx).abs() <= tol).all(), f"combine differs: max |diff| {(gx - wx).abs().max().item()}"
    if want_c[1] is not None:
        torch.testing.assert_close(got_c[1].cpu(), want_c[1], rtol=1e-6, atol=1e-6)
    _zero_copy_combine(kern, gh, y.to(dev), None if w_in is None else w_in.to(dev),
                       [None if b is None else b.to(dev) for b in biases], config, got_c)
    _fp8_combine(kern, ref, gh, wh, y, w_in, biases, config, got_c)
    return got, got_c


def _fp8_combine(kern, ref, gh, wh, y, w_in, biases, config, want):
    """``use_fp8``: kernels and reference each within half an e4m3 step per copy (2**-4 of its value, 2**-17 of
    its 128-channel block's largest below e4m3's normals) of the BF16 combine ``want``, plus BF16 rounding.
    The zero-copy input gives the same bits, once: it is encoded in place, so combining it again is refused
    (on every rank alike, as the view check runs before any communication)."""
    if y.size(1) % 128:
        return
    dev = kern.device
    w_dev = None if w_in is None else w_in.to(dev)
    b_dev = [None if b is None else b.to(dev) for b in biases]
    got = kern.combine(CombineRequest(y.to(dev), gh, config, w_dev, *b_dev, use_fp8=True))
    ref8 = ref.combine(CombineRequest(y, wh, config, w_in, *biases, use_fp8=True))
    mag = ref.combine(CombineRequest(y.abs(), wh, config)).combined_x.float()
    block_max = y.abs().float().unflatten(1, (-1, 128)).amax(2, keepdim=True).expand(-1, -1, 128).flatten(1)
    block = ref.combine(CombineRequest(block_max.bfloat16(), wh, config)).combined_x.float()
    torch.cuda.synchronize()
    base = want[0].cpu().float()
    bound = 2 ** -4 * mag + 2 ** -17 * block + base.abs() * 2 ** -7 + 1e-6
    for name, out in (("kernels", got[0]), ("reference", ref8[0])):
        excess = (out.cpu().float() - base).abs() - bound
        assert bool((excess <= 0).all()), f"FP8 combine ({name}) beyond its bound by {float(excess.max())}"
    if want[1] is not None:  # the weights travel as float32 either way
        assert_same("FP8 combine's weights", got[1], want[1])
    rows, hidden = y.shape
    num_topk = w_in.size(1) if w_in is not None else 0
    if all(gather(combine_input_bytes(rows, hidden * 2, num_topk) <= kern.num_nvl_bytes)):
        view = kern.get_next_combine_buffer(gh, hidden)
        view.copy_(y.to(dev))
        again = kern.combine(CombineRequest(view, gh, config, w_dev, *b_dev, use_fp8=True))
        torch.cuda.synchronize()
        assert_same("zero-copy FP8 combine", again[0], got[0])
        with pytest.raises(ValueError, match="get_next_combine_buffer"):
            kern.combine(CombineRequest(view, gh, config, w_dev, *b_dev, use_fp8=True))


def _in_buffer_dispatch(kern, case, layout_gpu, want, expert_alignment, num_worst_tokens, config):
    """Rows written by their senders into the receivers' buffers (plain, then cached dispatch): bit for bit
    the pulled outputs ``want``, as a view of the buffer where every rank's rows fit its receive area, as an
    ordinary tensor on every rank otherwise."""
    dev = kern.device
    x = case.x.to(dev)
    scales = None if case.x_scales is None else case.x_scales.to(dev)
    num_scales = 0 if scales is None else scales.size(1)
    rows = want[0].size(0)
    base = kern.get_local_buffer_tensor(torch.uint8).data_ptr()
    fits = all(gather(rows <= kern.dispatch_receive_rows(x.size(1) * x.element_size(), num_scales,
                                                         case.topk_idx.size(1))))
    options = dict(expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, recv_x_in_buffer=True)
    got = kern.dispatch(dispatch_request(x, scales, config, layout_gpu, case.topk_idx.to(dev),
                                         case.topk_weights.to(dev), **options))
    torch.cuda.synchronize()
    assert rows == 0 or (got[0].data_ptr() == base) == fits, f"in-buffer recv_x: view {fits} expected"
    for i, name in enumerate(("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights")):
        if want[i] is not None:
            assert_same(f"in-buffer {name}", got[i], want[i])
    assert_same("in-buffer handle.recv_src_idx", got[5].recv_src_idx, want[5].recv_src_idx)
    cached = kern.dispatch(dispatch_request(x, scales, config, handle=want[5], **options))
    torch.cuda.synchronize()
    assert_same("in-buffer cached recv_x", cached[0], want[0])
    if scales is not None:
        assert_same("in-buffer cached recv_x_scales", cached[1], want[1])


def _zero_copy_combine(kern, handle, y, weights, biases, config, want):
    """``y`` written into the buffer's combine input, combined twice: bit for bit ``want`` both times.

    A rank whose rows do not fit its buffer combines ``y`` as an ordinary input (ranks may mix both).
    """
    rows, hidden = y.shape
    num_topk = weights.size(1) if weights is not None else 0
    x = y
    if combine_input_bytes(rows, hidden * 2, num_topk) <= kern.num_nvl_bytes:
        x = kern.get_next_combine_buffer(handle, hidden)
        x.copy_(y)
    elif combine_input_bytes(rows, hidden * 2) > kern.num_nvl_bytes:
        with pytest.raises(ValueError, match=f"needs num_nvl_bytes >= {combine_input_bytes(rows, hidden * 2)}"):
            kern.get_next_combine_buffer(handle, hidden)
    for repeat in range(2):  # the second combine reads the same input again, nothing rewritten
        got = kern.combine(CombineRequest(x, handle, config, weights, *biases))
        torch.cuda.synchronize()
        assert_same(f"zero-copy combine {repeat}", got[0], want[0])
        if want[1] is not None:
            assert_same(f"zero-copy combined weights {repeat}", got[1], want[1])


def _correctness(rank, num_ranks):
    device = set_rank_device(rank)
    num_sms = rank_num_sms(num_ranks)
    group = dist.group.WORLD
    ref = ReferenceBackend(rank, num_ranks, group, num_ranks)
    dcfg = default_dispatch_config(num_ranks, num_sms)
    ccfg = default_combine_config(num_ranks, num_sms)
    nvl = max(dcfg.get_nvl_buffer_size_hint(7168 * 2, num_ranks), ccfg.get_nvl_buffer_size_hint(7168 * 2, num_ranks))
    kern = intranode.IntranodeBackend(rank, num_ranks, group, nvl, gather, KERNEL_TIMEOUT_S)
    assert kern.device == device

    # Dispatch pulls through registers or, from bulk_min_rows received rows on, with bulk copies through
    # shared memory: the middle configuration of every case takes the bulk path whatever its size. The last
    # one has the kernels stage their inputs instead of the copy engine. Combines run with the default
    # schedule (pipelined in token windows), then with one barrier (the copy engine staging), then in 3
    # windows.
    default_windows = kern.combine_windows
    assert default_windows > 0
    for i, spec in enumerate(round_trip_cases(rank, num_ranks, 7, 4096)):
        case = Case(rank, num_ranks, i, **spec)
        for j, (align, worst, bias) in enumerate(((1, 0, 0), (128, 0, 1), (4, 4200 * num_ranks, 2))):
            kern.set_bulk_min_rows(0 if j == 1 else intranode.BULK_MIN_ROWS)
            kern.set_copy_engine_staging(j != 2)
            kern.set_combine_windows((default_windows, 0, 3)[j])
            _round_trip(kern, ref, case, dcfg, align, worst, bias)
    kern.set_copy_engine_staging(True)
    kern.set_combine_windows(default_windows)
    # Default settings on 8 SMs, fewer than COMBINE_WINDOWS_MIN_SMS: the combine stages with the copy engine
    # and meets the peers once, whatever the window setting.
    assert 8 < intranode.COMBINE_WINDOWS_MIN_SMS
    case = Case(rank, num_ranks, 97, num_tokens=1000 + 100 * rank, hidden=7168, num_experts=256, topk=8)
    _round_trip(kern, ref, case, default_dispatch_config(num_ranks, 8), 1, 0, 1)
    with pytest.raises(ValueError):
        kern.set_bulk_min_rows(-1)
    for bad in (-1, intranode.MAX_COMBINE_WINDOWS + 1, 2.0):
        with pytest.raises(ValueError, match="combine windows"):
            kern.set_combine_windows(bad)
    assert kern.combine_windows == default_windows

    # A buffer that holds a few tokens per round: many rounds, same answers (bulk pull, then registers).
    small = intranode.IntranodeBackend(rank, num_ranks, group, 64 * 14336 * num_ranks // 4, gather,
                                       KERNEL_TIMEOUT_S)
    small.set_bulk_min_rows(0)
    case = Case(rank, num_ranks, 99, num_tokens=300 + 50 * rank, hidden=7168, num_experts=256, topk=8)
    _round_trip(small, ref, case, dcfg, 1, 0, 1)
    small.set_bulk_min_rows(1 << 30)
    small.set_combine_windows(8)  # more tokens than one round holds: the combine runs in rounds regardless
    case = Case(rank, num_ranks, 98, num_tokens=200, hidden=7168, num_experts=256, topk=8, fp8=True)
    _round_trip(small, ref, case, dcfg, 1, 1000 * num_ranks, 0)
    small.destroy()

    _zero_copy_race(rank, num_ranks, kern, dcfg, ccfg)
    kern.set_combine_windows(0)  # zero-copy inputs with one barrier
    _zero_copy_race(rank, num_ranks, kern, dcfg, ccfg, iterations=20)
    kern.set_combine_windows(default_windows)
    kern.set_bulk_min_rows(0)  # the bulk pull under 1000 repeats and CUDA graph replay
    _repeat_and_graph(rank, num_ranks, kern, ref, dcfg, ccfg)
    kern.destroy()


def _zero_copy_race(rank, num_ranks, kern, dcfg, ccfg, iterations=60):
    """Zero-copy combines back to back with a new input each time, some after a cached dispatch.

    Rank 0 sends many tokens and the others few, so in a combine rank 0 pulls far longer than its peers,
    which finish first and write their next input at once: over rows rank 0 may still be pulling unless
    get_next_combine_buffer waits for it. Inputs are ``y`` times powers of two, so every result is
    exactly the first one scaled, and any torn read shows. With 2, 4 and 8 ranks some ranks receive no
    rows: their views are empty, and the stale-view check at the end must raise on them as on the others
    (the combine is collective: a rank that communicated where its peers raised would wait for them).
    """
    dev = kern.device
    case = Case(rank, num_ranks, 21, num_tokens=2048 if rank == 0 else 64, hidden=7168, num_experts=256, topk=8)
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)
    layout = intranode.get_dispatch_layout(idx, case.num_experts, num_ranks, num_ranks)
    recv = kern.dispatch(dispatch_request(x, None, dcfg, layout, idx, w))
    handle, recv_w = recv.handle, recv.recv_topk_weights
    cached = dispatch_request(x, None, dcfg, handle=handle)
    y = torch.randn(recv.recv_x.shape, generator=case.gen).to(torch.bfloat16).to(dev)
    base, base_w, _ = kern.combine(CombineRequest(y, handle, ccfg, recv_w))
    bad = torch.zeros((), dtype=torch.int64, device=dev)
    for it in range(iterations):
        if it % 4 == 3:  # dispatch, then a zero-copy combine over the rows it staged
            again = kern.dispatch(cached)
            bad += (again.recv_x != recv.recv_x).sum()
        scale = 2.0 ** (it % 7 - 3)
        view = kern.get_next_combine_buffer(handle, y.size(1))
        torch.mul(y, scale, out=view)
        out, out_w, _ = kern.combine(CombineRequest(view, handle, ccfg, recv_w))
        bad += (out != (base.float() * scale).to(torch.bfloat16)).sum() + (out_w != base_w).sum()
        # A rank still runs ahead of its peers by up to one operation; the host only stops queueing
        # operations on an error (each queued barrier would wait out the timeout on its own).
        torch.cuda.synchronize()
        kern.check()
    assert int(bad) == 0, f"{int(bad)} values differ in zero-copy combines back to back"
    # A dispatch overwrote the input: the stale view is refused.
    view = kern.get_next_combine_buffer(handle, y.size(1))
    kern.dispatch(cached)
    with pytest.raises(ValueError, match="overwrote it"):
        kern.combine(CombineRequest(view, handle, ccfg, recv_w))
    kern.check()


def _repeat_and_graph(rank, num_ranks, kern, ref, dcfg, ccfg):
    """1000 round trips on the same buffer (no drift, no leak), then CUDA-graph capture of num_worst_tokens."""
    dev = kern.device
    case = Case(rank, num_ranks, 5, num_tokens=128 + rank, hidden=2048, num_experts=64, topk=4)
    _round_trip(kern, ref, case, dcfg, 1, 0, 0)
    x, idx, w = case.x.to(dev), case.topk_idx.to(dev), case.topk_weights.to(dev)

    def eager():
        layout = intranode.get_dispatch_layout(idx, case.num_experts, num_ranks, num_ranks)
        recv = kern.dispatch(dispatch_request(x, None, dcfg, layout, idx, w))
        out = kern.combine(CombineRequest(recv.recv_x, recv.handle, ccfg, recv.recv_topk_weights))
        return recv.recv_x, out.combined_x

    check_repeats(eager, 1000, 250)

    # CUDA graph: layout + dispatch(num_worst_tokens) + combine captured once, replayed on new data.
    worst = 160 * num_ranks
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream())

    def step():
        layout = intranode.get_dispatch_layout(idx, case.num_experts, num_ranks, num_ranks)
        recv = kern.dispatch(dispatch_request(x, None, dcfg, layout, idx, w, num_worst_tokens=worst))
        out = kern.combine(CombineRequest(recv.recv_x, recv.handle, ccfg, recv.recv_topk_weights))
        return recv, out

    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv, out = step()
    for it in range(3):
        new = Case(rank, num_ranks, 50 + it, num_tokens=128 + rank, hidden=2048, num_experts=64, topk=4)
        x.copy_(new.x)
        idx.copy_(new.topk_idx)
        w.copy_(new.topk_weights)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.dispatch(dispatch_request(new.x, None, dcfg, new.layout, new.topk_idx, new.topk_weights,
                                             num_worst_tokens=worst))
        assert_same(f"graph replay {it} recv_x", recv[0], want[0])
        assert_same(f"graph replay {it} recv_topk_idx", recv[2], want[2])
        want_c = ref.combine(CombineRequest(want.recv_x, want.handle, ccfg, want.recv_topk_weights))
        gx, wx = out[0].cpu().float(), want_c[0].float()
        assert ((gx - wx).abs() <= wx.abs() * 2 ** -7 + 1e-6).all(), f"graph replay {it} combine differs"
    del graph
    kern.check()


# Int offsets of the header before every rank's staging area (csrc/kernels/api.cuh, namespace hdr) that hold
# barrier epochs, and its size in bytes.
HDR_EPOCHS = ((0, 8), (8, 1), (600, 8), (760, 32))  # kSignal[8], kEpoch, kPeerDone[8], kWindowReady[32]
HDR_EPOCH, HDR_BYTES = 8, 32768


class _DeviceInts:
    """Raw device memory as an int32 tensor (through the CUDA array interface, no copy)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "<i4", "data": (ptr, False), "version": 2}


def _counters_wrap(rank, num_ranks):
    """Barrier epochs are 32-bit counters that wrap: started just below INT_MAX on every rank, round trips across
    the wrap still equal the reference's (with a signed comparison a wait ends early or never)."""
    set_rank_device(rank)
    group = dist.group.WORLD
    ref = ReferenceBackend(rank, num_ranks, group, num_ranks)
    dcfg = default_dispatch_config(num_ranks, rank_num_sms(num_ranks))
    ccfg = default_combine_config(num_ranks, rank_num_sms(num_ranks))
    nvl = max(dcfg.get_nvl_buffer_size_hint(2048 * 2, num_ranks), ccfg.get_nvl_buffer_size_hint(2048 * 2, num_ranks))
    kern = intranode.IntranodeBackend(rank, num_ranks, group, nvl, gather, KERNEL_TIMEOUT_S)
    header = torch.as_tensor(_DeviceInts(kern.runtime.local_buffer(0).data_ptr() - HDR_BYTES, HDR_BYTES // 4),
                             device=kern.device)
    for offset, n in HDR_EPOCHS:
        header[offset:offset + n] = 2 ** 31 - 3
    torch.cuda.synchronize()
    dist.barrier()
    for i in range(6):
        case = Case(rank, num_ranks, 70 + i, num_tokens=100 + 7 * rank, hidden=2048, num_experts=32, topk=4)
        _round_trip(kern, ref, case, dcfg)
    assert header[HDR_EPOCH].item() < 0, "the epochs did not pass INT_MAX: the test proves nothing"
    kern.check()
    dist.barrier()
    kern.destroy()


def _timeout(rank, num_ranks):
    set_rank_device(rank)
    group = dist.group.WORLD
    cfg = Config(rank_num_sms(num_ranks))
    kern = intranode.IntranodeBackend(rank, num_ranks, group, cfg.get_nvl_buffer_size_hint(4096, num_ranks), gather,
                                      2.0)
    dev = kern.device
    idx = torch.randint(0, 8 * num_ranks, (64, 2), device=dev)
    x = torch.randn(64, 2048, device=dev).to(torch.bfloat16)
    layout = intranode.get_dispatch_layout(idx, 8 * num_ranks, num_ranks, num_ranks)
    request = dispatch_request(x, None, cfg, layout, idx)
    kern.dispatch(request)  # everyone present: fine
    torch.cuda.synchronize()
    dist.barrier()
    if rank != num_ranks - 1:  # the last rank skips the call
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=rf"timed out .* waiting for rank {num_ranks - 1}"):
            kern.dispatch(request)
        assert time.monotonic() - start < 2.0 * 2 + 10
        with pytest.raises(RuntimeError, match="cannot be used again"):
            kern.dispatch(request)
    dist.barrier()
    synchronize_after_fault()
    kern.destroy()


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_intranode_matches_reference(num_ranks):
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_correctness, num_ranks)


def test_intranode_counters_wrap():
    reason = skip_reason(2)
    if reason:
        pytest.skip(reason)
    run_ranks(_counters_wrap, 2)


def test_intranode_timeout_names_the_missing_rank():
    reason = skip_reason(2)
    if reason:
        pytest.skip(reason)
    run_ranks(_timeout, 2)
