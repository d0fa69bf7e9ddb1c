"""Rank masking on the intranode low-latency kernels, ranks sharing one GPU under MPS: the rounds of the CPU
tests (``tests/cpu/test_rank_mask.py``) with CUDA tensors, so every dispatch and combine runs on the kernels
and is checked against the inputs of the live ranks only.

A kernel that times out without ``enable_shrink`` traps (the call's error), which under MPS ends every process
on the GPU; so a lost rank is survived here with ``enable_shrink`` only, and masking by hand is tested with a
rank masked on purpose that keeps making the calls.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, set_rank_device, skip_reason
from test_rank_mask import EXPERTS_PER_RANK, HIDDEN, MAX_TOKENS, _leave_together, _make_buffer, _round

pytestmark = pytest.mark.gpu
NUM_RANKS = 3


def _manual_body(rank, num_ranks):
    device = set_rank_device(rank)
    buffer = _make_buffer()
    assert buffer.backend == "cuda"
    everyone, last = set(range(num_ranks)), num_ranks - 1
    _round(buffer, 0, everyone, device)
    assert buffer.low_latency_query_mask_buffer().tolist() == [0] * num_ranks
    # Every rank (the masked one too) masks the last rank: it exchanges with no one, the others skip it.
    buffer.low_latency_update_mask_buffer(last, True)
    status = torch.zeros(num_ranks, dtype=torch.int32, device=device)
    assert buffer.low_latency_query_mask_buffer(status) is status
    assert status.tolist() == [0] * (num_ranks - 1) + [1]
    _round(buffer, 1, everyone - {last}, device)
    # The mask outlives a clean of the flags (all ranks are alive, so all take part in the clean).
    buffer.clean_low_latency_buffer(MAX_TOKENS, HIDDEN, EXPERTS_PER_RANK * num_ranks)
    _round(buffer, 2, everyone - {last}, device)
    buffer.low_latency_update_mask_buffer(last, mask=False)  # it kept step: unmask it
    _round(buffer, 3, everyone, device)
    buffer.low_latency_update_mask_buffer(0, mask=True)
    buffer.low_latency_clean_mask_buffer()
    _round(buffer, 4, everyone, device)
    torch.cuda.synchronize()


@pytest.mark.skipif(skip_reason(NUM_RANKS) is not None, reason=str(skip_reason(NUM_RANKS)))
def test_mask_and_unmask_on_kernels():
    run_ranks(_manual_body, NUM_RANKS)


def _lost_body(rank, num_ranks, silent):
    """The last rank leaves after round 0 (``silent``: it stays alive but makes no call); the survivors' next
    dispatch masks it after ``timeout_s`` and both rounds complete over the survivors."""
    device = set_rank_device(rank)
    timeout_s = 3.0
    buffer = _make_buffer(enable_shrink=True, timeout_s=timeout_s)
    assert buffer.backend == "cuda"
    lost = num_ranks - 1
    _round(buffer, 0, set(range(num_ranks)), device)
    torch.cuda.synchronize()
    dist.barrier()  # nothing of round 0 is still in flight to the rank that leaves
    if rank == lost:
        time.sleep(timeout_s + 3 if silent else 0.2)
        os._exit(0)
    survivors = set(range(num_ranks)) - {lost}
    time.sleep(0.5)
    started = time.monotonic()
    _round(buffer, 1, survivors, device)
    took = time.monotonic() - started
    assert timeout_s * 0.9 < took < timeout_s * 2 + 2, took  # one wait for the lost rank, then on without it
    assert buffer.low_latency_query_mask_buffer().tolist() == [int(r == lost) for r in range(num_ranks)]
    started = time.monotonic()
    _round(buffer, 2, survivors, device)
    assert time.monotonic() - started < timeout_s, "a masked rank is not waited for"
    assert not buffer._ll_kernels.error(), buffer._ll_kernels.error()  # masking is not an error
    _leave_together(survivors)


@pytest.mark.skipif(skip_reason(NUM_RANKS) is not None, reason=str(skip_reason(NUM_RANKS)))
@pytest.mark.parametrize("silent", [False, True], ids=["exited", "silent"])
def test_lost_rank_is_masked_by_the_kernels(silent):
    run_ranks(_lost_body, NUM_RANKS, silent, timeout=180)

