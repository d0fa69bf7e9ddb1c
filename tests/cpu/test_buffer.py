"""Buffer on the reference backend (gloo, CPU) against an independent computation on gathered inputs."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a import Buffer, Config, EventOverlap
from moe_a2a.fp8 import per_token_cast_to_fp8

HIDDEN = 256


def make_buffer(num_ranks_per_node=None, hidden=HIDDEN, **kw):
    # Sized as the README's quick start does (the dispatch config's hint alone): it must serve combine too.
    config = Buffer.get_dispatch_config(dist.get_world_size())
    nvl = config.get_nvl_buffer_size_hint(hidden * 2, dist.get_world_size())
    rdma = config.get_rdma_buffer_size_hint(hidden * 4, dist.get_world_size()) if num_ranks_per_node else 0
    return Buffer(dist.group.WORLD, nvl, max(rdma, kw.pop("num_rdma_bytes", 0)),
                  num_ranks_per_node=num_ranks_per_node, **kw)


def random_routing(num_tokens, num_experts, topk, gen, skew=True, drop=0.1):
    """Top-k expert ids without repeats, skewed toward low experts, with some -1 slots."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if skew:
        scores += torch.linspace(1.0, 0.0, num_experts)
    idx = scores.topk(topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < drop] = -1
    return idx


def gather_objects(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def expected_dispatch(all_x, all_idx, all_w, me, num_ranks, num_experts):
    """What rank ``me`` must receive, built token by token."""
    per_rank = num_experts // num_ranks
    xs, idxs, ws, src_idx = [], [], [], []
    counts = [0] * per_rank
    for s in range(num_ranks):
        for t in range(all_x[s].size(0)):
            experts = all_idx[s][t].tolist()
            if not any(e >= 0 and e // per_rank == me for e in experts):
                continue
            xs.append(all_x[s][t])
            local = [e - me * per_rank if e >= 0 and e // per_rank == me else -1 for e in experts]
            idxs.append(local)
            ws.append([w if l >= 0 else 0.0 for w, l in zip(all_w[s][t].tolist(), local)])
            src_idx.append(t)
        for e in all_idx[s].flatten().tolist():
            if e >= 0 and e // per_rank == me:
                counts[e % per_rank] += 1
    hidden = all_x[0].size(1)
    x = torch.stack(xs) if xs else torch.empty(0, hidden, dtype=all_x[0].dtype)
    topk = all_idx[0].size(1)
    return (x, torch.tensor(idxs, dtype=torch.int64).view(-1, topk), torch.tensor(ws, dtype=torch.float32).view(-1, topk),
            counts, torch.tensor(src_idx, dtype=torch.int32))


def _normal_mode_body(rank, num_ranks):
    gen = torch.Generator().manual_seed(1234 + rank)
    buffer = make_buffer()
    # (tokens on this rank, topk, experts per rank, dtype); rank 1 sends nothing in the second case.
    cases = [(37 + 5 * rank, 4, 4, torch.bfloat16), (0 if rank == 1 else 16, 1, 2, torch.float32),
             (23, 8, 8 if num_ranks <= 4 else 2, torch.bfloat16)]
    for num_tokens, topk, per_rank, dtype in cases:
        num_experts = per_rank * num_ranks
        topk = min(topk, num_experts)
        x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
        topk_idx = random_routing(num_tokens, num_experts, topk, gen)
        topk_w = torch.rand(num_tokens, topk, generator=gen)
        all_x, all_idx, all_w = gather_objects(x), gather_objects(topk_idx), gather_objects(topk_w)

        # Layout against a direct count.
        ntpr, ntprdma, ntpe, in_rank, layout_event = buffer.get_dispatch_layout(topk_idx, num_experts)
        assert ntprdma is None
        want_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool)
        for t in range(num_tokens):
            for e in topk_idx[t].tolist():
                if e >= 0:
                    want_in_rank[t, e // per_rank] = True
        assert torch.equal(in_rank, want_in_rank)
        assert torch.equal(ntpr, want_in_rank.sum(0).int())
        assert torch.equal(ntpe, torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int())

        want_x, want_idx, want_w, want_counts, want_src = expected_dispatch(all_x, all_idx, all_w, rank, num_ranks,
                                                                            num_experts)
        for alignment in (1, 4):
            recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                topk_idx=topk_idx, topk_weights=topk_w, expert_alignment=alignment,
                previous_event=layout_event)  # an empty event (no async_finish) means nothing to wait for
            assert torch.equal(recv_x, want_x)
            assert torch.equal(recv_idx, want_idx)
            assert torch.equal(recv_w, want_w)
            assert counts == [(c + alignment - 1) // alignment * alignment for c in want_counts]
            assert torch.equal(handle.recv_src_idx, want_src)

        # Cached dispatch reuses the layout and moves the same rows.
        cached_x, none_idx, none_w, none_counts, none_handle, _ = buffer.dispatch(x * 2, handle=handle)
        assert torch.equal(cached_x, want_x * 2) and none_idx is None and none_handle is None
        # The in-buffer request is a kernel option: here the same rows come back as an ordinary tensor.
        in_buffer_x, *_ = buffer.dispatch(x * 2, handle=handle, recv_x_in_buffer=True)
        assert torch.equal(in_buffer_x, want_x * 2)

        # FP8 tokens travel with their scales, bit for bit.
        if HIDDEN % 128 == 0:
            x_fp8 = per_token_cast_to_fp8(x.bfloat16())
            (rx, rs), *_ = buffer.dispatch(x_fp8, handle=handle)
            want_fp8 = expected_dispatch(gather_objects(x_fp8[0].view(torch.uint8)), all_idx, all_w, rank, num_ranks,
                                         num_experts)[0]
            want_scales = expected_dispatch(gather_objects(x_fp8[1]), all_idx, all_w, rank, num_ranks, num_experts)[0]
            assert torch.equal(rx.view(torch.uint8), want_fp8) and torch.equal(rs, want_scales)

        # Combine: every rank scales what it received by (rank + 1); the sum over ranks comes home.
        y = (recv_x.float() * (rank + 1)).to(dtype)
        bias = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, bias=bias)
        all_y = gather_objects(y)
        all_src = gather_objects(handle.recv_src_idx)
        want = bias.float().clone()
        for r in range(num_ranks):
            mine = torch.arange(all_src[r].numel())[_rows_from(r, rank, all_idx, num_ranks, num_experts)]
            want.index_add_(0, all_src[r][mine].long(), all_y[r][mine].float())
        torch.testing.assert_close(combined, want.to(dtype), rtol=0, atol=0)
        kept = torch.where(topk_idx >= 0, topk_w, torch.zeros(()))
        torch.testing.assert_close(combined_w, kept)

        # The zero-copy input: same API as on the kernels, an ordinary tensor here; same result.
        if dtype == torch.bfloat16:
            buf = buffer.get_next_combine_buffer(handle)
            assert buf.shape == (recv_x.size(0), HIDDEN) and buf.dtype == torch.bfloat16
            buf.copy_(y)
            again, again_w, _ = buffer.combine(buf, handle, topk_weights=recv_w, bias=bias)
            assert torch.equal(again, combined) and torch.equal(again_w, combined_w)

        # num_worst_tokens pads the outputs and returns no per-expert list.
        worst = sum(t.size(0) for t in all_x)
        px, pidx, pw, pcounts, phandle, _ = buffer.dispatch(
            x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=topk_idx,
            topk_weights=topk_w, num_worst_tokens=worst)
        n = want_x.size(0)
        assert px.size(0) == worst and pcounts == [] and torch.equal(px[:n], want_x)
        assert bool((pidx[n:] == -1).all()) and torch.equal(pidx[:n], want_idx)
        padded_y = torch.zeros(worst, HIDDEN, dtype=dtype)
        padded_y[:n] = y
        pc, _, _ = buffer.combine(padded_y, phandle, bias=bias)
        torch.testing.assert_close(pc, combined)


def _rows_from(r, me, all_idx, num_ranks, num_experts):
    """Mask over rank ``r``'s received rows: those that came from rank ``me``."""
    per_rank = num_experts // num_ranks
    sources = []
    for s in range(num_ranks):
        for t in range(all_idx[s].size(0)):
            if any(e >= 0 and e // per_rank == r for e in all_idx[s][t].tolist()):
                sources.append(s)
    return torch.tensor(sources, dtype=torch.int64) == me


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_normal_mode(num_ranks):
    run_distributed(_normal_mode_body, num_ranks)


def _internode_body(rank, num_ranks):
    gen = torch.Generator().manual_seed(7 + rank)
    buffer = make_buffer(num_ranks_per_node=2)
    assert buffer.num_rdma_ranks == num_ranks // 2
    num_experts = 4 * num_ranks
    x = torch.randn(19, HIDDEN, generator=gen).bfloat16()
    topk_idx = random_routing(19, num_experts, 3, gen)
    topk_w = torch.rand(19, 3, generator=gen)
    ntpr, ntprdma, ntpe, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    per_node = in_rank.view(19, num_ranks // 2, 2).any(2).sum(0).int()
    assert torch.equal(ntprdma, per_node)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                        num_worst_tokens=100)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.internode_dispatch(
        x, None, ntpr, ntprdma, in_rank, ntpe, topk_idx, topk_w)
    want = expected_dispatch(gather_objects(x), gather_objects(topk_idx), gather_objects(topk_w), rank, num_ranks,
                             num_experts)
    assert torch.equal(recv_x, want[0]) and torch.equal(recv_idx, want[1]) and counts == want[3]
    combined, _, _ = buffer.internode_combine(recv_x, handle)
    copies = in_rank.sum(1, keepdim=True).float()
    torch.testing.assert_close(combined.float(), (x.float() * copies).bfloat16().float(), rtol=1e-2, atol=1e-2)
    # Low-latency mode across nodes: queue pairs are checked before any backend starts.
    with pytest.raises(ValueError, match="num_qps_per_rank must be an int >= 1, got 0"):
        Buffer(dist.group.WORLD, 0, 1024, low_latency_mode=True, num_qps_per_rank=0, num_ranks_per_node=2)


def test_internode_entry_points():
    run_distributed(_internode_body, 4)


def _low_latency_body(rank, num_ranks):
    gen = torch.Generator().manual_seed(99 + rank)
    hidden, max_tokens = 512, 12
    num_experts = 3 * num_ranks
    per_rank = num_experts // num_ranks
    buffer = make_buffer(hidden=hidden, low_latency_mode=True,
                         num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks,
                                                                              num_experts))
    stats = torch.zeros(per_rank, dtype=torch.int32)
    want_stats = torch.zeros(per_rank, dtype=torch.int32)
    wait_stats = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    for step, num_tokens in enumerate([max_tokens, 0 if rank == 0 else 5, 1]):
        x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
        topk = 2 if step != 1 else 1
        topk_idx = random_routing(num_tokens, num_experts, topk, gen)
        topk_w = torch.rand(num_tokens, topk, generator=gen)
        all_x, all_idx = gather_objects(x), gather_objects(topk_idx)
        slots = max_tokens * num_ranks
        for use_fp8, round_scale, ue8m0, hook_mode in [(False, False, False, False), (True, False, False, True),
                                                      (True, True, True, False)]:
            recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
                x, topk_idx, max_tokens, num_experts, cumulative_local_expert_recv_stats=stats,
                dispatch_wait_recv_cost_stats=wait_stats, use_fp8=use_fp8, round_scale=round_scale,
                use_ue8m0=ue8m0, return_recv_hook=hook_mode)
            if hook_mode:
                hook()
            want_stats += recv_count
            recv_x = recv[0] if use_fp8 else recv
            assert recv_x.shape == (per_rank, slots, hidden)
            if use_fp8:
                assert recv[1].shape == (per_rank, slots, hidden // (512 if ue8m0 else 128))
                assert recv[1].stride(1) == 1  # column-major scales
            for local in range(per_rank):
                expert = rank * per_rank + local
                want_rows = [(s, t) for s in range(num_ranks) for t in range(all_x[s].size(0))
                             if expert in all_idx[s][t].tolist()]
                assert int(recv_count[local]) == len(want_rows)
                for slot, (s, t) in enumerate(want_rows):
                    assert int(handle.src_info[local, slot]) == t
                    if use_fp8:
                        want_q, want_s = per_token_cast_to_fp8(all_x[s][t:t + 1], round_scale)
                        assert torch.equal(recv_x[local, slot].view(torch.uint8), want_q[0].view(torch.uint8))
                        if not ue8m0:
                            assert torch.equal(recv[1][local, slot], want_s[0])
                    else:
                        assert torch.equal(recv_x[local, slot], all_x[s][t])
            # Combine: each expert returns its input times (expert + 1); the result is the weighted sum.
            y = torch.zeros(per_rank, slots, hidden, dtype=torch.bfloat16)
            for local in range(per_rank):
                n = int(recv_count[local])
                rows = recv_x[local, :n].float() if not use_fp8 else None
                if rows is None:
                    continue
                y[local, :n] = (rows * (rank * per_rank + local + 1)).bfloat16()
            if use_fp8:
                continue
            zero_copy = step == 2
            if zero_copy:
                buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
            out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16)
            combined, _, chook = buffer.low_latency_combine(y, topk_idx, topk_w, handle, zero_copy=zero_copy,
                                                            out=out, return_recv_hook=step == 1)
            if chook is not None:
                chook()
            assert combined.data_ptr() == out.data_ptr()
            want = torch.zeros(num_tokens, hidden)
            for t in range(num_tokens):
                for k, e in enumerate(topk_idx[t].tolist()):
                    if e >= 0:
                        want[t] += topk_w[t, k] * (x[t].float() * (e + 1)).bfloat16().float()
            torch.testing.assert_close(combined.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(stats, want_stats)
    assert bool((wait_stats >= 0).all())


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_low_latency(num_ranks):
    run_distributed(_low_latency_body, num_ranks)


def _bad_input_body(rank, num_ranks):
    buffer = make_buffer()
    x = torch.randn(4, HIDDEN).bfloat16()
    idx = torch.tensor([[0, 1], [2, -1], [3, 0], [-1, -1]])
    with pytest.raises(TypeError, match="topk_idx must have dtype torch.int64"):
        buffer.get_dispatch_layout(idx.int(), 4)
    with pytest.raises(ValueError, match=r"expert id 9; expected -1 or an id in \[0, 4\)"):
        buffer.get_dispatch_layout(torch.tensor([[9, 0]]), 4)
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        buffer.get_dispatch_layout(idx, 3)
    ntpr, _, ntpe, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        buffer.dispatch(x.int(), num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    with pytest.raises(ValueError, match=r"is_token_in_rank must have shape \[3, 2\]"):
        buffer.dispatch(x[:3], num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    with pytest.raises(ValueError, match="disagrees with is_token_in_rank"):
        buffer.dispatch(x, num_tokens_per_rank=ntpr + 1, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    with pytest.raises(ValueError, match="too small"):
        Buffer(dist.group.WORLD, 1024).dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=ntpe)
    with pytest.raises(ValueError, match="FP8 tokens"):
        buffer.dispatch((x[:, :100].to(torch.float8_e4m3fn), torch.ones(4, 1)), num_tokens_per_rank=ntpr,
                        is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    with pytest.raises(ValueError, match="topk_weights needs topk_idx"):
        buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                        topk_weights=torch.ones(4, 2))
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=ntpe, topk_idx=idx)
    with pytest.raises(ValueError, match="handle was made for 4"):
        buffer.dispatch(x[:2], handle=handle)
    with pytest.raises(ValueError, match="cached dispatch .handle given. takes no topk_idx"):
        buffer.dispatch(x, handle=handle, topk_idx=idx)
    with pytest.raises(ValueError, match="x must have shape"):
        buffer.combine(recv_x[:, :8], handle) if recv_x.size(0) == 0 else buffer.combine(recv_x[1:], handle)
    with pytest.raises(TypeError, match="handle must be a handle from dispatch"):
        buffer.get_next_combine_buffer(tuple(handle))
    with pytest.raises(ValueError, match="did not come from this Buffer's dispatch: pass hidden="):
        make_buffer().get_next_combine_buffer(handle)
    num_recv = handle.num_recv_tokens
    assert make_buffer().get_next_combine_buffer(handle, hidden=HIDDEN).shape == (num_recv, HIDDEN)
    small = Buffer(dist.group.WORLD, 16 * 1024)
    need = num_recv * (HIDDEN * 8) * 2
    if need > 16 * 1024:
        with pytest.raises(ValueError, match=rf"need num_nvl_bytes >= {need}, got 16384 .*num_recv_tokens={num_recv}"):
            small.get_next_combine_buffer(handle, hidden=HIDDEN * 8)
    hint = Config().get_nvl_buffer_size_hint(HIDDEN * 8 * 2, num_ranks, num_recv_tokens=num_recv)
    assert Buffer(dist.group.WORLD, hint).get_next_combine_buffer(handle, hidden=HIDDEN * 8).size(1) == HIDDEN * 8
    with pytest.raises(ValueError, match="low_latency_mode=True"):
        buffer.low_latency_dispatch(x, idx, 8, 4)
    ll = Buffer(dist.group.WORLD, 0, 1024, low_latency_mode=True)
    with pytest.raises(ValueError, match="num_rdma_bytes=1024 is too small"):
        ll.low_latency_dispatch(x, idx, 8, 4)
    ll = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(8, HIDDEN, num_ranks, 4),
                low_latency_mode=True)
    with pytest.raises(ValueError, match="x has 4 tokens, more than num_max_dispatch_tokens_per_rank=2"):
        ll.low_latency_dispatch(x, idx, 2, 4)
    with pytest.raises(ValueError, match="use_ue8m0 needs use_fp8=True and round_scale=True"):
        ll.low_latency_dispatch(x, idx, 8, 4, use_ue8m0=True)
    with pytest.raises(ValueError, match="Config.num_sms must be even"):
        Config(num_sms=3)
    with pytest.raises(ValueError, match="must be even"):
        Buffer.set_num_sms(7)
    with pytest.raises(ValueError, match="explicitly_destroy"):
        buffer.destroy()
    gone = Buffer(dist.group.WORLD, buffer.num_nvl_bytes, explicitly_destroy=True)
    gone.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        gone.get_dispatch_layout(idx, 4)


def _resources_body(rank, num_ranks):
    buffer = make_buffer()
    raw = buffer.get_local_buffer_tensor(torch.float32)
    assert raw.numel() == buffer.num_nvl_bytes // 4
    view = buffer.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=16)
    view.fill_(rank + 1)
    again = buffer.get_local_buffer_tensor(torch.bfloat16)
    assert bool((again[16:48] == rank + 1).all()) and bool((again[:16] == 0).all())
    with pytest.raises(ValueError, match="needs .* elements"):
        buffer.get_local_buffer_tensor(torch.uint8, torch.Size([buffer.num_nvl_bytes + 1]))
    with pytest.raises(RuntimeError, match="no communication stream"):
        buffer.get_comm_stream()
    event = Buffer.capture()
    assert event.event.event is None  # CPU: calls are synchronous, nothing to record
    with event:
        pass
    event.current_stream_wait()
    with pytest.raises(ValueError, match="holds no event"):
        EventOverlap().current_stream_wait()
    for name in ("FusedDispatch", "hybrid_ep_dispatch", "get_buffer", "set_deepep_num_sms"):
        import moe_a2a
        assert hasattr(moe_a2a, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of streams and events")
def test_local_buffer_stream_and_events():
    run_distributed(_resources_body, 2)


def test_bad_input():
    run_distributed(_bad_input_body, 2)
