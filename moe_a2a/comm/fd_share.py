"""Pass one file descriptor from every rank to every rank of a group on one host (Unix sockets, SCM_RIGHTS):
how the ranks share CUDA virtual memory (``cuMemExportToShareableHandle`` gives a descriptor that only a
process holding a duplicate of it can import)."""
from __future__ import annotations

import os
import socket
import threading
from typing import List

import torch.distributed as dist

from .gather_scatter import exchange_objects


def share_fds(fd: int, group, timeout_s: float) -> List[int]:
    """Every rank's ``fd``, duplicated into this process: entry ``r`` is rank ``r``'s (entry ``rank`` is ``fd``
    itself). Collective over ``group``; the ranks must share a host (abstract Unix sockets). The caller owns
    the received descriptors (and still owns ``fd``)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    token = exchange_objects(os.urandom(8).hex(), group, "descriptor exchange", timeout_s)[0]

    def address(r: int) -> str:
        return f"\0moe_a2a-fds-{token}-{r}"

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address(rank))
    server.listen(size)
    server.settimeout(timeout_s)
    failure: List[BaseException] = []

    def serve():
        try:
            for _ in range(size - 1):
                conn, _ = server.accept()
                with conn:
                    socket.send_fds(conn, [b"f"], [fd])
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            failure.append(e)

    exchange_objects(None, group, "descriptor exchange", timeout_s)  # every rank listens before any connects
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fds: List[int] = [-1] * size
    fds[rank] = fd
    try:
        for r in range(size):
            if r == rank:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout_s)
                conn.connect(address(r))
                _, got, _, _ = socket.recv_fds(conn, 1, 1)
                if len(got) != 1:
                    raise RuntimeError(f"rank {rank} received no file descriptor from rank {r}")
                fds[r] = got[0]
        thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"rank {rank}: its peers did not all fetch its descriptor within {timeout_s:.0f} s")
        if failure:
            raise RuntimeError(f"rank {rank} could not send its descriptor: {failure[0]}")
    except BaseException:
        for r, got in enumerate(fds):
            if r != rank and got >= 0:
                os.close(got)
        raise
    finally:
        server.close()
    return fds
