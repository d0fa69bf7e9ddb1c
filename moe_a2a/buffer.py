"""``Buffer``: the expert-parallel communication buffer, with DeepEP's Python API.

One ``Buffer`` per rank of an EP group. It validates every input on the calling rank, then runs the
call on a backend:

* ``cuda``: moe_a2a's own kernels for CUDA tensors, when built: ``moe_a2a._C`` inside one node,
  ``moe_a2a._nvshmem`` + ``moe_a2a._C`` across nodes (normal mode; ``InternodeHandle``);
* ``reference``: ``torch.distributed`` all-to-all (gloo for CPU tensors, NCCL for CUDA ones), the
  oracle every kernel is tested against and the path whenever the kernels cannot serve a call.

Received tokens are ordered by source rank, then by source token index, on every backend.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
import weakref
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import checks
from .backends import internode, internode_low_latency, intranode, low_latency
from .backends.base import (CombineRequest, DispatchRequest, LayoutRequest, LowLatencyCombineRequest,
                            LowLatencyDispatchRequest, LowLatencyModeKernels, NormalHandle, NormalModeBackend,
                            NormalModeKernels)
from .backends.reference import ReferenceBackend
from .backends.reference_low_latency import ReferenceLowLatency
from .config import (Config, combine_input_bytes, default_combine_config, default_dispatch_config,
                     min_nvl_buffer_bytes)
from .config import get_low_latency_rdma_size_hint as _ll_size_hint
from .event import EventHandle, EventOverlap
from .handles import DispatchHandle, HandleIdentity, InternodeHandle, LowLatencyHandle
from .limits import (INTERNODE_LOW_LATENCY_MAX_TOKENS, LAYOUT_MAX_EXPERTS, LOW_LATENCY_MAX_EXPERTS, MAX_NVL_PEERS,
                     MAX_TOPK)
from .tuning import tuned_num_sms

Tokens = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
_FLOAT_TOKENS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_DEFAULT_TIMEOUT_S = 10.0


class Buffer:
    """Communication buffers for MoE expert parallelism: normal (high-throughput) and low-latency modes.

    Attributes:
        num_sms: SMs the normal kernels use (class-wide, see ``set_num_sms``).
        rank: this rank's index in the group.
        group_size: ranks in the group.
        group: the ``torch.distributed`` process group.
        num_nvl_bytes: bytes of the intranode (NVLink / CUDA IPC) buffer.
        num_rdma_bytes: bytes of the internode and low-latency buffer.
        num_ranks_per_node: ranks per NVLink domain; a larger group runs internode.
        backend: ``"cuda"`` when the kernels serve CUDA tensors, else ``"reference"``.
    """

    num_sms: int = 20
    _num_sms_set = False  # whether set_num_sms chose num_sms (a default is fitted silently, a choice with a warning)

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, comm=None, *, num_ranks_per_node: Optional[int] = None,
                 timeout_s: Optional[float] = None, backend: str = "auto", check_values: bool = True,
                 enable_shrink: bool = False) -> None:
        """Create the buffer (collective: every rank of the group calls it with the same sizes).

        Arguments:
            group: the EP process group.
            num_nvl_bytes: intranode buffer bytes; at least ``Config.get_nvl_buffer_size_hint`` for normal mode.
            num_rdma_bytes: internode / low-latency buffer bytes; at least ``get_low_latency_rdma_size_hint``
                for low-latency calls.
            low_latency_mode: enable the low-latency entry points. Across nodes NVSHMEM then runs over the
                whole group; normal internode calls keep working on such a buffer.
            num_qps_per_rank: RDMA queue pairs per rank (internode low-latency kernels).
            allow_nvlink_for_low_latency_mode: let low-latency traffic use NVLink inside a node.
            allow_mnnvl: allow multi-node NVLink.
            explicitly_destroy: resources are released by ``destroy()`` rather than by the destructor.
            comm: an ``mpi4py`` communicator; only accepted together with ``group`` (collectives need it).
            num_ranks_per_node: ranks per NVLink domain (default 8, or ``MOE_A2A_NUM_RANKS_PER_NODE``);
                tests set it lower to form virtual nodes.
            timeout_s: seconds any wait on a peer lasts before raising (default 10, or ``MOE_A2A_TIMEOUT_S``): the
                kernels' spin loops, and the reference backend's gloo/NCCL collectives, which then raise a
                ``CollectiveError`` (a ``RuntimeError``) naming the operation and, where it can be known, the
                rank that did not arrive; the buffer then refuses further calls.
            backend: ``"auto"`` (kernels where they apply), ``"reference"`` or ``"cuda"`` (kernels required).
            check_values: also check tensor values: expert ids in range, and the counts and mask passed to
                ``dispatch`` (``num_tokens_per_rank``, ``is_token_in_rank``, ``num_tokens_per_expert``,
                ``num_tokens_per_rdma_rank``) against each other and against ``topk_idx``, recomputed on the
                tensors' device: O(num_tokens * (num_topk + num_ranks)) device work and one host sync per call.
                A dispatch handed the tensors ``get_dispatch_layout`` returned, with the same ``topk_idx``, none
                modified in place since, runs none of them: the layout call checked the ids (one host sync) and
                the counts derive from them. They are skipped while a CUDA graph is captured and on the
                ``num_worst_tokens`` path, which promises no host sync; ``False`` skips them all (nothing extra
                runs). Shapes, dtypes and devices are always checked.
            enable_shrink: low-latency calls mask a rank that fails (connection lost, or nothing within
                ``timeout_s``) and complete over the others, instead of raising (see
                ``low_latency_update_mask_buffer``). The low-latency kernels (IPC and NVSHMEM), and the reference
                backend on a gloo group.
        """
        if group is None:
            if comm is not None:
                raise NotImplementedError("Buffer(comm=...) needs a torch.distributed group as well: the "
                                          "collectives run on a ProcessGroup")
            raise ValueError("Buffer needs a process group: pass group=")
        checks.positive_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
        checks.positive_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
        if backend not in ("auto", "reference", "cuda"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'cuda', got {backend!r}")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.explicitly_destroy = explicitly_destroy
        self.check_values = check_values
        if num_ranks_per_node is None:
            num_ranks_per_node = int(os.environ.get("MOE_A2A_NUM_RANKS_PER_NODE", MAX_NVL_PEERS))
        checks.positive_int("num_ranks_per_node", num_ranks_per_node)
        if self.group_size > num_ranks_per_node and self.group_size % num_ranks_per_node:
            raise ValueError(f"group size {self.group_size} must be a multiple of num_ranks_per_node "
                             f"({num_ranks_per_node}) when the group spans several nodes")
        self.num_ranks_per_node = min(num_ranks_per_node, self.group_size)
        self.timeout_s = float(timeout_s if timeout_s is not None else
                               os.environ.get("MOE_A2A_TIMEOUT_S", _DEFAULT_TIMEOUT_S))
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

        if low_latency_mode and self.group_size > self.num_ranks_per_node:
            checks.positive_int("num_qps_per_rank", num_qps_per_rank)
            # Queue pairs per peer of NVSHMEM's IBGDA transport, set before either backend starts NVSHMEM.
            os.environ.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(num_qps_per_rank))
        self._reference = ReferenceBackend(self.rank, self.group_size, group, self.num_ranks_per_node, self.timeout_s)
        self._reference_ll = ReferenceLowLatency(self.rank, self.group_size, group, self.timeout_s,
                                                 auto_mask=bool(enable_shrink))
        # The backends each call is handed to (contract: moe_a2a.backends.base): the kernels where they serve the
        # call's tensors, the reference backends otherwise.
        self._kernels: Optional[NormalModeKernels] = self._make_kernel_backend(backend)
        self._ll_kernels: Optional[LowLatencyModeKernels] = self._make_low_latency_backend(backend)
        self.backend = "cuda" if self._kernels is not None or self._ll_kernels is not None else "reference"
        self._local_buffers = {}
        self._ll_combine_buffers: List[Optional[torch.Tensor]] = [None, None]
        self._ll_buffer_index = 0
        self._destroyed = False
        self._handle_hidden: Dict[int, int] = {}  # id(handle.recv_src_idx) -> hidden of its tokens
        self._capped = set()  # (op, num_sms) already warned about by _fit_config
        self._dispatch_epoch = 0  # non-cached dispatches completed: the epoch of the next handle
        self._checked_layout: Optional[checks.CheckedTensors] = None  # the last layout whose ids were checked
        if enable_shrink:
            self._check_masking()

    def _kernel_obstacles(self, num_bytes: int, bytes_name: str, internode_kernels: bool = False) -> List[str]:
        """Why the CUDA kernels cannot serve this buffer (empty when they can).

        ``internode_kernels``: the caller has kernels for groups spanning several nodes (normal mode).
        """
        reasons = []
        if not intranode.extension_available():
            reasons.append("the CUDA extension moe_a2a._C is not built")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible")
        if self.group_size > self.num_ranks_per_node:
            if not internode_kernels:
                reasons.append("the group spans several nodes and these kernels are intranode only")
            elif not internode.available():
                reasons.append("the group spans several nodes and the internode kernels (moe_a2a._nvshmem) are not "
                               "built: build with NVSHMEM headers (nvidia-nvshmem-cu13 or NVSHMEM_HOME)")
            if internode_kernels and self.num_rdma_bytes == 0:
                reasons.append("num_rdma_bytes is 0 (internode kernels need Config.get_rdma_buffer_size_hint)")
        if num_bytes == 0:
            reasons.append(f"{bytes_name} is 0")
        return reasons

    def _all_gather_object(self, obj) -> list:
        objects = [None] * self.group_size
        dist.all_gather_object(objects, obj, self.group)
        return objects

    def _make_kernel_backend(self, backend: str) -> Optional[NormalModeKernels]:
        """The intranode kernels for normal mode, or None where the reference backend serves."""
        if backend == "reference":
            return None
        reasons = self._kernel_obstacles(self.num_nvl_bytes, "num_nvl_bytes", internode_kernels=True)
        if reasons:
            if backend == "cuda" and not self.low_latency_mode:
                raise NotImplementedError("backend='cuda' unavailable: " + "; ".join(reasons))
            return None
        if self.group_size > self.num_ranks_per_node:
            # In low-latency mode NVSHMEM runs over the whole group (the low-latency kernels reach every rank);
            # the normal internode kernels then address their team by whole-group PE ids.
            return internode.InternodeBackend(self.rank, self.group_size, self.num_ranks_per_node, self.num_nvl_bytes,
                                              self.num_rdma_bytes, self._all_gather_object, self.timeout_s,
                                              nvshmem_over_group=self.low_latency_mode)
        return intranode.IntranodeBackend(self.rank, self.group_size, self.group, self.num_nvl_bytes,
                                          self._all_gather_object, self.timeout_s)

    def _make_low_latency_backend(self, backend: str) -> Optional[LowLatencyModeKernels]:
        """The low-latency kernels (``low_latency_mode``), or None where the reference backend serves."""
        if backend == "reference" or not self.low_latency_mode:
            return None
        checks.positive_int("num_qps_per_rank", self.num_qps_per_rank)
        across_nodes = self.group_size > self.num_ranks_per_node
        reasons = self._kernel_obstacles(self.num_rdma_bytes, "num_rdma_bytes", internode_kernels=across_nodes)
        if not reasons and across_nodes and not internode_low_latency.available():
            reasons.append("this build has no internode low-latency kernels (moe_a2a._nvshmem.LowLatencyRuntime)")
        if not reasons and not across_nodes and not low_latency.available():
            reasons.append("this build has no low-latency kernels")
        if reasons:
            if backend == "cuda":
                raise NotImplementedError("backend='cuda' unavailable for low-latency mode: " + "; ".join(reasons))
            return None
        if across_nodes:
            # NVSHMEM over the whole group: RDMA across nodes, NVLink stores inside a node where allowed.
            return internode_low_latency.InternodeLowLatencyBackend(
                self.rank, self.group_size, self.group, self.num_rdma_bytes, self._all_gather_object, self.timeout_s,
                num_qps_per_rank=self.num_qps_per_rank, allow_nvlink=self.allow_nvlink_for_low_latency_mode,
                shrink=self._reference_ll.peers.auto_mask)
        return low_latency.LowLatencyBackend(self.rank, self.group_size, self.group, self.num_rdma_bytes,
                                             self._all_gather_object, self.timeout_s,
                                             shrink=self._reference_ll.peers.auto_mask)

    # ------------------------------------------------------------------ resources
    def destroy(self) -> None:
        """Release the kernels' resources now (requires ``explicitly_destroy=True``)."""
        if not self.explicitly_destroy:
            raise ValueError("destroy() requires Buffer(..., explicitly_destroy=True)")
        for kernels in (self._kernels, self._ll_kernels):
            if kernels is not None:
                kernels.destroy()
        self._kernels = self._ll_kernels = None
        self._local_buffers.clear()
        self._ll_combine_buffers = [None, None]
        self._destroyed = True

    def _check_alive(self) -> None:
        """Refuse a destroyed buffer, and one whose kernels failed: the error they recorded (in host memory, read
        without a device sync) is raised before this call runs anything on the device."""
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed; create a new one")
        if self._kernels is not None:
            self._kernels.check()
        if self._ll_kernels is not None:
            self._ll_kernels.raise_if_error()

    @staticmethod
    def is_sm90_compiled() -> bool:
        return intranode.extension_available()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs used by the normal kernels (even: one sender and one receiver block per channel)."""
        checks.positive_int("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2:
            raise ValueError(f"the SM count must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms
        Buffer._num_sms_set = True

    @property
    def max_num_sms(self) -> Optional[int]:
        """Most SMs a normal-mode kernel of this buffer may use: the device's SMs divided among the ranks that
        share it (every block of every rank must be resident at once); None where no kernels run."""
        return getattr(self._kernels, "max_num_sms", None)

    def _fit_config(self, config: Optional[Config], op: str) -> Config:
        """``config`` (default: the tuned one) with at most ``max_num_sms`` SMs.

        A count the caller chose (an explicit ``config`` or ``set_num_sms``) that does not fit is capped with a
        warning, once per buffer and count; the default is fitted silently. Capping is the same on every rank
        (``max_num_sms`` is computed from every rank's device), so ranks stay in step.
        """
        chosen = config is not None or Buffer._num_sms_set
        if config is None:
            config = self.get_dispatch_config(self.group_size) if op == "dispatch" else \
                self.get_combine_config(self.group_size)
        elif not isinstance(config, Config):
            raise TypeError(f"config must be a moe_a2a.Config, got {type(config).__name__}")
        budget = self.max_num_sms
        if budget is None or config.num_sms <= budget:
            return config
        if chosen and (op, config.num_sms) not in self._capped:
            self._capped.add((op, config.num_sms))
            warnings.warn(f"moe_a2a: {op} asked for {config.num_sms} SMs per rank, but with the ranks that share a GPU "
                          f"only {budget} per rank keep every block resident; using {budget}",
                          RuntimeWarning, stacklevel=3)
        return dataclasses.replace(config, num_sms=budget)

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (no event on a machine without CUDA)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of ``num_rdma_bytes`` the low-latency kernels need (BF16 sizing)."""
        return _ll_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The tuned dispatch ``Config`` for ``num_ranks`` ranks: ``Buffer.num_sms`` SMs, or fewer where
        measurements showed no gain from more (``moe_a2a.tuning``)."""
        return default_dispatch_config(num_ranks, _capped_num_sms("dispatch", num_ranks))

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The tuned combine ``Config`` for ``num_ranks`` ranks (SMs as in ``get_dispatch_config``)."""
        return default_combine_config(num_ranks, _capped_num_sms("combine", num_ranks))

    def get_comm_stream(self) -> "torch.cuda.Stream":
        """The stream the kernels communicate on."""
        if self._kernels is not None:
            return self._kernels.get_comm_stream()
        if torch.cuda.is_available():
            return torch.cuda.current_stream()  # the reference backend runs on the caller's stream
        raise RuntimeError("no communication stream: this Buffer runs on CPU")

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """The raw local buffer (from element ``offset``) viewed as ``dtype``, optionally ``size``-shaped."""
        self._check_alive()
        if self._kernels is not None:
            t = self._kernels.get_local_buffer_tensor(dtype, offset, use_rdma_buffer)
        else:
            num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
            raw = self._local_buffers.get(use_rdma_buffer)
            if raw is None:
                device = "cuda" if torch.cuda.is_available() and "nccl" in str(dist.get_backend(self.group)) \
                    else "cpu"
                raw = self._local_buffers[use_rdma_buffer] = torch.zeros(num_bytes, dtype=torch.uint8,
                                                                         device=device)
            itemsize = torch.empty((), dtype=dtype).element_size()
            t = raw[:num_bytes // itemsize * itemsize].view(dtype)[offset:]
        if size is None:
            return t
        if t.numel() < size.numel():
            raise ValueError(f"size {list(size)} needs {size.numel()} elements; the buffer has {t.numel()} "
                             f"from offset {offset}")
        return t[:size.numel()].view(size)

    # ------------------------------------------------------------------ normal mode
    @staticmethod
    def _event_to_wait(previous_event: Optional[EventOverlap]) -> Optional[EventOverlap]:
        """``previous_event`` if it holds an event; an empty one (no ``async_finish``) means nothing to wait for."""
        if previous_event is None or previous_event.event is None:
            return None
        if not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
        return previous_event

    def _backend_for(self, t: torch.Tensor, kernel_dtypes) -> NormalModeBackend:
        """The kernels for CUDA tensors of the dtypes they take, the reference backend otherwise.

        Both backends read a ``DispatchHandle`` the same way, so a handle made by one serves the other.
        """
        if self._kernels is not None and t.is_cuda and t.dtype in kernel_dtypes:
            return self._kernels
        return self._reference

    def _backend_for_handle(self, handle: NormalHandle) -> NormalModeBackend:
        """The kernels for a handle on CUDA of the kind they make, the reference backend otherwise."""
        if self._kernels is not None and handle.recv_src_idx.is_cuda and \
                isinstance(handle, InternodeHandle) == isinstance(self._kernels, internode.InternodeBackend):
            return self._kernels
        return self._reference

    def _check_handle(self, handle, backend) -> None:
        """A handle serves the backend kind that made it (internode kernels make ``InternodeHandle``s), and a
        group of this size."""
        if not isinstance(handle, (DispatchHandle, InternodeHandle)):
            raise TypeError(f"handle must be a handle from dispatch(), got {type(handle).__name__}")
        if handle.is_token_in_rank.dim() != 2 or handle.is_token_in_rank.size(1) != self.group_size:
            raise ValueError(f"the handle was made for a group of {handle.is_token_in_rank.size(-1)} ranks, this "
                             f"buffer's has {self.group_size}")
        made_by_internode = isinstance(handle, InternodeHandle)
        for_internode = isinstance(backend, internode.InternodeBackend)
        if made_by_internode != for_internode:
            raise ValueError("this handle comes from the " + ("internode kernels" if made_by_internode else
                             "reference backend") + " but the call runs on the " +
                             ("internode kernels" if for_internode else "reference backend") +
                             ": pass tensors of the same device and dtype kind (CUDA bf16/fp8) as the dispatch")

    @property
    def num_rdma_ranks(self) -> int:
        return self.group_size // self.num_ranks_per_node

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Count what each rank and expert receives.

        Arguments:
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for none.
            num_experts: experts in the group (divisible by the group size).

        Returns:
            num_tokens_per_rank: ``[num_ranks]`` int32.
            num_tokens_per_rdma_rank: ``[num_nodes]`` int32, or ``None`` inside one node.
            num_tokens_per_expert: ``[num_experts]`` int32.
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
            event: an ``EventOverlap`` (holding an event if ``async_finish``).
        """
        self._check_alive()
        checks.tensor("topk_idx", topk_idx, (torch.int64,), (None, None))
        checks.experts_divisible(num_experts, self.group_size)
        ids_checked = self.check_values and not (topk_idx.is_cuda and torch.cuda.is_current_stream_capturing())
        if ids_checked:
            checks.expert_ids("topk_idx", topk_idx, num_experts)
        if topk_idx.is_cuda and intranode.extension_available():  # every backend counts CUDA ids with the kernel
            checks.at_most("num_experts", num_experts, LAYOUT_MAX_EXPERTS, "the layout kernel")
        backend = self._kernels if topk_idx.is_cuda and self._kernels is not None else self._reference
        *layout, event = backend.get_dispatch_layout(LayoutRequest(
            topk_idx, num_experts, self._event_to_wait(previous_event), async_finish, allocate_on_comm_stream))
        # The counts and mask derive from ids just checked: a dispatch handed these very tensors, unmodified,
        # skips its value checks (dispatch).
        self._checked_layout = checks.CheckedTensors(topk_idx, *layout) if ids_checked else None
        return (*layout, EventOverlap(event))

    def dispatch(self, x: Tokens, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, recv_x_in_buffer: bool = False):
        """Send each token to every rank that holds one of its experts.

        Arguments:
            x: ``[num_tokens, hidden]`` bf16, or a tuple of ``[num_tokens, hidden]`` float8_e4m3fn and
                ``[num_tokens, hidden // 128]`` float32 scales, or NVFP4 (``moe_a2a.formats.nvfp4``): a tuple of ``[num_tokens, hidden // 2]`` uint8 (two e2m1
                values a byte), ``[num_tokens, hidden // 16]`` float8_e4m3fn block scales and a float32 global
                scale (``[]`` or ``[1]``, or ``[num_tokens]`` per token); it arrives as
                ``(recv_packed, recv_block_scales, recv_global_scale [num_recv] float32)``, each row with its
                source's global scale. The bytes arrive unchanged. The reference backend also takes
                float16/32/64.
            handle: a handle from an earlier dispatch with the same routing: skips the layout exchange
                (then ``topk_idx``/``topk_weights`` must be None).
            num_tokens_per_rank: ``[num_ranks]`` int32 (from ``get_dispatch_layout``).
            num_tokens_per_rdma_rank: ``[num_nodes]`` int32, internode only.
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool.
            num_tokens_per_expert: ``[num_experts]`` int32.
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for none.
            topk_weights: ``[num_tokens, num_topk]`` float32.
            expert_alignment: round each local expert's received count up to a multiple of this.
            num_worst_tokens: if > 0, outputs are padded to this many rows and no count reaches the host
                (intranode only; CUDA-graph safe on the kernels).
            config: chunking config (default ``get_dispatch_config(group_size)``).
            previous_event / async_finish / allocate_on_comm_stream: stream ordering, as in DeepEP.
            recv_x_in_buffer: (moe_a2a extension, keyword only) on the intranode kernels, the senders write
                the received rows straight into this rank's buffer and ``recv_x`` is a view of it, valid until
                the next dispatch or combine on this buffer: for consumers that read it at once (a permute).
                Each token then crosses memory once. The rows must fit what ``num_nvl_bytes`` leaves
                (otherwise every rank falls back to an ordinary tensor, as other backends return).

        Returns:
            recv_x: received tokens (same form as ``x``), ordered by source rank then source index.
            recv_topk_idx: ``[num_recv, num_topk]`` int64 local expert ids, ``-1`` where not local.
            recv_topk_weights: ``[num_recv, num_topk]`` float32, 0 where the expert is not local.
            num_recv_tokens_per_expert_list: ``[num_local_experts]`` Python ints, aligned (empty with
                ``num_worst_tokens``).
            handle: a ``DispatchHandle`` for combine and cached dispatch.
            event: an ``EventOverlap``.
        """
        self._check_alive()
        config = self._fit_config(config, "dispatch")
        nvfp4 = isinstance(x, tuple) and len(x) == 3
        x, x_scales = self._check_nvfp4(x) if nvfp4 else self._check_tokens(x)
        num_tokens, hidden = x.shape
        device = x.device
        checks.positive_int("expert_alignment", expert_alignment)
        checks.positive_int("num_worst_tokens", num_worst_tokens, minimum=0)
        multi_node = self.num_rdma_ranks > 1
        if multi_node and num_worst_tokens:
            raise ValueError("num_worst_tokens is intranode only; this group spans "
                             f"{self.num_rdma_ranks} nodes")
        self._check_buffer_sizes(config, x)
        # NVFP4 rows are bytes to the kernels: packed values as the row, side bytes as 4-byte scale words.
        backend = self._backend_for(x, (torch.bfloat16, torch.float8_e4m3fn) + ((torch.uint8,) if nvfp4 else ()))
        on_kernels = backend is self._kernels
        if nvfp4 and on_kernels:
            x_scales = x_scales.view(torch.float32)
        if on_kernels:
            checks.kernel_rows("x[0] (NVFP4 packed values)" if nvfp4 else "x", hidden, x.element_size())
        if handle is not None:
            self._check_handle(handle, backend)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("cached dispatch (handle given) takes no topk_idx/topk_weights")
            if handle.num_sent_tokens != num_tokens:
                raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_sent_tokens}")
            if handle.is_token_in_rank.device != device:
                raise ValueError(f"the handle lives on {handle.is_token_in_rank.device}, x on {device}")
        else:
            if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
                raise ValueError("dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and "
                                 "num_tokens_per_expert (from get_dispatch_layout)")
            r = self.group_size
            checks.tensor("num_tokens_per_rank", num_tokens_per_rank, (torch.int32,), (r,), device)
            checks.tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), (num_tokens, r), device)
            checks.tensor("num_tokens_per_expert", num_tokens_per_expert, (torch.int32,), (None,), device)
            num_experts = num_tokens_per_expert.numel()
            checks.experts_divisible(num_experts, r)
            if multi_node and num_tokens_per_rdma_rank is not None:
                checks.tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, (torch.int32,),
                              (self.num_rdma_ranks,), device)
            if topk_weights is not None and topk_idx is None:
                raise ValueError("topk_weights needs topk_idx")
            # num_worst_tokens promises no host sync, so value checks (which read device memory) are skipped; so
            # are they for the layout get_dispatch_layout returned and checked, passed on unmodified.
            check_values = self.check_values and not num_worst_tokens and not (
                self._checked_layout is not None and self._checked_layout.same(
                    topk_idx, num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank))
            if topk_idx is not None:
                checks.tensor("topk_idx", topk_idx, (torch.int64,), (num_tokens, None), device)
                if on_kernels:
                    checks.at_most("topk_idx's top-k width", topk_idx.size(1), MAX_TOPK, "the CUDA kernels")
                if check_values:
                    checks.expert_ids("topk_idx", topk_idx, num_experts)
                if topk_weights is not None:
                    weight_dtypes = (torch.float32,) if on_kernels else (torch.float32, torch.float64)
                    checks.tensor("topk_weights", topk_weights, weight_dtypes, tuple(topk_idx.shape), device)
            if check_values and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                checks.routing_metadata(topk_idx, num_experts, r, self.num_ranks_per_node, num_tokens_per_rank,
                                        is_token_in_rank, num_tokens_per_expert,
                                        num_tokens_per_rdma_rank if multi_node else None)
        routing = {} if handle is not None else dict(
            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
            topk_weights=topk_weights)
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, counts, new_handle, event = backend.dispatch(
            DispatchRequest(x, config, x_scales, handle, **routing, expert_alignment=expert_alignment,
                            num_worst_tokens=num_worst_tokens, previous_event=self._event_to_wait(previous_event),
                            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream,
                            recv_x_in_buffer=bool(recv_x_in_buffer)))
        recv = (recv_x, recv_x_scales) if x_scales is not None else recv_x
        if new_handle is not None:
            new_handle = self._stamp(new_handle)
        if nvfp4:
            recv, hidden = _split_nvfp4(recv_x, recv_x_scales), hidden * 2
        self._remember_hidden(handle if handle is not None else new_handle, hidden)
        if handle is not None:
            return recv, None, None, None, None, EventOverlap(event)
        return recv, recv_topk_idx, recv_topk_weights, counts, new_handle, EventOverlap(event)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False, *, use_fp8: bool = False):
        """Send each received token back to its source rank and sum the copies (no weights applied).

        Arguments:
            x: ``[num_recv, hidden]`` bf16 (the reference backend also takes float16/32/64), rows as dispatch
                returned them.
            handle: the ``DispatchHandle`` from ``dispatch``.
            topk_weights: ``[num_recv, num_topk]`` float32, summed back like the tokens.
            bias: ``[num_tokens, hidden]`` tensor, or a tuple of two, added to the result.
            config: chunking config (default ``get_combine_config(group_size)``).
            use_fp8: (moe_a2a extension, keyword only) the rows travel as FP8 e4m3 with one float32 scale per
                128 channels (``moe_a2a.fp8``; hidden divisible by 128) and are summed in float32 after
                decoding: 53% of BF16's bytes, relative error per copy below 2**-4 of its block's largest value
                (``README``, "Formats"). On the internode kernels both hops move FP8 (each copy to its node's
                forwarder, then each node's partial sum), so the error is that of two casts. On the intranode
                kernels a ``get_next_combine_buffer`` input is encoded in place: write it again (after a new
                ``get_next_combine_buffer``) before another combine.

        Returns:
            combined_x: ``[num_tokens, hidden]``, the float32 sum of the copies, cast to ``x``'s dtype.
            combined_topk_weights: ``[num_tokens, num_topk]`` float32 or ``None``.
            event: an ``EventOverlap``.
        """
        self._check_alive()
        config = self._fit_config(config, "combine")
        if not isinstance(handle, (DispatchHandle, InternodeHandle)):
            raise TypeError(f"handle must be a DispatchHandle from dispatch(), got {type(handle).__name__}")
        checks.tensor("x", x, _FLOAT_TOKENS, (handle.num_recv_tokens, None), handle.recv_src_idx.device)
        backend = self._backend_for(x, (torch.bfloat16,))
        on_kernels = backend is self._kernels
        if use_fp8:
            checks.hidden_divisible(x.size(1), 128, "FP8 combine with per-128 scales")
        self._check_handle(handle, backend)
        self._check_buffer_sizes(config, x)
        if on_kernels:
            checks.kernel_rows("x", x.size(1), x.element_size())
        if topk_weights is not None:
            weight_dtypes = (torch.float32,) if on_kernels else (torch.float32, torch.float64)
            checks.tensor("topk_weights", topk_weights, weight_dtypes, (handle.num_recv_tokens, None), x.device)
            if on_kernels:
                checks.at_most("topk_weights' top-k width", topk_weights.size(1), MAX_TOPK, "the CUDA kernels")
        bias_0, bias_1 = bias if isinstance(bias, tuple) else (bias, None)
        for name, b in (("bias[0]", bias_0), ("bias[1]", bias_1)):
            if b is not None:
                checks.tensor(name, b, (x.dtype,), (handle.num_sent_tokens, x.size(1)), x.device)
        combined_x, combined_weights, event = backend.combine(CombineRequest(
            x, handle, config, topk_weights, bias_0, bias_1, self._event_to_wait(previous_event), async_finish,
            allocate_on_comm_stream, use_fp8))
        self._remember_hidden(handle, x.size(1))
        return combined_x, combined_weights, EventOverlap(event)

    def get_next_combine_buffer(self, handle: Union[DispatchHandle, InternodeHandle],
                                hidden: Optional[int] = None) -> torch.Tensor:
        """Where the next ``combine`` with ``handle`` reads its input in place: ``[num_recv, hidden]`` bf16.

        Write the expert outputs into it (``torch.index_select(y, 0, rows, out=buf)``, ``buf.copy_(acc)``, ...)
        and pass it as ``combine``'s ``x``. On the intranode kernels it is a view of this rank's registered
        buffer, so the combine skips staging its input there (a copy of every received row otherwise);
        other backends return an ordinary tensor, which ``combine`` takes like any input.

        Write it on the current stream (or one ordered after it): the view is ready there once every peer
        stopped reading this buffer for earlier calls. It serves any number of combines with ``handle``
        until a dispatch, or a combine of another tensor, runs on this buffer (``combine`` then raises
        ``ValueError`` if given the stale view); call again before writing the next input.

        Arguments:
            handle: a handle from ``dispatch``.
            hidden: hidden size; by default that of the tokens last dispatched or combined with ``handle``.

        Raises:
            ValueError: ``num_nvl_bytes`` is below ``combine_input_bytes(num_recv, hidden * 2)`` (size the
                buffer with ``Config.get_nvl_buffer_size_hint(..., num_recv_tokens=...)``); with
                ``topk_weights`` the combine also needs ``num_topk * 4`` bytes per row.
        """
        self._check_alive()
        if not isinstance(handle, (DispatchHandle, InternodeHandle)):
            raise TypeError(f"handle must be a handle from dispatch(), got {type(handle).__name__}")
        if hidden is None:
            hidden = self._handle_hidden.get(id(handle.recv_src_idx))
            if hidden is None:
                raise ValueError("this handle did not come from this Buffer's dispatch: pass hidden=")
        checks.positive_int("hidden", hidden)
        num_recv = handle.num_recv_tokens
        need = combine_input_bytes(num_recv, hidden * 2)
        if self.num_nvl_bytes < need:
            raise ValueError(f"get_next_combine_buffer: [{num_recv}, {hidden}] bf16 rows need num_nvl_bytes >= "
                             f"{need}, got {self.num_nvl_bytes} (Config.get_nvl_buffer_size_hint(hidden * 2, "
                             f"num_ranks, num_recv_tokens={num_recv}))")
        backend = self._backend_for_handle(handle)
        if backend is self._kernels:
            checks.kernel_rows("the combine input", hidden, 2)
        return backend.get_next_combine_buffer(handle, hidden)

    def _stamp(self, handle):
        """``handle`` with its ``HandleIdentity``: this dispatch's epoch (the same on every rank) and, where
        the rank-to-rank counts are on the host already, their fingerprint."""
        fingerprint = -1
        if isinstance(handle, DispatchHandle) and not handle.rank_prefix_matrix.is_cuda:
            digest = hashlib.blake2b(handle.rank_prefix_matrix.contiguous().numpy().tobytes(), digest_size=7)
            fingerprint = int.from_bytes(digest.digest(), "little")
        identity = HandleIdentity(self._dispatch_epoch, fingerprint)
        self._dispatch_epoch += 1
        return handle._replace(identity=identity)

    def _remember_hidden(self, handle, hidden: int) -> None:
        """Record the hidden size used with ``handle`` (the default of ``get_next_combine_buffer``)."""
        key = id(handle.recv_src_idx)
        if key not in self._handle_hidden:
            weakref.finalize(handle.recv_src_idx, self._handle_hidden.pop, key, None)
        self._handle_hidden[key] = hidden

    def internode_dispatch(self, x: Tokens, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                           is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment: int = 1, config: Optional[Config] = None, previous_event=None,
                           async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Dispatch across nodes (see ``dispatch``); ``num_worst_tokens`` is not available here."""
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, 0, config,
                             previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle, topk_weights=None, bias=None,
                          config: Optional[Config] = None, previous_event=None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False):
        """Combine across nodes (see ``combine``)."""
        return self.combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    def _check_tokens(self, x: Tokens):
        """Split ``x`` into tokens and optional FP8 scales, checking dtypes and shapes."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise ValueError(f"FP8 x must be a tuple (tokens, scales), got {len(x)} elements")
            x, scales = x
            checks.tensor("x[0]", x, (torch.float8_e4m3fn,), (None, None))
            checks.hidden_divisible(x.size(1), 128, "FP8 tokens with per-128 scales")
            checks.tensor("x[1] (scales)", scales, (torch.float32,), (x.size(0), x.size(1) // 128), x.device)
            return x, scales
        checks.tensor("x", x, _FLOAT_TOKENS, (None, None))
        return x, None

    def _check_nvfp4(self, x: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        """Check NVFP4 parts; returns ``(packed, side)``: ``side`` ``[num_tokens, S]`` uint8 holds each token's
        block scales (``hidden // 16`` bytes), zero padding to a multiple of 4 bytes, then its float32 global
        scale, so everything travels as one row of bytes (the kernels carry it as ``S // 4`` scale words)."""
        packed, block_scales, global_scale = x
        checks.tensor("x[0] (NVFP4 packed values)", packed, (torch.uint8,), (None, None))
        num_tokens, hidden = packed.size(0), packed.size(1) * 2
        checks.hidden_divisible(hidden, 16, "NVFP4 tokens with per-16 block scales")
        checks.tensor("x[1] (NVFP4 block scales)", block_scales, (torch.float8_e4m3fn,), (num_tokens, hidden // 16),
                      packed.device)
        if not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32 or \
                global_scale.numel() not in (1, num_tokens) or global_scale.dim() > 1 or \
                global_scale.device != packed.device:
            raise ValueError(f"x[2] (NVFP4 global scale) must be a float32 tensor of shape [], [1] or [{num_tokens}] "
                             f"on {packed.device}, got {_describe(global_scale)}")
        per_token = global_scale.reshape(-1).expand(num_tokens).contiguous().view(torch.uint8).view(num_tokens, 4)
        pad = packed.new_zeros(num_tokens, -(hidden // 16) % 4)
        side = torch.cat([block_scales.contiguous().view(torch.uint8), pad, per_token], dim=1)
        return packed, side

    def _check_buffer_sizes(self, config: Config, x: torch.Tensor) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"config must be a moe_a2a.Config, got {type(config).__name__}")
        hidden_bytes = x.size(1) * max(x.element_size(), 2)
        # The kernels stage rows in rounds, so the floor is far below any size hint: a buffer sized from the
        # dispatch config's hint serves the combine config too (and the other way round).
        need = min_nvl_buffer_bytes(hidden_bytes, self.group_size, config.num_sms)
        if self.num_nvl_bytes < need:
            hint = config.get_nvl_buffer_size_hint(hidden_bytes, self.group_size)
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for hidden {x.size(1)} on "
                             f"{self.group_size} ranks with {config}: need at least {need}; size it with "
                             f"Config.get_nvl_buffer_size_hint ({hint})")
        if self.num_rdma_ranks > 1:
            # The internode kernels size their rounds by the real node size; the reference needs no buffer.
            per_node = self.num_ranks_per_node if isinstance(self._kernels, internode.InternodeBackend) else \
                MAX_NVL_PEERS
            need = config.get_rdma_buffer_size_hint(hidden_bytes, self.group_size, per_node)
            if self.num_rdma_bytes < need:
                raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small: need at least {need} "
                                 "(Config.get_rdma_buffer_size_hint)")

    # ------------------------------------------------------------------ low-latency mode
    def _check_low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        checks.positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        checks.experts_divisible(num_experts, self.group_size)
        need = _ll_size_hint(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency mode with "
                             f"{num_max_dispatch_tokens_per_rank} tokens, hidden {hidden}, {num_experts} experts: "
                             f"need at least {need} (Buffer.get_low_latency_rdma_size_hint)")

    def _check_low_latency_kernels(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """The call shape the low-latency kernels take (``moe_a2a.limits``), for a call about to run on them."""
        checks.kernel_rows("x", hidden, 2)
        checks.at_most("num_experts", num_experts, LOW_LATENCY_MAX_EXPERTS, "the low-latency kernels")
        if isinstance(self._ll_kernels, internode_low_latency.InternodeLowLatencyBackend):
            checks.at_most("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank,
                           INTERNODE_LOW_LATENCY_MAX_TOKENS, "the internode low-latency kernels")

    @staticmethod
    def _check_low_latency_kernel_topk(topk_idx: torch.Tensor) -> None:
        """The top-k width the low-latency kernels take: 1 to ``MAX_TOPK`` columns."""
        if not 1 <= topk_idx.size(1) <= MAX_TOPK:
            raise ValueError(f"topk_idx has {topk_idx.size(1)} top-k columns; the low-latency kernels take 1 to "
                             f"{MAX_TOPK}")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency receive state (needed after normal-mode use of the same memory)."""
        self._check_alive()
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if self._ll_kernels is not None:
            self._ll_kernels.clean()
        for b in self._ll_combine_buffers:
            if b is not None:
                b.zero_()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Dispatch a small batch into fixed per-expert slots.

        Arguments:
            x: ``[num_tokens, hidden]`` bf16, ``num_tokens <= num_max_dispatch_tokens_per_rank``.
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, ``-1`` for none.
            num_max_dispatch_tokens_per_rank: the same on every rank.
            num_experts: experts in the group.
            cumulative_local_expert_recv_stats: ``[num_local_experts]`` int32, incremented by the counts.
            dispatch_wait_recv_cost_stats: ``[num_ranks, num_ranks]`` int64; row ``rank``, column ``src``
                accumulates nanoseconds this rank waited for data from ``src``.
            use_fp8: cast to FP8 e4m3 with per-128 scales on the fly.
            round_scale: round scales up to powers of two.
            use_ue8m0: pack the (rounded) scales as UE8M0 bytes, four per int32 (needs ``round_scale``).
            async_finish: return an event instead of waiting on the current stream.
            return_recv_hook: only issue the sends; the returned hook completes the receive.

        Returns:
            recv_x: ``[num_local_experts, num_max * num_ranks, hidden]`` bf16, or with ``use_fp8`` a tuple of
                float8_e4m3fn tokens and scales ``[..., hidden // 128]`` float32 (``[..., hidden // 512]`` int32
                with ``use_ue8m0``), the scales column-major in the last two dims.
            recv_count: ``[num_local_experts]`` int32 valid rows per expert.
            handle: a ``LowLatencyHandle`` for ``low_latency_combine``.
            event: an ``EventOverlap``.
            hook: call it to complete the receive (``return_recv_hook``), else ``None``.
        """
        self._check_alive()
        checks.tensor("x", x, (torch.bfloat16,), (None, None))
        num_tokens, hidden = x.shape
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        checks.tensor("topk_idx", topk_idx, (torch.int64,), (num_tokens, None), x.device)
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        if self.check_values:
            checks.expert_ids("topk_idx", topk_idx, num_experts)
        if use_fp8:
            checks.hidden_divisible(hidden, 128, "FP8 casting")
        if use_ue8m0:
            if not (use_fp8 and round_scale):
                raise ValueError("use_ue8m0 needs use_fp8=True and round_scale=True")
            checks.hidden_divisible(hidden, 512, "UE8M0 packed scales")
        num_local_experts = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            checks.tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, (torch.int32,),
                          (num_local_experts,), x.device)
        if dispatch_wait_recv_cost_stats is not None:
            checks.tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, (torch.int64,),
                          (self.group_size, self.group_size), x.device)
        backend = self._ll_kernels if x.is_cuda and self._ll_kernels is not None else self._reference_ll
        if backend is self._ll_kernels:
            self._check_low_latency_kernels(num_max_dispatch_tokens_per_rank, hidden, num_experts)
            self._check_low_latency_kernel_topk(topk_idx)
        recv_x, recv_scales, recv_count, handle, hook = backend.dispatch(LowLatencyDispatchRequest(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0, return_recv_hook))
        event = EventHandle(device=x.device) if async_finish and x.is_cuda else None
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        tensors = (x, topk_idx, recv_x, recv_scales, recv_count, handle.src_info, handle.layout_range)
        return recv, recv_count, handle, EventOverlap(event, tensors if async_finish else None), hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None, *, use_fp8: bool = False):
        """Send expert outputs back and reduce them with the top-k weights (float32 accumulation).

        Arguments:
            x: ``[num_local_experts, num_max * num_ranks, hidden]`` bf16 expert outputs in dispatch's slots
                (ignored with ``zero_copy``: the buffer from ``get_next_low_latency_combine_buffer`` is used).
            topk_idx: ``[num_tokens, num_topk]`` int64, as given to ``low_latency_dispatch``.
            topk_weights: ``[num_tokens, num_topk]`` float32.
            handle: the ``LowLatencyHandle`` from ``low_latency_dispatch``.
            use_logfmt: the rows travel as LogFMT (``docs/logfmt.md``): 10-bit log-domain values with one log
                range per 64 channels (hidden divisible by 64), 66% of BF16's bytes, decoded to float32 before
                the weighted sum; relative error per value at most 1.1%. On the kernels a ``zero_copy`` input
                is encoded in place (refill it before every combine, as usual).
            out: optional ``[num_tokens, hidden]`` bf16 tensor written in place and returned.
            use_fp8: (moe_a2a extension, keyword only) the rows travel as FP8 e4m3 with per-128 scales (hidden
                divisible by 128), 53% of BF16's bytes; as ``use_logfmt`` otherwise.

        Returns:
            combined_x: ``[num_tokens, hidden]`` bf16; event: an ``EventOverlap``; hook: as in dispatch.
        """
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be a LowLatencyHandle from low_latency_dispatch(), got "
                            f"{type(handle).__name__}")
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        num_local_experts = handle.num_experts // self.group_size
        slots = handle.num_max_dispatch_tokens_per_rank * self.group_size
        kernels = self._ll_kernels if handle.src_info.is_cuda and self._ll_kernels is not None else None
        if use_logfmt and use_fp8:
            raise ValueError("use_logfmt and use_fp8 are exclusive: pick one combine format")
        wire_format = "logfmt" if use_logfmt else "fp8" if use_fp8 else "bf16"
        if use_logfmt:
            checks.hidden_divisible(handle.hidden, 64, "LogFMT combine with per-64 log ranges")
        if use_fp8:
            checks.hidden_divisible(handle.hidden, 128, "FP8 combine with per-128 scales")
        if kernels is not None:
            self._check_low_latency_kernels(handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                            handle.num_experts)
        if zero_copy:
            # The expert outputs are already in the registered buffer of the next combine.
            if kernels is not None:
                x = kernels.get_next_combine_buffer(handle)
            else:
                x = self._ll_combine_buffers[self._ll_buffer_index]
                if x is None:
                    raise ValueError("zero_copy=True needs get_next_low_latency_combine_buffer(handle) filled first")
                self._ll_buffer_index ^= 1
        checks.tensor("x", x, (torch.bfloat16,), (num_local_experts, slots, handle.hidden))
        checks.tensor("topk_idx", topk_idx, (torch.int64,), (None, None), x.device)
        if topk_idx.size(0) > handle.num_max_dispatch_tokens_per_rank:
            raise ValueError(f"topk_idx has {topk_idx.size(0)} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{handle.num_max_dispatch_tokens_per_rank}")
        if self.check_values:
            checks.expert_ids("topk_idx", topk_idx, handle.num_experts)
        checks.tensor("topk_weights", topk_weights, (torch.float32,), tuple(topk_idx.shape), x.device)
        if out is not None:
            checks.tensor("out", out, (torch.bfloat16,), (topk_idx.size(0), handle.hidden), x.device)
        if combine_wait_recv_cost_stats is not None:
            checks.tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, (torch.int64,),
                          (self.group_size, self.group_size), x.device)
        if kernels is not None:
            self._check_low_latency_kernel_topk(topk_idx)
            if out is not None and not out.is_contiguous():
                raise ValueError("out must be contiguous on the low-latency kernels")
        combined, hook = (kernels or self._reference_ll).combine(LowLatencyCombineRequest(
            x, topk_idx, topk_weights, handle, out, combine_wait_recv_cost_stats, return_recv_hook, wire_format))
        event = EventHandle(device=x.device) if async_finish and x.is_cuda else None
        tensors = (x, topk_idx, topk_weights, handle.src_info, handle.layout_range, combined)
        return combined, EventOverlap(event, tensors if async_finish else None), hook

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The buffer the next ``low_latency_combine(..., zero_copy=True)`` reads: fill it with expert outputs.

        Returns ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`` bf16.
        """
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle must be a LowLatencyHandle, got {type(handle).__name__}")
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        if handle.src_info.is_cuda and self._ll_kernels is not None:
            self._check_low_latency_kernels(handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                                            handle.num_experts)
            return self._ll_kernels.get_next_combine_buffer(handle)
        shape = (handle.num_experts // self.group_size, self.group_size * handle.num_max_dispatch_tokens_per_rank,
                 handle.hidden)
        b = self._ll_combine_buffers[self._ll_buffer_index]
        if b is None or tuple(b.shape) != shape or b.device != handle.src_info.device:
            b = torch.zeros(shape, dtype=torch.bfloat16, device=handle.src_info.device)
            self._ll_combine_buffers[self._ll_buffer_index] = b
        return b

    # ------------------------------------------------------------------ rank masking (low-latency mode)
    def _check_masking(self) -> None:
        self._check_alive()
        if not self.low_latency_mode:
            raise ValueError("rank masking is for low-latency buffers: Buffer(..., low_latency_mode=True)")
        if self._ll_kernels is not None:  # the kernels keep their mask on the GPU: nothing to communicate
            return
        if self._reference_ll.peers.device.type != "cpu":
            # An NCCL communicator does not survive a lost peer (it must be aborted and rebuilt); gloo's
            # point-to-point connections to the live ranks do.
            raise NotImplementedError("rank masking needs a gloo process group (CUDA tensors travel through it); "
                                      "this group runs NCCL")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (``mask=True``) or unmask (``False``, the default as in DeepEP) a rank of the group for the
        low-latency calls of this buffer.

        Masked ranks' tokens are neither sent nor waited for, and their experts' outputs count as zero in the
        combine; the other ranks go on without them. Call it on every live rank with the same arguments
        before their next call (a live rank that masks itself then exchanges with no one). Local: nothing is
        communicated, so it works while the masked rank is dead. Unmask only a rank that kept making the
        same low-latency calls as the others (for example one masked on purpose); a restarted process needs
        a new group and Buffer.
        """
        self._check_masking()
        if isinstance(rank_to_mask, bool) or not isinstance(rank_to_mask, int) or \
                not 0 <= rank_to_mask < self.group_size:
            raise ValueError(f"rank_to_mask must be a rank in [0, {self.group_size}), got {rank_to_mask!r}")
        if self._ll_kernels is not None:  # on the current stream: the calls enqueued after this see it
            self._ll_kernels.update_mask(rank_to_mask, bool(mask))
        self._reference_ll.mask[rank_to_mask] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Which ranks are masked: ``[num_ranks]`` int32, 1 for masked (by ``low_latency_update_mask_buffer``
        or, with ``enable_shrink``, after failing during a call). Written into ``mask_status`` when given."""
        self._check_alive()
        if self._ll_kernels is not None:
            # The kernels' mask (they mask ranks that time out), with any masked for CPU-tensor calls.
            status = torch.maximum(self._ll_kernels.query_mask(), self._reference_ll.mask)
        else:
            status = self._reference_ll.mask.clone()
        if mask_status is not None:
            checks.tensor("mask_status", mask_status, (torch.int32,), (self.group_size,))
            mask_status.copy_(status)
            return mask_status
        return status

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (see ``low_latency_update_mask_buffer`` for when that is safe)."""
        self._check_masking()
        if self._ll_kernels is not None:
            self._ll_kernels.clean_mask()
        self._reference_ll.mask.zero_()


def _split_nvfp4(packed: torch.Tensor, side: torch.Tensor):
    """Received NVFP4 rows: ``(packed, block_scales float8_e4m3fn, global_scale [num_recv] float32)`` from the
    packed values and the side bytes of ``Buffer._check_nvfp4`` (uint8, or float32 words from the kernels)."""
    side = side.view(torch.uint8)
    num_scales = packed.size(1) // 8
    block_scales = side[:, :num_scales].contiguous().view(torch.float8_e4m3fn)
    global_scale = side[:, -4:].contiguous().view(torch.float32).view(-1)
    return packed, block_scales, global_scale


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {list(t.shape)} on {t.device}"
    return type(t).__name__


def _capped_num_sms(op: str, num_ranks: int) -> int:
    tuned = tuned_num_sms(op, num_ranks)
    return Buffer.num_sms if tuned is None else min(Buffer.num_sms, tuned)
