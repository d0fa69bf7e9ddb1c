"""Run a test body on several ranks: spawned processes joined by a gloo (CPU) process group."""
from __future__ import annotations

from moe_a2a.launch import RanksFailed, free_port, spawn

__all__ = ["free_port", "run_distributed"]


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; fail the test if any rank fails.

    ``fn`` must be a module-level function (it is pickled into the children). A failure is an
    ``AssertionError`` whose message names every failed rank, the root cause's traceback first.
    """
    try:
        spawn(fn, world_size, *args, backend=backend, timeout=timeout)
    except RanksFailed as exc:
        raise AssertionError(str(exc)) from None
