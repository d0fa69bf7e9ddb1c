"""Deadlines on ``torch.distributed`` collectives, and errors that name the peer that was missing.

``wait(work, ...)`` waits for an asynchronous collective at most ``timeout_s`` seconds: gloo's own
``Work.wait(timeout)``; for NCCL (whose ``wait`` only orders the GPU stream) the host polls
``is_completed()``. On a timeout, or when the transport reports a lost connection, the ranks that are stuck
find out who is missing through the rendezvous store: each posts "rank r waits in operation #n", waits a
moment for the others to post, and names the ranks that did not (or that wait in another operation).
Nothing touches the store while calls succeed. The raised ``CollectiveError`` names the operation, this
rank and, where it can be known, the missing rank; the exchanger that raised refuses further calls, because
the abandoned collective may still complete later and mix with a new one.
"""
from __future__ import annotations

import datetime
import itertools
import time
from typing import Optional

import torch.distributed as dist

#: Seconds a stuck rank waits for its peers to report themselves before naming the missing ones.
REPORT_GRACE_S = 3.0


class CollectiveError(RuntimeError):
    """A collective of the reference backend that did not complete: timed out, or a peer was lost."""


def _is_nccl(group) -> bool:
    return "nccl" in str(dist.get_backend(group)).lower()


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no default group, or a torch without this helper
        return None


def _name(group, rank: int) -> str:
    """``rank`` of ``group``, with its global rank where the group is not the whole job."""
    try:
        global_rank = dist.get_global_rank(group, rank)
    except Exception:  # an old torch, or a group object this process does not know
        return str(rank)
    return str(rank) if global_rank == rank else f"{rank} (global rank {global_rank})"


def _missing_peers(group, op_key: str, timeout_s: float) -> str:
    """Post this rank as stuck in ``op_key``, then name the ranks that did not post the same (best effort)."""
    store = _store()
    if store is None:
        return "the missing rank cannot be named (no rendezvous store)"
    me, n = dist.get_rank(group), dist.get_world_size(group)
    prefix = f"moe_a2a/stuck/{getattr(group, 'group_name', 'group')}/"
    grace = min(REPORT_GRACE_S, timeout_s)
    try:
        # The post carries its time: a post older than one deadline is from an earlier failure, not this one.
        store.set(prefix + str(me), f"{time.time()}|{op_key}")
        deadline = time.monotonic() + grace
        others = [r for r in range(n) if r != me]
        posts = {}
        while True:
            for r in others:
                if r not in posts and store.check([prefix + str(r)]):
                    when, key = store.get(prefix + str(r)).decode().split("|", 1)
                    if time.time() - float(when) < timeout_s + 2 * grace:
                        posts[r] = key
            if len(posts) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        mine_op, mine_seq = op_key.rsplit("#", 1)
        elsewhere = []
        for r, key in sorted(posts.items()):
            if key != op_key:
                op, seq = key.rsplit("#", 1)
                elsewhere.append(f"rank {_name(group, r)} waits in {op} (its call #{seq} on this exchanger; "
                                 f"this rank's is #{mine_seq} in {mine_op})")
        absent = [r for r in others if r not in posts]
    except Exception as exc:  # the store lives on rank 0 of the job: it may be the lost one
        return f"the missing rank cannot be named (the rendezvous store is unreachable: {type(exc).__name__})"
    parts = []
    if absent:
        names = ", ".join(_name(group, r) for r in absent)
        parts.append(f"{'rank' if len(absent) == 1 else 'ranks'} {names} of the group did not arrive (stalled, "
                     f"dead, or in another call)")
    parts += elsewhere
    return "; ".join(parts) if parts else "every peer reported itself stuck as well"


#: What sets the deadline of the dispatcher's collectives (named in timeout messages).
BUFFER_SETTING = "Buffer(timeout_s=...) or MOE_A2A_TIMEOUT_S"


def wait(work, group, timeout_s: float, operation: str, seq: int, setting: str = BUFFER_SETTING) -> None:
    """Wait for ``work`` (an async collective of ``group``) at most ``timeout_s`` seconds.

    Raises:
        CollectiveError: naming ``operation``, this rank and, where it can be known, the missing rank; the
            message says that ``setting`` sets the deadline.
    """
    failure: Optional[str] = None
    try:
        if _is_nccl(group):
            deadline = time.monotonic() + timeout_s
            pause = 1e-4
            while not work.is_completed():
                if time.monotonic() > deadline:
                    failure = "timed out"
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.01)
            if failure is None:
                work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        text = str(exc)
        failure = "timed out" if "timed out" in text.lower() else f"failed: {text.strip().splitlines()[0][:300]}"
    if failure is None:
        return
    me = dist.get_rank(group)
    who = _missing_peers(group, f"{operation}#{seq}", timeout_s)
    if failure == "timed out":
        raise CollectiveError(f"{operation} on rank {me} timed out after {timeout_s:g} s waiting for its peers: "
                              f"{who} ({setting} sets the deadline)")
    raise CollectiveError(f"{operation} on rank {me} lost a peer ({who}); the transport said: "
                          f"{failure[len('failed: '):]}")


_barriers = itertools.count(1)


def barrier(group, timeout_s: float, operation: str, setting: str) -> None:
    """Meet every rank of ``group``, each waiting at most ``timeout_s`` seconds (``monitored_barrier`` bounds
    only rank 0's wait: its other ranks wait for rank 0 as long as rank 0 lives).

    Raises:
        CollectiveError: as ``wait``, naming the ranks that did not arrive.
    """
    wait(dist.barrier(group=group, async_op=True), group, timeout_s, operation, next(_barriers), setting)


class Deadline:
    """Waits of one exchanger: numbers its operations, remembers a failure and refuses calls after it.

    ``owner`` names the exchanger in messages (``Buffer``, ``AllReduce``); ``setting`` what sets the deadline."""

    def __init__(self, group, timeout_s: float, owner: str = "Buffer", setting: str = BUFFER_SETTING):
        self.group = group
        self.timeout_s = float(timeout_s)
        self.owner, self.setting = owner, setting
        self.seq = 0
        self.failed: Optional[str] = None

    def check_usable(self) -> None:
        if self.failed is not None:
            raise CollectiveError(f"an earlier collective of this {self.owner} failed, so it refuses further calls "
                                  f"(create a new {self.owner} and process group): {self.failed}")

    def wait(self, work, operation: str) -> None:
        self.seq += 1
        try:
            wait(work, self.group, self.timeout_s, operation, self.seq, self.setting)
        except CollectiveError as exc:
            self.failed = str(exc)
            raise
