"""Lamport all-reduce kernels against the reference oracle, N = 2, 4, 8 ranks (one GPU under MPS, or N GPUs).

Every rank runs the same cases in lockstep: the kernels on its GPU, the oracle (``moe_a2a.comm.reference``)
on CPU copies over the gloo group, then compares. The sum and ``residual_out`` must be bit-exact (same
rank-order float32 sum, same roundings); the norm may differ by the order of its sum of squares (one unit
in the last place); FP8 outputs by one e4m3 step where the norm did.
"""
import re

import pytest
import torch
import torch.distributed as dist

from harness import expect_fault, gather, run_ranks, set_rank_device, skip_reason, synchronize_after_fault
from moe_a2a.comm import (AllReduce, AllReduceFusionOp, AllReduceParams, AllReduceStrategy, LamportWorkspace,
                          MoEAllReduce, MoEAllReduceParams, kernels_available, moe_local_reduction, reference)

pytestmark = pytest.mark.gpu

OP = AllReduceFusionOp
ST = AllReduceStrategy
FP8 = torch.float8_e4m3fn
NORM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
#: Short enough that a broken protocol fails the test in seconds, naming the rank.
TIMEOUT_S = 10.0


def _skip(num_ranks):
    reason = skip_reason(num_ranks)
    if reason is None and not kernels_available():
        reason = "moe_a2a._C lacks the all-reduce kernels"
    return reason


def _inputs(seed, rank, tokens, hidden, dtype, device):
    """x differs per rank; the residual and the parameters are the same on every rank, as in tensor
    parallelism (the fused two-shot takes each row's residual and bias from the rank that owns the row)."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, -0.0])  # the sentinel value must travel as a zero
    g = torch.Generator().manual_seed(seed * 100 + 99)
    residual = torch.randn(tokens, hidden, generator=g).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    bias = (torch.randn(hidden, generator=g) * 0.1).to(dtype)
    scale = torch.rand(1, generator=g) * 0.02 + 0.005
    return [t.to(device) for t in (x, residual, weight, bias, scale)]


def _oracle(x, params):
    """The reference on CPU copies over the gloo group."""
    cpu = lambda t: None if t is None else t.cpu()
    p = AllReduceParams(params.fusion_op, bias=cpu(params.bias), residual=cpu(params.residual),
                        norm_weight=cpu(params.norm_weight), scale=cpu(params.scale), eps=params.eps)
    return reference.epilogue(reference.ordered_sum(x.cpu()), p)


def _compare(what, got, want, op, dtype):
    got = (got,) if op == OP.NONE else tuple(got)
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        g = g.cpu()
        name = f"{what} output {k}"
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        exact = k == len(want) - 1  # the sum (NONE) or residual_out: bitwise
        if g.dtype == FP8:
            torch.testing.assert_close(g.float(), w.float(), rtol=0.13, atol=2e-3, msg=lambda m: f"{name}: {m}")
        elif exact:
            if not torch.equal(g, w):
                bad = (g != w).nonzero()[:5].tolist()
                raise AssertionError(f"{name} differs from the oracle at {bad}")
        else:
            tol = NORM_TOL[dtype]
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


CASES = [  # (op, dtype, tokens, hidden, bias)
    (OP.NONE, torch.bfloat16, 1, 4096, False),
    (OP.NONE, torch.float32, 37, 2048, True),
    (OP.RESIDUAL_RMS_NORM, torch.bfloat16, 1, 7168, False),
    (OP.RESIDUAL_RMS_NORM, torch.bfloat16, 129, 4096, True),
    (OP.RESIDUAL_RMS_NORM, torch.float16, 16, 200, False),   # hidden not a multiple of 128
    (OP.RESIDUAL_RMS_NORM, torch.float32, 3, 16384, False),
    (OP.RESIDUAL_RMS_NORM_QUANT_FP8, torch.bfloat16, 64, 2048, False),
    (OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8, torch.bfloat16, 9, 1000, True),
    (OP.RESIDUAL_RMS_NORM_OUT_QUANT_FP8, torch.float32, 2, 128, False),
    (OP.RESIDUAL_RMS_NORM, torch.bfloat16, 2048, 4096, False),  # two-shot territory, grows the workspace
    (OP.RESIDUAL_RMS_NORM, torch.float16, 8192, 136, True),    # 8k short rows: one-warp blocks, many rows each
]


def _cases_body(rank, num_ranks):
    device = set_rank_device(rank)
    ars = {st: AllReduce(None, st, timeout_s=TIMEOUT_S) for st in (ST.ONESHOT, ST.TWOSHOT)}
    ars[ST.AUTO] = AllReduce(None)  # every default: strategy, timeout, blocks
    for seed, (op, dtype, tokens, hidden, with_bias) in enumerate(CASES):
        x, residual, weight, bias, scale = _inputs(seed, rank, tokens, hidden, dtype, device)
        params = AllReduceParams(op, bias=bias if with_bias else None, residual=residual, norm_weight=weight,
                                 scale=scale, eps=1e-5)
        want = _oracle(x, params)
        for st, ar in ars.items():
            what = f"{num_ranks} ranks, case {seed} {op.name} {dtype} [{tokens}, {hidden}] {st.name}"
            for _ in range(2):  # the second call runs on the next Lamport buffer
                got = ar(x, all_reduce_params=params)
                torch.cuda.synchronize()
                ar.workspace(x.element_size()).check()
                _compare(what, got, want, op, dtype)
    for ar in ars.values():
        ar.destroy()


def _rotation_body(rank, num_ranks):
    """Many calls of changing sizes on one workspace: every buffer is used, cleared and reused."""
    device = set_rank_device(rank)
    ar = AllReduce(None, ST.AUTO, timeout_s=TIMEOUT_S)
    sizes = [(1, 1024), (300, 1024), (2, 1024), (64, 1024), (1, 1024), (513, 1024), (7, 1024)] * 3
    for i, (tokens, hidden) in enumerate(sizes):
        x, residual, weight, _, _ = _inputs(1000 + i, rank, tokens, hidden, torch.bfloat16, device)
        strategy = ST.TWOSHOT if i % 2 else ST.ONESHOT
        ar.strategy = strategy
        params = AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=residual, norm_weight=weight)
        got = ar(x, all_reduce_params=params)
        _compare(f"call {i} [{tokens}, {hidden}] {strategy.name}", got, _oracle(x, params), OP.RESIDUAL_RMS_NORM,
                 torch.bfloat16)
    torch.cuda.synchronize()
    ar.workspace(2).check()
    ar.destroy()


def _graph_body(rank, num_ranks):
    """A captured call replays on the next buffers (the buffer index lives on the device)."""
    device = set_rank_device(rank)
    ar = AllReduce(None, ST.ONESHOT, timeout_s=TIMEOUT_S)
    x, residual, weight, _, _ = _inputs(5, rank, 8, 2048, torch.bfloat16, device)
    params = AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=residual, norm_weight=weight)
    ar(x, all_reduce_params=params)  # creates the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            out = ar(x, all_reduce_params=params)
    for i in range(5):
        x.copy_(_inputs(50 + i, rank, 8, 2048, torch.bfloat16, device)[0])
        graph.replay()
        torch.cuda.synchronize()
        _compare(f"replay {i}", out, _oracle(x, params), OP.RESIDUAL_RMS_NORM, torch.bfloat16)
    ar.workspace(2).check()
    ar.destroy()


def _moe_body(rank, num_ranks):
    device = set_rank_device(rank)
    moe = MoEAllReduce(None, timeout_s=TIMEOUT_S)
    g = torch.Generator().manual_seed(rank)
    tokens, hidden, topk, rows = 32, 4096, 4, 80
    x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, rows, (tokens, topk), generator=g, dtype=torch.int32)
    idx[0, 1] = -1
    shared = torch.Generator().manual_seed(99)  # the residual and the weight: the same on every rank
    p = MoEAllReduceParams(residual=torch.randn(tokens, hidden, generator=shared).to(torch.bfloat16),
                           norm_weight=(torch.rand(hidden, generator=shared) + 0.5).to(torch.bfloat16),
                           expert_scale_factor=torch.rand(tokens, topk, generator=g), expanded_idx_to_permuted_idx=idx,
                           shared_expert_output=torch.randn(tokens, hidden, generator=g).to(torch.bfloat16))
    local = moe_local_reduction(x, p)  # the definition, on CPU
    ref = _oracle(local, AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=p.residual, norm_weight=p.norm_weight,
                                         eps=p.eps))
    to = lambda t: t.to(device)
    pg = MoEAllReduceParams(residual=to(p.residual), norm_weight=to(p.norm_weight),
                            expert_scale_factor=to(p.expert_scale_factor),
                            expanded_idx_to_permuted_idx=to(idx), shared_expert_output=to(p.shared_expert_output))
    got = moe(to(x), all_reduce_params=pg)
    torch.cuda.synchronize()
    _compare("moe regular", got, ref, OP.RESIDUAL_RMS_NORM, torch.bfloat16)
    moe.destroy()


def _error_text(ws) -> str:
    """The error a kernel of this workspace recorded, or ''."""
    try:
        ws.check()
    except RuntimeError as e:
        return str(e)
    return ""


def _mismatch_body(rank, num_ranks):
    """Ranks passing different shapes: the kernels record an error naming both shapes and trap; nothing hangs,
    and no rank reads the outputs as valid."""
    device = set_rank_device(rank)
    ar = AllReduce(None, ST.ONESHOT, timeout_s=2.0)
    ar(torch.ones(4, 1024, device=device, dtype=torch.bfloat16))  # a good call first
    torch.cuda.synchronize()
    ws = ar.workspace(2)
    ws.check()
    expect_fault(lambda: ar(torch.ones(4 + rank, 1024, device=device, dtype=torch.bfloat16)))
    texts = gather(_error_text(ws))  # under MPS the first trap ends the others' kernels: some hold no record
    assert any(re.search(r"rank \d+ (got a message of shape|timed out)", t) for t in texts), texts
    with pytest.raises(RuntimeError):
        ar(torch.ones(4, 1024, device=device, dtype=torch.bfloat16))
    dist.barrier()
    synchronize_after_fault()


def _timeout_body(rank, num_ranks):
    """A rank that does not take part: its peers time out naming it, trap, and raise at every later call."""
    device = set_rank_device(rank)
    ar = AllReduce(None, ST.ONESHOT, timeout_s=1.0)
    x = torch.ones(2, 1024, device=device, dtype=torch.bfloat16)
    ar(x)
    torch.cuda.synchronize()
    dist.barrier()
    if rank != 0:
        expect_fault(lambda: ar(x))
    texts = gather(_error_text(ar.workspace(2)))
    assert any(texts) and all(not t or re.search(r"timed out after 1000 ms .* waiting for rank 0", t)
                              for t in texts), texts
    if rank != 0:
        with pytest.raises(RuntimeError, match="timed out" if texts[rank] else None):
            ar(x)
    dist.barrier()
    synchronize_after_fault()


def _residual_mismatch_body(rank, num_ranks):
    """The fused two-shot with a residual that is not the same on every rank (the contract): a rank that reads
    another owner's rows records the token and the owner, and the call raises instead of returning the
    owner's residual silently."""
    device = set_rank_device(rank)
    ar = AllReduce(None, ST.TWOSHOT, timeout_s=TIMEOUT_S)
    x, residual, weight, _, _ = _inputs(7, rank, 8, 1024, torch.bfloat16, device)
    params = AllReduceParams(OP.RESIDUAL_RMS_NORM, residual=residual, norm_weight=weight)
    got = ar(x, all_reduce_params=params)  # replicated: a good call first
    torch.cuda.synchronize()
    _compare("replicated residual", got, _oracle(x, params), OP.RESIDUAL_RMS_NORM, torch.bfloat16)
    ws = ar.workspace(2)
    ws.check()
    params.residual = residual + rank  # rank 1's rows now differ from rank 0's (the owner of tokens 0-3)
    expect_fault(lambda: ar(x, all_reduce_params=params))
    texts = gather(_error_text(ws))
    assert any(re.search(r"residual of token \d+ differs from that of rank \d+", t) for t in texts), texts
    dist.barrier()
    synchronize_after_fault()


def _bad_input_body(rank, num_ranks):
    device = set_rank_device(rank)
    x = torch.randn(4, 100, device=device, dtype=torch.bfloat16)  # rows of 200 bytes
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        AllReduce(None, ST.ONESHOT)(x)
    out = AllReduce(None, ST.AUTO)(x)  # AUTO falls back to NCCL-style all_reduce + torch ops
    torch.testing.assert_close(out.cpu().float(), reference.ordered_sum(x.cpu()).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        AllReduce(None, ST.ONESHOT)(torch.randn(4, 128, device=device, dtype=torch.float64))


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_cases(num_ranks):
    if _skip(num_ranks):
        pytest.skip(_skip(num_ranks))
    run_ranks(_cases_body, num_ranks)


def _rotation_graph_moe_body(rank, num_ranks):
    _rotation_body(rank, num_ranks)
    _graph_body(rank, num_ranks)
    _moe_body(rank, num_ranks)


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_rotation_graph_moe(num_ranks):
    if _skip(num_ranks):
        pytest.skip(_skip(num_ranks))
    run_ranks(_rotation_graph_moe_body, num_ranks)


def _workspace_body(rank, num_ranks):
    """The FlashInfer-style workspace API on its own: sizing, rounding, sufficiency, destroy."""
    set_rank_device(rank)
    ws = LamportWorkspace(None, buffer_size_in_bytes=1 << 20, dtype=torch.bfloat16, timeout_s=TIMEOUT_S)
    assert ws.buffer_size_bytes == 8 << 20 and ws.NUM_LAMPORT_BUFFERS == 3
    assert ws.world_size == num_ranks and ws.rank == rank
    assert ws.is_buffer_size_sufficient(num_ranks, 16, 4096, torch.bfloat16, ST.ONESHOT)
    assert not ws.is_buffer_size_sufficient(num_ranks, 8192, 4096, torch.bfloat16, ST.TWOSHOT)
    ws.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        ws.check()
    ws = LamportWorkspace(None, max_num_tokens=4096, hidden_dim=7168, dtype=torch.bfloat16)
    assert ws.is_buffer_size_sufficient(num_ranks, 4096, 7168, torch.bfloat16, ST.TWOSHOT)
    assert ws.buffer_size_bytes % (8 << 20) == 0
    ws.destroy()


def _errors_body(rank, num_ranks):
    _workspace_body(rank, num_ranks)
    _bad_input_body(rank, num_ranks)


def test_errors():
    if _skip(2):
        pytest.skip(_skip(2))
    run_ranks(_errors_body, 2)


@pytest.mark.parametrize("body", [_mismatch_body, _timeout_body, _residual_mismatch_body],
                         ids=["shape_mismatch", "timeout", "residual_mismatch"])
def test_failed_kernel_raises(body):
    """Each in fresh processes: a kernel that failed traps, which ends the CUDA context."""
    if _skip(2):
        pytest.skip(_skip(2))
    run_ranks(body, 2)
