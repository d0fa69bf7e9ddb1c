"""Run a function on N ranks of one machine: spawned processes joined by a process group.

``spawn(fn, num_ranks, *args)`` starts ``num_ranks`` processes (``torch.multiprocessing``'s ``spawn``
start method), joins them into a ``gloo`` group (or the ``backend`` given) on a free loopback port and
calls ``fn(rank, num_ranks, *args)`` in each. It returns every rank's return value, indexed by rank, or
raises ``RanksFailed`` naming every rank that failed (the root cause first), every rank that did not
finish within ``timeout`` seconds (or within ``grace`` seconds of another rank's failure), and every rank
that exited with a non-zero code.

``mps_if_needed(num_ranks)`` wraps a ``spawn`` whose ranks must share a GPU: the kernels of the ranks
wait on each other, so they must run at the same time, which CUDA MPS allows. It starts a private MPS
control daemon (its own pipe and log directories) when there are more ranks than GPUs, and stops it
after. ``max_num_sms_per_rank`` says how many SMs each rank may use so that every rank's blocks are
resident together.

The trainer, the benchmarks, the demo and the tests launch their ranks through this module.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["RanksFailed", "free_port", "spawn", "mps_if_needed", "ranks_per_gpu", "max_num_sms_per_rank"]

_MPS_VARS = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
# Errors a rank sees when a peer died first: symptoms, reported after the cause.
_PEER_GONE = ("Connection closed", "Connection reset")


class RanksFailed(RuntimeError):
    """Some ranks raised, did not finish in time, or exited with a non-zero code.

    ``errors`` maps a rank to its traceback, ``hung`` lists the ranks killed at the deadline and
    ``exit_codes`` maps each rank that ended to its exit code.
    """

    def __init__(self, message: str, errors: Dict[int, str], hung: List[int], exit_codes: Dict[int, int]):
        super().__init__(message)
        self.errors, self.hung, self.exit_codes = errors, hung, exit_codes


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave(code: int = 0) -> None:
    """End a rank's process now with exit status ``code``, after releasing moe_a2a's native buffers.

    Skips the interpreter's shutdown on purpose: gloo's worker threads may still release finished collectives
    then, and a release that needs the GIL during shutdown aborts the process ("terminate called without an
    active exception", torch's process-group teardown) after it finished its work. The caller has flushed
    what it reports (queues and pipes are written synchronously).
    """
    from . import _native

    _native.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _rank_main(rank: int, num_ranks: int, port: int, fn: Callable, args: Tuple, backend: str,
               cuda_device: bool, group_timeout: Optional[float], queue, stack_dir: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # ranks share the machine's cores
    if hasattr(signal, "SIGUSR1"):  # spawn() asks a rank that hangs where it is before it kills it
        stacks = open(os.path.join(stack_dir, f"rank{rank}.txt"), "w")  # open for the process's life
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        if cuda_device:  # before the group: NCCL binds to the current device
            torch.cuda.set_device(rank % torch.cuda.device_count())
        timeout = {} if group_timeout is None else {"timeout": datetime.timedelta(seconds=group_timeout)}
        dist.init_process_group(backend, rank=rank, world_size=num_ranks, **timeout)
        result = fn(rank, num_ranks, *args)
        dist.barrier()
        queue.put(("ok", rank, result))
    except BaseException:  # every rank's failure reaches the parent, not only the first
        queue.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    leave(0)


def spawn(fn: Callable, num_ranks: int, *args: Any, backend: str = "gloo", timeout: float = 300.0,
          cuda_device: bool = False, grace: float = 30.0, group_timeout: Optional[float] = None) -> List[Any]:
    """Run ``fn(rank, num_ranks, *args)`` on ``num_ranks`` spawned ranks; return their results by rank.

    ``fn`` and ``args`` are pickled into the children: ``fn`` must be a module-level function.
    ``backend``: the process group's (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``).
    ``timeout``: seconds every rank has to finish (``math.inf``: no limit); ranks still running then are killed.
    ``cuda_device``: each rank selects GPU ``rank % torch.cuda.device_count()`` first.
    ``grace``: once a rank has failed, seconds the others have left to finish or report their own error.
    ``group_timeout``: seconds a collective of the group waits for a peer before it fails (None: torch's default).
    Raises ``RanksFailed`` unless every rank returned and exited with code 0.
    """
    import torch.multiprocessing as mp

    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if not timeout > 0 or not grace > 0:
        raise ValueError(f"timeout and grace must be > 0 seconds, got timeout={timeout!r}, grace={grace!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    stack_dir = tempfile.mkdtemp(prefix="moe_a2a_stacks_")
    procs = [ctx.Process(target=_rank_main,
                         args=(r, num_ranks, port, fn, args, backend, cuda_device, group_timeout, queue, stack_dir))
             for r in range(num_ranks)]
    for p in procs:
        p.start()
    results: List[Any] = [None] * num_ranks
    errors: Dict[int, str] = {}

    def drain() -> None:
        # Read while the ranks run: a result larger than the pipe's buffer blocks its sender until read.
        while not queue.empty():
            status, rank, payload = queue.get()
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload

    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        drain()
        running = [p for p in procs if p.exitcode is None]
        if failed_at is None and (errors or any(p.exitcode for p in procs)):
            # A failed rank can leave its peers blocked where no error reaches them (a rendezvous, a
            # collective): give them a grace period to report their own error, then stop them.
            failed_at = time.monotonic()
            deadline = min(deadline, failed_at + grace)
        left = deadline - time.monotonic()
        if not running or left <= 0:
            break
        wait([p.sentinel for p in running], timeout=min(left, 0.2))
    hung = [r for r, p in enumerate(procs) if p.exitcode is None]
    if hung and hasattr(signal, "SIGUSR1"):
        # Each hung rank writes its Python stacks (where it waits: a collective, a kernel's sync) to its file.
        for r in hung:
            with contextlib.suppress(OSError):
                os.kill(procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
    for r in hung:
        procs[r].kill()
    stacks = {r: _read_stack(stack_dir, r) for r in hung}
    shutil.rmtree(stack_dir, ignore_errors=True)
    for p in procs:
        p.join()
    drain()
    exit_codes = {r: p.exitcode for r, p in enumerate(procs) if r not in hung}
    waited = f"{grace}s after the first failure" if failed_at is not None else f"{timeout}s"
    message = _failure_message(num_ranks, waited, errors, hung, exit_codes, stacks)
    if message:
        raise RanksFailed(message, errors, hung, exit_codes)
    return results


def _read_stack(stack_dir: str, rank: int) -> str:
    try:
        with open(os.path.join(stack_dir, f"rank{rank}.txt")) as f:
            return f.read().strip()
    except OSError:
        return ""


def _failure_message(num_ranks: int, waited: str, errors: Dict[int, str], hung: List[int],
                     exit_codes: Dict[int, int], stacks: Optional[Dict[int, str]] = None) -> Optional[str]:
    """What went wrong, most telling first: a rank's own error, then ranks that hung (with where they were),
    then exit codes."""
    where = "".join(f"\nrank {r} was at:\n{text}" for r, text in sorted((stacks or {}).items()) if text)
    bad = sorted((r, code) for r, code in exit_codes.items() if code != 0)
    if errors:
        # A rank that crashed makes its peers fail with connection errors: show the crash itself.
        root = [r for r, tb in errors.items() if not any(s in tb for s in _PEER_GONE)]
        first = min(root or errors)
        # One line per failed rank: the first one's error may be the symptom (a timeout naming a peer)
        # of another rank's failure.
        summary = "\n".join(f"  rank {r}: {errors[r].strip().splitlines()[-1]}" for r in sorted(errors))
        silent = [(r, code) for r, code in bad if r not in errors]
        extra = f"\nranks that exited without an error message (rank, exit code): {silent}" if silent else ""
        extra += f"\nranks {hung} did not finish within {waited}" if hung else ""
        return f"ranks failed:\n{summary}{extra}\nrank {first} of {num_ranks}:\n{errors[first]}{where}"
    if hung:
        extra = f"; ranks that exited abnormally (rank, exit code): {bad}" if bad else ""
        return f"ranks {hung} of {num_ranks} did not finish within {waited}{extra}{where}"
    if bad:
        return f"ranks exited abnormally (rank, exit code): {bad}"
    return None


# ---------------------------------------------------------------------------- ranks sharing a GPU
def ranks_per_gpu(num_ranks: int) -> int:
    """Ranks on the busiest GPU when ``num_ranks`` ranks take GPU ``rank % device_count``."""
    import torch

    return -(-num_ranks // max(1, torch.cuda.device_count()))


def max_num_sms_per_rank(num_ranks: int) -> int:
    """Most SMs per rank such that the blocks of every rank's kernel are resident at once.

    The one-block notify kernels need no room of their own: a rank's dispatch can only get past its
    first barrier after every rank's notify has finished its own barrier.
    """
    import torch

    return torch.cuda.get_device_properties(0).multi_processor_count // ranks_per_gpu(num_ranks)


@contextlib.contextmanager
def mps_if_needed(num_ranks: int):
    """Start a private CUDA MPS daemon when ``num_ranks`` ranks must share a GPU; stop it on exit.

    Nothing is started when every rank has its own GPU or when an MPS daemon is set up already
    (``CUDA_MPS_PIPE_DIRECTORY`` set). Ranks spawned inside the block inherit the daemon's directories
    and join it, so the kernels of all ranks run together.
    """
    import torch

    if num_ranks <= torch.cuda.device_count() or os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        yield
        return
    if shutil.which("nvidia-cuda-mps-control") is None:
        raise RuntimeError(f"{num_ranks} ranks on {torch.cuda.device_count()} GPU(s) need CUDA MPS "
                           "(nvidia-cuda-mps-control not found)")
    root = tempfile.mkdtemp(prefix="moe_a2a_mps_")
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(root, "pipe"),
               CUDA_MPS_LOG_DIRECTORY=os.path.join(root, "log"))
    saved = {k: os.environ.get(k) for k in _MPS_VARS}
    started = False
    try:
        for key in _MPS_VARS:
            os.makedirs(env[key])
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=60)
        started = True
        os.environ.update({k: env[k] for k in _MPS_VARS})
        yield
    finally:
        if started:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, check=False, timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
