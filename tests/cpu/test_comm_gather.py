"""moe_a2a.comm allgather / reducescatter / cp_allgather against torch compositions on spawned gloo ranks.

Every rank builds every rank's inputs from one seed, so it can compute the expected result itself
(concatenation in rank order; sum in rank order with float32 accumulation for half types).
"""
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import gradcheck

from dist_utils import GatherRanks, Replicated, run_distributed
from moe_a2a.comm import (HelixAllToAllNative, allgather, alltoall_helix, cp_allgather,
                          get_helix_workspace_size_per_rank, reducescatter)
from moe_a2a.comm.gather_scatter import sum_in_order


def inputs(seed, size, shape_of, dtype):
    """``[tensor of rank r for r in range(size)]``, random (never all zeros), reproducible."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in range(size):
        x = torch.randn(shape_of(r), generator=gen, dtype=torch.float64) * 3
        out.append(x.round().to(dtype) if not dtype.is_floating_point else x.to(dtype))
    return out


def expect_raises(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def _body(rank, size):
    torch.manual_seed(0)
    # ---- allgather, equal shapes, several dims and dtypes (one collective each)
    for seed, (dim, dtype) in enumerate([(0, torch.bfloat16), (1, torch.float32), (-1, torch.int64),
                                         (-2, torch.float16)]):
        xs = inputs(seed, size, lambda r: (2, 3, 4), dtype)
        out = allgather(xs[rank], dim=dim)
        assert out.dtype == dtype and torch.equal(out, torch.cat(xs, dim=dim)), (dim, dtype)
        assert out.is_contiguous()  # like torch.cat's result
    # ---- uneven sizes along a middle dim, with an empty rank
    sizes = [2, 0, 3][:size] if size == 3 else [2] + [1] * (size - 1)
    xs = inputs(10, size, lambda r: (2, sizes[r], 5), torch.float16)
    assert torch.equal(allgather(xs[rank], None, 1, sizes), torch.cat(xs, 1))
    # ---- lists with None entries, mixed dtypes, one collective for all
    a = inputs(11, size, lambda r: (sizes[r], 3), torch.bfloat16)
    b = inputs(12, size, lambda r: (4, sizes[r]), torch.float32)
    out = allgather([a[rank].t(), None, b[rank]], dim=-1, sizes=sizes)
    assert out[1] is None and len(out) == 3
    assert torch.equal(out[0], torch.cat([t.t() for t in a], -1)) and torch.equal(out[2], torch.cat(b, -1))
    assert allgather([None, None]) == [None, None]
    # ---- cp_allgather through a mapping-like object
    mapping = types.SimpleNamespace(cp_group_pg=dist.group.WORLD)
    xs = inputs(13, size, lambda r: (3, 2), torch.float32)
    assert torch.equal(cp_allgather(xs[rank], mapping, dim=0), torch.cat(xs, 0))
    assert torch.equal(allgather(xs[rank], list(range(size)), 0), torch.cat(xs, 0))  # TensorRT-LLM's rank list

    # ---- reducescatter: equal chunks, bitwise against the rank-order sum
    for seed, (dim, dtype) in enumerate([(0, torch.float32), (-1, torch.bfloat16), (1, torch.float16)]):
        xs = inputs(20 + seed, size, lambda r: (size * 2, size * 3), dtype)
        want = sum_in_order(xs, dtype).chunk(size, dim=dim)[rank]
        got = reducescatter(xs[rank], dim=dim)
        assert got.dtype == dtype and torch.equal(got, want) and got.is_contiguous(), (dim, dtype)
    # ---- uneven sizes, lists with None
    total = sum(sizes)
    a = inputs(30, size, lambda r: (total, 3), torch.float32)
    b = inputs(31, size, lambda r: (2, total), torch.int32)
    out = reducescatter([None, a[rank].t().contiguous(), b[rank]], dim=1, sizes=sizes)
    start = sum(sizes[:rank])
    assert out[0] is None
    assert torch.equal(out[1], sum_in_order([t.t() for t in a], torch.float32)[:, start:start + sizes[rank]])
    assert torch.equal(out[2], sum_in_order(b, torch.int32)[:, start:start + sizes[rank]])

    # ---- autograd: loss = sum over ranks of <out_r, w_r>; check x.grad exactly (float64)
    w = inputs(40, size, lambda r: (2, sum(sizes)), torch.float64)
    xs = inputs(41, size, lambda r: (2, sizes[r]), torch.float64)
    x = xs[rank].clone().requires_grad_(True)
    (allgather(x, dim=1, sizes=sizes) * w[rank]).sum().backward()
    assert torch.equal(x.grad, sum_in_order(w, torch.float64)[:, start:start + sizes[rank]])
    w = inputs(42, size, lambda r: (sizes[r], 3), torch.float64)
    x = inputs(43, size, lambda r: (total, 3), torch.float64)[rank].requires_grad_(True)
    y = inputs(44, size, lambda r: (total, 3), torch.float64)[rank].requires_grad_(True)
    rx, _, ry = reducescatter([x, None, y], dim=0, sizes=sizes)
    (rx * w[rank] + 2 * ry * w[rank]).sum().backward()
    assert torch.equal(x.grad, torch.cat(w)) and torch.equal(y.grad, 2 * torch.cat(w))

    _gradchecks(rank, size, sizes)

    # ---- bad input: raised locally before any communication (every rank raises the same)
    x = torch.ones(2, 3)
    expect_raises(ValueError, f"sizes has {size + 1} entries", lambda: allgather(x, sizes=[3] * (size + 1)))
    expect_raises(ValueError, r"sizes\[%d\] \(this rank\) is 4" % rank, lambda: allgather(x, sizes=[4] * size))
    expect_raises(ValueError, "dim 2 is out of range", lambda: allgather(x, dim=2))
    expect_raises(TypeError, "list entry 1 must be a torch.Tensor or None", lambda: allgather([x, 3]))
    expect_raises(ValueError, "not divisible by the group size", lambda: reducescatter(torch.ones(size + 1)))
    expect_raises(ValueError, "expected sum\\(sizes\\)", lambda: reducescatter(x, sizes=[2] * size))
    expect_raises(TypeError, "cannot be summed", lambda: reducescatter(torch.ones(size, dtype=torch.bool), dim=0))
    expect_raises(TypeError, "dist.new_group", lambda: allgather(x, group=[0]))
    # ---- disagreement across ranks: every rank raises the same error naming the odd rank
    odd = size - 1
    expect_raises(ValueError, f"shape \\[2, 4\\] on rank {odd} but \\[2, 3\\] on rank 0",
                  lambda: allgather(torch.ones(2, 4 if rank == odd else 3), dim=0))
    expect_raises(ValueError, f"list entry 0 is None on rank {odd} but a tensor on rank 0",
                  lambda: allgather([x if rank != odd else None, x]))
    theirs = [2] * size if rank != odd else [3] + [2] * (size - 1)  # each fits its own shape
    expect_raises(ValueError, "disagree on the sizes", lambda: allgather(torch.ones(1, 2), dim=1, sizes=theirs))
    expect_raises(ValueError, "dtype", lambda: reducescatter(torch.ones(size, dtype=torch.float16 if rank == odd
                                                                        else torch.float32)))
    # ---- a group this rank is not in
    sub = dist.new_group([0, 1])
    if rank >= 2:
        expect_raises(ValueError, "not a member", lambda: allgather(x, group=sub))
    else:
        assert torch.equal(allgather(torch.full((1,), float(rank)), group=sub), torch.tensor([0.0, 1.0]))
    _helix(rank, size)
    # ---- still in lockstep after all the errors
    assert torch.equal(allgather(torch.full((1,), float(rank))), torch.arange(size, dtype=torch.float32))


def _gradchecks(rank, size, sizes):
    """gradcheck in float64 of the global functions (every rank's input in, every rank's output out)."""
    gen = torch.Generator().manual_seed(60)
    most = max(sizes)

    def gather(xs):  # xs: [size, 2, max(sizes)], rank r uses its first sizes[r] columns
        mine = Replicated.apply(xs)[rank, :, :sizes[rank]]
        return GatherRanks.apply(allgather(mine, dim=1, sizes=sizes))

    xs = torch.randn(size, 2, most, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(gather, (xs,))

    def scatter(xs, ys):  # a list with None, uneven sizes; outputs padded to one shape
        mine = [Replicated.apply(xs)[rank], None, Replicated.apply(ys)[rank]]
        a, _, b = reducescatter(mine, dim=0, sizes=sizes)
        return (GatherRanks.apply(F.pad(a, (0, 0, 0, most - a.shape[0]))),
                GatherRanks.apply(F.pad(b, (0, most - b.shape[0]))))

    xs = torch.randn(size, sum(sizes), 2, generator=gen, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(size, sum(sizes), generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(scatter, (xs, ys))

    def helix(xs):  # xs: [size, 2 * size, 3]: rank r's 2 lists of size tensors
        mine = Replicated.apply(xs)[rank]
        return tuple(GatherRanks.apply(o) for o in alltoall_helix(list(mine.unbind(0))))

    xs = torch.randn(size, 2 * size, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(helix, (xs,))


def _helix(rank, size):
    """alltoall_helix and HelixAllToAllNative against the definition: row j of the output came from rank j."""
    shapes = [((2, 3), torch.bfloat16), ((4,), torch.float32), ((0, 2), torch.float16)]
    ins = [[inputs(100 + il * size + j, size, lambda r: shape, dtype)
            for il, (shape, dtype) in enumerate(shapes) for j in range(size)]]
    ins = [[ins[0][k][r] for k in range(len(ins[0]))] for r in range(size)]  # ins[r][k]: rank r's k-th tensor
    outs = alltoall_helix(ins[rank])
    assert len(outs) == len(shapes)
    for il, (shape, dtype) in enumerate(shapes):
        want = torch.stack([ins[j][il * size + rank] for j in range(size)])
        assert outs[il].shape == (size, *shape) and outs[il].dtype == dtype and torch.equal(outs[il], want)
    one = alltoall_helix(ins[rank][:size])  # one list: the unpacked path
    assert torch.equal(one[0], torch.stack([ins[j][rank] for j in range(size)]))
    # autograd: loss = sum over ranks and lists of <out, w>; grad of inputs[il*size+k] on me = w_k[il][me]
    w = [inputs(150 + r, 2, lambda _: (size, 3), torch.float64) for r in range(size)]  # w[r][il]
    xs = [inputs(160 + r, 2 * size, lambda _: (3,), torch.float64) for r in range(size)]
    mine = [x.clone().requires_grad_(True) for x in xs[rank]]
    o = alltoall_helix(mine)
    (o[0] * w[rank][0]).sum().add((o[1] * w[rank][1]).sum()).backward()
    for il in range(2):
        for k in range(size):
            assert torch.equal(mine[il * size + k].grad, w[k][il][rank])
    expect_raises(ValueError, "positive multiple of the group size", lambda: alltoall_helix(ins[rank][:size + 1]))
    bad = list(ins[rank][:size])
    bad[-1] = torch.ones(5)
    expect_raises(ValueError, "same shape and dtype", lambda: alltoall_helix(bad))
    odd = [torch.ones(2 + (rank == size - 1)) for _ in range(size)]
    expect_raises(ValueError, f"rank {size - 1} passes lists", lambda: alltoall_helix(odd))

    # native: [..., cp, kv] half + [..., cp, 2] float32, default workspace and a tiny one (many rounds)
    po = inputs(170, size, lambda r: (2, 3, size, 5), torch.bfloat16)
    st = inputs(171, size, lambda r: (2, 3, size, 2), torch.float32)
    want_po = torch.stack([po[j][..., rank, :] for j in range(size)], dim=-2)
    want_st = torch.stack([st[j][..., rank, :] for j in range(size)], dim=-2)
    for fifo in (None, 64):  # the default workspace (one round) and a tiny one (several rounds)
        helix = HelixAllToAllNative.get() if fifo is None else HelixAllToAllNative.get(None, 2, fifo_bytes=fifo)
        ws = helix.workspace
        assert ws.size_bytes == size * ws.num_channels * (ws.fifo_bytes + 512)
        assert ws.size_bytes == get_helix_workspace_size_per_rank(size, ws.num_channels, ws.fifo_bytes)
        assert ws.num_channels == (1 if fifo is None else 2)  # no CUDA: one SM's worth of channels
        got_po, got_st = helix.alltoall_native(po[rank], st[rank])
        assert got_po.dtype == torch.bfloat16 and torch.equal(got_po, want_po)
        assert got_st.dtype == torch.float32 and torch.equal(got_st, want_st)
    assert HelixAllToAllNative.get() is HelixAllToAllNative.get(types.SimpleNamespace(cp_group_pg=dist.group.WORLD))
    expect_raises(TypeError, "partial_o must be float16 or bfloat16",
                  lambda: helix.alltoall_native(po[rank].float(), st[rank]))
    expect_raises(ValueError, "cp_size=%d" % size, lambda: helix.alltoall_native(po[rank][..., :1, :], st[rank]))
    expect_raises(ValueError, "softmax_stats must be", lambda: helix.alltoall_native(po[rank], st[rank][:1]))
    HelixAllToAllNative.clear_cache()


def test_gather_scatter_three_ranks():
    run_distributed(_body, 3)


def _timeout_body(rank, size):
    sub = dist.new_group([0, 1])
    if rank == 0:
        with pytest.raises(TimeoutError, match="rank 0 .*allgather shape exchange did not complete"):
            allgather(torch.ones(2), group=sub, timeout_s=1.0)
    dist.barrier()


def test_timeout_names_rank():
    run_distributed(_timeout_body, 2)


def test_single_rank_group_returns_input():
    run_distributed(_single, 1)


def _single(rank, size):
    x = torch.randn(3, 2)
    assert allgather(x) is x and reducescatter(x) is x
    with pytest.raises(ValueError, match="sizes\\[0\\]"):
        allgather(x, sizes=[3])


class _OneShotOnGloo:
    """The Lamport one-shot's contract (``LamportWorkspace.mixed``) on gloo: rank ``p`` receives rows
    ``send_first[p]`` to ``send_first[p] + send_rows`` of every rank's ``x`` and sums those of the ranks ``s``
    with ``src_block[s] == b`` into output block ``b``, in rank order with float32 accumulation."""

    calls = 0

    def mixed(self, x, send_first, send_rows, src_block, out_blocks):
        type(self).calls += 1
        me, size = dist.get_rank(), dist.get_world_size()
        every = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(every, x.contiguous())
        got = [e[send_first[me]:send_first[me] + send_rows] for e in every]
        blocks = [sum_in_order([got[s] for s in range(size) if src_block[s] == b], x.dtype)
                  if b in src_block else x.new_zeros(send_rows, x.shape[1]) for b in range(out_blocks)]
        return torch.cat(blocks)


def _kernel_path(rank, size):
    """What allgather / reducescatter do around the one-shot kernel (padding uneven sizes to the largest,
    moving ``dim`` first, cutting the padding off again, autograd), checked on CPU with the kernel's contract
    emulated on gloo: the same results as the torch path."""
    from moe_a2a.comm import gather_scatter
    gather_scatter._kernel_workspace = lambda moved, counts, group: _OneShotOnGloo() \
        if len(moved) == 1 and moved[0].dtype in gather_scatter._KERNEL_DTYPES else None
    sizes = [(r * 2) % 5 + 1 for r in range(size)]
    for dtype in (torch.bfloat16, torch.float32):
        xs = inputs(31, size, lambda r: (sizes[r], 4, 8), dtype)
        assert torch.equal(allgather(xs[rank], dim=0, sizes=sizes), torch.cat(xs))
        xs = inputs(32, size, lambda r: (3, sizes[r], 8), dtype)
        assert torch.equal(allgather(xs[rank], dim=1, sizes=sizes), torch.cat(xs, 1))
        xs = inputs(33, size, lambda r: (2, 3 * size), dtype)
        assert torch.equal(allgather(xs[rank], dim=0), torch.cat(xs))
        big = inputs(34, size, lambda r: (sum(sizes), 16), dtype)
        assert torch.equal(reducescatter(big[rank], dim=0, sizes=sizes), sum_in_order(big, dtype).split(sizes)[rank])
        wide = inputs(35, size, lambda r: (5, sum(sizes)), dtype)
        assert torch.equal(reducescatter(wide[rank], dim=-1, sizes=sizes),
                           sum_in_order(wide, dtype).split(sizes, dim=-1)[rank])
        even = inputs(36, size, lambda r: (4 * size, 2, 8), dtype)
        assert torch.equal(reducescatter(even[rank], dim=0), sum_in_order(even, dtype).chunk(size)[rank])
    x = torch.randn(sizes[rank], 8, dtype=torch.float64, requires_grad=True)  # not a kernel dtype: torch path
    calls = _OneShotOnGloo.calls
    allgather(x, dim=0, sizes=sizes).sum().backward()
    assert _OneShotOnGloo.calls == calls and torch.equal(x.grad, torch.full_like(x, float(size)))
    x = torch.randn(sizes[rank], 8, requires_grad=True)
    allgather(x, dim=0, sizes=sizes).sum().backward()  # forward and backward through the kernel path
    assert _OneShotOnGloo.calls == calls + 2 and torch.equal(x.grad, torch.full_like(x, float(size)))


def test_kernel_path_around_the_one_shot():
    run_distributed(_kernel_path, 3)
