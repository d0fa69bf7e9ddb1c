"""Mixed TP x DP collectives: all-reduce + all-gather and reduce-scatter + all-reduce (FlashInfer's
``MixedCommHandler`` / ``run_mixed_comm`` API).

Topology. ``world_rank = local_rank + inter_rank * local_size``; inside a node
``local_rank = local_tp_rank + local_dp_rank * local_tp_size``; across nodes
``inter_rank = inter_tp_rank + inter_dp_rank * inter_tp_size``. The TP rank is
``local_tp_rank + inter_tp_rank * local_tp_size`` (size ``local_tp_size * inter_tp_size``) and the DP rank
``local_dp_rank + inter_dp_rank * local_dp_size`` (size ``local_dp_size * inter_dp_size``). Defaults: all of a
node's ranks are TP (``local_tp_size = local_size``) and all nodes are TP (``inter_tp_size = inter_size``);
giving one of a pair derives the other. "Nodes" are only a grouping of ranks: on one machine they are
virtual nodes.

Operations (``x_in`` is ``[rows, ...]`` float16/bfloat16 on the handler's device):

* ``ALLREDUCE_ALLGATHER``: sum ``x_in`` over the TP group, then concatenate over the DP group in DP-rank order:
  ``[rows * dp_size, ...]``.
* ``REDUCESCATTER_ALLREDUCE``: ``x_in`` is ``dp_size`` chunks of ``rows // dp_size``; the result is the sum over
  every rank of the world of chunk ``dp_rank``: ``[rows // dp_size, ...]``.
* With no DP (``dp_size == 1``) the only operation is ``ALLREDUCE``; with no TP, ``ALLGATHER`` and
  ``REDUCESCATTER`` (the reference's valid-op rule).

Modes (which level does which part):

* ``NCCL_ONE``: one collective over the whole world (an all-gather or all-to-all, then a local sum; or the plain
  all-reduce / all-gather / reduce-scatter when only one of TP and DP is present).
* ``NCCL_TP_DP``: the unfused composition: all-reduce over the TP group and all-gather over the DP group (or
  reduce-scatter over DP, then all-reduce over TP). Only with both TP and DP.
* ``HIER_INTRA_FIRST``: one collective inside each node (it reduces the node's TP part and gathers/scatters the
  node's DP part), then one across nodes (the inter-node TP and DP parts). Only with several nodes.
* ``HIER_INTER_FIRST``: the same two steps, across nodes first.
* ``FUSED_OPT_WAITS_UC``: one kernel on one node (``inter_size == 1``, CUDA tensors, rows of a multiple of 16
  bytes): every rank stores the rows each peer needs straight into that peer's Lamport buffer, which every
  rank of the node maps (CUDA virtual memory by default, cudaIpc handles with ``memory="cuda_ipc"``;
  ``moe_a2a.comm.workspace``; one wait per 16-byte piece, no barrier, no host sync) and sums what it received
  in rank order with float32 accumulation, so it matches ``NCCL_ONE``'s sums bit for bit. One-shot (fewest
  waits): each rank receives ``world_size`` messages, so it is the small-message mode.
* ``FUSED_OPT_BYTES1_UC``: the same kernel in two shots (fewest bytes): the result is cut into one piece per
  rank (a TP rank's share of its DP group's rows); each rank receives its piece from the ranks that hold its
  inputs, sums it in rank order (float32, rounded once: the same sums) and stores the sum into the rank(s) that
  need it. A rank receives about ``1 + dp_size`` (gather ops) or ``1 + 1 / dp_size`` (scatter ops) times its
  input instead of ``world_size`` times; with no TP (``tp_size == 1``) it saves nothing.
* The fused modes take messages whose Lamport buffer fits ``FUSED_MAX_BUFFER_BYTES`` (the two-shot's is about
  ``2 / tp_size`` of the one-shot's); larger ones take the torch modes. With a gloo default group (ranks sharing
  a GPU, where NCCL cannot run) they are the only modes.
* Across nodes (``inter_size > 1``) ``FUSED_OPT_WAITS_UC`` is the same one-shot over NVSHMEM
  (``moe_a2a.comm.mixed_internode``; ``init_nvshmem`` starts it over the whole group): the node's peers get
  plain stores, the other nodes' RDMA puts, each source's message signalled once complete; the same sums. Its
  messages must fit one slot (``mixed_internode.slot_bytes_for(world_size)``); larger ones take the torch modes.
* Other ``FUSED_*`` modes: ``*_MC`` need NVLink multicast, which moe_a2a keeps off; ``FUSED_OPT_BYTES2_*``, and
  ``FUSED_OPT_BYTES1_UC`` across nodes, are not built. Asking for one raises ``NotImplementedError`` naming
  why. Passing ``require_fused=True`` makes the constructor raise when the fused mode is unavailable instead of
  falling back to the torch modes.
* ``AUTOTUNE``: the fastest of the valid modes for the input's size bucket (see ``select_autotune_mode``).

The "NCCL" names are the reference's; here they run on whatever backend the process groups have (NCCL for CUDA
tensors, gloo on CPU). Every mode computes the same sum: local reductions accumulate in float32 in a fixed
order, and partial sums cross a level in the tensor's dtype (as a two-level all-reduce sends them), so results
agree bit for bit wherever the sums are exact, and to rounding otherwise.

Default mode (``mode=None``): ``AUTOTUNE`` when ``use_autotune``; otherwise the fixed rule ``NCCL_TP_DP`` when
valid, else ``NCCL_ONE`` (the unfused torch composition, which is also the reference's rule), or where only the
fused modes run, ``FUSED_OPT_WAITS_UC`` up to ``FUSED_ONESHOT_MAX_BYTES`` of one-shot buffer (or without TP) and
``FUSED_OPT_BYTES1_UC`` above. A measured or default choice of a fused mode for an input it cannot take (rows not
a multiple of 16 bytes, too large) falls back to that rule.
"""
from __future__ import annotations

import enum
import functools
import math
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..limits import MAX_NVL_PEERS
from .gather_scatter import (all_gather_single, all_to_all_single, comm_device, default_timeout_s,
                             exchange_objects, sum_in_order, wait)
from . import mixed_internode
from .workspace import GROWTH_BYTES, LamportWorkspace, kernels_available, mixed_buffer_bytes

#: Largest Lamport buffer the fused modes use (three per rank); larger messages take the torch modes.
FUSED_MAX_BUFFER_BYTES = 256 * 1024 * 1024
#: Where only the fused modes run and nothing was measured: the one-shot up to this one-shot buffer size (8
#: ranks sharing an H100, TP 4 x DP 2: the two-shot was faster from 1 MiB per rank for AR+AG, 8 MiB of buffer,
#: and from 4 MiB per rank for RS+AR; docs/perf/mixed_comm_tp4_dp2_h100.md).
FUSED_ONESHOT_MAX_BYTES = 4 * 1024 * 1024


class MixedCommOp(enum.IntEnum):
    """Operations (values as in the reference)."""
    ALLREDUCE = 0
    ALLGATHER = 1
    REDUCESCATTER = 2
    ALLREDUCE_ALLGATHER = 3
    REDUCESCATTER_ALLREDUCE = 4


class MixedCommMode(enum.IntEnum):
    """Execution modes (reference values 0-8; the two hierarchical torch modes are moe_a2a's)."""
    FUSED_OPT_WAITS_MC = 0
    FUSED_OPT_WAITS_UC = 1
    FUSED_OPT_BYTES1_MC = 2
    FUSED_OPT_BYTES1_UC = 3
    FUSED_OPT_BYTES2_MC = 4
    FUSED_OPT_BYTES2_UC = 5
    NCCL_ONE = 6
    NCCL_TP_DP = 7
    AUTOTUNE = 8
    HIER_INTRA_FIRST = 9
    HIER_INTER_FIRST = 10


#: The fused modes moe_a2a builds on one node, and across nodes (the others are refused with the reason, see the
#: module docstring).
FUSED_MODES = (MixedCommMode.FUSED_OPT_WAITS_UC, MixedCommMode.FUSED_OPT_BYTES1_UC)
FUSED_MODES_INTER = (MixedCommMode.FUSED_OPT_WAITS_UC,)

_GATHER_OPS = (MixedCommOp.ALLREDUCE, MixedCommOp.ALLGATHER, MixedCommOp.ALLREDUCE_ALLGATHER)
_SCATTER_OPS = (MixedCommOp.REDUCESCATTER, MixedCommOp.REDUCESCATTER_ALLREDUCE)


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _split(level: str, size: int, tp: Optional[int], dp: Optional[int]):
    """(tp, dp) of one level with the reference's defaults: all TP, or derive the missing one."""
    if tp is None and dp is None:
        return size, 1
    if tp is not None:
        _pos_int(f"{level}_tp_size", tp)
    if dp is not None:
        _pos_int(f"{level}_dp_size", dp)
    if dp is None:
        if size % tp:
            raise ValueError(f"{level}_tp_size {tp} does not divide {level}_size {size}")
        return tp, size // tp
    if tp is None:
        if size % dp:
            raise ValueError(f"{level}_dp_size {dp} does not divide {level}_size {size}")
        return size // dp, dp
    if tp * dp != size:
        raise ValueError(f"{level}_tp_size * {level}_dp_size = {tp} * {dp} != {level}_size {size}")
    return tp, dp


class ParallelInfo:
    """Ranks and sizes of the TP x DP split inside and across nodes (see the module docstring)."""

    def __init__(self, world_rank, world_size, local_rank, local_size, inter_rank, inter_size,
                 local_tp_size=None, local_dp_size=None, inter_tp_size=None, inter_dp_size=None):
        for name, v in (("world_size", world_size), ("local_size", local_size), ("inter_size", inter_size)):
            _pos_int(name, v)
        for name, v, n in (("world_rank", world_rank, world_size), ("local_rank", local_rank, local_size),
                           ("inter_rank", inter_rank, inter_size)):
            _pos_int(name, v, 0)
            if v >= n:
                raise ValueError(f"{name} {v} must be < {n}")
        if world_size != inter_size * local_size:
            raise ValueError(f"world_size {world_size} != inter_size * local_size = {inter_size} * {local_size}")
        if world_rank != local_rank + inter_rank * local_size:
            raise ValueError(f"world_rank {world_rank} != local_rank + inter_rank * local_size = "
                             f"{local_rank} + {inter_rank} * {local_size}")
        self.world_rank, self.world_size = world_rank, world_size
        self.local_rank, self.local_size = local_rank, local_size
        self.inter_rank, self.inter_size = inter_rank, inter_size
        self.local_tp_size, self.local_dp_size = _split("local", local_size, local_tp_size, local_dp_size)
        self.inter_tp_size, self.inter_dp_size = _split("inter", inter_size, inter_tp_size, inter_dp_size)
        self.local_tp_rank, self.local_dp_rank = local_rank % self.local_tp_size, local_rank // self.local_tp_size
        self.inter_tp_rank, self.inter_dp_rank = inter_rank % self.inter_tp_size, inter_rank // self.inter_tp_size
        self.tp_size = self.local_tp_size * self.inter_tp_size
        self.dp_size = self.local_dp_size * self.inter_dp_size
        self.tp_rank = self.local_tp_rank + self.inter_tp_rank * self.local_tp_size
        self.dp_rank = self.local_dp_rank + self.inter_dp_rank * self.local_dp_size

    use_local_tp = property(lambda self: self.local_tp_size > 1)
    use_inter_tp = property(lambda self: self.inter_tp_size > 1)
    use_tp = property(lambda self: self.tp_size > 1)
    use_dp = property(lambda self: self.dp_size > 1)
    use_inter = property(lambda self: self.inter_size > 1)
    use_mixed = property(lambda self: self.use_tp and self.use_dp)

    def dp_rank_of(self, world_rank: int) -> int:
        """The DP rank of ``world_rank``."""
        local, inter = world_rank % self.local_size, world_rank // self.local_size
        return local // self.local_tp_size + inter // self.inter_tp_size * self.local_dp_size

    @functools.cached_property
    def dp_ranks(self) -> tuple:
        """The DP rank of every world rank (the fused kernels' output block of each source)."""
        return tuple(self.dp_rank_of(w) for w in range(self.world_size))

    def world_rank_of(self, tp_rank: int, dp_rank: int) -> int:
        ltp, itp = tp_rank % self.local_tp_size, tp_rank // self.local_tp_size
        ldp, idp = dp_rank % self.local_dp_size, dp_rank // self.local_dp_size
        return (ltp + ldp * self.local_tp_size) + (itp + idp * self.inter_tp_size) * self.local_size

    def tp_group_ranks(self, dp_rank: int) -> List[int]:
        return [self.world_rank_of(t, dp_rank) for t in range(self.tp_size)]

    def dp_group_ranks(self, tp_rank: int) -> List[int]:
        return [self.world_rank_of(tp_rank, d) for d in range(self.dp_size)]

    def local_group_ranks(self, inter_rank: int) -> List[int]:
        return list(range(inter_rank * self.local_size, (inter_rank + 1) * self.local_size))

    def inter_group_ranks(self, local_rank: int) -> List[int]:
        return [local_rank + n * self.local_size for n in range(self.inter_size)]


def _new_groups(rank_lists: List[List[int]], mine: int):
    """Create one group per list (collective: every rank creates all of them) and return group ``mine``."""
    groups = [dist.new_group(ranks) for ranks in rank_lists]
    return groups[mine]


class MixedCommHandler:
    """All-reduce + all-gather and reduce-scatter + all-reduce over a TP x DP split inside and across nodes.

    Args (the reference's):
        world_rank, world_size: this process in the default process group (``local_rank + inter_rank * local_size``).
        local_rank, local_size: this process in its node (``local_tp_rank + local_dp_rank * local_tp_size``).
        inter_rank, inter_size: the node index and the number of nodes.
        local_tp_size, local_dp_size, inter_tp_size, inter_dp_size: the split (None: defaults, see module doc).
        dtype: ``torch.float16`` or ``torch.bfloat16``.
        device: where the tensors live; CUDA with an NCCL default group, or CPU with gloo (CUDA over gloo, for
            ranks sharing a GPU, runs the fused mode only).
        grid_size, max_block_size, min_block_size, min_num_steps, ib_enable_ibgda, should_init_nvshmem: settings
            of the fused kernels; validated and kept, unused by the torch.distributed modes.
        use_autotune: pick the mode per size bucket by measurement (``mode=None`` means ``AUTOTUNE``).
    Args (moe_a2a's, keyword only):
        require_fused: raise (NotImplementedError) instead of falling back when the fused kernels are missing.
        autotune_max_bytes: largest bucket ``run_autotune`` measures (default: the reference's range, 8 KiB
            times ``2 ** (max(15 - log2(dp_size), 1) - 1)``).
        timeout_s: deadline of each wait on CPU groups (default ``MOE_A2A_TIMEOUT_S`` or 60 s).
        memory: how the node's ranks map the fused mode's buffers: ``"vmm"`` (the default: CUDA virtual memory,
            ``cuMem*`` allocations shared as file descriptors; where they cannot be shared the handler falls back to
            cudaIpc handles and ``virtual_memory_error`` says why) or ``"cuda_ipc"`` (cudaIpc handles).

    Construction is collective over the default group (it creates the node, cross-node, TP and DP groups).
    Autotuning is lazy: a size bucket is measured the first time an operation of that size runs in
    ``AUTOTUNE`` mode (every rank runs it, so the measurement is collective), or all at once by ``run_autotune``.
    """

    def __init__(self, world_rank: int, world_size: int, local_rank: int, local_size: int, inter_rank: int,
                 inter_size: int, local_tp_size: Optional[int], local_dp_size: Optional[int],
                 inter_tp_size: Optional[int], inter_dp_size: Optional[int], dtype: torch.dtype,
                 device: torch.device, grid_size: Optional[int] = None, max_block_size: Optional[int] = None,
                 min_block_size: int = 256, min_num_steps: int = 4, ib_enable_ibgda: bool = True,
                 should_init_nvshmem: bool = True, use_autotune: bool = True, *, require_fused: bool = False,
                 autotune_max_bytes: Optional[int] = None, timeout_s: Optional[float] = None,
                 memory: str = "vmm"):
        if not dist.is_initialized():
            raise RuntimeError("MixedCommHandler needs an initialized torch.distributed default process group")
        self.para_info = p = ParallelInfo(world_rank, world_size, local_rank, local_size, inter_rank, inter_size,
                                          local_tp_size, local_dp_size, inter_tp_size, inter_dp_size)
        if (world_rank, world_size) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(f"world_rank/world_size ({world_rank}, {world_size}) must be this process's rank and "
                             f"size in the default group ({dist.get_rank()}, {dist.get_world_size()})")
        if world_size < 2:
            raise ValueError("world_size must be >= 2 (with one rank there is nothing to communicate)")
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        #: Whether the torch.distributed modes run: NCCL for CUDA tensors, gloo for CPU tensors. CUDA tensors on a
        #: gloo group (ranks sharing a GPU) run the fused mode only.
        self.torch_modes = device.type == comm_device(None).type
        if not self.torch_modes and device.type != "cuda":
            raise ValueError(f"device {device} does not fit the default group's backend "
                             f"{dist.get_backend()} (NCCL for CUDA tensors, gloo for CPU tensors)")
        self.dtype, self.device = dtype, device
        max_grid = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
        if grid_size is not None:
            _pos_int("grid_size", grid_size)
            if max_grid is not None and grid_size > max_grid:
                raise ValueError(f"grid_size {grid_size} exceeds the device's {max_grid} SMs")
        self.grid_size = grid_size if grid_size is not None else max_grid
        _pos_int("min_block_size", min_block_size, 32)
        if min_block_size % 32:
            raise ValueError(f"min_block_size must be a multiple of 32 (the warp size), got {min_block_size}")
        if max_block_size is not None and (max_block_size % 32 or max_block_size < min_block_size):
            raise ValueError(f"max_block_size must be a multiple of 32 and >= min_block_size ({min_block_size}), "
                             f"got {max_block_size}")
        self.max_block_size, self.min_block_size = max_block_size, min_block_size
        self.min_num_steps = _pos_int("min_num_steps", min_num_steps)
        self.ib_enable_ibgda, self.should_init_nvshmem = bool(ib_enable_ibgda), bool(should_init_nvshmem)
        self.use_autotune = bool(use_autotune)
        self.timeout_s = default_timeout_s(timeout_s)
        if memory not in ("cuda_ipc", "vmm"):
            raise ValueError(f"memory must be 'cuda_ipc' or 'vmm', got {memory!r}")
        self.memory = memory
        self.autotune_base_bytes = 8192
        self.autotune_max_coef = max(15 - int(math.log2(p.dp_size)), 1)
        if autotune_max_bytes is not None:
            _pos_int("autotune_max_bytes", autotune_max_bytes, self.autotune_base_bytes)
            self.autotune_max_coef = int(math.log2(autotune_max_bytes // self.autotune_base_bytes)) + 1
        self.autotune_map: Dict[MixedCommOp, Dict[int, MixedCommMode]] = {}

        # The fused mode first: a handler that requires it fails before creating any group. Across nodes the
        # NVSHMEM part is checked first, so nothing is allocated for a mode that cannot run.
        self.fused_available = False
        self.fused_unavailable_reason: Optional[str] = None
        self._workspace: Optional[LamportWorkspace] = None
        self._nvshmem_workspace: Optional[mixed_internode.MixedInternodeWorkspace] = None
        #: Why the intranode workspace fell back from CUDA virtual memory to cudaIpc handles (None: it did not).
        self.virtual_memory_error: Optional[str] = None
        #: The fused modes this handler runs (none where ``fused_available`` is false).
        self.fused_modes = FUSED_MODES_INTER if p.use_inter else FUSED_MODES
        try:
            if p.use_inter:
                self.init_nvshmem()
            self.init_virtual_memory()
            self.fused_available = True
        except NotImplementedError as e:
            if require_fused:
                raise
            self.fused_unavailable_reason = str(e)
        if not self.torch_modes and not self.fused_available:
            raise ValueError(f"device {device} does not fit the default group's backend {dist.get_backend()} (NCCL "
                             f"for CUDA tensors, gloo for CPU tensors), and the fused mode, which runs on CUDA "
                             f"tensors over any group, is unavailable: {self.fused_unavailable_reason}")

        # Process groups (creation is collective: every rank creates every group, in the same order).
        self.world_group = dist.group.WORLD
        self.local_comm_group = self.inter_comm_group = self.tp_comm_group = self.dp_comm_group = None
        self._own_groups = []
        if p.use_inter and p.local_size > 1:
            self.local_comm_group = _new_groups([p.local_group_ranks(n) for n in range(p.inter_size)], p.inter_rank)
            self.inter_comm_group = _new_groups([p.inter_group_ranks(l) for l in range(p.local_size)], p.local_rank)
            self._own_groups += [self.local_comm_group, self.inter_comm_group]
        if p.use_mixed:
            self.tp_comm_group = _new_groups([p.tp_group_ranks(d) for d in range(p.dp_size)], p.dp_rank)
            self.dp_comm_group = _new_groups([p.dp_group_ranks(t) for t in range(p.tp_size)], p.tp_rank)
            self._own_groups += [self.tp_comm_group, self.dp_comm_group]

        self.valid_op_list = self.get_valid_op_list()
        self.valid_mode_list = self.get_valid_mode_list()
        self.is_running = True

    # ------------------------------------------------------------------------------ topology
    def get_valid_op_list(self) -> List[MixedCommOp]:
        """Operations for this split: the fused pair with TP and DP, ALLREDUCE with TP only, else AG/RS."""
        p = self.para_info
        if p.use_mixed:
            return [MixedCommOp.ALLREDUCE_ALLGATHER, MixedCommOp.REDUCESCATTER_ALLREDUCE]
        if p.use_tp:
            return [MixedCommOp.ALLREDUCE]
        return [MixedCommOp.ALLGATHER, MixedCommOp.REDUCESCATTER]

    def get_valid_mode_list(self) -> List[MixedCommMode]:
        """Modes that run on this split and build (FUSED_* only where their kernels are initialized)."""
        p = self.para_info
        modes = list(self.fused_modes) if self.fused_available else []
        if self.torch_modes:
            modes.append(MixedCommMode.NCCL_ONE)
            if p.use_mixed:
                modes.append(MixedCommMode.NCCL_TP_DP)
            if self.local_comm_group is not None:
                modes += [MixedCommMode.HIER_INTRA_FIRST, MixedCommMode.HIER_INTER_FIRST]
        if self.use_autotune:
            modes.append(MixedCommMode.AUTOTUNE)
        return modes

    # --------------------------------------------------------------------- fused-kernel setup
    def init_virtual_memory(self) -> None:
        """Set up the fused mode's intranode workspace (collective over the node): Lamport buffers that every
        local rank maps: CUDA virtual memory (``cuMem*``) shared as file descriptors over Unix sockets
        (``moe_a2a.comm.workspace``), or cudaIpc handles with ``memory="cuda_ipc"`` or where virtual memory
        cannot be shared (``virtual_memory_error`` says why).
        Across nodes there is nothing to do: NVSHMEM maps the node's peers (``init_nvshmem``). Raises
        NotImplementedError where the fused mode cannot run (CPU tensors, no kernels)."""
        p = self.para_info
        if self._workspace is not None:
            return
        why = None
        if self.device.type != "cuda":
            why = "it runs on CUDA tensors (this handler's device is the CPU)"
        elif p.use_inter:
            return
        elif not kernels_available():
            why = "moe_a2a._C is built without the all-reduce kernels (a CUDA build of torch and nvcc)"
        elif p.local_size > MAX_NVL_PEERS:
            why = f"the kernels serve at most {MAX_NVL_PEERS} ranks on a node, this one has {p.local_size}"
        if why is not None:
            raise NotImplementedError(f"MixedCommHandler.init_virtual_memory: the fused mode is unavailable: {why}")
        if self.memory == "vmm":
            try:
                self._workspace = LamportWorkspace(dist.group.WORLD, buffer_size_in_bytes=GROWTH_BYTES,
                                                   dtype=self.dtype, timeout_s=self.timeout_s, memory="vmm")
                return
            except RuntimeError as e:  # every rank gets the same error (the workspace agrees on it): use cudaIpc
                if "CUDA virtual memory is unavailable" not in str(e):
                    raise
                self.virtual_memory_error = str(e)
        self._workspace = LamportWorkspace(dist.group.WORLD, buffer_size_in_bytes=GROWTH_BYTES, dtype=self.dtype,
                                           timeout_s=self.timeout_s)

    def init_nvshmem(self) -> None:
        """Set up the fused mode across nodes (collective over the default group): NVSHMEM over the whole group
        (started here unless ``should_init_nvshmem`` is false, which asks for it to run already) and the
        one-shot's symmetric buffer. Raises NotImplementedError where it cannot run (CPU tensors, no NVSHMEM
        build, NVSHMEM not running with ``should_init_nvshmem=False``)."""
        if self._nvshmem_workspace is not None:
            return
        why = None
        if self.device.type != "cuda":
            why = "it runs on CUDA tensors (this handler's device is the CPU)"
        elif not mixed_internode.available():
            why = "moe_a2a._nvshmem is not built (NVSHMEM headers at build time)"
        elif not self.should_init_nvshmem and not mixed_internode.nvshmem_runs_over_group(self.para_info.world_rank,
                                                                                          self.para_info.world_size):
            why = "should_init_nvshmem=False, but NVSHMEM does not run over the whole group in this process"
        if why is not None:
            raise NotImplementedError(f"MixedCommHandler.init_nvshmem: the fused mode across nodes (NVSHMEM) is "
                                      f"unavailable: {why}")
        self._nvshmem_workspace = mixed_internode.MixedInternodeWorkspace(dist.group.WORLD, self.para_info.local_size,
                                                                          self.timeout_s)

    def shutdown(self) -> None:
        """Release the handler's workspace and process groups (collective). Call once; the handler is unusable
        afterwards."""
        if not self.is_running:
            raise RuntimeError("MixedCommHandler.shutdown() was already called")
        self.is_running = False
        if self._workspace is not None:
            self._workspace.destroy()
            self._workspace = None
        if self._nvshmem_workspace is not None:
            self._nvshmem_workspace.destroy()
            self._nvshmem_workspace = None
        for g in self._own_groups:
            dist.destroy_process_group(g)
        self._own_groups = []
        self.local_comm_group = self.inter_comm_group = self.tp_comm_group = self.dp_comm_group = None

    # ------------------------------------------------------------------------------ autotune
    def _bucket(self, op: MixedCommOp, num_bytes: int) -> int:
        """Size bucket: round(log2(per-rank bytes / 8 KiB)), clamped to ``[0, autotune_max_coef)``."""
        if op in _SCATTER_OPS:
            num_bytes //= self.para_info.dp_size
        if num_bytes <= self.autotune_base_bytes:
            return 0
        coef = math.log2(num_bytes / self.autotune_base_bytes)
        return min(round(coef), self.autotune_max_coef - 1)

    def _tune_bucket(self, op: MixedCommOp, bucket: int, warmup: int = 1, iters: int = 3) -> MixedCommMode:
        """Time every valid mode on a bucket-sized input; every rank agrees on the slowest rank's times."""
        hidden = self.autotune_base_bytes // torch.empty((), dtype=self.dtype).element_size()
        rows = 2 ** bucket * (self.para_info.dp_size if op in _SCATTER_OPS else 1)
        x = torch.empty(rows, hidden, dtype=self.dtype, device=self.device).uniform_(-0.5, 0.5)
        modes = [m for m in self.valid_mode_list if m != MixedCommMode.AUTOTUNE and
                 not (m in FUSED_MODES and self.fused_refuses(op, x, m))]
        if not modes:  # only the fused modes run here, and not at this size: using one raises, naming why
            self.autotune_map.setdefault(op, {})[bucket] = self.fused_modes[-1]
            return self.fused_modes[-1]
        times = []
        for mode in modes:
            for _ in range(warmup):
                _run_op(self, op, x, mode)
            self._sync()
            start = time.perf_counter()
            for _ in range(iters):
                _run_op(self, op, x, mode)
            self._sync()
            times.append((time.perf_counter() - start) / iters)
        every = exchange_objects(times, self.world_group, "autotune timing exchange", self.timeout_s)
        slowest = [max(t[i] for t in every) for i in range(len(modes))]
        best = modes[min(range(len(modes)), key=lambda i: (slowest[i], i))]
        self.autotune_map.setdefault(op, {})[bucket] = best
        return best

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wait(dist.barrier(group=self.world_group, async_op=True), self.world_group, "autotune barrier",
             self.timeout_s)

    def run_autotune(self) -> None:
        """Measure every valid (op, mode) on every size bucket and fill ``autotune_map`` (collective)."""
        self._check_running()
        for op in self.valid_op_list:
            for bucket in range(self.autotune_max_coef):
                self._tune_bucket(op, bucket)

    def select_autotune_mode(self, op: MixedCommOp, x_in: torch.Tensor) -> MixedCommMode:
        """The measured best mode for ``op`` at ``x_in``'s size bucket (measured now if not yet: collective)."""
        self._check_running()
        op = MixedCommOp(op)
        bucket = self._bucket(op, x_in.numel() * x_in.element_size())
        mode = self.autotune_map.get(op, {}).get(bucket)
        if mode is None and x_in.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{op.name}: size bucket {bucket} is not tuned yet and measuring it cannot be "
                               f"captured in a CUDA graph; call run_autotune() (or run once) before capturing")
        return mode if mode is not None else self._tune_bucket(op, bucket)

    def resolve_mode(self, op: MixedCommOp, x_in: torch.Tensor,
                     mode: Optional[MixedCommMode] = None) -> MixedCommMode:
        """The mode an operation on ``x_in`` runs in: ``mode``, or the default rule (module docstring), with
        ``AUTOTUNE`` replaced by the measured choice (measuring it first if needed: collective)."""
        asked = mode
        if mode is None:
            mode = MixedCommMode.AUTOTUNE if self.use_autotune else self._rule(op, x_in)
        if mode == MixedCommMode.AUTOTUNE:
            mode = self.select_autotune_mode(op, x_in)
        why = self.fused_refuses(op, x_in, mode) if mode in FUSED_MODES else None
        if why is not None and asked != mode and not self.torch_modes:
            mode = self._rule(op, x_in)  # a measured one-shot above its size: the two-shot may still take it
            why = self.fused_refuses(op, x_in, mode)
        if why is not None:
            if asked == mode or not self.torch_modes:
                raise ValueError(f"mode {mode.name} cannot take this input: {why}")
            mode = self._rule(op, x_in, fused=False)
        return mode

    def _rule(self, op: MixedCommOp, x_in: torch.Tensor, fused: bool = True) -> MixedCommMode:
        """The fixed default: NCCL_TP_DP where valid, else NCCL_ONE; where only the fused modes run, the one-shot
        up to FUSED_ONESHOT_MAX_BYTES of buffer (or without TP), the two-shot above."""
        if not self.torch_modes and fused:
            if not self.para_info.use_tp or self.para_info.use_inter:
                return MixedCommMode.FUSED_OPT_WAITS_UC
            need = self._fused_buffer_bytes(op, x_in, MixedCommMode.FUSED_OPT_WAITS_UC)
            return (MixedCommMode.FUSED_OPT_WAITS_UC if need is not None and need <= FUSED_ONESHOT_MAX_BYTES
                    else MixedCommMode.FUSED_OPT_BYTES1_UC)
        return MixedCommMode.NCCL_TP_DP if MixedCommMode.NCCL_TP_DP in self.valid_mode_list else MixedCommMode.NCCL_ONE

    def _fused_buffer_bytes(self, op: MixedCommOp, x_in: torch.Tensor, mode: MixedCommMode) -> Optional[int]:
        """Bytes of Lamport buffer ``mode`` needs for ``op`` on ``x_in`` (None for an input it cannot take)."""
        rows, row_bytes = x_in.shape[0], x_in[:1].numel() * x_in.element_size()
        if rows == 0 or row_bytes == 0 or row_bytes % 16:
            return None
        hidden = row_bytes // x_in.element_size()
        if self.para_info.use_inter:  # the NVSHMEM one-shot: one source's message against a slot
            send_rows = rows // self.para_info.dp_size if op in _SCATTER_OPS else rows
            return send_rows * row_bytes
        if mode == MixedCommMode.FUSED_OPT_BYTES1_UC:
            return mixed_buffer_bytes(self.para_info.world_size, max(_two_shot_plan(self.para_info, op, rows)[1]),
                                      hidden, x_in.dtype, two_shot=True)
        send_rows = rows // self.para_info.dp_size if op in _SCATTER_OPS else rows
        return mixed_buffer_bytes(self.para_info.world_size, send_rows, hidden, x_in.dtype)

    def fused_refuses(self, op: MixedCommOp, x_in: torch.Tensor,
                      mode: MixedCommMode = MixedCommMode.FUSED_OPT_WAITS_UC) -> Optional[str]:
        """Why the fused ``mode`` cannot run ``op`` on ``x_in`` (None where it can)."""
        rows, row_bytes = x_in.shape[0], x_in[:1].numel() * x_in.element_size()
        send_rows = rows // self.para_info.dp_size if op in _SCATTER_OPS else rows
        if send_rows == 0 or row_bytes == 0:
            return "the input is empty"
        if row_bytes % 16:
            return f"its rows must be a multiple of 16 bytes, got {row_bytes}"
        need = self._fused_buffer_bytes(op, x_in, mode)
        if self.para_info.use_inter:
            slot = mixed_internode.slot_bytes_for(self.para_info.world_size)
            if need > slot:
                return (f"one source's message has {need} bytes, above the NVSHMEM one-shot's slot of {slot} "
                        f"(mixed_internode.AREA_BYTES / world_size)")
            return None
        if need > FUSED_MAX_BUFFER_BYTES:
            return (f"the message needs a {need}-byte Lamport buffer in {mode.name}, above FUSED_MAX_BUFFER_BYTES "
                    f"({FUSED_MAX_BUFFER_BYTES})")
        return None

    # ---------------------------------------------------------------------------- operations
    def _check_running(self) -> None:
        if not self.is_running:
            raise RuntimeError("MixedCommHandler was shut down")

    def allreduce_allgather(self, x_in, x_out=None, mode=None) -> torch.Tensor:
        return run_mixed_comm(MixedCommOp.ALLREDUCE_ALLGATHER, self, x_in, x_out, mode)

    def reducescatter_allreduce(self, x_in, x_out=None, mode=None) -> torch.Tensor:
        return run_mixed_comm(MixedCommOp.REDUCESCATTER_ALLREDUCE, self, x_in, x_out, mode)

    def allreduce(self, x_in, x_out=None, mode=None) -> torch.Tensor:
        return run_mixed_comm(MixedCommOp.ALLREDUCE, self, x_in, x_out, mode)

    def allgather(self, x_in, x_out=None, mode=None) -> torch.Tensor:
        return run_mixed_comm(MixedCommOp.ALLGATHER, self, x_in, x_out, mode)

    def reducescatter(self, x_in, x_out=None, mode=None) -> torch.Tensor:
        return run_mixed_comm(MixedCommOp.REDUCESCATTER, self, x_in, x_out, mode)


# ------------------------------------------------------------------------------ the modes
def _gather(x: torch.Tensor, group, h: MixedCommHandler, step: str) -> torch.Tensor:
    """``[group_size, *x.shape]``: every member's ``x`` in group-rank order."""
    out = torch.empty(dist.get_world_size(group), *x.shape, dtype=x.dtype, device=x.device)
    all_gather_single(out, x.contiguous(), group, step, h.timeout_s)
    return out


def _exchange(send: torch.Tensor, group, h: MixedCommHandler, step: str) -> torch.Tensor:
    """All-to-all of ``send[j]`` to member ``j``; returns ``recv[j]`` from member ``j``."""
    send = send.contiguous()
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, None, None, group, step, h.timeout_s)
    return recv


def _reduce(parts: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum over ``dim`` in index order, float32 accumulation."""
    return sum_in_order(parts.unbind(dim), dtype)


def _gather_family(h: MixedCommHandler, x: torch.Tensor, mode: MixedCommMode) -> torch.Tensor:
    """ALLREDUCE / ALLGATHER / ALLREDUCE_ALLGATHER: ``cat over dp of (sum over tp of x)``."""
    p, dt, rest = h.para_info, x.dtype, x.shape
    if mode == MixedCommMode.NCCL_ONE:
        if not p.use_dp:  # plain all-reduce over the world
            out = x.clone(memory_format=torch.contiguous_format)
            wait(dist.all_reduce(out, group=h.world_group, async_op=True), h.world_group, "allreduce", h.timeout_s)
            return out
        every = _gather(x, h.world_group, h, "world all-gather")  # [world, rows, ...] in world-rank order
        grid = every.view(p.inter_dp_size, p.inter_tp_size, p.local_dp_size, p.local_tp_size, *rest)
        # -> [tp (itp, ltp), dp (idp, ldp), rows, ...], then sum over tp in TP-rank order
        grid = grid.permute(1, 3, 0, 2, *range(4, grid.dim())).reshape(p.tp_size, p.dp_size, *rest)
        return _reduce(grid, 0, dt).flatten(0, 1)
    if mode == MixedCommMode.NCCL_TP_DP:
        red = x.clone(memory_format=torch.contiguous_format)
        wait(dist.all_reduce(red, group=h.tp_comm_group, async_op=True), h.tp_comm_group, "TP all-reduce",
             h.timeout_s)
        return _gather(red, h.dp_comm_group, h, "DP all-gather").flatten(0, 1)
    if mode == MixedCommMode.HIER_INTRA_FIRST:
        node = _gather(x, h.local_comm_group, h, "intranode all-gather")  # [local, rows, ...]
        node = _reduce(node.view(p.local_dp_size, p.local_tp_size, *rest), 1, dt)  # [ldp, rows, ...]
        nodes = _gather(node, h.inter_comm_group, h, "internode all-gather")  # [inter, ldp, rows, ...]
        nodes = nodes.view(p.inter_dp_size, p.inter_tp_size, p.local_dp_size, *rest)
        return _reduce(nodes, 1, dt).flatten(0, 2)  # [idp, ldp, rows, ...] -> DP-rank order
    if mode == MixedCommMode.HIER_INTER_FIRST:
        nodes = _gather(x, h.inter_comm_group, h, "internode all-gather")  # [inter, rows, ...]
        nodes = _reduce(nodes.view(p.inter_dp_size, p.inter_tp_size, *rest), 1, dt)  # [idp, rows, ...]
        node = _gather(nodes, h.local_comm_group, h, "intranode all-gather")  # [local, idp, rows, ...]
        node = _reduce(node.view(p.local_dp_size, p.local_tp_size, p.inter_dp_size, *rest), 1, dt)
        return node.transpose(0, 1).flatten(0, 2)  # [ldp, idp, ...] -> [idp, ldp, ...]
    raise AssertionError(mode)


def _scatter_family(h: MixedCommHandler, x: torch.Tensor, mode: MixedCommMode) -> torch.Tensor:
    """REDUCESCATTER / REDUCESCATTER_ALLREDUCE: ``sum over every rank of chunk dp_rank of x``."""
    p, dt = h.para_info, x.dtype
    chunks = x.reshape(p.dp_size, x.shape[0] // p.dp_size, *x.shape[1:])  # [dp, rows, ...]
    rest = chunks.shape[1:]
    if mode == MixedCommMode.NCCL_ONE:
        if not p.use_tp:  # plain reduce-scatter over the world (DP order = world order here)
            out = torch.empty(rest, dtype=dt, device=x.device)
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            wait(fn(out, x.contiguous(), group=h.world_group, async_op=True), h.world_group, "reduce-scatter",
                 h.timeout_s)
            return out
        # Send each world rank the chunk of its DP rank; sum what arrives in world-rank order.
        dp_of = [w % p.local_size // p.local_tp_size + w // p.local_size // p.inter_tp_size * p.local_dp_size
                 for w in range(p.world_size)]
        recv = _exchange(chunks[dp_of], h.world_group, h, "world all-to-all")
        return _reduce(recv, 0, dt)
    if mode == MixedCommMode.NCCL_TP_DP:
        out = torch.empty(rest, dtype=dt, device=x.device)
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        wait(fn(out, x.contiguous(), group=h.dp_comm_group, async_op=True), h.dp_comm_group, "DP reduce-scatter",
             h.timeout_s)
        wait(dist.all_reduce(out, group=h.tp_comm_group, async_op=True), h.tp_comm_group, "TP all-reduce",
             h.timeout_s)
        return out
    grid = chunks.view(p.inter_dp_size, p.local_dp_size, *rest)  # chunk d = ldp + idp * local_dp
    ldp_of_local = [l // p.local_tp_size for l in range(p.local_size)]
    idp_of_inter = [n // p.inter_tp_size for n in range(p.inter_size)]
    if mode == MixedCommMode.HIER_INTRA_FIRST:
        # Node step: local rank l gets the chunks of its local DP rank for every inter DP rank.
        recv = _exchange(grid.transpose(0, 1)[ldp_of_local], h.local_comm_group, h, "intranode all-to-all")
        part = _reduce(recv, 0, dt)  # [idp, rows, ...]
        recv = _exchange(part[idp_of_inter], h.inter_comm_group, h, "internode all-to-all")
        return _reduce(recv, 0, dt)
    if mode == MixedCommMode.HIER_INTER_FIRST:
        recv = _exchange(grid[idp_of_inter], h.inter_comm_group, h, "internode all-to-all")  # [inter, ldp, ...]
        part = _reduce(recv, 0, dt)  # [ldp, rows, ...]
        recv = _exchange(part[ldp_of_local], h.local_comm_group, h, "intranode all-to-all")
        return _reduce(recv, 0, dt)
    raise AssertionError(mode)


def _two_shot_plan(p: ParallelInfo, op: MixedCommOp, rows: int):
    """FUSED_OPT_BYTES1_UC's work split on one node (world rank = local rank ``tp_rank + dp_rank * tp_size``):
    per owner rank ``o = c + d * tp_size``, its piece ``c`` of DP rank ``d``'s result, as the lists of
    ``LamportWorkspace.mixed_two_shot`` (send_first, own_rows, scatter_src, gather_dst, out_first, out_rows).

    Gather ops: DP rank ``d``'s block is the sum of its TP group's inputs (every row); owner ``o`` sums rows
    ``[c * S, (c + 1) * S)`` (``S = ceil(rows / tp_size)``) over that group and every rank stores the sum at
    ``d * rows + c * S``. Scatter ops: DP rank ``d``'s result is the sum over all ranks of chunk ``d``
    (``C = rows / dp_size`` rows); owner ``o`` sums its rows ``[c * S, (c + 1) * S)`` (``S = ceil(C / tp_size)``)
    over every rank and the ranks of DP rank ``d`` store it at ``c * S``. Cached: every call of the mode (its
    size check and its launch) asks for it."""
    return _plan(p.tp_size, p.dp_size, op in _GATHER_OPS, rows)  # on one node the local sizes


@functools.lru_cache(maxsize=256)
def _plan(tp: int, dp: int, gather: bool, rows: int):
    world = tp * dp
    everyone = (1 << world) - 1
    group = [((1 << tp) - 1) << (d * tp) for d in range(dp)]  # the ranks of DP rank d
    chunk = rows if gather else rows // dp
    piece = -(-chunk // tp)
    send_first, own_rows, scatter_src, gather_dst, out_first = [], [], [], [], []
    for o in range(world):
        c, d = o % tp, o // tp
        n = max(0, min(piece, chunk - c * piece))
        first = min(c * piece, chunk)
        own_rows.append(n)
        send_first.append(first if gather else d * chunk + first)
        scatter_src.append(group[d] if gather else everyone)
        gather_dst.append(everyone if gather else group[d])
        out_first.append(d * rows + first if gather else first)
    return (tuple(send_first), tuple(own_rows), tuple(scatter_src), tuple(gather_dst), tuple(out_first),
            rows * dp if gather else chunk)


def _fused(h: MixedCommHandler, op: MixedCommOp, x: torch.Tensor, mode: MixedCommMode) -> torch.Tensor:
    """The fused modes on one node (world rank = local rank). FUSED_OPT_WAITS_UC: the gather ops send the whole
    input to every rank and sum each DP rank's TP group into output block ``dp_rank``; the scatter ops send each
    rank the chunk of its DP rank and sum every rank's. FUSED_OPT_BYTES1_UC: ``_two_shot_plan``."""
    p = h.para_info
    rows, rest = x.shape[0], x.shape[1:]
    flat = x.reshape(rows, -1)
    if mode == MixedCommMode.FUSED_OPT_BYTES1_UC:
        plan = _two_shot_plan(p, op, rows)
        out = h._workspace.mixed_two_shot(flat, *plan)
        return out.view(plan[-1], *rest)
    one_shot = (h._nvshmem_workspace or h._workspace).mixed  # across nodes: NVSHMEM; in one node: CUDA IPC
    if op in _GATHER_OPS:
        out = one_shot(flat, [0] * p.world_size, rows, p.dp_ranks, p.dp_size)
        return out.view(rows * p.dp_size, *rest)
    chunk = rows // p.dp_size
    out = one_shot(flat, [d * chunk for d in p.dp_ranks], chunk, [0] * p.world_size, 1)
    return out.view(chunk, *rest)


def _run_op(h: MixedCommHandler, op: MixedCommOp, x: torch.Tensor, mode: MixedCommMode) -> torch.Tensor:
    if mode in h.fused_modes:
        return _fused(h, op, x, mode)
    return (_gather_family if op in _GATHER_OPS else _scatter_family)(h, x, mode)


def _check(op, h: MixedCommHandler, x_in, x_out, mode) -> None:
    if not isinstance(h, MixedCommHandler):
        raise TypeError(f"handler must be a MixedCommHandler, got {type(h).__name__}")
    h._check_running()
    if op not in h.valid_op_list:
        raise ValueError(f"op {getattr(op, 'name', op)} is not valid for this TP x DP split; valid ops: "
                         f"{[o.name for o in h.valid_op_list]}")
    if mode is not None:
        if not isinstance(mode, MixedCommMode):
            raise TypeError(f"mode must be a MixedCommMode or None, got {mode!r}")
        if mode.name.startswith("FUSED_") and not h.fused_available:
            raise NotImplementedError(f"mode {mode.name}: {h.fused_unavailable_reason}")
        if mode.name.startswith("FUSED_") and mode not in h.fused_modes:
            why = ("it needs NVLink multicast, which moe_a2a keeps off" if mode.name.endswith("_MC")
                   else "moe_a2a does not build it across nodes" if mode in FUSED_MODES
                   else "moe_a2a does not build it")
            raise NotImplementedError(f"mode {mode.name}: {why}; the fused modes here are "
                                      f"{', '.join(m.name for m in h.fused_modes)}")
        if mode not in h.valid_mode_list:
            raise ValueError(f"mode {mode.name} is not valid for this handler; valid modes: "
                             f"{[m.name for m in h.valid_mode_list]}")
    if not isinstance(x_in, torch.Tensor):
        raise TypeError(f"x_in must be a torch.Tensor, got {type(x_in).__name__}")
    if x_in.dtype != h.dtype:
        raise TypeError(f"x_in must have the handler's dtype {h.dtype}, got {x_in.dtype}")
    if x_in.dim() < 2:
        raise ValueError(f"x_in must be at least 2-d ([rows, ...]), got shape {list(x_in.shape)}")
    if x_in.device != h.device:
        raise ValueError(f"x_in must be on the handler's device {h.device}, got {x_in.device}")
    dp = h.para_info.dp_size
    if op in _SCATTER_OPS and x_in.shape[0] % dp:
        raise ValueError(f"x_in.shape[0] = {x_in.shape[0]} must be divisible by dp_size {dp}")
    if x_out is not None:
        rows = x_in.shape[0] // dp if op in _SCATTER_OPS else x_in.shape[0] * dp
        want = [rows, *x_in.shape[1:]]
        if not isinstance(x_out, torch.Tensor) or list(x_out.shape) != want or x_out.dtype != x_in.dtype \
                or x_out.device != x_in.device:
            got = (list(x_out.shape), x_out.dtype, x_out.device) if isinstance(x_out, torch.Tensor) else x_out
            raise ValueError(f"x_out must be {want} {x_in.dtype} on {x_in.device}, got {got}")


def run_mixed_comm(op: MixedCommOp, handler: MixedCommHandler, x_in: torch.Tensor,
                   x_out: Optional[torch.Tensor] = None, mode: Optional[MixedCommMode] = None, *,
                   check_peers: bool = False) -> torch.Tensor:
    """Run ``op`` on ``x_in`` (``[rows, ...]`` with the handler's dtype and device) in ``mode``.

    Returns the result (written into ``x_out`` when given): ``[rows * dp_size, ...]`` for the gather
    operations, ``[rows // dp_size, ...]`` for the scatter ones, ``x_in``'s shape for ALLREDUCE. Every rank of the
    world must call it with the same op, mode and shape; ``check_peers=True`` verifies the shapes first (one
    extra small collective) and raises the same ValueError on every rank if they differ.
    """
    _check(op, handler, x_in, x_out, mode)
    op = MixedCommOp(op)
    if check_peers:
        every = exchange_objects((tuple(x_in.shape), None if mode is None else int(mode)), handler.world_group,
                                 "run_mixed_comm shape exchange", handler.timeout_s)
        for rank, m in enumerate(every):
            if m != every[0]:
                raise ValueError(f"run_mixed_comm: rank {rank} passes (shape, mode) {m}, rank 0 passes {every[0]}")
    out = _run_op(handler, op, x_in, handler.resolve_mode(op, x_in, mode))
    if x_out is not None:
        x_out.copy_(out)
        return x_out
    return out
