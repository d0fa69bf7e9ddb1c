"""moe_a2a.launch: results come back by rank; every failure is reported, the root cause first."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from moe_a2a.launch import RanksFailed, spawn


def _sum_ranks(rank, num_ranks, scale):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "total": t.item() * scale, "big": torch.rand(40000).tolist() if rank == 1 else None}


def _rank_raises(rank, num_ranks):
    if rank == 1:
        raise ValueError("bad value on rank 1")
    dist.barrier()  # fails when rank 1 is gone: a symptom


def _all_exit(rank, num_ranks):
    os._exit(3)


def _rank_hangs(rank, num_ranks):
    if rank == 1:
        time.sleep(600)
    dist.barrier()


def test_spawn_returns_every_rank_result():
    out = spawn(_sum_ranks, 3, 2.0)
    assert [r["rank"] for r in out] == [0, 1, 2]
    assert all(r["total"] == 12.0 for r in out)
    assert len(out[1]["big"]) == 40000  # larger than a pipe's buffer: read while the ranks run


def test_root_cause_first():
    with pytest.raises(RanksFailed, match="ranks failed") as info:
        spawn(_rank_raises, 2, timeout=120)
    text = str(info.value)
    assert "rank 1: ValueError: bad value on rank 1" in text
    assert text.split("\nrank ")[-1].startswith("1 of 2:")  # the traceback shown is the cause's
    assert set(info.value.errors) >= {1}


def test_exit_codes_checked():
    with pytest.raises(RanksFailed, match=r"ranks exited abnormally \(rank, exit code\): \[\(0, 3\), \(1, 3\)\]"):
        spawn(_all_exit, 2, timeout=120)


def test_timeout_kills_ranks():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"did not finish within 8") as info:
        spawn(_rank_hangs, 2, timeout=8)
    assert 1 in info.value.hung
    assert time.monotonic() - start < 60
    # Where the hung rank was when it was stopped: its Python stack, innermost frame first.
    assert "rank 1 was at:" in str(info.value) and "in _rank_hangs" in str(info.value)


def _rank_fails_peer_sleeps(rank, num_ranks):
    if rank == 1:
        raise ValueError("bad value on rank 1")
    time.sleep(600)  # no collective tells this rank that its peer is gone


def test_peers_stopped_after_a_failure():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="ranks failed") as info:
        spawn(_rank_fails_peer_sleeps, 2, timeout=600, grace=3)
    assert "rank 1: ValueError: bad value on rank 1" in str(info.value)
    assert "ranks [0] did not finish within 3s after the first failure" in str(info.value)
    assert "rank 0 was at:" in str(info.value) and "in _rank_fails_peer_sleeps" in str(info.value)
    assert time.monotonic() - start < 120


def test_group_timeout_bounds_a_collective():
    # Rank 1 never joins the all-reduce: with group_timeout rank 0's collective fails after 3 s (torch's
    # default would wait 30 minutes and the whole spawn would reach its 120 s deadline instead).
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="ranks failed") as info:
        spawn(_rank_hangs, 2, timeout=120, grace=3, group_timeout=3)
    assert set(info.value.errors) == {0} and info.value.hung == [1]
    assert "Timed out waiting 3000ms" in info.value.errors[0]  # gloo's message, naming the group's timeout
    assert time.monotonic() - start < 60


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_ranks"):
        spawn(_sum_ranks, 0)
    with pytest.raises(ValueError, match="timeout"):
        spawn(_sum_ranks, 2, timeout=0)
    with pytest.raises(ValueError, match="grace"):
        spawn(_sum_ranks, 2, grace=-1)
