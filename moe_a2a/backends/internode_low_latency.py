"""Low-latency dispatch/combine across nodes over NVSHMEM (``moe_a2a._nvshmem.LowLatencyRuntime``).

Same outputs, handle and semantics as the intranode low-latency backend (``low_latency.py``), for groups
that span several nodes, as in DeepEP's low-latency mode:

* NVSHMEM runs over the whole group (PE = group rank), bootstrapped by a unique id over the group.
* Senders push. Dispatch casts each token once (FP8 e4m3 with per-128 scales, or BF16) into this rank's
  send area, then puts each (token, expert) message straight into slot ``[local expert][this rank][j]``
  of the rank that holds the expert: over RDMA across nodes, or, where NVSHMEM maps the peer (NVLink
  inside a node) and ``allow_nvlink`` is set, with plain stores. Each thread completes its puts
  (``nvshmem_quiet``); then the last block sends one count per (local expert, source rank), tagged with
  the call's epoch. The receiver waits for those signals and copies the messages to their slots, source
  rank by source rank, each source's tokens by increasing index (the reference order).
* Combine puts every valid slot's row back to its token's rank, into ``[global expert][token]``, then
  flags every rank; the token's rank waits for the flags and sums the top-k rows, weighted, in float32.
* Two alternating buffer sets, no host synchronization (dispatch + combine can be captured in one CUDA
  graph); with ``return_recv_hook`` the call issues the sends and the hook launches the receive. Call
  each hook before issuing the call after next. Every wait times out after ``timeout_s``; the next call
  raises naming the rank, step and peer (with ``shrink``, the ranks waited for are masked instead).
* Rank masking as in ``low_latency.py``: masked ranks are left out of every put, count, flag and wait.
* ``num_qps_per_rank``: NVSHMEM picks the transport; the value becomes ``NVSHMEM_IBGDA_NUM_RC_PER_PE``
  (queue pairs per peer of the IBGDA transport) before NVSHMEM starts, unless that variable is set.
  Other transports (IBRC, UCX, NVLink) have no such setting, and NVSHMEM spreads a PE's puts over its
  queue pairs itself (the kernels do not pick a queue pair per expert as DeepEP's IBGDA code does).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from ..handles import LowLatencyHandle
from ..limits import LOW_LATENCY_MAX_EXPERTS
from . import internode
from . import residency
from .low_latency import LowLatencyBackend

from .. import _native

_nvshmem = _native.Lazy("_nvshmem")  # loaded by a group that spans nodes; absent when built without NVSHMEM


def available() -> bool:
    """Whether ``moe_a2a._nvshmem`` was built with the low-latency kernels."""
    return bool(_nvshmem) and hasattr(_nvshmem, "LowLatencyRuntime")


class _Runtime:
    """``_nvshmem.LowLatencyRuntime`` with errors raised: the extension returns them as strings."""

    def __init__(self, rank: int) -> None:
        self._rt = _nvshmem.LowLatencyRuntime()
        self._rank = rank

    def _check(self, err: str) -> None:
        if err:
            raise RuntimeError(f"moe_a2a internode low-latency: rank {self._rank}: {err}")

    def allocate(self, *args) -> None:
        self._check(self._rt.allocate(*args))

    def dispatch(self, *args) -> None:
        self._check(self._rt.dispatch(*args))

    def combine(self, *args) -> None:
        self._check(self._rt.combine(*args))

    def clean(self) -> None:
        self._check(self._rt.clean())

    def __getattr__(self, name):
        return getattr(self._rt, name)


class InternodeLowLatencyBackend(LowLatencyBackend):
    """Low-latency kernels for one rank of a group spanning nodes (all ranks construct it together); a
    ``LowLatencyModeKernels`` (``base``). Its calls take at most ``limits.INTERNODE_LOW_LATENCY_MAX_TOKENS``
    tokens per rank (``Buffer`` checks).

    Arguments:
        rank, num_ranks: this rank and the group size (at most ``LOW_LATENCY_MAX_EXPERTS``).
        group: the process group (used by ``clean``).
        num_rdma_bytes: bytes of the symmetric buffer, at least ``config.get_low_latency_rdma_size_hint(...)`` of the
            calls (``config.get_low_latency_rdma_size_hint``); the same on every rank.
        all_gather_object: ``obj -> [obj of rank 0, ..., obj of rank num_ranks - 1]`` over the group.
        timeout_s: seconds a kernel waits for a peer before giving up and recording the error.
        num_qps_per_rank: RDMA queue pairs per peer (IBGDA transport only, see the module doc).
        allow_nvlink: store directly to peers NVSHMEM maps (NVLink); False sends everything with NVSHMEM puts.
        num_sms: blocks per kernel; default: the device's SMs divided by the ranks sharing the device.
        shrink: a peer that times out is masked and the call completes without it (see ``LowLatencyBackend``).
    """

    def __init__(self, rank: int, num_ranks: int, group, num_rdma_bytes: int, all_gather_object, timeout_s: float,
                 num_qps_per_rank: int = 24, allow_nvlink: bool = True, num_sms: Optional[int] = None,
                 shrink: bool = False) -> None:
        if not available():
            raise NotImplementedError("the internode low-latency kernels are not built: moe_a2a._nvshmem (NVSHMEM "
                                      "headers at build time) has no LowLatencyRuntime")
        if isinstance(num_qps_per_rank, bool) or not isinstance(num_qps_per_rank, int) or num_qps_per_rank < 1:
            raise ValueError(f"num_qps_per_rank must be an int >= 1, got {num_qps_per_rank!r}")
        if not 2 <= num_ranks <= LOW_LATENCY_MAX_EXPERTS:
            raise NotImplementedError(f"internode low-latency kernels need 2..{LOW_LATENCY_MAX_EXPERTS} ranks, "
                                      f"got {num_ranks}")
        sizes = all_gather_object(int(num_rdma_bytes))
        if len(set(sizes)) != 1:
            raise ValueError(f"every rank must pass the same num_rdma_bytes, got {sizes}")
        self.rank, self.num_ranks, self.group = rank, num_ranks, group
        self.num_rdma_bytes, self.timeout_s = int(num_rdma_bytes), float(timeout_s)
        self.num_qps_per_rank, self.allow_nvlink = num_qps_per_rank, bool(allow_nvlink)
        self.device = torch.device("cuda", torch.cuda.current_device())
        os.environ.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(num_qps_per_rank))
        internode.init_nvshmem_over_group(rank, num_ranks, all_gather_object, self.num_rdma_bytes)
        self._rt = _Runtime(rank)
        self._rt.allocate(rank, num_ranks, self.num_rdma_bytes, self.timeout_s, self.allow_nvlink)
        devices = all_gather_object(residency.device_id(self.device))
        self.num_sms = residency.low_latency_num_sms(self._rt.num_device_sms(), devices, num_sms)
        self._rt.set_shrink(bool(shrink))
        self.shrink = bool(shrink)
        self.mask = self._rt.rank_mask()  # as LowLatencyBackend.mask
        self._set = 0
        self._calls = 0

    def destroy(self, at_exit: bool = False) -> None:
        """Free the symmetric buffer (collective: NVSHMEM frees with a barrier). ``at_exit``: nothing is freed
        (peers may have exited already; the process's exit returns the memory)."""
        if at_exit or not _native.cuda_context_usable(self.device):  # a failed kernel: no collective free
            return
        self._rt.destroy()

    # ------------------------------------------------------------------ combine
    def _launch_combine(self, x, handle: LowLatencyHandle, topk_idx, topk_weights, combined, wait_stats, set_: int,
                        call: int, phases: int, wire_format: str) -> None:
        # The NVSHMEM combine also reads each slot's source token (the handle's src_info) to address the reply.
        self._rt.combine(x, handle.layout_range, handle.src_info, topk_idx, topk_weights, combined, wait_stats,
                         handle.num_experts, handle.num_max_dispatch_tokens_per_rank, set_, self.num_sms, call, phases,
                         wire_format)

    # ------------------------------------------------------------------ probes (debug, benchmark)
    STEPS = ("none", "start", "rows sent", "arrival counted", "peers waited for", "done")

    def set_step_probe(self, on: bool) -> None:
        """Debug probe: the launches after this record, per block, the last step reached (``STEPS``) in pinned
        host memory, which ``block_steps`` reads without a device sync, also while a kernel hangs."""
        self._rt.set_step_probe(bool(on))

    def block_steps(self) -> List[Tuple[int, str]]:
        """``(call number, step)`` of every block's last recorded step (``(0, "none")`` before any)."""
        return [(v >> 4, self.STEPS[v & 15]) for v in self._rt.block_steps(self.num_sms)]

    def empty_kernel(self) -> None:
        raise NotImplementedError("the internode low-latency backend has no probe kernels")

    def flag_round_trip(self, peer: int, iters: int = 1000, warmup: int = 100) -> torch.Tensor:
        raise NotImplementedError("the internode low-latency backend has no probe kernels")
