"""Ranks that used the kernels exit with status 0, every time (buffers left for the exit handler to release)."""
import torch
import torch.distributed as dist

from harness import routing, run_ranks, set_rank_device, skip_reason
from moe_a2a import Buffer


def _use_kernels_and_leave(rank, num_ranks, low_latency):
    device = set_rank_device(rank)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, 512, generator=gen).bfloat16().to(device)
    idx = routing(64, 16, 2, gen).to(device)
    if low_latency:
        buf = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(64, 512, num_ranks, 16),
                     low_latency_mode=True)
        recv, _, handle, _, _ = buf.low_latency_dispatch(x, idx, 64, 16, use_fp8=False)
        buf.low_latency_combine(recv, idx, torch.rand(64, 2, generator=gen).to(device), handle)
    else:
        buf = Buffer(dist.group.WORLD, int(2e7))
        ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, 16)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                                  num_tokens_per_expert=ntpe, topk_idx=idx)
        buf.combine(recv_x, handle)
    assert buf.backend == "cuda"
    torch.cuda.synchronize()
    # The buffer stays alive: moe_a2a's exit handler releases it (run_ranks checks every exit code).


def test_ranks_exit_cleanly_after_using_the_kernels():
    reason = skip_reason(2)
    if reason:
        import pytest
        pytest.skip(reason)
    for attempt in range(6):
        run_ranks(_use_kernels_and_leave, 2, attempt % 2 == 1, timeout=120.0)
