"""Point-to-point exchange with the live ranks only: what lets low-latency calls go on after a rank is lost.

A collective over the whole group fails (or hangs) once one member is gone. ``PeerExchanger`` has the
same interface as ``reference.Exchanger`` but talks to each unmasked peer with its own send and receive,
every wait bounded by ``timeout_s``. A peer that fails (its connection closed, or nothing arrived in time)
is masked when ``auto_mask`` is set, and the call completes over the others; otherwise the call raises
naming the peer. Masked ranks are neither sent to nor waited for, and count as having sent nothing.

Every rank numbers its exchanges in the same order (one per phase of each call, whether or not it
sends anything), and messages are tagged with that number, so a late message of an earlier exchange is
never taken for a later one.
"""
from __future__ import annotations

import datetime
import threading
import time
from typing import List, Sequence

import torch
import torch.distributed as dist

from .reference import _as_bytes, _comm_device

_TAG_LIMIT = 1 << 30
#: What helper threads pass to gloo's wait: longer than any job, so gloo itself never times out (see ``_wait``).
_NO_GLOO_TIMEOUT = datetime.timedelta(days=30)


def _wait_in_thread(work, done: threading.Event, error: list) -> None:
    try:
        work.wait(timeout=_NO_GLOO_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - handed to the waiting thread, which names the peer
        error.append(e)
    done.set()


class PeerLost(RuntimeError):
    """A peer failed during a low-latency exchange and automatic masking is off."""


class PeerExchanger:
    """Row exchange over point-to-point messages with the live ranks of ``group``.

    ``mask``: ``[num_ranks]`` int32 CPU tensor shared with the owner, 1 for masked ranks; updated in
    place when ``auto_mask`` masks a failed peer.
    """

    def __init__(self, group, rank: int, mask: torch.Tensor, timeout_s: float, auto_mask: bool):
        self.group = group
        self.rank = rank
        self.num_ranks = dist.get_world_size(group)
        self.device = _comm_device(group)
        self.mask = mask
        self.timeout_s = timeout_s
        self.auto_mask = auto_mask
        self.step = "exchange"  # named in errors: the caller sets "dispatch" / "combine"
        self._seq = 0
        # Works of failed peers (with their helper's done event), kept alive: gloo may still touch their buffers.
        self._abandoned: List = []

    def live_peers(self) -> List[int]:
        """Other ranks this rank exchanges with now (none while this rank itself is masked)."""
        if self.mask[self.rank]:
            return []
        return [p for p in range(self.num_ranks) if p != self.rank and not self.mask[p]]

    def _next_tag(self) -> int:
        self._seq += 1
        return self._seq % _TAG_LIMIT

    def _send(self, tensor: torch.Tensor, peer: int, tag: int):
        return dist.isend(tensor, group=self.group, group_dst=peer, tag=tag)

    def _recv(self, tensor: torch.Tensor, peer: int, tag: int):
        return dist.irecv(tensor, group=self.group, group_src=peer, tag=tag)

    def _post(self, peers_ops, failed: set) -> list:
        """Post ``(peer, op, tensor, tag)`` sends/receives; returns ``(peer, work)`` pairs."""
        works = []
        for peer, op, tensor, tag in peers_ops:
            if peer in failed:
                continue
            try:
                works.append((peer, op(tensor, peer, tag)))
            except RuntimeError as e:  # the peer's connection is already closed
                self._fail(peer, e, failed)
        return works

    def _wait(self, works, failed: set, started: float) -> None:
        """Wait for every work until ``timeout_s`` after ``started``; a peer not done by then has failed.

        Each work is waited on by a helper thread while this one keeps the deadline. A timed wait inside gloo
        would not do: when it expires gloo closes every connection of the group, so the live peers would lose
        each other too. A helper stuck on a silent peer ends when that peer sends or its connection closes.
        """
        pending = []
        for peer, work in works:
            if peer in failed:
                self._abandoned.append((work, None))
                continue
            done, error = threading.Event(), []
            threading.Thread(target=_wait_in_thread, args=(work, done, error), daemon=True,
                             name=f"moe_a2a-peer-{peer}").start()
            pending.append((peer, work, done, error))
        for peer, work, done, error in pending:
            if peer in failed:
                self._abandoned.append((work, done))
                continue
            if not done.wait(max(self.timeout_s - (time.monotonic() - started), 0.0)):
                self._abandoned.append((work, done))
                self._fail(peer, TimeoutError(f"nothing from or to rank {peer} within {self.timeout_s:g}s"), failed)
            elif error:
                self._fail(peer, error[0], failed)
        self._abandoned = [(w, d) for w, d in self._abandoned if d is None or not d.is_set()]

    def _fail(self, peer: int, error: Exception, failed: set) -> None:
        failed.add(peer)
        if self.auto_mask:
            self.mask[peer] = 1
            return
        raise PeerLost(f"rank {self.rank}: low-latency {self.step} failed with rank {peer} within "
                       f"{self.timeout_s:g}s ({str(error).splitlines()[0][:200]}); mask it on every live rank with "
                       f"Buffer.low_latency_update_mask_buffer({peer}, True) or create the Buffer with "
                       "enable_shrink=True") from error

    def counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """Exchange ``[num_ranks, k]`` int64 rows (row ``j`` to rank ``j``); masked or failed ranks' rows are 0."""
        tag = self._next_tag()
        send = send_counts.to(self.device, torch.int64).contiguous()
        recv = torch.zeros_like(send)
        recv[self.rank] = send[self.rank]
        peers = self.live_peers()
        failed: set = set()
        started = time.monotonic()
        ops = [(p, self._recv, recv[p], tag) for p in peers] + [(p, self._send, send[p], tag) for p in peers]
        self._wait(self._post(ops, failed), failed, started)
        for p in failed:
            recv[p] = 0
        return recv.cpu()

    def rows(self, tensors: Sequence[torch.Tensor], send_splits: List[int], recv_splits: List[int],
             async_op: bool = False):
        """Send ``tensors`` (rows grouped by destination) to the live ranks; see ``reference.Exchanger.rows``.

        Returns ``(unpack, wait)`` with ``async_op`` (else ``unpack()``'s result). ``wait()`` returns the set of
        peers that failed during this exchange (masked with ``auto_mask``); ``unpack()`` returns the received
        tensors without those peers' rows, plus the ``[num_ranks]`` list of rows kept from each source.
        """
        tag = self._next_tag()
        parts = [_as_bytes(t) for t in tensors]
        widths = [p.size(1) for p in parts]
        packed = torch.cat([p.to(self.device) for p in parts], dim=1).contiguous()
        starts = [0]
        for n in send_splits:
            starts.append(starts[-1] + n)
        width = sum(widths)
        received = [torch.empty(n, width, dtype=torch.uint8, device=self.device) for n in recv_splits]
        received[self.rank] = packed[starts[self.rank]:starts[self.rank + 1]]
        peers = self.live_peers()
        skipped = [p for p in range(self.num_ranks) if p != self.rank and p not in peers]
        failed: set = set()
        started = time.monotonic()
        ops = [(p, self._recv, received[p], tag) for p in peers if recv_splits[p]]
        ops += [(p, self._send, packed[starts[p]:starts[p + 1]], tag) for p in peers if send_splits[p]]
        works = self._post(ops, failed)

        def wait() -> set:
            self._wait(works, failed, started)
            return set(failed)

        def unpack():
            dropped = failed.union(skipped)
            kept = [0 if p in dropped else recv_splits[p] for p in range(self.num_ranks)]
            rows = torch.cat([received[p] for p in range(self.num_ranks) if p not in dropped]) if \
                len(dropped) < self.num_ranks else torch.empty(0, width, dtype=torch.uint8, device=self.device)
            out, col = [], 0
            for t, w in zip(tensors, widths):
                piece = torch.empty(rows.size(0), w, dtype=torch.uint8, device=t.device)
                piece.copy_(rows[:, col:col + w])
                out.append(piece.view(t.dtype).reshape(rows.size(0), *t.shape[1:]))
                col += w
            return out, kept

        if async_op:
            return unpack, wait
        wait()
        return unpack()

