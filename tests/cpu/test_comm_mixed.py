"""MixedCommHandler on spawned gloo ranks with virtual nodes: every op and mode against the torch composition.

Every rank builds every rank's input from one seed and computes the expected result itself: all-reduce over
TP then all-gather over DP (or reduce-scatter over DP then all-reduce over TP), summing in rank order. Inputs
are small multiples of 1/8, so every partial sum is exact in float16/bfloat16 and every mode must match
bit for bit; one extra case with Gaussian inputs checks the modes to rounding.
"""
import argparse

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a.comm import MixedCommHandler, MixedCommMode, MixedCommOp, ParallelInfo, run_mixed_comm
from moe_a2a.comm.gather_scatter import exchange_objects, sum_in_order
from moe_a2a.comm.mixed import _two_shot_plan

GATHER_OPS = (MixedCommOp.ALLREDUCE, MixedCommOp.ALLGATHER, MixedCommOp.ALLREDUCE_ALLGATHER)


def make_handler(rank, size, local_size, split, dtype=torch.bfloat16, device="cpu", **kw):
    local_tp, local_dp, inter_tp, inter_dp = split
    return MixedCommHandler(rank, size, rank % local_size, local_size, rank // local_size, size // local_size,
                            local_tp, local_dp, inter_tp, inter_dp, dtype, torch.device(device), **kw)


def world_inputs(seed, size, shape, dtype, exact=True):
    gen = torch.Generator().manual_seed(seed)
    if exact:
        return [(torch.randint(-16, 17, shape, generator=gen).float() / 8).to(dtype) for _ in range(size)]
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(size)]


def expected(op, info: ParallelInfo, xs, dtype):
    """The unfused composition, from every rank's input (sum in TP / world rank order)."""
    if op in GATHER_OPS:
        return torch.cat([sum_in_order([xs[info.world_rank_of(t, d)] for t in range(info.tp_size)], dtype)
                          for d in range(info.dp_size)])
    return sum_in_order([x.chunk(info.dp_size)[info.dp_rank] for x in xs], dtype)


def check_all_modes(h, rank, size, seed, dtype=torch.bfloat16, rows=3, hidden=4, gaussian=True):
    info = h.para_info
    tried = []
    for op in h.valid_op_list:
        shape = (rows * info.dp_size if op not in GATHER_OPS else rows, hidden)
        xs = world_inputs(seed + int(op), size, shape, dtype)
        want = expected(op, info, xs, dtype)
        mine = xs[rank].to(h.device)
        for mode in [None, *h.valid_mode_list]:
            got = run_mixed_comm(op, h, mine, mode=mode)
            assert got.dtype == dtype and got.device == h.device, (op, mode)
            assert torch.equal(got.cpu(), want), (op, mode, info.__dict__)
            tried.append((op.name, getattr(mode, "name", None)))
        strided = torch.cat([mine, mine], dim=-1)[..., :hidden]  # a non-contiguous view of the same values
        transposed = mine.t().contiguous().t()  # dense, but column-major
        for odd in (strided, transposed):
            assert not odd.is_contiguous() and torch.equal(run_mixed_comm(op, h, odd).cpu(), want)
        out = torch.empty_like(want, device=h.device)
        assert run_mixed_comm(op, h, mine, out) is out and torch.equal(out.cpu(), want)
        if not gaussian:
            continue
        # Gaussian inputs: every mode within rounding of the float64 sum
        xs = world_inputs(seed + 50, size, shape, dtype, exact=False)
        ref = expected(op, info, [x.double() for x in xs], torch.float64)
        for mode in h.valid_mode_list:
            got = run_mixed_comm(op, h, xs[rank].to(h.device), mode=mode).double().cpu()
            assert torch.allclose(got, ref, rtol=2e-2, atol=4e-2), (op, mode, (got - ref).abs().max())
    return tried


def _four_ranks(rank, size):
    # (local_size, (local_tp, local_dp, inter_tp, inter_dp)) -> expected valid ops and whether HIER modes exist
    configs = [
        (2, (2, None, 1, None), "TP in the node, DP across 2 virtual nodes"),
        (2, (None, 2, 2, None), "DP in the node, TP across nodes"),
        (4, (2, 2, None, None), "TP 2 x DP 2 on one node"),
        (2, (None, None, None, None), "defaults: all TP (ALLREDUCE)"),
        (2, (1, None, None, 2), "all DP (ALLGATHER / REDUCESCATTER)"),
    ]
    for i, (local_size, split, what) in enumerate(configs):
        h = make_handler(rank, size, local_size, split, dtype=torch.float16 if i == 2 else torch.bfloat16,
                         use_autotune=(i == 0), autotune_max_bytes=16384)
        p = h.para_info
        assert p.tp_size * p.dp_size == size
        assert (MixedCommMode.HIER_INTRA_FIRST in h.valid_mode_list) == (local_size < size), what
        assert not any(m.name.startswith("FUSED_") for m in h.valid_mode_list)
        if p.use_mixed:
            assert h.valid_op_list == [MixedCommOp.ALLREDUCE_ALLGATHER, MixedCommOp.REDUCESCATTER_ALLREDUCE]
            assert MixedCommMode.NCCL_TP_DP in h.valid_mode_list
        if i == 0:
            _autotune(h, rank)  # before any operation fills the table
        x = torch.ones(2 * p.dp_size, 4, dtype=h.dtype)
        rule = MixedCommMode.NCCL_TP_DP if p.use_mixed else MixedCommMode.NCCL_ONE
        want_mode = h.select_autotune_mode(h.valid_op_list[0], x) if h.use_autotune else rule
        assert h.resolve_mode(h.valid_op_list[0], x) == want_mode
        assert h.resolve_mode(h.valid_op_list[0], x, MixedCommMode.NCCL_ONE) == MixedCommMode.NCCL_ONE
        tried = check_all_modes(h, rank, size, seed=10 * i, dtype=h.dtype)
        assert len(tried) >= 2 * len(h.valid_op_list)
        if i == 0:
            _errors(h, rank, size)
        if i == 3:
            assert h.valid_op_list == [MixedCommOp.ALLREDUCE]
            with pytest.raises(ValueError, match="mode NCCL_TP_DP is not valid"):
                h.allreduce(torch.ones(2, 2, dtype=torch.bfloat16), mode=MixedCommMode.NCCL_TP_DP)
            with pytest.raises(ValueError, match="op ALLREDUCE_ALLGATHER is not valid"):
                h.allreduce_allgather(torch.ones(2, 2, dtype=torch.bfloat16))
        if i == 4:
            assert h.valid_op_list == [MixedCommOp.ALLGATHER, MixedCommOp.REDUCESCATTER]
        h.shutdown()
    _constructor_errors(rank, size)
    _fused_mode_choice(rank, size)
    _benchmark(rank, size)


def _benchmark(rank, size):
    """``python -m benchmarks mixed-comm``'s per-rank part: every valid mode and the unfused baseline, same results."""
    from benchmarks import mixed_comm as bench
    args = argparse.Namespace(device="cpu", dtype="bf16", local_size=2, local_tp=2, local_dp=None, inter_tp=1,
                              inter_dp=None, min_bytes=8192, max_bytes=8192, row_bytes=1024, warmup=0, iters=1,
                              quiet=True)
    info, results = bench.run_rank(rank, size, args)
    assert (info["tp_size"], info["dp_size"]) == (2, 2)
    for op in ("ALLREDUCE_ALLGATHER", "REDUCESCATTER_ALLREDUCE"):
        modes = {r["mode"].split("(")[0] for r in results if r["op"] == op}
        assert modes == {"unfused", "NCCL_ONE", "NCCL_TP_DP", "HIER_INTRA_FIRST", "HIER_INTER_FIRST", "AUTOTUNE"}
        # bf16 partial sums of 2-4 values in [-0.5, 0.5): within a few bf16 ulps of the unfused result
        assert all(r["max_abs_diff"] <= 1 / 64 and r["time_us"] > 0 for r in results if r["op"] == op)


def _autotune(h, rank):
    """Lazy per-bucket choice on first use, the full table from run_autotune, identical on every rank."""
    op = MixedCommOp.ALLREDUCE_ALLGATHER
    assert h.autotune_map == {}
    x = torch.ones(1, 4, dtype=h.dtype)
    mode = h.select_autotune_mode(op, x)  # measured now (bucket 0)
    assert mode in h.valid_mode_list and mode != MixedCommMode.AUTOTUNE
    assert h.autotune_map == {op: {0: mode}}
    h.run_autotune()
    assert h.autotune_max_coef == 2
    assert set(h.autotune_map) == set(h.valid_op_list)
    assert all(set(m) == {0, 1} for m in h.autotune_map.values())
    everyone = exchange_objects({o.name: {b: m.name for b, m in v.items()} for o, v in h.autotune_map.items()},
                                dist.group.WORLD, "test", 30.0)
    assert all(e == everyone[0] for e in everyone)
    big = torch.ones(16, 4096, dtype=h.dtype)  # 128 KiB per rank: clamped to the last bucket
    assert h.select_autotune_mode(op, big) == h.autotune_map[op][1]
    rs = MixedCommOp.REDUCESCATTER_ALLREDUCE
    assert h.select_autotune_mode(rs, torch.ones(4, 2048, dtype=h.dtype)) == h.autotune_map[rs][0]


def _errors(h, rank, size):
    x = torch.ones(2, 4, dtype=h.dtype)
    with pytest.raises(TypeError, match="dtype torch.bfloat16, got torch.float32"):
        h.allreduce_allgather(x.float())
    with pytest.raises(ValueError, match="at least 2-d"):
        h.allreduce_allgather(torch.ones(4, dtype=h.dtype))
    with pytest.raises(ValueError, match="divisible by dp_size 2"):
        h.reducescatter_allreduce(torch.ones(3, 4, dtype=h.dtype))
    with pytest.raises(ValueError, match=r"x_out must be \[4, 4\]"):
        h.allreduce_allgather(x, torch.empty(2, 4, dtype=h.dtype))
    for mode in (MixedCommMode.FUSED_OPT_WAITS_MC, MixedCommMode.FUSED_OPT_WAITS_UC):
        with pytest.raises(NotImplementedError, match=f"mode {mode.name}: .*init_nvshmem: the fused mode across"):
            h.allreduce_allgather(x, mode=mode)
    with pytest.raises(NotImplementedError, match="init_virtual_memory: the fused mode is unavailable: it runs on "
                                                  "CUDA tensors"):
        h.init_virtual_memory()
    with pytest.raises(NotImplementedError, match=r"init_nvshmem: the fused mode across nodes \(NVSHMEM\) is "
                                                  "unavailable: it runs on CUDA tensors"):
        h.init_nvshmem()
    with pytest.raises(TypeError, match="mode must be a MixedCommMode"):
        h.allreduce_allgather(x, mode="NCCL_ONE")
    # What the fused mode would refuse (a shape rule, the same on every device).
    ag, rs = MixedCommOp.ALLREDUCE_ALLGATHER, MixedCommOp.REDUCESCATTER_ALLREDUCE
    assert h.fused_refuses(ag, torch.ones(3, 8, dtype=h.dtype)) is None
    assert "multiple of 16 bytes, got 8" in h.fused_refuses(ag, torch.ones(3, 4, dtype=h.dtype))
    assert "empty" in h.fused_refuses(rs, torch.ones(0, 8, dtype=h.dtype))
    # Two virtual nodes: the NVSHMEM one-shot, whose messages must fit one slot.
    assert "above the NVSHMEM one-shot's slot" in h.fused_refuses(ag, torch.empty(1 << 12, 1 << 12, dtype=h.dtype))
    assert h.fused_refuses(ag, torch.empty(1 << 10, 1 << 12, dtype=h.dtype)) is None
    odd = torch.ones(2 + (rank == size - 1), 4, dtype=h.dtype)
    with pytest.raises(ValueError, match=f"rank {size - 1} passes"):
        run_mixed_comm(MixedCommOp.ALLREDUCE_ALLGATHER, h, odd, check_peers=True)


def _constructor_errors(rank, size):
    with pytest.raises(TypeError, match="float16 or torch.bfloat16, got torch.float32"):
        make_handler(rank, size, 2, (None,) * 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="local_tp_size 3 does not divide local_size 2"):
        make_handler(rank, size, 2, (3, None, None, None))
    with pytest.raises(ValueError, match="local_tp_size \\* local_dp_size = 2 \\* 2 != local_size 2"):
        make_handler(rank, size, 2, (2, 2, None, None))
    with pytest.raises(ValueError, match="world_rank"):
        MixedCommHandler(rank, size, (rank + 1) % 2, 2, rank // 2, 2, None, None, None, None, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="min_block_size must be a multiple of 32"):
        make_handler(rank, size, 2, (None,) * 4, min_block_size=100)
    with pytest.raises(ValueError, match="memory must be 'cuda_ipc' or 'vmm', got 'shm'"):
        make_handler(rank, size, 2, (None,) * 4, memory="shm")
    with pytest.raises(NotImplementedError, match="init_nvshmem: the fused mode across nodes"):
        make_handler(rank, size, 2, (None,) * 4, require_fused=True)  # two virtual nodes
    with pytest.raises(NotImplementedError, match="init_virtual_memory: .* runs on CUDA tensors"):
        make_handler(rank, size, size, (None,) * 4, require_fused=True)  # one node, CPU tensors
    h = make_handler(rank, size, 2, (None,) * 4, use_autotune=False)
    assert h.fused_available is False and "NVSHMEM" in h.fused_unavailable_reason
    assert h.memory == "vmm"  # the default: the node's buffers in CUDA virtual memory, as the reference
    h.shutdown()
    with pytest.raises(RuntimeError, match="already called"):
        h.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        h.allreduce(torch.ones(2, 2, dtype=torch.bfloat16))


def _eight_ranks(rank, size):
    for i, (local_size, split) in enumerate([(4, (2, 2, None, 2)),      # TP 2 (node) x DP 4 (2 in node, 2 across)
                                             (4, (2, 2, 2, None)),      # TP 4 (2 in node, 2 across) x DP 2
                                             (2, (2, None, 2, 2))]):    # TP 4 x DP 2 over 4 virtual nodes
        h = make_handler(rank, size, local_size, split, use_autotune=False)
        assert h.para_info.use_mixed and MixedCommMode.HIER_INTER_FIRST in h.valid_mode_list
        check_all_modes(h, rank, size, seed=100 + 10 * i, rows=2, hidden=3, gaussian=False)
        h.shutdown()


def test_mixed_four_ranks():
    run_distributed(_four_ranks, 4)


def test_mixed_eight_ranks():
    run_distributed(_eight_ranks, 8)


def test_parallel_info_ranks():
    """The rank arithmetic of the split, on its own (no processes)."""
    p = ParallelInfo(13, 16, 5, 8, 1, 2, 2, None, None, 2)  # local: tp 2 x dp 4; inter: tp 1 x dp 2
    assert (p.local_tp_rank, p.local_dp_rank, p.inter_tp_rank, p.inter_dp_rank) == (1, 2, 0, 1)
    assert (p.tp_size, p.dp_size, p.tp_rank, p.dp_rank) == (2, 8, 1, 6)
    assert p.world_rank_of(p.tp_rank, p.dp_rank) == 13
    assert all(p.dp_rank_of(p.world_rank_of(t, d)) == d for t in range(p.tp_size) for d in range(p.dp_size))
    assert p.dp_ranks == tuple(p.dp_rank_of(w) for w in range(16)) and p.dp_ranks[13] == 6
    assert p.tp_group_ranks(6) == [12, 13] and p.dp_group_ranks(1) == [1, 3, 5, 7, 9, 11, 13, 15]
    seen = sorted(p.world_rank_of(t, d) for t in range(p.tp_size) for d in range(p.dp_size))
    assert seen == list(range(16))
    with pytest.raises(ValueError, match="world_size 16 != inter_size \\* local_size"):
        ParallelInfo(0, 16, 0, 4, 0, 2)


def _run_two_shot_plan(info: ParallelInfo, op, xs, dtype):
    """Every rank's output of FUSED_OPT_BYTES1_UC as the kernel computes it from the plan: owner o sums its rows
    over the ranks of scatter_src[o] in rank order (float32, rounded once) and every rank of gather_dst[o]
    stores the sum at out_first[o]."""
    send_first, own_rows, scatter_src, gather_dst, out_first, out_rows = _two_shot_plan(info, op, xs[0].shape[0])
    world = info.world_size
    outs = [torch.full((out_rows, xs[0].shape[1]), float("nan"), dtype=dtype) for _ in range(world)]
    for o in range(world):
        n, first = own_rows[o], send_first[o]
        sources = [xs[r][first:first + n] for r in range(world) if scatter_src[o] >> r & 1]
        assert n == 0 or sources, o
        for q in range(world):
            if n and gather_dst[o] >> q & 1:
                outs[q][out_first[o]:out_first[o] + n] = sum_in_order(sources, dtype)
    return outs


@pytest.mark.parametrize("tp,dp", [(2, 1), (8, 1), (2, 2), (4, 2), (2, 4), (1, 4), (3, 2)])
def test_two_shot_plan(tp, dp):
    """The two-shot's work split (which rank sums which rows of whom, and where the sums land) gives every rank
    the unfused composition's result, bit for bit, for row counts that do and do not split evenly."""
    size = tp * dp
    for rank in range(size):
        info = ParallelInfo(rank, size, rank, size, 0, 1, tp, dp, None, None)
        ops = ([MixedCommOp.ALLREDUCE_ALLGATHER, MixedCommOp.REDUCESCATTER_ALLREDUCE] if info.use_mixed
               else [MixedCommOp.ALLREDUCE] if tp > 1 else [MixedCommOp.ALLGATHER, MixedCommOp.REDUCESCATTER])
        for op in ops:
            for rows in (1, 2, 5, 2 * size + 1):
                rows *= 1 if op in GATHER_OPS else dp
                xs = world_inputs(rows + int(op), size, (rows, 8), torch.bfloat16, exact=False)
                got = _run_two_shot_plan(info, op, xs, torch.bfloat16)[rank]
                assert torch.equal(got, expected(op, info, xs, torch.bfloat16)), (tp, dp, op, rows, rank)
                own_rows = _two_shot_plan(info, op, rows)[1]
                # A rank receives its piece from each source and the pieces it needs: far less than the
                # one-shot's world_size messages once TP has several ranks.
                assert max(own_rows) == -(-(rows if op in GATHER_OPS else rows // dp) // tp)


def _fused_mode_choice(rank, size):
    """Which fused mode an input gets where only the fused modes run (ranks sharing a GPU): the fixed rule by
    one-shot buffer size, a measured one-shot choice that cannot take a large input handing it to the
    two-shot, and a mode asked for by name that cannot take it raising. Checked on a CPU handler made to look
    like one that runs only the fused modes (the choice reads shapes only; nothing is launched)."""
    from moe_a2a.comm import mixed
    h = make_handler(rank, size, size, (None,) * 4, use_autotune=False)  # TP 4: the two-shot's buffer is half
    h.torch_modes, h.fused_available = False, True
    h.valid_mode_list = [MixedCommMode.FUSED_OPT_WAITS_UC, MixedCommMode.FUSED_OPT_BYTES1_UC]
    op, waits, bytes1 = MixedCommOp.ALLREDUCE, MixedCommMode.FUSED_OPT_WAITS_UC, MixedCommMode.FUSED_OPT_BYTES1_UC

    def rows(n, hidden=4096):  # shape only: an expanded row costs no memory
        return torch.empty(1, hidden, dtype=h.dtype).expand(n, hidden)

    one_shot_rows = (mixed.FUSED_ONESHOT_MAX_BYTES - 16 * size) // (size * 8192)  # one-shot buffer at the limit
    assert h.resolve_mode(op, rows(one_shot_rows)) == waits
    assert h.resolve_mode(op, rows(one_shot_rows + 1)) == bytes1
    huge = rows(mixed.FUSED_MAX_BUFFER_BYTES // (size * 8192) + 1)  # past the one-shot's buffer, not the two-shot's
    assert "above FUSED_MAX_BUFFER_BYTES" in h.fused_refuses(op, huge, waits)
    assert h.fused_refuses(op, huge, bytes1) is None
    h.use_autotune = True
    h.autotune_map = {op: {b: waits for b in range(h.autotune_max_coef)}}  # as if the one-shot had been measured best
    assert h.resolve_mode(op, huge) == bytes1
    with pytest.raises(ValueError, match="mode FUSED_OPT_WAITS_UC cannot take this input: the message needs"):
        h.resolve_mode(op, huge, waits)
    h.shutdown()
    # Two (virtual) nodes: the one-shot over NVSHMEM is the fused mode; the two-shot is not built there.
    h = make_handler(rank, size, size // 2, (None,) * 4, use_autotune=False)
    h.torch_modes, h.fused_available, h.valid_mode_list = False, True, [waits]
    assert h.fused_modes == (waits,)
    assert h.resolve_mode(op, rows(one_shot_rows + 1)) == waits
    with pytest.raises(NotImplementedError, match="FUSED_OPT_BYTES1_UC: moe_a2a does not build it across nodes"):
        run_mixed_comm(op, h, torch.ones(2, 8, dtype=h.dtype), mode=bytes1)
    h.shutdown()

