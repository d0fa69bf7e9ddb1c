"""The layout kernel against ``moe_a2a.layout.compute_layout`` on random routing with -1 entries."""
import pytest
import torch

from harness import skip_reason
from moe_a2a.backends import intranode
from moe_a2a.layout import compute_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]


def _routing(num_tokens, num_experts, topk, gen, drop):
    scores = torch.rand(num_tokens, num_experts, generator=gen) + torch.linspace(1.0, 0.0, num_experts)
    idx = scores.topk(topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < drop] = -1
    return idx


@pytest.mark.parametrize("num_tokens,num_experts,topk,num_ranks,per_node", [
    (0, 8, 2, 2, 8), (1, 8, 1, 8, 8), (777, 64, 6, 4, 8), (4096, 256, 8, 8, 8), (4096, 256, 8, 16, 8),
    (1023, 256, 8, 32, 8), (300, 16, 4, 1, 8), (2048, 128, 8, 8, 4),
])
def test_layout_matches_reference(num_tokens, num_experts, topk, num_ranks, per_node):
    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    for drop in (0.0, 0.3, 1.0):
        idx = _routing(num_tokens, num_experts, topk, gen, drop)
        want = compute_layout(idx, num_experts, num_ranks, per_node)
        got = intranode.get_dispatch_layout(idx.cuda(), num_experts, num_ranks, per_node)
        torch.cuda.synchronize()
        for name, w, g in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                               "is_token_in_rank"), want, got):
            if w is None:
                assert g is None, name
                continue
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.equal(g.cpu(), w), f"{name} differs (drop={drop})"


def test_layout_kernel_guards_its_input():
    # Buffer.get_dispatch_layout validates its arguments (tests/cpu/test_buffer.py); called directly, the
    # kernel's own guards still refuse what it cannot read.
    idx = torch.zeros(4, 2, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="int64"):
        intranode.get_dispatch_layout(idx.int(), 8, 2, 8)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        intranode.get_dispatch_layout(idx.cpu(), 8, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of num_ranks"):
        intranode.get_dispatch_layout(idx, 9, 2, 8)
    with pytest.raises(RuntimeError, match="at most 8192 experts"):
        intranode.get_dispatch_layout(idx, 8194, 2, 8)
