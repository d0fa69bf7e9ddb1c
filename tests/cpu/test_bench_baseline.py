"""The NCCL baseline of the benchmark (Megatron's alltoall permutations) computes the right thing, on gloo."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from benchmarks.intranode import MegatronAllToAll


def _check(rank, num_ranks):
    gen = torch.Generator().manual_seed(rank)
    num_tokens, hidden, num_experts, topk = 37, 16, 4 * num_ranks, 3
    num_local = num_experts // num_ranks
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, 1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < 0.2] = -1
    w = torch.rand(num_tokens, topk, generator=gen)
    base = MegatronAllToAll(dist.group.WORLD, idx, w, num_experts, num_ranks, hidden)
    y = base.dispatch(x)
    # Rows arrive grouped by local expert, then by source rank, then in token order.
    everyone = [None] * num_ranks
    dist.all_gather_object(everyone, (x, idx))
    expected = [xs[t] for e in range(num_local) for xs, ids in everyone
                for t in range(num_tokens) if (ids[t] == rank * num_local + e).any()]
    assert torch.equal(y, torch.stack(expected))
    out = base.combine(y * 2)
    weights = torch.where(idx >= 0, w, 0).double().sum(1, keepdim=True)
    torch.testing.assert_close(out, 2 * weights * x)


def test_megatron_alltoall_baseline():
    run_distributed(_check, 2)


def _deepep_calls(rank, num_ranks):
    """The DeepEP baseline's calls, with moe_a2a (same public API) in deep_ep's place on the CPU: they move the
    same rows as moe_a2a's own calls, and the SM count given reaches the default configs."""
    import moe_a2a
    from benchmarks.deepep_baseline import DeepEPCalls

    gen = torch.Generator().manual_seed(rank)
    num_tokens, hidden, num_experts, topk = 29, 64, 4 * num_ranks, 3
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, 1).indices
    w = torch.rand(num_tokens, topk, generator=gen)
    saved = moe_a2a.Buffer.num_sms
    try:
        calls = DeepEPCalls(moe_a2a, dist.group.WORLD, num_ranks, hidden).calls(x, None, idx, w, num_experts, 12)
        assert moe_a2a.Buffer.get_dispatch_config(num_ranks).num_sms == 12
        assert set(calls) == {"layout", "dispatch_full", "dispatch", "combine"}
        layout = calls["layout"]()
        full, cached = calls["dispatch_full"](), calls["dispatch"]()
        combined, combined_w, _ = calls["combine"]()
    finally:
        moe_a2a.Buffer.num_sms = saved
    own = moe_a2a.Buffer(dist.group.WORLD, 1 << 22, 0)
    per_rank, _, per_expert, in_rank, _ = own.get_dispatch_layout(idx, num_experts)
    want = own.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        topk_idx=idx, topk_weights=w)
    assert torch.equal(full[0], want[0]) and torch.equal(cached[0], want[0])
    assert torch.equal(layout[0], per_rank) and torch.equal(layout[3], in_rank)
    assert combined.shape == x.shape and combined_w.shape == w.shape


def test_deepep_baseline_calls():
    run_distributed(_deepep_calls, 2)


def test_deepep_baseline_modes(monkeypatch):
    import sys

    import pytest

    from benchmarks import deepep_baseline

    monkeypatch.setitem(sys.modules, "deep_ep", None)  # not importable
    assert deepep_baseline.load("off") is None and deepep_baseline.load("auto") is None
    with pytest.raises(SystemExit, match="build_deepep.sh"):
        deepep_baseline.load("on")
    with pytest.raises(ValueError, match="auto, on or off"):
        deepep_baseline.load("yes")


def test_benchmark_options_and_report(tmp_path):
    import argparse
    import json

    from benchmarks.common import add_shape_args, write_report

    p = argparse.ArgumentParser()
    add_shape_args(p, sms="8,16", warmup=2, iters=4)
    args = p.parse_args(["--tokens", "128,4096"])
    assert (args.tokens, args.hidden, args.sms, args.experts, args.topk, args.iters) == ("128,4096", "7168", "8,16",
                                                                                        256, 8, 4)
    report = dict(commit="abc1234", date="2026-01-01", command="python -m benchmarks x", results=[1])
    write_report(report, "| a |", str(tmp_path / "sub" / "r.json"), "title")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == report
    page = (tmp_path / "sub" / "r.md").read_text()
    assert page.startswith("# title") and "abc1234" in page and "| a |" in page
