"""The NCCL baseline of the benchmark (Megatron's alltoall permutations) computes the right thing, on gloo."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a.bench import _MegatronAllToAll


def _check(rank, num_ranks):
    gen = torch.Generator().manual_seed(rank)
    num_tokens, hidden, num_experts, topk = 37, 16, 4 * num_ranks, 3
    num_local = num_experts // num_ranks
    x = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, 1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < 0.2] = -1
    w = torch.rand(num_tokens, topk, generator=gen)
    base = _MegatronAllToAll(dist.group.WORLD, idx, w, num_experts, num_ranks, hidden)
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
