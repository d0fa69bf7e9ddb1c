"""moe_a2a.comm on CPU: every fusion op, dtype and strategy against the unfused torch composition, across
spawned gloo ranks (many cases per spawn), autograd (gradcheck in float64), bad input, and the sizing."""
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import run_distributed
from moe_a2a.backends.waits import CollectiveError
from moe_a2a.comm import (NUM_LAMPORT_BUFFERS, AllReduce, AllReduceFusionOp, AllReduceParams, AllReduceStrategy,
                          LamportWorkspace, MoEAllReduce, MoEAllReduceParams, choose_strategy,
                          get_required_buffer_size_bytes, kernels_available, reference)
from moe_a2a.comm import workspace as ws_mod

OP = AllReduceFusionOp
ST = AllReduceStrategy
FP8 = torch.float8_e4m3fn
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OPS = (OP.NONE, OP.RESIDUAL_RMS_NORM, OP.RESIDUAL_RMS_NORM_QUANT_FP8, OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8)
SHAPES = ((1, 128), (7, 200), (300, 128), (2, 16384), (33, 1000), (64, 4096), (5, 136), (8192, 160))
STRATEGIES = (ST.AUTO, ST.ONESHOT, ST.TWOSHOT, ST.NCCL, ST.MIN_LATENCY)
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _inputs(seed, rank, tokens, hidden, dtype):
    """Rank ``rank``'s inputs of case ``seed`` (any rank can rebuild any other rank's)."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype)
    g_shared = torch.Generator().manual_seed(seed)  # replicated tensors: same on every rank
    residual = torch.randn(tokens, hidden, generator=g_shared).to(dtype)
    weight = (torch.rand(hidden, generator=g_shared) + 0.5).to(dtype)
    bias = (torch.randn(hidden, generator=g_shared) * 0.1).to(dtype)
    scale = torch.rand(1, generator=g_shared) * 0.02 + 0.005
    return x, residual, weight, bias, scale


def _unfused(x, world, residual, weight, bias, scale, eps, op):
    """The unfused torch sequence: all_reduce (gloo, float32), add bias, add residual, RMSNorm, quantize."""
    s = x.float().clone()
    dist.all_reduce(s)
    s = s.to(x.dtype)
    if bias is not None:
        s = s + bias
    if op == OP.NONE:
        return (s,)
    r = s + residual
    n = F.rms_norm(r.float(), (r.shape[-1],), weight.float(), eps).to(x.dtype)
    if op == OP.RESIDUAL_RMS_NORM:
        return n, r
    q = (n.float() / scale).clamp(-448, 448).to(FP8)
    return {OP.RESIDUAL_RMS_NORM: (n, r), OP.RESIDUAL_RMS_NORM_QUANT_FP8: (q, r),
            OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8: (n, q, r)}[op]


def _rank_order_sum(seed, world, tokens, hidden, dtype):
    acc = None
    for r in range(world):
        v = _inputs(seed, r, tokens, hidden, dtype)[0].float()
        acc = v if acc is None else acc + v
    return acc.to(dtype)


def _close(name, got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.shape, want.dtype)
    if got.dtype == FP8:  # one e4m3 step is 1/8 relative; compare the values
        got, want, tol = got.float(), want.float(), 0.13
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def _all_equal_across_ranks(t):
    raw = t.contiguous().view(torch.uint8).reshape(-1)
    parts = [torch.empty_like(raw) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, raw)
    return all(torch.equal(p, parts[0]) for p in parts)


def _cases(world, quick):
    cases, i = [], 0
    for op in OPS:
        for dtype in DTYPES:
            for _ in range(1 if quick else 2):
                tokens, hidden = SHAPES[i % len(SHAPES)]
                cases.append((i, op, dtype, tokens, hidden, STRATEGIES[i % len(STRATEGIES)], i % 3 == 0))
                i += 1
    return cases


def _fused_body(rank, world, quick):
    ars = {st: AllReduce(None, st) for st in STRATEGIES}
    for seed, op, dtype, tokens, hidden, strategy, with_bias in _cases(world, quick):
        x, residual, weight, bias, scale = _inputs(seed, rank, tokens, hidden, dtype)
        bias = bias if with_bias else None
        params = AllReduceParams(fusion_op=op, residual=residual, norm_weight=weight, bias=bias, scale=scale,
                                 eps=1e-5)
        what = f"case {seed}: {op.name} {dtype} [{tokens}, {hidden}] {strategy.name} bias={with_bias}"
        out = ars[strategy](x, all_reduce_params=params)
        out = (out,) if op == OP.NONE else out
        want = _unfused(x, world, residual, weight, bias, scale, 1e-5, op)
        assert len(out) == len(want), what
        for k, (o, w) in enumerate(zip(out, want)):
            _close(f"{what} output {k}", o, w, TOL[dtype])
        if strategy != ST.NCCL:
            # Deterministic: the sum is the rank-order float32 sum, identical on every rank and every run.
            again = ars[strategy](x, all_reduce_params=params)
            again = (again,) if op == OP.NONE else again
            for o, a in zip(out, again):
                assert torch.equal(o.view(torch.uint8), a.view(torch.uint8)), f"{what}: run to run"
                assert _all_equal_across_ranks(o), f"{what}: ranks disagree"
            s = _rank_order_sum(seed, world, tokens, hidden, dtype)
            s = s if bias is None else s + bias
            if op == OP.NONE:
                assert torch.equal(out[0], s), f"{what}: not the rank-order sum"
            else:
                assert torch.equal(out[-1], s + residual), f"{what}: residual_out not the rank-order sum"
    # Leading dims are kept; a [B, S, H] input is [B * S, H] rows.
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(rank))
    out = ars[ST.AUTO](x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=torch.ones_like(x),
                                                            norm_weight=torch.ones(64)))
    assert [o.shape for o in out] == [x.shape, x.shape]


def _moe_body(rank, world):
    ar = MoEAllReduce(None)
    for seed, (dtype, tokens, hidden, topk, rows) in enumerate(
            [(torch.bfloat16, 5, 256, 2, 9), (torch.float32, 40, 200, 4, 100), (torch.float16, 1, 128, 1, 3)]):
        g = torch.Generator().manual_seed(1000 + seed * 10 + rank)
        gs = torch.Generator().manual_seed(2000 + seed)
        x = torch.randn(rows, hidden, generator=g).to(dtype)
        idx = torch.randint(0, rows, (tokens, topk), generator=g, dtype=torch.int32)
        idx[torch.rand(tokens, topk, generator=g) < 0.2] = -1
        esf = torch.rand(tokens, topk, generator=g)
        shared = torch.randn(tokens, hidden, generator=g).to(dtype)
        residual = torch.randn(tokens, hidden, generator=gs).to(dtype)
        w = (torch.rand(hidden, generator=gs) + 0.5).to(dtype)
        p = MoEAllReduceParams(residual=residual, norm_weight=w, expert_scale_factor=esf,
                               expanded_idx_to_permuted_idx=idx, shared_expert_output=shared, eps=1e-6)
        norm, res = ar(x, all_reduce_params=p)
        # Composition: weighted rows per token (float64), plus shared, all-reduce, residual, RMSNorm.
        local = shared.double().clone()
        for t in range(tokens):
            for k in range(topk):
                if idx[t, k] >= 0:
                    local[t] += x[idx[t, k]].double() * float(esf[t, k])
        want = _unfused(local.to(dtype), world, residual, w, None, None, 1e-6, OP.RESIDUAL_RMS_NORM)
        _close(f"moe regular {dtype}", norm, want[0], TOL[dtype] * 2)
        _close(f"moe regular {dtype} residual", res, want[1], TOL[dtype] * 2)
        # Min-latency layout: [num_experts, tokens, hidden], only the first device_num_experts active.
        experts = 3
        xe = torch.randn(experts, tokens, hidden, generator=g).to(dtype)
        scale = torch.rand(experts, tokens, generator=g)
        active = torch.tensor([2], dtype=torch.int32)
        p = MoEAllReduceParams(residual=residual, norm_weight=w, expert_scale_factor=scale, device_num_experts=active,
                               shared_expert_output=shared, is_cutlass_min_latency=True)
        norm, res = ar(xe, all_reduce_params=p)
        local = shared.double() + (xe[:2].double() * scale[:2].double().unsqueeze(-1)).sum(0)
        want = _unfused(local.to(dtype), world, residual, w, None, None, 1e-6, OP.RESIDUAL_RMS_NORM)
        _close(f"moe min-latency {dtype}", norm, want[0], TOL[dtype] * 2)
        _close(f"moe min-latency {dtype} residual", res, want[1], TOL[dtype] * 2)


def _autograd_body(rank, world):
    ar = AllReduce(None, ST.AUTO)
    # Plain all-reduce: backward is identity (Megatron's reduce-from-tensor-parallel region).
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    y = ar(x)
    g = torch.randn(4, 16, dtype=torch.float64)
    y.backward(g)
    assert torch.equal(x.grad, g)
    # Fused residual + RMSNorm (+ bias): gradcheck in float64. The ranks take turns: gradcheck moves one
    # element at a time, so the sum must depend on one rank's input only. The checking rank announces each
    # forward call (a broadcast), and the others join that call's collectives with fixed inputs.
    gen = torch.Generator().manual_seed(7 + rank)
    for op in (OP.RESIDUAL_RMS_NORM, OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8, OP.RESIDUAL_RMS_NORM_QUANT_FP8, OP.NONE):
        for active in range(world):
            x = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
            residual = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
            weight = (torch.rand(8, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
            bias = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
            scale = torch.tensor([0.01])

            def f(x, residual, weight, bias):
                dist.broadcast(torch.ones(1), src=active)
                out = ar(x, all_reduce_params=AllReduceParams(op, residual=residual, norm_weight=weight, bias=bias,
                                                              scale=scale, eps=1e-3))
                out = (out,) if op == OP.NONE else out
                return tuple(o for o in out if o.dtype == torch.float64)

            if rank == active:
                inputs = (x, residual, weight, bias) if op != OP.NONE else (x, bias)
                fn = f if op != OP.NONE else (lambda x, bias: f(x, None, None, bias))
                assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5), f"{op.name} rank {active}"
                dist.broadcast(torch.zeros(1), src=active)
            else:
                while True:
                    flag = torch.empty(1)
                    dist.broadcast(flag, src=active)
                    if flag.item() == 0:
                        break
                    with torch.no_grad():
                        ar(x, all_reduce_params=AllReduceParams(op, residual=residual, norm_weight=weight,
                                                                bias=bias, scale=scale, eps=1e-3))


def _bad_input_body(rank, world):
    ar = AllReduce(None)

    def expect(exc, text, fn):
        with pytest.raises(exc, match=text):
            fn()

    # Shapes differ across ranks: every rank raises, naming each rank's shape; nothing hangs.
    x = torch.randn(2 + rank, 16)
    expect(ValueError, r"differ across ranks .*rank 0: \[2, 16\]", lambda: ar(x))
    # One rank passes a wrong dtype: it raises TypeError, the peers ValueError naming it.
    x = torch.randn(4, 16) if rank else torch.ones(4, 16, dtype=torch.int32)
    if rank == 0:
        expect(TypeError, "dtype", lambda: ar(x))
    else:
        expect(ValueError, r"rank\(s\) \[0\] rejected", lambda: ar(x))
    x = torch.randn(4, 16)
    expect(ValueError, "needs residual and norm_weight",
           lambda: ar(x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM)))
    expect(ValueError, r"residual must have shape \[4, 16\]",
           lambda: ar(x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=torch.randn(4, 8),
                                                           norm_weight=torch.ones(16))))
    expect(TypeError, "norm_weight must have dtype",
           lambda: ar(x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=x,
                                                           norm_weight=torch.ones(16, dtype=torch.float64))))
    expect(TypeError, "scale",
           lambda: ar(x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM_QUANT_FP8, residual=x,
                                                           norm_weight=torch.ones(16))))
    expect(NotImplementedError, "NVFP4",
           lambda: ar(x, all_reduce_params=AllReduceParams(OP.RESIDUAL_RMS_NORM_QUANT_NVFP4, residual=x,
                                                           norm_weight=torch.ones(16))))
    expect(TypeError, "built for torch.float16", lambda: AllReduce(None, dtype=torch.float16)(x))
    expect(ValueError, "timeout_s must be a number > 0, got 0", lambda: AllReduce(None, timeout_s=0))
    expect(NotImplementedError, "UB", lambda: AllReduce(None, ST.UB))
    # MoE: a token index out of range on one rank; the peers raise too.
    p = MoEAllReduceParams(residual=torch.randn(2, 16), norm_weight=torch.ones(16),
                           expert_scale_factor=torch.rand(2, 2),
                           expanded_idx_to_permuted_idx=torch.tensor([[0, 1], [2, 9 if rank == 1 else 3]]))
    moe = MoEAllReduce(None)
    if rank == 1:
        expect(ValueError, "holds 9", lambda: moe(torch.randn(4, 16), all_reduce_params=p))
    else:
        expect(ValueError, r"rank\(s\) \[1\] rejected", lambda: moe(torch.randn(4, 16), all_reduce_params=p))
    # enable_allreduce=False returns the input itself.
    assert ar(x, all_reduce_params=AllReduceParams(enable_allreduce=False)) is x
    # A CUDA input for ONESHOT without kernels: a clear error (skipped where CUDA exists).


def _all_bodies(rank, world):
    _fused_body(rank, world, quick=False)
    _moe_body(rank, world)
    _autograd_body(rank, world)
    _bad_input_body(rank, world)


def test_two_ranks_everything():
    run_distributed(_all_bodies, 2)


def _three_rank_body(rank, world):
    _fused_body(rank, world, quick=True)
    _moe_body(rank, world)


def test_three_ranks():
    run_distributed(_three_rank_body, 3)


def test_reference_definitions():
    """The epilogue matches its written definition, bit for bit, in one process."""
    x, residual, weight, bias, scale = _inputs(3, 0, 5, 96, torch.bfloat16)
    p = AllReduceParams(OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8, bias=bias, residual=residual, norm_weight=weight,
                        scale=scale, eps=1e-5)
    norm, quant, res = reference.epilogue(x, p)
    assert torch.equal(res, (x + bias) + residual)
    r = res.float()
    assert torch.equal(norm, (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()).to(x.dtype))
    assert torch.equal(quant.float(), (norm.float() * (1 / scale)).clamp(-448, 448).to(FP8).float())
    with pytest.raises(NotImplementedError, match="NVFP4"):
        reference.epilogue(x, AllReduceParams(OP.RESIDUAL_RMS_NORM_QUANT_NVFP4, residual=residual, norm_weight=weight))


def test_workspace_sizing():
    bf = torch.bfloat16
    assert NUM_LAMPORT_BUFFERS == 3 and LamportWorkspace.NUM_LAMPORT_BUFFERS == 3
    assert get_required_buffer_size_bytes(8, 16, 4096, bf, ST.ONESHOT) == 8 * 16 + 8 * 16 * 4096 * 2
    # two-shot: 2 stages of ceil(T / tp) * tp tokens
    assert get_required_buffer_size_bytes(8, 17, 4096, bf, ST.TWOSHOT) == 8 * 16 + 3 * 8 * (2 * 4096 * 2 + 16)
    assert get_required_buffer_size_bytes(4, 1, 128, torch.float32, ST.TWOSHOT) == 4 * 16 + 1 * 4 * (2 * 128 * 4 + 16)
    with pytest.raises(ValueError, match="num_tokens"):
        get_required_buffer_size_bytes(2, -1, 128, bf)
    with pytest.raises(ValueError, match="strategy"):
        get_required_buffer_size_bytes(2, 1, 128, bf, ST.NCCL)
    # A workspace sized for 4096 tokens suffices for fewer, not for more; growth rounds to 8 MiB.
    size = LamportWorkspace.size_for(8, 4096, 7168, bf)
    assert size >= get_required_buffer_size_bytes(8, 4096, 7168, bf, ST.TWOSHOT)
    assert ws_mod._round_up(size + 1, ws_mod.GROWTH_BYTES) % (8 << 20) == 0
    grown = ws_mod._round_up(size, ws_mod.GROWTH_BYTES)
    assert ws_mod.buffer_size_sufficient(grown, 8, 4096, 7168, bf, ST.TWOSHOT)
    assert ws_mod.buffer_size_sufficient(grown, 8, 1, 7168, bf)
    assert not ws_mod.buffer_size_sufficient(grown, 8, 16384, 7168, bf, ST.TWOSHOT)


def test_strategy_choice_fallback_and_table(tmp_path):
    bf = torch.bfloat16
    empty = {"entries": {}}
    # Fallback: one-shot up to 512 KiB of tp * tokens * hidden * elem, and whenever tokens < tp.
    assert choose_strategy(8, 8, 4096, bf, empty) == "oneshot"      # 8*8*4096*2 = 512 KiB
    assert choose_strategy(8, 16, 4096, bf, empty) == "twoshot"
    assert choose_strategy(8, 4, 1 << 20, bf, empty) == "oneshot"
    table = {"entries": {"8": [{"bytes": 65536, "oneshot_us": 10.0, "twoshot_us": 12.0},
                               {"bytes": 1 << 20, "oneshot_us": 30.0, "twoshot_us": 20.0}]}}
    assert choose_strategy(8, 8, 4096, bf, table) == "oneshot"      # 64 KiB per rank: the 64 KiB row
    assert choose_strategy(8, 8, 2048, bf, table) == "oneshot"      # 32 KiB: nearest (log) is the 64 KiB row
    assert choose_strategy(8, 64, 4096, bf, table) == "twoshot"     # 512 KiB: nearest (log) is the 1 MiB row
    assert choose_strategy(4, 64, 4096, bf, table) == "twoshot"     # no rows for 4 ranks: fallback
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert ws_mod.load_table(str(path)) == table


def test_kernels_missing_is_a_clear_error():
    if kernels_available():
        pytest.skip("the kernels are built here")
    with pytest.raises(NotImplementedError, match="moe_a2a._C"):
        LamportWorkspace(None, max_num_tokens=1, hidden_dim=128, dtype=torch.bfloat16)


def test_benchmark_table_feeds_auto(tmp_path, monkeypatch):
    """What ``python -m benchmarks all-reduce --write-table`` records is what AUTO reads back."""
    from benchmarks.allreduce import _sizes, tuning_entries
    assert _sizes(8 << 10, 256 << 20)[0] == 8 << 10 and _sizes(8 << 10, 256 << 20)[-1] == 256 << 20
    rows = [{"ranks": 4, "bytes": 1 << 16, "op": "oneshot", "time_us": 9.0},
            {"ranks": 4, "bytes": 1 << 16, "op": "twoshot", "time_us": 14.0},
            {"ranks": 4, "bytes": 1 << 24, "op": "oneshot", "time_us": 900.0},
            {"ranks": 4, "bytes": 1 << 24, "op": "twoshot", "time_us": 400.0},
            {"ranks": 4, "bytes": 1 << 24, "op": "fused", "time_us": 420.0}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": tuning_entries(rows)}))
    monkeypatch.setenv("MOE_A2A_ALLREDUCE_TABLE", str(path))
    bf = torch.bfloat16
    assert choose_strategy(4, 8, 4096, bf) == "oneshot"       # 64 KiB
    assert choose_strategy(4, 1024, 4096, bf) == "twoshot"    # 8 MiB: nearest (log) is 16 MiB
    assert choose_strategy(8, 1024, 4096, bf) == "twoshot"    # no 8-rank rows: the fallback rule


def test_constructor_arguments():
    with pytest.raises(RuntimeError, match="init_process_group"):
        AllReduce(None)


def _share_fds_body(rank, size):
    """Each rank's descriptor reaches every rank (a duplicate that reads the sender's file), own entry untouched."""
    import os
    import tempfile
    from moe_a2a.comm.fd_share import share_fds
    with tempfile.TemporaryFile() as f:
        f.write(f"rank {rank}".encode())
        f.flush()
        fds = share_fds(f.fileno(), dist.group.WORLD, 30.0)
        assert fds[rank] == f.fileno()
        for r, fd in enumerate(fds):
            assert os.pread(fd, 16, 0) == f"rank {r}".encode(), (rank, r)
            if r != rank:
                assert fd != fds[rank]
                os.close(fd)


def test_share_fds_between_ranks():
    run_distributed(_share_fds_body, 3)


def test_workspace_memory_kinds():
    with pytest.raises(ValueError, match="memory must be 'cuda_ipc' or 'vmm', got 'shm'"):
        ws_mod.LamportWorkspace(buffer_size_in_bytes=1 << 20, dtype=torch.bfloat16, memory="shm")


def _stall_body(rank, num_ranks, strategy):
    """A rank whose peer never calls raises within its deadline on the host path (reference or NCCL), naming the
    peer; the AllReduce then refuses further calls instead of mixing a new collective with the abandoned one."""
    ar = AllReduce(None, strategy, timeout_s=1.0)
    x = torch.randn(4, 64)
    ar(x)  # one call together
    if rank == 1:
        time.sleep(8)  # never calls again; lives past rank 0's deadline and report window
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        ar(x)
    waited = time.monotonic() - start
    text = str(info.value)
    assert "AllReduce (argument exchange) on rank 0 timed out after 1 s" in text, text
    assert "rank 1 of the group did not arrive" in text and "AllReduce(timeout_s=...) sets the deadline" in text, text
    assert waited < 5, (waited, text)
    with pytest.raises(CollectiveError, match=r"refuses further calls \(create a new AllReduce"):
        ar(x)
    os._exit(0)  # the abandoned collective cannot be finished: leave without the harness's final barrier


@pytest.mark.parametrize("strategy", [AllReduceStrategy.AUTO, AllReduceStrategy.NCCL], ids=["reference", "nccl"])
def test_stalled_peer_is_named_within_the_deadline(strategy):
    run_distributed(_stall_body, 2, strategy, timeout=60)
