"""The routing layout's definition (what the layout kernel and the reference compute)."""
import torch

from moe_a2a.layout import compute_layout


def test_layout_definition():
    topk_idx = torch.tensor([[0, 5, -1], [7, 6, 5], [-1, -1, -1], [1, 0, 2]])
    ntpr, ntprdma, ntpe, in_rank = compute_layout(topk_idx, 8, 4, 2)
    assert in_rank.tolist() == [[True, False, True, False], [False, False, True, True],
                                [False, False, False, False], [True, True, False, False]]
    assert ntpr.tolist() == [2, 1, 2, 1]
    assert ntprdma.tolist() == [2, 2]
    assert ntpe.tolist() == [2, 1, 1, 0, 0, 2, 1, 1]
    assert compute_layout(topk_idx, 8, 4, 8)[1] is None
