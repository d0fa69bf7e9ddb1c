"""The reference backend on NCCL (2 GPUs): deadlines, disagreement errors and metadata checks as on gloo.

The same test bodies as ``tests/test_peer_checks.py``; the reference backend moves its exchanges to each
rank's GPU, where NCCL's ``wait`` only orders streams, so the deadline is kept by polling the work.
"""
import pytest
import torch

import test_peer_checks as cpu_bodies
from dist_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs (one per rank)")


def _on_own_gpu(rank, num_ranks, body, *args):
    torch.cuda.set_device(rank)
    body(rank, num_ranks, *args)


@pytest.mark.parametrize("body", ["_disagreement_body", "_metadata_body"])
def test_checks_on_nccl(body):
    run_distributed(_on_own_gpu, 2, getattr(cpu_bodies, body), backend="nccl")


@pytest.mark.parametrize("mode", ["stall", "dead"])
def test_stalled_or_dead_peer_on_nccl(mode):
    run_distributed(_on_own_gpu, 2, cpu_bodies._stall_body, mode, backend="nccl", timeout=120)
