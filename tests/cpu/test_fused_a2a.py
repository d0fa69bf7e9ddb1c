"""moe_a2a.fused_a2a: forward against an independent computation, gradients by gradcheck in float64.

gradcheck sees the global function: the inputs of every rank in, the outputs of every rank out (padded
to one shape and gathered). Every rank runs it in lockstep on the same global inputs, so every rank
makes the same perturbations and backward calls, and the collectives inside line up.
"""
import ast
import importlib.util
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import gradcheck

from dist_utils import GatherRanks, Replicated, run_distributed
from moe_a2a import Buffer, fused_a2a
from moe_a2a.fused_a2a import (HybridEPHandle, fused_combine, fused_dispatch, hybrid_ep_combine,
                               hybrid_ep_dispatch)

HIDDEN = 3  # gradcheck perturbs every element: keep tensors tiny


# ------------------------------------------------------------------------------------------ inputs
class Case:
    """Inputs of every rank, built identically on all ranks from one seed."""

    def __init__(self, seed, num_ranks, num_tokens, local_experts, topk, targets=None, drop=0.25,
                 nowhere_rank=None, hidden=HIDDEN):
        gen = torch.Generator().manual_seed(seed)
        self.num_ranks, self.num_local, self.topk = num_ranks, local_experts, topk
        self.num_experts = num_ranks * local_experts
        pool = torch.arange(self.num_experts) if targets is None else torch.tensor(targets)
        self.x, self.idx, self.probs, self.prob_map = [], [], [], []
        for r, t in enumerate(num_tokens):
            rows = [pool[torch.randperm(len(pool), generator=gen)[:topk]] for _ in range(t)]
            idx = torch.stack(rows) if rows else torch.empty(0, topk, dtype=torch.int64)
            idx = idx.masked_fill(torch.rand(t, topk, generator=gen) < drop, -1)
            if r == nowhere_rank:
                idx.fill_(-1)
            self.x.append(torch.randn(t, hidden, generator=gen, dtype=torch.float64))
            self.idx.append(idx)
            self.probs.append(torch.rand(t, topk, generator=gen, dtype=torch.float64) + 0.1)
            # Dense probabilities for the HybridEP form: random where unrouted, which must be ignored.
            dense = torch.rand(t, self.num_experts, generator=gen, dtype=torch.float64)
            for k in range(topk):
                ok = idx[:, k] >= 0
                dense[ok.nonzero().view(-1), idx[ok, k]] = self.probs[r][ok, k]
            self.prob_map.append(dense)
        self.num_tokens = list(num_tokens)

    def routing_map(self, r):
        m = torch.zeros(self.num_tokens[r], self.num_experts + 1, dtype=torch.bool)
        m.scatter_(1, torch.where(self.idx[r] >= 0, self.idx[r], self.num_experts), True)
        return m[:, :self.num_experts]


def expected_fused_dispatch(case, me):
    """Rows rank ``me`` receives: by source rank, then token; local ids / weights, -1 / 0 elsewhere."""
    lo, hi = me * case.num_local, (me + 1) * case.num_local
    xs, idxs, ps = [], [], []
    for s in range(case.num_ranks):
        local = (case.idx[s] >= lo) & (case.idx[s] < hi)
        rows = local.any(1)
        xs.append(case.x[s][rows])
        idxs.append(torch.where(local, case.idx[s] - lo, -1)[rows])
        ps.append(torch.where(local, case.probs[s], 0.0)[rows])
    counts = torch.tensor([sum(int((i == lo + e).sum()) for i in case.idx) for e in range(case.num_local)])
    return torch.cat(xs), torch.cat(idxs), torch.cat(ps), counts


def expected_hybrid_dispatch(case, me, pad, num_rows=None):
    """Expert-grouped rows of rank ``me``: expert by expert, by source rank then token, zero-padded."""
    xs, ps, counts = [], [], []
    for e in range(case.num_local):
        expert = me * case.num_local + e
        ex = [case.x[s][case.routing_map(s)[:, expert]] for s in range(case.num_ranks)]
        ep = [case.prob_map[s][case.routing_map(s)[:, expert], expert] for s in range(case.num_ranks)]
        ex, ep = torch.cat(ex), torch.cat(ep)
        padded = (ex.size(0) + pad - 1) // pad * pad
        xs.append(F.pad(ex, (0, 0, 0, padded - ex.size(0))))
        ps.append(F.pad(ep, (0, padded - ep.size(0))))
        counts.append(padded)
    x, p = torch.cat(xs), torch.cat(ps)
    if num_rows is not None:
        x, p = F.pad(x, (0, 0, 0, num_rows - x.size(0))), F.pad(p, (0, num_rows - p.size(0)))
    return x, p, torch.tensor(counts)


def pad_rows(t, rows):
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.size(0)))


def global_input(tensors, rows):
    """The inputs of every rank, padded to ``rows``: ``[num_ranks, rows, ...]`` float64, needing grad."""
    return torch.stack([pad_rows(t, rows) for t in tensors]).requires_grad_()


def all_max(value: int) -> int:
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


# ----------------------------------------------------------------------------------- gradchecks
def check_fused(case, rank, group, fast=True):
    """Forward against the expected rows; gradcheck of FusedDispatch (x and probs) and FusedCombine."""
    t, t_max, e = case.num_tokens[rank], max(case.num_tokens), case.num_experts
    idx = case.idx[rank]
    recv_x, recv_idx, recv_p, tpe, handle = fused_dispatch(case.x[rank], idx, case.probs[rank], e, group)
    want_x, want_idx, want_p, want_counts = expected_fused_dispatch(case, rank)
    assert torch.equal(recv_x, want_x) and torch.equal(recv_idx, want_idx) and torch.equal(recv_p, want_p)
    assert tpe.dtype == torch.int64 and torch.equal(tpe, want_counts)
    n, n_max = recv_x.size(0), all_max(recv_x.size(0))

    def dispatch(xs, ps):
        x, p = Replicated.apply(xs)[rank, :t], Replicated.apply(ps)[rank, :t]
        rx, _, rp, _, _ = fused_dispatch(x, idx, p, e, group)
        return GatherRanks.apply(pad_rows(rx, n_max)), GatherRanks.apply(pad_rows(rp, n_max))

    assert gradcheck(dispatch, (global_input(case.x, t_max), global_input(case.probs, t_max)), fast_mode=fast)

    # Weights' gradient: only slots whose expert is on the receiving rank (never -1 ones).
    x1, p1 = case.x[rank].clone().requires_grad_(), case.probs[rank].clone().requires_grad_()
    _, _, rp, _, _ = fused_dispatch(x1, idx, p1, e, group)
    (rp * 2).sum().backward()
    assert torch.equal(p1.grad, torch.where(idx >= 0, 2.0, 0.0).to(p1.dtype))

    def combine(ys):
        return GatherRanks.apply(pad_rows(fused_combine(Replicated.apply(ys)[rank, :n], group, handle)[0], t_max))

    gen = torch.Generator().manual_seed(5)
    ys = torch.randn(case.num_ranks, n_max, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(combine, (ys,), fast_mode=fast)


def check_hybrid(case, rank, group, pad_multiple, extra_rows, fast=True):
    """Forward against the expected layout; gradcheck of HybridEPDispatch (x, probs) and HybridEPCombine.

    ``extra_rows`` None: sizes from the counts (host path); else ``num_permuted_tokens`` = padded total +
    ``extra_rows`` (the no-sync path).
    """
    t, t_max, num_local = case.num_tokens[rank], max(case.num_tokens), case.num_local
    rmap = case.routing_map(rank)
    pad = pad_multiple or 1
    want_x, want_p, want_counts = expected_hybrid_dispatch(case, rank, pad)
    rows = None if extra_rows is None else want_x.size(0) + extra_rows
    if rows is not None:
        want_x, want_p = pad_rows(want_x, rows), F.pad(want_p, (0, rows - want_p.size(0)))
    out_x, out_p, scale, tpe, handle = hybrid_ep_dispatch(case.x[rank], rmap, case.prob_map[rank], group, num_local,
                                                          num_permuted_tokens=rows, pad_multiple=pad_multiple)
    assert scale is None and isinstance(handle, HybridEPHandle)
    assert torch.equal(out_x, want_x) and torch.equal(out_p, want_p), (out_x, want_x, out_p, want_p)
    assert torch.equal(tpe, want_counts) and tpe.dtype == torch.int64
    assert tpe.device.type == "cpu"
    p_max = all_max(out_x.size(0))

    def dispatch(xs, ps):
        x, p = Replicated.apply(xs)[rank, :t], Replicated.apply(ps)[rank, :t]
        dx, dp, _, _, _ = hybrid_ep_dispatch(x, rmap, p, group, num_local, num_permuted_tokens=rows,
                                             pad_multiple=pad_multiple)
        return GatherRanks.apply(pad_rows(dx, p_max)), GatherRanks.apply(pad_rows(dp, p_max))

    assert gradcheck(dispatch, (global_input(case.x, t_max), global_input(case.prob_map, t_max)),
                     fast_mode=fast)

    # Unrouted entries of probs get exactly zero gradient.
    p1 = case.prob_map[rank].clone().requires_grad_()
    _, dp, _, _, _ = hybrid_ep_dispatch(case.x[rank], rmap, p1, group, num_local, num_permuted_tokens=rows,
                                        pad_multiple=pad_multiple)
    dp.sum().backward()
    assert torch.equal(p1.grad, rmap.to(p1.dtype))

    n_rows = out_x.size(0)

    def combine(ys):
        y = Replicated.apply(ys)[rank, :n_rows]
        return GatherRanks.apply(pad_rows(hybrid_ep_combine(y, handle, rows, pad_multiple), t_max))

    gen = torch.Generator().manual_seed(6)
    ys = torch.randn(case.num_ranks, p_max, HIDDEN, generator=gen, dtype=torch.float64, requires_grad=True)
    assert gradcheck(combine, (ys,), fast_mode=fast)


# ------------------------------------------------------------------------------ end-to-end MoE
def dense_moe(case, weights):
    """Single-process MoE on every rank's tokens: out_t = sum_k p_tk * x_t @ W[e_tk] over routed slots."""
    outs = []
    for x, idx, p in zip(case.x_leaf, case.idx, case.p_leaf):
        out = torch.zeros_like(x)
        for k in range(idx.size(1)):
            valid = (idx[:, k] >= 0).unsqueeze(1)
            y = torch.einsum("th,thg->tg", x, weights[idx[:, k].clamp(min=0)]) * p[:, k:k + 1]
            out = out + torch.where(valid, y, 0.0)
        outs.append(out)
    return outs


def check_moe(case, rank, group, hybrid, pad_multiple=None, extra_rows=None, dtype=torch.float64):
    """Dispatch, per-expert linear, combine: forward and all gradients equal the dense MoE's."""
    gen = torch.Generator().manual_seed(7)
    e, num_local = case.num_experts, case.num_local
    weights = torch.randn(e, HIDDEN, HIDDEN, generator=gen, dtype=torch.float64)
    grads_out = [torch.randn(t, HIDDEN, generator=gen, dtype=torch.float64) for t in case.num_tokens]

    # Dense reference, with gradients of every rank's inputs.
    case.x_leaf = [x.clone().requires_grad_() for x in case.x]
    case.p_leaf = [p.clone().requires_grad_() for p in case.probs]
    w_dense = weights.clone().requires_grad_()
    dense = dense_moe(case, w_dense)
    sum((o * g).sum() for o, g in zip(dense, grads_out)).backward()

    x = case.x[rank].to(dtype, copy=True).requires_grad_()
    w_local = weights[rank * num_local:(rank + 1) * num_local].to(dtype, copy=True).requires_grad_()
    prob_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # Megatron: float32 probs
    if hybrid:
        probs = case.prob_map[rank].to(prob_dtype, copy=True).requires_grad_()
        rows = None
        if extra_rows is not None:
            rows = expected_hybrid_dispatch(case, rank, pad_multiple or 1)[2].sum().item() + extra_rows
        dx, dp, _, tpe, handle = hybrid_ep_dispatch(x, case.routing_map(rank), probs, group, num_local,
                                                    num_permuted_tokens=rows, pad_multiple=pad_multiple)
        segments = torch.split(dx[:int(tpe.sum())], tpe.tolist())
        seg_p = torch.split(dp[:int(tpe.sum())], tpe.tolist())
        ys = [s @ w_local[i] * sp.unsqueeze(1).to(dtype) for i, (s, sp) in enumerate(zip(segments, seg_p))]
        y = pad_rows(torch.cat(ys), dx.size(0))
        # As Megatron's flex dispatcher: combine gets the dispatch's row count as a (CPU) tensor.
        out = hybrid_ep_combine(y, handle, tpe.sum() if rows is None else rows, pad_multiple)
    else:
        probs = case.probs[rank].to(prob_dtype, copy=True).requires_grad_()
        rx, ridx, rp, tpe, handle = fused_dispatch(x, case.idx[rank], probs, e, group)
        y = torch.zeros_like(rx)
        for i in range(num_local):
            hit = ridx == i
            assert int(tpe[i]) == int(hit.sum())
            y = y + (rx @ w_local[i]) * (rp * hit).sum(1, keepdim=True).to(dtype)
        out, none = fused_combine(y, group, handle)
        assert none is None
    (out.double() * grads_out[rank]).sum().backward()

    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.double(), dense[rank].detach(), **tol)
    torch.testing.assert_close(x.grad.double(), case.x_leaf[rank].grad, **tol)
    torch.testing.assert_close(w_local.grad.double(), w_dense.grad[rank * num_local:(rank + 1) * num_local], **tol)
    if hybrid:
        want = torch.zeros_like(case.prob_map[rank])
        idx = case.idx[rank]
        for k in range(idx.size(1)):
            ok = idx[:, k] >= 0
            want[ok.nonzero().view(-1), idx[ok, k]] = case.p_leaf[rank].grad[ok, k]
        torch.testing.assert_close(probs.grad.double(), want, **tol)
    else:
        torch.testing.assert_close(probs.grad.double(), case.p_leaf[rank].grad, **tol)


def _cases(num_ranks):
    """Random with holes and an empty rank; topk 1; topk 8; all to one rank; a rank routed nowhere; more
    than 32 experts."""
    tokens = [5 - r % 3 for r in range(num_ranks)]
    tokens[1] = 0
    last = num_ranks - 1
    local8 = max(1, 8 // num_ranks)
    return [
        Case(11, num_ranks, tokens, 2, 2),
        Case(12, num_ranks, [3] * num_ranks, 2, 1, drop=0.0),
        Case(13, num_ranks, [4] * num_ranks, local8, 8, drop=0.2),
        Case(14, num_ranks, [4] * num_ranks, 2, 2, targets=[last * 2, last * 2 + 1], drop=0.0),
        Case(15, num_ranks, [3] * num_ranks, 2, 2, nowhere_rank=0),
        # More experts than top-k columns a token may carry: HybridEP's routing map travels as top-k lists.
        Case(16, num_ranks, [3] * num_ranks, 40 // num_ranks + 1, 3),
    ]


def _autograd_body(rank, num_ranks, gradchecks):
    group = dist.group.WORLD
    for i, case in enumerate(_cases(num_ranks)):
        if not gradchecks and i in (1, 4):
            continue  # the large group covers random routing, topk 8 and all-to-one-rank
        if gradchecks:
            # Fast gradcheck (one random projection of the Jacobian); the full Jacobian on one small case.
            fast = not (i == 1 and num_ranks == 2)
            check_fused(case, rank, group, fast)
            check_hybrid(case, rank, group, pad_multiple=None, extra_rows=None, fast=fast)
            check_hybrid(case, rank, group, pad_multiple=4, extra_rows=i % 3)  # no-sync path
        check_moe(case, rank, group, hybrid=False)
        check_moe(case, rank, group, hybrid=True)
        check_moe(case, rank, group, hybrid=True, pad_multiple=2, extra_rows=1)
    # Megatron's default dtypes: bf16 tokens, float32 probs, one more hidden size.
    case = Case(21, num_ranks, [6] * num_ranks, 2, 2, hidden=HIDDEN)
    check_moe(case, rank, group, hybrid=False, dtype=torch.bfloat16)
    check_moe(case, rank, group, hybrid=True, dtype=torch.bfloat16, pad_multiple=4)
    # async_finish on CPU: no event to wait for, same result.
    x = case.x[rank]
    a = fused_dispatch(x, case.idx[rank], case.probs[rank], case.num_experts, group, async_finish=True,
                       allocate_on_comm_stream=True)
    b = fused_dispatch(x, case.idx[rank], case.probs[rank], case.num_experts, group)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert torch.equal(fused_combine(a[0], group, a[4], async_finish=True)[0], fused_combine(b[0], group, b[4])[0])


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_autograd(num_ranks):
    run_distributed(_autograd_body, num_ranks, True)


def test_moe_eight_ranks():
    run_distributed(_autograd_body, 8, False)


# --------------------------------------------------------------------------------- bad inputs
def _raises(exc, fragment, fn, *args, **kwargs):
    with pytest.raises(exc, match=fragment):
        fn(*args, **kwargs)


def _bad_input_body(rank, num_ranks):
    group = dist.group.WORLD
    case = Case(31, num_ranks, [4] * num_ranks, 2, 2)
    x, idx, p = case.x[rank], case.idx[rank], case.probs[rank]
    e, num_local = case.num_experts, case.num_local
    rmap, pmap = case.routing_map(rank), case.prob_map[rank]
    recv_x, _, _, _, handle = fused_dispatch(x, idx, p, e, group)
    hx, _, _, _, hhandle = hybrid_ep_dispatch(x, rmap, pmap, group, num_local, pad_multiple=2)

    # Only rank 0 makes bad calls: had any of them communicated, the next collective would not match.
    if rank == 0:
        _raises(TypeError, "x must have dtype", fused_dispatch, x.int(), idx, p, e, group)
        _raises(ValueError, r"x must have shape", fused_dispatch, x[0], idx, p, e, group)
        _raises(TypeError, "token_indices must have dtype", fused_dispatch, x, idx.int(), p, e, group)
        _raises(ValueError, "token_indices must have shape", fused_dispatch, x, idx[:2], p, e, group)
        _raises(TypeError, "token_probs must have dtype", fused_dispatch, x, idx, p.half(), e, group)
        _raises(ValueError, "token_probs must have shape", fused_dispatch, x, idx, p[:, :1], e, group)
        _raises(ValueError, "divisible", fused_dispatch, x, idx, p, e + 1, group)
        _raises(ValueError, "expert id", fused_dispatch, x, torch.full_like(idx, e), p, e, group)
        _raises(TypeError, "ProcessGroup", fused_dispatch, x, idx, p, e, "world")
        _raises(TypeError, "DispatchHandle", fused_combine, recv_x, group, hhandle)
        _raises(ValueError, "x must have shape", fused_combine, pad_rows(recv_x, recv_x.size(0) + 1), group, handle)
        _raises(TypeError, "x must have dtype", fused_combine, recv_x.long(), group, handle)

        _raises(TypeError, "routing_map must have dtype", hybrid_ep_dispatch, x, rmap.int(), pmap, group, num_local)
        _raises(ValueError, "routing_map must have shape", hybrid_ep_dispatch, x, rmap, pmap, group, num_local + 1)
        _raises(TypeError, "probs must have dtype", hybrid_ep_dispatch, x, rmap, pmap.half(), group, num_local)
        _raises(ValueError, "probs must have shape", hybrid_ep_dispatch, x, rmap, pmap[:1], group, num_local)
        _raises(ValueError, "num_local_experts", hybrid_ep_dispatch, x, rmap[:, :0], pmap[:, :0], group, 0)
        _raises(ValueError, "num_permuted_tokens", hybrid_ep_dispatch, x, rmap, pmap, group, num_local,
                num_permuted_tokens=-1)
        _raises(ValueError, "num_permuted_tokens", hybrid_ep_dispatch, x, rmap, pmap, group, num_local,
                num_permuted_tokens=torch.tensor(3.0))
        _raises(ValueError, "pad_multiple", hybrid_ep_dispatch, x, rmap, pmap, group, num_local, pad_multiple=0)
        _raises(ValueError, "num_sms", hybrid_ep_dispatch, x, rmap, pmap, group, num_local, num_sms_dispatch_api=25)
        _raises(TypeError, "HybridEPHandle", hybrid_ep_combine, hx, handle, None, None)
        _raises(ValueError, "x must have shape", hybrid_ep_combine, pad_rows(hx, hx.size(0) + 1), hhandle, None, 2)
        _raises(ValueError, "num_permuted_tokens", hybrid_ep_combine, hx, hhandle, hx.size(0) + 1, 2)
        _raises(ValueError, "pad_multiple", hybrid_ep_combine, hx, hhandle, None, 4)
        _raises(NotImplementedError, "FP8", fused_a2a.init_hybrid_ep_buffer, group, 8, 4, num_local, 24, 24, True)
        _raises(ValueError, "hidden_bytes", fused_a2a.get_buffer, group, 0)
        _raises(ValueError, "x must have shape", fused_a2a.get_hidden_bytes, x[0])
        _raises(ValueError, "even", fused_a2a.set_deepep_num_sms, 3)

    # Without probs: no weights travel, and the tokens still do.
    rx, ridx, rp, _, h = fused_dispatch(x, idx, None, e, group)
    assert rp is None and torch.equal(rx, recv_x) and ridx.shape == (rx.size(0), idx.size(1))
    fused_combine(rx, group, h)

    # Every rank still in step: the pending combines finish with the right sums.
    # Combine sums one copy per destination rank.
    num_dest = sum(((idx >= r * num_local) & (idx < (r + 1) * num_local)).any(1) for r in range(num_ranks))
    torch.testing.assert_close(fused_combine(recv_x, group, handle)[0], x * num_dest.unsqueeze(1).double(),
                               rtol=0, atol=0)
    routed = rmap.sum(1, keepdim=True).double()
    torch.testing.assert_close(hybrid_ep_combine(hx, hhandle, None, 2), x * routed, rtol=0, atol=1e-15)

    # num_permuted_tokens below the padded count: every rank receives 2 pairs for its first expert,
    # padded to 4 > 3 rows; every rank raises, so the group stays in step.
    two = torch.zeros(2, e, dtype=torch.bool)
    two[0, 0] = two[1, num_local] = True
    _raises(ValueError, "num_permuted_tokens=3 is smaller", hybrid_ep_dispatch, x[:2], two, pmap[:2], group,
            num_local, num_permuted_tokens=3, pad_multiple=4)
    out = hybrid_ep_dispatch(x[:2], two, pmap[:2], group, num_local, num_permuted_tokens=4, pad_multiple=4)
    assert out[0].shape == (4, HIDDEN) and out[3].tolist() == [4, 0]

    # More routed experts per token than a dispatched token carries (32), with more experts than that.
    many = 34 // num_ranks + 1
    crowded = torch.zeros(2, many * num_ranks, dtype=torch.bool)
    crowded[0, :33] = True
    _raises(ValueError, "routes a token to 33 experts; at most 32", hybrid_ep_dispatch, x[:2], crowded, None, group,
            many)

    # The buffer cache: one Buffer per group, replaced only by a larger one.
    b1 = fused_a2a.get_buffer(group, 64)
    assert fused_a2a.get_buffer(group, 32) is b1 and fused_a2a.get_buffer(group, 64) is b1
    b2 = fused_a2a.get_buffer(group, 8192)
    assert b2 is not b1 and b2.num_nvl_bytes > b1.num_nvl_bytes and fused_a2a.get_buffer(group, 64) is b2
    old_sms = Buffer.num_sms
    fused_a2a.set_deepep_num_sms(old_sms + 4)
    try:
        assert Buffer.num_sms == old_sms + 4
        b3 = fused_a2a.get_buffer(group, 8192)  # more SMs, more channels: a larger hint, a larger buffer
        assert b3 is not b2 and b3.num_nvl_bytes > b2.num_nvl_bytes
    finally:
        fused_a2a.set_deepep_num_sms(old_sms)
    fused_a2a.reset_hybrid_ep_buffer()
    assert fused_a2a._hybrid_ep_buffer is None
    fused_a2a.init_hybrid_ep_buffer(group, 16, 4, num_local, 24, 24, False)
    assert fused_a2a._hybrid_ep_buffer.buffer.group is group


def test_bad_inputs():
    run_distributed(_bad_input_body, 2)


# ------------------------------------------------------------------------------ Megatron's API
def _megatron_signatures():
    """Functions and methods of megatron-core's fused_a2a, read from its source (importing it is slow)."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("megatron-core is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "core", "transformer", "moe", "fused_a2a.py")
    if not os.path.exists(path):
        pytest.skip("megatron-core has no fused_a2a module")
    with open(path) as f:
        tree = ast.parse(f.read())
    sigs = {}

    def collect(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                collect(node.body, node.name + ".")
            elif isinstance(node, ast.FunctionDef):
                sigs[prefix + node.name] = node
            elif isinstance(node, (ast.If, ast.Try)):  # definitions guarded by "if HAVE_DEEP_EP:" etc.
                collect(node.body + node.orelse + getattr(node, "finalbody", []), prefix)

    collect(tree.body, "")
    return sigs


def _names_and_defaults(fn_node):
    args = fn_node.args
    names = [a.arg for a in args.args]
    defaults = [ast.literal_eval(d) for d in args.defaults]
    return names, defaults


def test_signatures_match_megatron():
    """Megatron's dispatcher calls these positionally and by keyword: names, order and defaults must match."""
    theirs = _megatron_signatures()
    checked = 0
    for name, node in theirs.items():
        if name.startswith("_"):
            continue
        owner, _, method = name.partition(".")
        ours = getattr(fused_a2a, owner, None)
        assert ours is not None, f"moe_a2a.fused_a2a lacks {owner}"
        if method:
            ours = inspect.getattr_static(ours, method).__func__
        params = list(inspect.signature(ours).parameters.values())
        names, defaults = _names_and_defaults(node)
        assert [p.name for p in params] == names, (name, [p.name for p in params], names)
        our_defaults = [p.default for p in params if p.default is not inspect.Parameter.empty]
        assert our_defaults == defaults, (name, our_defaults, defaults)
        checked += 1
    assert checked >= 13
