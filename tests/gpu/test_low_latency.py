"""Low-latency kernels against the reference backend, N = 2, 4, 8 ranks (one GPU under MPS, or N GPUs).

Every rank runs the same cases in lockstep: the kernels on its GPU, ``ReferenceLowLatency`` on CPU over
the gloo group, then compares. Received token sets per expert are compared through the handles' source
info; BF16 rows and scales must be exact, FP8 values within one e4m3 step; combine within BF16 rounding
of a float32 weighted sum. Then hook mode, CUDA graph replay, 10,000 alternating calls, a timeout, and ranks
whose calls differ (each told which field differs and both values, without waiting for the timeout).
"""
import re
import time

import pytest
import torch
import torch.distributed as dist

from harness import expect_fault, gather, run_ranks, set_rank_device, skip_reason, synchronize_after_fault
from moe_a2a.backends import low_latency
from moe_a2a.backends.base import LowLatencyCombineRequest, LowLatencyDispatchRequest
from moe_a2a.backends.reference_low_latency import ReferenceLowLatency
from moe_a2a.config import get_low_latency_rdma_size_hint
from moe_a2a.fp8 import fp8_to_float, unpack_ue8m0
from moe_a2a.handles import unpack_layout_range

pytestmark = pytest.mark.gpu

MODES = {"bf16": (False, False, False), "fp8": (True, False, False), "fp8_round": (True, True, False),
         "ue8m0": (True, True, True)}


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _backend(rank, num_ranks, num_max, hidden, num_experts, timeout_s=10.0):
    num_bytes = get_low_latency_rdma_size_hint(num_max, hidden, num_ranks, num_experts)
    return low_latency.LowLatencyBackend(rank, num_ranks, dist.group.WORLD, num_bytes, _gather, timeout_s)


def _routing(num_tokens, num_experts, topk, gen):
    """Top-k ids without repeats, skewed toward low experts, with -1 slots."""
    scores = torch.rand(num_tokens, num_experts, generator=gen) + torch.linspace(1.0, 0.0, num_experts)
    idx = scores.topk(topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < 0.15] = -1
    return idx


def _inputs(rank, seed, num_tokens, hidden, num_experts, topk):
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    return x, _routing(num_tokens, num_experts, topk, gen), torch.rand(num_tokens, topk, generator=gen)


def _slot_sources(layout_range, recv_count, num_ranks):
    """Per local expert: the source rank of each valid slot, from ``layout_range``."""
    begin, count = unpack_layout_range(layout_range.cpu())
    out = []
    for l in range(layout_range.size(0)):
        ranks = torch.repeat_interleave(torch.arange(num_ranks), count[l])
        assert int(begin[l, 0]) == 0 and torch.equal(begin[l, 1:], count[l].cumsum(0)[:-1])
        assert ranks.numel() == int(recv_count[l])
        out.append(ranks)
    return out


def _check_dispatch(name, got, want, num_ranks, num_max, mode):
    """Received sets per expert equal (through source info), rows exact (BF16) or within FP8 rounding."""
    use_fp8, _, ue8m0 = MODES[mode]
    g_x, g_s, g_count, g_h = got
    w_x, w_s, w_count, w_h = want
    assert torch.equal(g_count.cpu(), w_count), f"{name}: recv_count {g_count.tolist()} != {w_count.tolist()}"
    g_src, w_src = _slot_sources(g_h.layout_range, g_count, num_ranks), _slot_sources(w_h.layout_range, w_count,
                                                                                       num_ranks)
    g_info = g_h.src_info.cpu()
    g_x = g_x.cpu()
    g_s = g_s.cpu() if g_s is not None else None
    mismatched, total = 0, 0
    for l in range(w_count.numel()):
        n = int(w_count[l])
        assert bool((g_info[l, n:] == -1).all()), f"{name}: unused src_info slots of expert {l} are not -1"
        g_key = g_src[l].long() * num_max + g_info[l, :n].long()
        w_key = w_src[l].long() * num_max + w_h.src_info[l, :n].long()
        go, wo = torch.argsort(g_key), torch.argsort(w_key)
        assert torch.equal(g_key[go], w_key[wo]), f"{name}: expert {l} received a different token set"
        if not use_fp8:
            assert torch.equal(g_x[l, :n][go], w_x[l, :n][wo]), f"{name}: expert {l} rows differ"
            continue
        gs, ws = g_s[l, :n][go], w_s[l, :n][wo]
        if ue8m0:
            assert torch.equal(gs, ws), f"{name}: expert {l} UE8M0 scales differ"
            gs, ws = unpack_ue8m0(gs), unpack_ue8m0(ws)
        # amax / 448 may be rounded differently by a reciprocal multiply: allow a few float32 ulps.
        torch.testing.assert_close(gs, ws, rtol=2 ** -21, atol=0, msg=f"{name}: expert {l} scales differ")
        gq, wq = g_x[l, :n][go], w_x[l, :n][wo]
        gd, wd = fp8_to_float(gq, gs), fp8_to_float(wq, ws)
        full = ws.repeat_interleave(128, dim=1)
        # One e4m3 step: 2^-3 relative for normals, 2^-9 * scale for subnormals.
        assert bool(((gd - wd).abs() <= wd.abs() * 2 ** -3 + full * 2 ** -9).all()), f"{name}: expert {l} FP8 values"
        mismatched += int((gq.view(torch.uint8) != wq.view(torch.uint8)).sum())
        total += gq.numel()
    assert mismatched <= max(1, total // 1000), f"{name}: {mismatched} of {total} FP8 bytes differ"


def _expert_outputs(handle, recv_count, all_x, rank, num_ranks, hidden):
    """Each expert returns its input times (global expert id + 1), in BF16, placed by the handle."""
    L = recv_count.numel()
    y = torch.zeros(L, handle.src_info.size(1), hidden, dtype=torch.bfloat16)
    srcs = _slot_sources(handle.layout_range, recv_count, num_ranks)
    info = handle.src_info.cpu()
    for l in range(L):
        n = int(recv_count[l])
        rows = torch.stack([all_x[int(s)][int(t)] for s, t in zip(srcs[l], info[l, :n])]) if n else None
        if n:
            y[l, :n] = (rows.float() * (rank * L + l + 1)).bfloat16()
    return y


def _want_combine(x, topk_idx, topk_weights):
    """Float32 weighted sum of BF16 expert outputs, and the sum of magnitudes (for the error bound)."""
    want = torch.zeros(x.shape)
    mag = torch.zeros(x.shape)
    for k in range(topk_idx.size(1)):
        e = topk_idx[:, k]
        y = (x.float() * (e.clamp(min=0) + 1).float().unsqueeze(1)).bfloat16().float()
        term = topk_weights[:, k].unsqueeze(1) * y * (e >= 0).float().unsqueeze(1)
        want += term
        mag += term.abs()
    return want, mag


def _check_combine(name, got, want, mag):
    got = got.cpu().float()
    bound = want.abs() * 2 ** -8 + mag * 1e-6 + 1e-6
    bad = (got - want).abs() > bound
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} combined values beyond BF16 rounding"


#: Per copy error of a combine wire format: (relative to the value, relative to its block's largest value,
#: block size). LogFMT: 1.1% within a group's 16-octave span, values below it flush (2**-16 of the group's
#: largest); FP8 e4m3: half a step, 2**-4 of the value, or 2**-9 / 448 of the block's amax below e4m3's normals.
FORMAT_ERROR = {"logfmt": (0.011, 2.0 ** -16, 64), "fp8": (2.0 ** -4, 2.0 ** -17, 128)}


def _check_format_combine(name, wire_format, got, x, topk_idx, topk_weights):
    """A combine whose rows travelled in ``wire_format``, against the float32 sum of the BF16 copies: within
    the format's error per copy, plus BF16 rounding of the result."""
    relative, of_block, block = FORMAT_ERROR[wire_format]
    want, mag = _want_combine(x, topk_idx, topk_weights)
    block_mag = torch.zeros(x.shape)
    for k in range(topk_idx.size(1)):
        e = topk_idx[:, k]
        y = (x.float() * (e.clamp(min=0) + 1).float().unsqueeze(1)).bfloat16().float().abs()
        top = y.unflatten(1, (-1, block)).amax(2, keepdim=True).expand(-1, -1, block).flatten(1)
        block_mag += topk_weights[:, k].unsqueeze(1) * top * (e >= 0).float().unsqueeze(1)
    got = got.cpu().float()
    bound = relative * mag + of_block * block_mag + want.abs() * 2 ** -8 + 1e-6
    bad = (got - want).abs() > bound
    assert not bool(bad.any()), (f"{name}, {wire_format} combine: {int(bad.sum())} values beyond the format's "
                                 f"bound, worst excess {float(((got - want).abs() - bound).max())}")


def _round_trip(kern, ref, rank, num_ranks, name, seed, num_max, num_tokens, hidden, num_experts, topk, mode,
                hook, zero_copy, use_out, formats=()):
    """Dispatch and BF16 combine against the reference, then one combine per wire format in ``formats``
    ("fp8", "logfmt") on the same handle, kernels and reference both within the format's bound."""
    dev = kern.device
    use_fp8, round_scale, ue8m0 = MODES[mode]
    L = num_experts // num_ranks
    x, idx, w = _inputs(rank, seed, num_tokens, hidden, num_experts, topk)
    all_x = _gather(x)
    cum = torch.zeros(L, dtype=torch.int32, device=dev)
    wait = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=dev)
    got = kern.dispatch(LowLatencyDispatchRequest(x.to(dev), idx.to(dev), num_max, num_experts, cum, wait, use_fp8,
                                                  round_scale, ue8m0, hook))
    if hook:
        assert got[4] is not None
        got[4]()
        with pytest.raises(RuntimeError, match="already called"):
            got[4]()
    else:
        assert got[4] is None
    want = ref.dispatch(LowLatencyDispatchRequest(x, idx, num_max, num_experts, use_fp8=use_fp8,
                                                  round_scale=round_scale, use_ue8m0=ue8m0))
    torch.cuda.synchronize()
    kern.raise_if_error()
    _check_dispatch(name, got[:4], want[:4], num_ranks, num_max, mode)
    assert torch.equal(cum.cpu(), want[2]), f"{name}: cumulative stats"
    wait_cpu = wait.cpu()
    assert bool((wait_cpu >= 0).all()) and not bool(wait_cpu[torch.arange(num_ranks) != rank].any())

    handle = got[3]
    y = _expert_outputs(handle, got[2].cpu(), all_x, rank, num_ranks, hidden)
    y_ref = _expert_outputs(want[3], want[2], all_x, rank, num_ranks, hidden)
    if zero_copy:
        y_dev = kern.get_next_combine_buffer(handle)
        y_dev.copy_(y)
    else:
        y_dev = y.to(dev)
    out = torch.full((num_tokens, hidden), float("nan"), dtype=torch.bfloat16, device=dev) if use_out else None
    cwait = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=dev)
    combined, chook = kern.combine(LowLatencyCombineRequest(y_dev, idx.to(dev), w.to(dev), handle, out, cwait, hook))
    if hook:
        chook()
    if use_out:
        assert combined.data_ptr() == out.data_ptr()
    want_c, _ = ref.combine(LowLatencyCombineRequest(y_ref, idx, w, want.handle))
    torch.cuda.synchronize()
    kern.raise_if_error()
    want32, mag = _want_combine(x, idx, w)
    _check_combine(f"{name} vs float32", combined, want32, mag)
    _check_combine(f"{name} reference vs float32", want_c, want32, mag)
    assert bool((cwait.cpu() >= 0).all())
    for wire_format in formats:
        if zero_copy:  # the next call's set: filled again (an encoded combine overwrites its input there)
            y_dev = kern.get_next_combine_buffer(handle)
            y_dev.copy_(y)
        got_f, fhook = kern.combine(LowLatencyCombineRequest(y_dev, idx.to(dev), w.to(dev), handle, None, None, hook,
                                                             wire_format))
        if hook:
            fhook()
        want_f, _ = ref.combine(LowLatencyCombineRequest(y_ref, idx, w, want.handle, wire_format=wire_format))
        torch.cuda.synchronize()
        kern.raise_if_error()
        _check_format_combine(name, wire_format, got_f, x, idx, w)
        _check_format_combine(f"{name} reference", wire_format, want_f, x, idx, w)


def _cases(num_ranks):
    """(num_max, hidden, num_experts, topk, mode, hook, zero_copy, out, combine formats) covering the issue's
    ranges; the formats run on the BF16 combine's handle (zero copy: encoded in place)."""
    return [
        (32, 2048, 8, 1, "bf16", False, False, False, ("fp8", "logfmt")),
        (32, 2048, 32, 4, "fp8", True, False, True, ()),
        (32, 4096, 64, 8, "fp8_round", False, True, False, ("logfmt",)),
        (32, 7168, 256, 8, "ue8m0", True, True, True, ("logfmt", "fp8")),
        (32, 7168, 288, 6, "bf16", False, True, True, ()),
        (8, 4096, 16, 2, "ue8m0", False, False, False, ()),
        (32, 2048, 288, 3, "fp8", True, True, False, ("fp8",)),
        (8, 7168, 8, 8, "fp8", False, False, True, ("logfmt",)),
        (32, 4096, 128, 5, "bf16", True, False, False, ()),
        (16, 2112, 16, 2, "bf16", False, True, False, ("logfmt",)),  # LogFMT groups, no whole FP8 block
    ]


def _correctness(rank, num_ranks):
    set_rank_device(rank)
    ref = ReferenceLowLatency(rank, num_ranks, dist.group.WORLD)
    kern = _backend(rank, num_ranks, 32, 7168, 288)
    assert get_low_latency_rdma_size_hint(32, 7168, num_ranks, 288) == \
        low_latency._C.LowLatencyRuntime.required_bytes(32, 7168, num_ranks, 288)
    _run_cases(kern, ref, rank, num_ranks)
    _graph(rank, num_ranks, kern, ref)
    _many_calls(rank, num_ranks, kern)
    _probes(rank, num_ranks, kern)
    dist.barrier()
    kern.clean()
    _round_trip(kern, ref, rank, num_ranks, "after clean", 999, 16, 16 - rank, 2048, 64, 4, "fp8", False, False, False)
    kern.destroy()


def _run_cases(kern, ref, rank, num_ranks):
    """Every shape case of ``_cases`` (random token counts, a rank with none, one with the maximum). More tokens
    than ``num_max_dispatch_tokens_per_rank`` are refused by ``Buffer`` (``tests/cpu/test_buffer.py``)."""
    for i, (num_max, hidden, num_experts, topk, mode, hook, zero_copy, use_out, formats) in \
            enumerate(_cases(num_ranks)):
        gen = torch.Generator().manual_seed(7 * i + rank)
        num_tokens = int(torch.randint(1, num_max + 1, (1,), generator=gen))
        if i == 2 and rank == 0:
            num_tokens = 0
        if i == 3 and rank == num_ranks - 1:
            num_tokens = num_max
        name = f"case {i} ({mode}, hidden {hidden}, {num_experts} experts, top-{topk}, rank {rank})"
        _round_trip(kern, ref, rank, num_ranks, name, 100 + i, num_max, num_tokens, hidden, num_experts, topk, mode,
                    hook, zero_copy, use_out, formats)


def _graph(rank, num_ranks, kern, ref):
    """Dispatch (hook inside) + expert + zero-copy combine captured once, replayed on new data."""
    dev = kern.device
    num_max, hidden, num_experts, topk = 16, 2048, 8 * num_ranks, 4
    L = num_experts // num_ranks
    x = torch.zeros(num_max, hidden, dtype=torch.bfloat16, device=dev)
    idx = torch.full((num_max, topk), -1, dtype=torch.int64, device=dev)
    w = torch.zeros(num_max, topk, device=dev)
    out = torch.zeros(num_max, hidden, dtype=torch.bfloat16, device=dev)
    mult = (torch.arange(L, device=dev) + rank * L + 1).float().view(L, 1, 1)

    def step():
        recv, _, count, handle, hook = kern.dispatch(LowLatencyDispatchRequest(x, idx, num_max, num_experts,
                                                                               use_fp8=False, return_recv_hook=True))
        hook()
        buf = kern.get_next_combine_buffer(handle)
        buf.copy_((recv.float() * mult).bfloat16())
        kern.combine(LowLatencyCombineRequest(buf, idx, w, handle, out))
        return count

    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        count = step()
    for it in range(4):
        nx, nidx, nw = _inputs(rank, 500 + it, num_max, hidden, num_experts, topk)
        x.copy_(nx)
        idx.copy_(nidx)
        w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        kern.raise_if_error()
        want = ref.dispatch(LowLatencyDispatchRequest(nx, nidx, num_max, num_experts, use_fp8=False))
        assert torch.equal(count.cpu(), want[2]), f"graph replay {it}: recv_count"
        want32, mag = _want_combine(nx, nidx, nw)
        _check_combine(f"graph replay {it}", out, want32, mag)
    del graph


def _many_calls(rank, num_ranks, kern, num_pairs=5000):
    """10,000 alternating calls (BF16 and FP8 dispatch, hook and plain), checked on the device each time."""
    dev = kern.device
    num_max, hidden, num_experts, topk = 16, 2048, 4 * num_ranks, 3
    x, idx, w = (t.to(dev) for t in _inputs(rank, 77, num_max - rank % 2, hidden, num_experts, topk))
    first = {}
    bad = torch.zeros((), dtype=torch.int64, device=dev)
    drift = torch.zeros((), dtype=torch.float32, device=dev)
    for i in range(num_pairs):
        use_fp8, hook = i % 2 == 1, i % 3 == 1
        recv_x, scales, count, handle, dhook = kern.dispatch(LowLatencyDispatchRequest(
            x, idx, num_max, num_experts, use_fp8=use_fp8, round_scale=use_fp8, return_recv_hook=hook))
        if dhook:
            dhook()
        if use_fp8 not in first:
            torch.cuda.synchronize()
            slots = torch.arange(recv_x.size(1), device=dev).view(1, -1)
            mask = (slots < count.view(-1, 1)).unsqueeze(2)
            first[use_fp8] = (recv_x.view(torch.uint8).clone(), count.clone(), mask)
            if not use_fp8:
                y = (recv_x.float() * 0.5).bfloat16() * mask
        ref_x, ref_count, mask = first[use_fp8]
        bad += (count != ref_count).sum() + ((recv_x.view(torch.uint8) != ref_x) & mask).sum()
        combined, chook = kern.combine(LowLatencyCombineRequest(y, idx, w, handle, return_recv_hook=hook))
        if chook:
            chook()
        if i == 0:
            first_out = combined.clone()
        drift = torch.maximum(drift, (combined.float() - first_out.float()).abs().max())
    torch.cuda.synchronize()
    kern.raise_if_error()
    assert int(bad) == 0, f"{int(bad)} dispatch values changed over {2 * num_pairs} calls"
    assert float(drift) == 0.0, f"combine drifted by {float(drift)} over {2 * num_pairs} calls"


def _probes(rank, num_ranks, kern):
    """The benchmark's probes: an empty kernel, and flag round trips between ranks 0 and 1 (twice, so the
    second run starts from the first one's flag values)."""
    kern.empty_kernel()
    dist.barrier()
    if rank < 2:
        for _ in range(2):
            ns = kern.flag_round_trip(1 - rank, 200, 20).cpu().tolist()
            assert ns[1] == 180 and ns[0] > 0, f"flag round trip returned {ns}"
    with pytest.raises(ValueError, match="peer"):
        kern.flag_round_trip(rank)
    torch.cuda.synchronize()
    kern.raise_if_error()
    dist.barrier()


def _timeout(rank, num_ranks):
    set_rank_device(rank)
    kern = _backend(rank, num_ranks, 8, 2048, 8 * num_ranks, timeout_s=1.0)
    dev = kern.device
    x = torch.randn(8, 2048, device=dev).to(torch.bfloat16)
    idx = torch.randint(0, 8 * num_ranks, (8, 1), device=dev)
    request = LowLatencyDispatchRequest(x, idx, 8, 8 * num_ranks)
    kern.dispatch(request)
    torch.cuda.synchronize()
    dist.barrier()
    missing = num_ranks - 1  # skips the call
    if rank != missing:
        start = time.monotonic()
        expect_fault(lambda: kern.dispatch(request))
        assert time.monotonic() - start < 10
    # The first rank to time out records it and traps; under MPS the trap ends the others' kernels too, so
    # some ranks may hold no record. Every record names the missing rank.
    records = gather(kern.error())
    assert any(records) and all(not r or f"waiting for rank {missing}" in r for r in records), records
    if rank != missing:
        match = rf"rank {rank} timed out .* dispatch receive .* cannot be used again" if records[rank] else None
        with pytest.raises(RuntimeError, match=match):
            kern.dispatch(request)
    dist.barrier()
    synchronize_after_fault()
    kern.destroy()


# What the last rank changes: the field the error names, the operation, the others' value and its own.
DISAGREEMENTS = {"hidden": ("hidden size", "dispatch", 256, 512),
                 "fp8": ("wire format", "dispatch", "BF16 dispatch", "FP8 dispatch"),
                 "tokens_per_rank": ("tokens per rank", "dispatch", 8, 16),
                 "experts": ("number of experts", "dispatch", "8R", "16R"),
                 "combine_hidden": ("hidden size", "combine", 256, 512)}


def _disagree(rank, num_ranks, kern, what, within_s=15.0):
    """The last rank's call differs from the others' (``what``, see ``DISAGREEMENTS``): every rank that compares
    with it records the difference, naming the field, both ranks and both values, and stops instead of copying
    rows of another shape; all within ``within_s`` seconds. ``kern``'s buffer fits hidden 512, 16 tokens per
    rank and 16 experts per rank."""
    field, operation, value, odd_value = DISAGREEMENTS[what]
    if what == "experts":
        value, odd_value = 8 * num_ranks, 16 * num_ranks
    odd, dev, E = num_ranks - 1, kern.device, 8 * num_ranks
    gen = torch.Generator().manual_seed(rank)
    idx = _routing(8, E, 2, gen).to(dev)
    x = torch.randn(8, 256, generator=gen).to(torch.bfloat16).to(dev)
    recv_x, _, _, handle, _ = kern.dispatch(LowLatencyDispatchRequest(x, idx, 8, E, use_fp8=False))  # all agree
    torch.cuda.synchronize()
    kern.raise_if_error()
    dist.barrier()
    start = time.monotonic()
    if what == "combine_hidden":
        y = torch.zeros(recv_x.shape, dtype=torch.bfloat16, device=dev)
        if rank == odd:
            handle = handle._replace(hidden=512)
            y = torch.zeros(*recv_x.shape[:2], 512, dtype=torch.bfloat16, device=dev)
        w = torch.rand(idx.shape, generator=gen).to(dev)
        expect_fault(lambda: kern.combine(LowLatencyCombineRequest(y, idx, w, handle)))
    else:
        odd_call = rank == odd
        hidden = 512 if what == "hidden" and odd_call else 256
        num_max = 16 if what == "tokens_per_rank" and odd_call else 8
        num_experts = 2 * E if what == "experts" and odd_call else E
        use_fp8 = what == "fp8" and odd_call
        xs = torch.randn(8, hidden, generator=gen).to(torch.bfloat16).to(dev)
        expect_fault(lambda: kern.dispatch(LowLatencyDispatchRequest(xs, idx, num_max, num_experts, use_fp8=use_fp8)))
    assert time.monotonic() - start < within_s, "a mismatch must stop the kernel"
    # The first rank to see the difference records it and traps; under MPS that trap ends the other ranks'
    # kernels too, so some ranks may hold no record. Each record names both ranks and both values.
    records = gather(kern.error())
    assert any(records), records
    for r, text in enumerate(records):
        if not text:
            continue
        found = re.search(rf"rank {r} and rank (\d+) disagree on the {re.escape(field)}[^:]* of low-latency "
                          rf"{operation} \(call 1, buffer set 1\): rank {r} has (.+), rank (\d+) has (.+) \(every",
                          text)
        assert found, (r, text)
        peer = int(found.group(1))
        assert peer == int(found.group(3)) and (r == odd) != (peer == odd), (r, text)
        want = (odd_value, value) if r == odd else (value, odd_value)
        assert (found.group(2), found.group(4)) == tuple(map(str, want)), (r, text)
    if records[rank]:
        with pytest.raises(RuntimeError, match=r"disagree .* the buffer cannot be used again"):
            kern.dispatch(LowLatencyDispatchRequest(x, idx, 8, E, use_fp8=False))
    dist.barrier()
    synchronize_after_fault()
    kern.destroy(at_exit=True)  # no collective free (NVSHMEM) after a failure: a peer's CUDA context may be gone


def _ranks_disagree(rank, num_ranks, what):
    set_rank_device(rank)
    _disagree(rank, num_ranks, _backend(rank, num_ranks, 16, 512, 16 * num_ranks, timeout_s=30.0), what)


@pytest.mark.parametrize("what", sorted(DISAGREEMENTS))
def test_ranks_that_disagree_are_told(what):
    reason = skip_reason(2) or (None if low_latency.available() else "no low-latency kernels in moe_a2a._C")
    if reason:
        pytest.skip(reason)
    run_ranks(_ranks_disagree, 2, what, timeout=120.0)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_low_latency_matches_reference(num_ranks):
    reason = skip_reason(num_ranks) or (None if low_latency.available() else "no low-latency kernels in moe_a2a._C")
    if reason:
        pytest.skip(reason)
    run_ranks(_correctness, num_ranks, timeout=300.0)


def test_low_latency_timeout_names_the_missing_rank():
    reason = skip_reason(2) or (None if low_latency.available() else "no low-latency kernels in moe_a2a._C")
    if reason:
        pytest.skip(reason)
    run_ranks(_timeout, 2, timeout=120.0)
