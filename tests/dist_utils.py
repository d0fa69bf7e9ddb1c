"""Run a test body on several ranks: spawned processes joined by a gloo (CPU) process group."""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, backend: str, errors):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:  # report every rank's failure to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; raise if any rank fails.

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, backend, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures:
        # A rank that crashed makes its peers fail with connection errors: report the crash itself.
        root = [f for f in failures if "Connection closed" not in f[1] and "Connection reset" not in f[1]]
        rank, tb = sorted(root or failures)[0]
        # One line per failed rank: the first one's error may be the symptom (a timeout naming a peer)
        # of another rank's failure.
        summary = "\n".join(f"  rank {r}: {t.strip().splitlines()[-1]}" for r, t in sorted(failures))
        raise AssertionError(f"ranks failed:\n{summary}\nrank {rank} of {world_size}:\n{tb}")
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish within {timeout}s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited abnormally (rank, exit code): {bad}")
