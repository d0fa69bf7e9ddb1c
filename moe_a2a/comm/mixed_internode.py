"""The mixed TP x DP one-shot across nodes over NVSHMEM: ``MixedCommHandler``'s fused mode when its ranks span
several nodes (``moe_a2a._nvshmem.MixedRuntime``; kernel and protocol in ``csrc/nvshmem/mixed.cuh``).

NVSHMEM runs over the whole group (PE = group rank; shared with the internode low-latency buffers, which run
it the same way). Every rank's symmetric allocation holds a send area and two receive areas of ``world_size``
slots; each source's message must fit one slot (``slot_bytes``, fixed at creation: ``AREA_BYTES / world_size``).
Ranks of the sender's node that NVSHMEM maps get plain stores, the others RDMA puts; a signal per source and
call, set after the data is complete, tells the receiver, which checks the sender's shape header and sums in
rank order (float32 accumulation, rounded once): the intranode one-shot's sums, bit for bit. Every wait has a
deadline; the first one that passes it (or a message of another shape) is recorded and raised, naming the ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .. import _native
from ..backends import internode as _internode
from .gather_scatter import exchange_objects

_nvshmem = _native.Lazy("_nvshmem")

#: Bytes of one area (send, or one of the two receive areas) of the symmetric allocation.
AREA_BYTES = 64 * 1024 * 1024
_DTYPES = {torch.float16: 1, torch.bfloat16: 2}  # comm::ArDtype


def available() -> bool:
    """Whether the NVSHMEM kernels are built (``moe_a2a._nvshmem``)."""
    return bool(_nvshmem)


def nvshmem_runs_over_group(rank: int, world_size: int) -> bool:
    """Whether NVSHMEM already runs in this process with PE = rank over all ``world_size`` ranks."""
    return _internode._TEAM == (list(range(world_size)), rank)


def slot_bytes_for(world_size: int) -> int:
    """The largest message one source sends one rank: an area's share per rank, in 16-byte pieces."""
    return AREA_BYTES // world_size // 16 * 16


class MixedInternodeWorkspace:
    """Symmetric buffer and call state of the one-shot across nodes (collective construction over ``group``,
    which must be the default group: NVSHMEM's PEs are its ranks).

    Args:
        group: the process group of all ranks (CUDA tensors travel over it for the start-up exchange).
        local_size: ranks per node (rank ``r`` is on node ``r // local_size``): the node's ranks get stores.
        timeout_s: seconds a kernel waits on a peer before it records an error and stops.
    """

    def __init__(self, group, local_size: int, timeout_s: float):
        if not available():
            raise NotImplementedError("moe_a2a._nvshmem is not built (NVSHMEM headers at build time)")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        if self.world_size > _nvshmem.mixed_max_ranks:
            raise NotImplementedError(f"the NVSHMEM mixed kernel serves at most {_nvshmem.mixed_max_ranks} ranks, "
                                      f"the group has {self.world_size}")
        self.timeout_s = float(timeout_s)
        self.slot_bytes = slot_bytes_for(self.world_size)

        def all_gather_object(obj):
            return exchange_objects(obj, group, "NVSHMEM start-up exchange", self.timeout_s)

        _internode.init_nvshmem_over_group(self.rank, self.world_size, all_gather_object,
                                           _nvshmem.mixed_alloc_bytes(self.world_size, self.slot_bytes))
        self._rt = _nvshmem.MixedRuntime()
        err = self._rt.allocate(self.rank, self.world_size, local_size, self.slot_bytes, self.timeout_s)
        if err:
            raise RuntimeError(f"moe_a2a mixed internode: {err}")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        me = str(getattr(props, "uuid", torch.cuda.current_device()))
        #: Blocks per call: every block of every rank sharing this GPU must be resident at once.
        self.default_blocks = max(1, props.multi_processor_count // sum(1 for g in all_gather_object(me) if g == me))
        self._destroyed = False
        self.device = torch.device("cuda", torch.cuda.current_device())
        _native.track(self)

    def check(self) -> None:
        """Raise the first error a kernel recorded (its call never returned valid outputs)."""
        if self._destroyed:
            raise RuntimeError("the mixed internode workspace was destroyed")
        err = self._rt.error()
        if err:
            raise RuntimeError(f"moe_a2a mixed internode: {err}")

    def mixed(self, x: torch.Tensor, send_first: Sequence[int], send_rows: int, src_block: Sequence[int],
              out_blocks: int) -> torch.Tensor:
        """The one-shot on the current stream: rank ``p`` receives rows ``send_first[p]`` to ``send_first[p] +
        send_rows`` of ``x`` ``[rows, hidden]`` (float16/bfloat16, rows of a multiple of 16 bytes); returns
        ``[out_blocks * send_rows, hidden]`` whose block ``b`` is the sum, in rank order, of what the ranks ``s``
        with ``src_block[s] == b`` sent here. Every rank passes the same lists and shape."""
        self.check()
        if x.dtype not in _DTYPES or not x.is_cuda or x.dim() != 2:
            raise ValueError(f"x must be a 2-d float16/bfloat16 CUDA tensor, got {x.dtype} {list(x.shape)}")
        rows, hidden = x.shape
        row_bytes = hidden * x.element_size()
        if row_bytes % 16 or send_rows < 1:
            raise ValueError(f"rows must be a multiple of 16 bytes and send_rows >= 1, got {row_bytes}, {send_rows}")
        if send_rows * row_bytes > self.slot_bytes:
            raise ValueError(f"a message of {send_rows * row_bytes} bytes exceeds the slot of {self.slot_bytes}")
        if len(send_first) != self.world_size or len(src_block) != self.world_size:
            raise ValueError("send_first and src_block need one entry per rank")
        if any(f < 0 or f + send_rows > rows for f in send_first) or any(not 0 <= b < out_blocks for b in src_block):
            raise ValueError(f"send_first {send_first} / src_block {src_block} out of range for {rows} rows, "
                             f"{out_blocks} blocks")
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
        out = torch.empty(out_blocks * send_rows, hidden, dtype=x.dtype, device=x.device)
        blocks = max(1, min(self.default_blocks, -(-send_rows * row_bytes // 16 // 512)))
        err = self._rt.run(x, list(send_first), int(send_rows), list(src_block), int(out_blocks), blocks,
                           _DTYPES[x.dtype], out)
        if err:
            raise RuntimeError(err)
        return out

    def destroy(self, at_exit: bool = False) -> None:
        """Free the symmetric buffer (collective: NVSHMEM frees with a barrier); the workspace is unusable
        afterwards. At exit, or after a failed kernel, nothing is freed (peers may be gone; exit returns it)."""
        if self._destroyed:
            return
        self._destroyed = True
        if at_exit or not _native.cuda_context_usable(self.device):
            return
        torch.cuda.synchronize(self.device)
        self._rt.destroy()
