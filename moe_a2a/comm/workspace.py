"""Lamport workspaces of the all-reduce kernels: sizing, growth, strategy choice, and the launch.

Each rank owns one allocation of ``NUM_LAMPORT_BUFFERS * buffer_size_bytes`` that every rank of the group
maps (cudaIpc handles, or with ``memory="vmm"`` CUDA virtual memory shared as file descriptors). Call ``k`` uses buffer ``k % 3``: peers write their data into it, with every -0.0
replaced by +0.0, over a buffer pre-filled with -0.0; a reader knows a 16-byte piece has arrived once none
of its elements is -0.0 (the sentinel). While buffer ``k % 3`` is in use, the kernel clears (refills with
the sentinel) what call ``k - 1`` used of buffer ``(k - 1) % 3``: no peer can still write there (this rank
read all of it), and no peer can already write there for call ``k + 2`` (that needs this rank's data of
call ``k + 1``). The buffer index and the bytes to clear live in device memory, so nothing syncs with the
host and CUDA graphs replay correctly.

Buffer layout (bytes): a header of ``16 * tp_size`` (each peer's message shape, checked by the receiver),
then one-shot: ``tp_size`` slots of ``num_tokens * hidden`` elements (every rank reads every peer's input);
two-shot: a scatter area of ``tp_size`` slots of ``ceil(num_tokens / tp_size) * hidden`` elements (the
owner of a token chunk receives it from every rank), a gather area of ``tp_size`` such chunks (the owners'
sums, written to every rank; with the fused norm the owners' residual_out), and 16 bytes per gathered row
(with the fused norm: the row's 1/rms, computed by its owner).
"""
from __future__ import annotations

import functools
import math
import os
import socket
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..backends import waits
from ..limits import MAX_NVL_PEERS
from ..tuning import read_table
from .fd_share import share_fds
from .types import FP8_OPS, NORM_OPS, AllReduceFusionOp, AllReduceStrategy

try:
    from .. import _C
except ImportError:  # built without CUDA
    _C = None

NUM_LAMPORT_BUFFERS = 3
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Buffers grow in steps of this many bytes, so a slowly growing batch does not reallocate every call.
GROWTH_BYTES = 8 * 1024 * 1024
#: The first buffer holds at least this many tokens of hidden 8192 (one reallocation less for most models).
INITIAL_TOKENS, INITIAL_HIDDEN = 1024, 8192
#: Without a measurement, one-shot up to this many bytes of ``tp_size * num_tokens * hidden`` (the rule of
#: TensorRT-LLM's kernels: one-shot reads every peer's input, so its cost grows with ``tp_size``).
ONESHOT_MAX_BYTES = 64 * 1024 * 8
HEADER_BYTES_PER_RANK = 16
TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                          "allreduce_tuning.json")


def kernels_available() -> bool:
    """Whether ``moe_a2a._C`` was built with the all-reduce kernels."""
    return _C is not None and hasattr(_C, "AllReduceWorkspace")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_problem(tp_size, num_tokens, hidden_dim, dtype) -> None:
    for name, v, lo in (("tp_size", tp_size, 1), ("num_tokens", num_tokens, 0), ("hidden_dim", hidden_dim, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")


# ---------------------------------------------------------------------------- strategy choice
def load_table(path: Optional[str] = None) -> Dict:
    """The measured one-shot/two-shot table (``python -m benchmarks all-reduce --write-table`` writes it).

    ``{"entries": {"<tp_size>": [{"bytes": message bytes per rank, "oneshot_us": t, "twoshot_us": t}, ...]},
    "device": ..., "commit": ..., "command": ...}``; empty when nothing was measured. The path can be
    overridden with ``MOE_A2A_ALLREDUCE_TABLE``.
    """
    return read_table(path or os.environ.get("MOE_A2A_ALLREDUCE_TABLE") or TABLE_PATH)


def choose_strategy(tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype,
                    table: Optional[Dict] = None) -> str:
    """``"oneshot"`` or ``"twoshot"`` for a message of ``num_tokens * hidden_dim`` elements per rank.

    With a measured table for ``tp_size``: the faster strategy at the measured message size nearest to this
    one (in log scale). Without one: one-shot when ``tp_size * num_tokens * hidden_dim * element size`` is at
    most ``ONESHOT_MAX_BYTES`` (512 KiB), two-shot above, and always one-shot with fewer tokens than ranks
    (two-shot would leave ranks without a chunk to reduce).
    """
    _check_problem(tp_size, num_tokens, hidden_dim, dtype)
    if num_tokens < tp_size:
        return "oneshot"
    message = num_tokens * hidden_dim * _element_size(dtype)
    rows = (table if table is not None else load_table())["entries"].get(str(tp_size))
    if rows:
        nearest = min(rows, key=lambda r: abs(math.log(max(r["bytes"], 1)) - math.log(max(message, 1))))
        return "oneshot" if nearest["oneshot_us"] <= nearest["twoshot_us"] else "twoshot"
    return "oneshot" if tp_size * message <= ONESHOT_MAX_BYTES else "twoshot"


# ---------------------------------------------------------------------------- sizing
def get_required_buffer_size_bytes(tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype,
                                   strategy: AllReduceStrategy = AllReduceStrategy.AUTO) -> int:
    """Bytes one Lamport buffer needs for ``[num_tokens, hidden_dim]`` of ``dtype`` over ``tp_size`` ranks.

    One-shot: ``tp_size * num_tokens * hidden_dim * elem``; two-shot: ``ceil(num_tokens / tp_size) * tp_size
    * (2 * hidden_dim * elem + 16)`` (the rows sent to their owner, the reduced rows gathered, and 16 bytes per
    gathered row for the fused norm's 1/rms); plus a ``16 * tp_size``-byte header. ``AUTO`` sizes for the
    strategy ``choose_strategy`` picks.
    """
    _check_problem(tp_size, num_tokens, hidden_dim, dtype)
    strategy = AllReduceStrategy(strategy)
    if strategy == AllReduceStrategy.AUTO:
        strategy = AllReduceStrategy.ONESHOT if choose_strategy(tp_size, num_tokens, hidden_dim, dtype) == \
            "oneshot" else AllReduceStrategy.TWOSHOT
    if strategy not in (AllReduceStrategy.ONESHOT, AllReduceStrategy.MIN_LATENCY, AllReduceStrategy.TWOSHOT):
        raise ValueError(f"strategy must be AUTO, ONESHOT or TWOSHOT, got {strategy.name}")
    return _buffer_bytes(tp_size, num_tokens, hidden_dim, _element_size(dtype), strategy == AllReduceStrategy.TWOSHOT)


@functools.lru_cache(maxsize=1024)
def _buffer_bytes(tp_size: int, num_tokens: int, hidden_dim: int, elem: int, two_shot: bool) -> int:
    """``get_required_buffer_size_bytes`` without the checks (cached: it runs on every call's path)."""
    if two_shot:
        data = math.ceil(num_tokens / tp_size) * tp_size * (2 * hidden_dim * elem + 16)
    else:
        data = tp_size * num_tokens * hidden_dim * elem
    return HEADER_BYTES_PER_RANK * tp_size + data


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def buffer_size_sufficient(buffer_bytes: int, tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype,
                           strategy: AllReduceStrategy = AllReduceStrategy.AUTO) -> bool:
    """Whether a Lamport buffer of ``buffer_bytes`` holds ``num_tokens x hidden_dim`` on ``tp_size`` ranks."""
    return get_required_buffer_size_bytes(tp_size, num_tokens, hidden_dim, dtype, strategy) <= buffer_bytes


class LamportWorkspace:
    """One rank's Lamport buffers (``NUM_LAMPORT_BUFFERS`` of ``buffer_size_bytes``) and its peers' mappings.

    Collective: every rank of ``group`` constructs it, grows it and destroys it at the same call. The
    workspace is not bound to a problem size: any size for which ``is_buffer_size_sufficient`` holds runs
    on it, and ``allreduce`` grows it (in ``GROWTH_BYTES`` steps) when a larger one comes.

    Args:
        group: the process group (None: default); its ranks must share one host.
        max_num_tokens, hidden_dim, dtype: the largest problem expected; the buffer fits its one-shot size
            at the one-shot threshold and its two-shot size (or ``buffer_size_in_bytes`` when given).
        buffer_size_in_bytes: bytes per Lamport buffer, rounded up to ``GROWTH_BYTES``.
        timeout_s: seconds a kernel waits on a peer before it records an error and gives up.
        memory: how the ranks map each other's buffers: ``"cuda_ipc"`` (cudaIpc handles) or ``"vmm"`` (CUDA
            virtual memory, ``cuMem*``, shared as file descriptors over Unix sockets).
    """
    NUM_LAMPORT_BUFFERS = NUM_LAMPORT_BUFFERS

    def __init__(self, group=None, max_num_tokens: Optional[int] = None, hidden_dim: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, buffer_size_in_bytes: Optional[int] = None,
                 timeout_s: float = 30.0, memory: str = "cuda_ipc"):
        if memory not in ("cuda_ipc", "vmm"):
            raise ValueError(f"memory must be 'cuda_ipc' or 'vmm', got {memory!r}")
        self.memory = memory
        if not kernels_available():
            raise NotImplementedError("LamportWorkspace needs moe_a2a._C built with the all-reduce kernels "
                               "(a CUDA build of torch and nvcc)")
        if not torch.cuda.is_available():
            raise RuntimeError("LamportWorkspace needs a CUDA device")
        if not (timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world_size > MAX_NVL_PEERS:
            raise ValueError(f"the kernels serve at most {MAX_NVL_PEERS} ranks, the group has {self.world_size}")
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32 (the sentinel is its -0.0), got {dtype!r}")
        if buffer_size_in_bytes is None:
            if max_num_tokens is None or hidden_dim is None:
                raise ValueError("give max_num_tokens and hidden_dim, or buffer_size_in_bytes")
            buffer_size_in_bytes = self.size_for(self.world_size, max_num_tokens, hidden_dim, dtype)
        elif isinstance(buffer_size_in_bytes, bool) or not isinstance(buffer_size_in_bytes, int) or \
                buffer_size_in_bytes <= 0:
            raise ValueError(f"buffer_size_in_bytes must be a positive int, got {buffer_size_in_bytes!r}")
        self.timeout_s = float(timeout_s)
        self.element_size = _element_size(dtype)
        self._barrier("create")  # a rank creating one alone raises here, not in the exchanges below
        device = torch.cuda.current_device()
        self.device = torch.device("cuda", device)  # the buffers' GPU (syncs wait for it, not the current one)
        props = torch.cuda.get_device_properties(device)
        me = (socket.gethostname(), str(getattr(props, "uuid", device)))
        everyone = self._gather(me)
        hosts = sorted({h for h, _ in everyone})
        if len(hosts) != 1:
            raise RuntimeError(f"LamportWorkspace needs every rank on one host (CUDA IPC), got hosts {hosts}")
        #: Ranks whose kernels share this GPU (under MPS): their blocks must all be resident at once, so each
        #: launches at most SMs / ranks_per_gpu blocks (one per SM) by default.
        self.ranks_per_gpu = sum(1 for e in everyone if e == me)
        self.default_blocks = max(1, props.multi_processor_count // self.ranks_per_gpu)
        self._runtime = None
        self._allocate(_round_up(buffer_size_in_bytes, GROWTH_BYTES))

    backend = "cuda_ipc"

    @staticmethod
    def size_for(tp_size: int, max_num_tokens: int, hidden_dim: int, dtype: torch.dtype) -> int:
        """Bytes per buffer for problems up to ``[max_num_tokens, hidden_dim]``: the larger of the one-shot
        size at the one-shot threshold and the two-shot size, and at least ``INITIAL_TOKENS x INITIAL_HIDDEN``."""
        elem = _element_size(dtype)
        oneshot_tokens = max(1, min(max_num_tokens, ONESHOT_MAX_BYTES // (tp_size * hidden_dim * elem)))
        need = max(get_required_buffer_size_bytes(tp_size, oneshot_tokens, hidden_dim, dtype,
                                                  AllReduceStrategy.ONESHOT),
                   get_required_buffer_size_bytes(tp_size, max_num_tokens, hidden_dim, dtype,
                                                  AllReduceStrategy.TWOSHOT))
        return max(need, INITIAL_TOKENS * INITIAL_HIDDEN * elem)

    get_required_buffer_size_bytes = staticmethod(get_required_buffer_size_bytes)

    def is_buffer_size_sufficient(self, tp_size: int, num_tokens: int, hidden_dim: int, dtype: torch.dtype,
                                  strategy: AllReduceStrategy = AllReduceStrategy.AUTO) -> bool:
        """Whether one buffer holds the problem (``get_required_buffer_size_bytes`` <= ``buffer_size_bytes``)."""
        return buffer_size_sufficient(self.buffer_size_bytes, tp_size, num_tokens, hidden_dim, dtype, strategy)

    @property
    def buffer_size_bytes(self) -> int:
        return self._buffer_size_bytes

    def _gather(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _allocate(self, buffer_bytes: int) -> None:
        self._runtime = None
        if self.memory == "vmm":
            self._allocate_vmm(buffer_bytes)
        else:
            self._runtime = _C.AllReduceWorkspace(self.rank, self.world_size, buffer_bytes, self.element_size,
                                                  self.timeout_s, False)
            self._runtime.connect(self._gather(self._runtime.ipc_handle()))
        self._buffer_size_bytes = buffer_bytes

    def _allocate_vmm(self, buffer_bytes: int) -> None:
        """The buffers in CUDA virtual memory, every rank's mapped here through its file descriptor. After each
        step (allocate and export; share and map) the ranks compare notes, so where one rank fails every rank
        raises the same RuntimeError ("CUDA virtual memory is unavailable ...") and can fall back together."""
        def agree(step: str, why: str) -> None:
            failed = [(r, w) for r, w in enumerate(self._gather(why)) if w]
            if failed:
                if self._runtime is not None:
                    self._runtime.destroy()
                    self._runtime = None
                raise RuntimeError(f"LamportWorkspace: CUDA virtual memory is unavailable: rank {failed[0][0]} "
                                   f"could not {step}: {failed[0][1]}")

        fd, why = -1, ""
        try:
            self._runtime = _C.AllReduceWorkspace(self.rank, self.world_size, buffer_bytes, self.element_size,
                                                  self.timeout_s, True)
            fd = self._runtime.export_fd()
        except RuntimeError as e:
            why = str(e)
        try:
            agree("allocate and export its buffers", why)
            try:
                self._runtime.connect_fds(share_fds(fd, self.group or dist.group.WORLD, self.timeout_s))
            except (RuntimeError, OSError) as e:
                why = str(e)
        finally:
            if fd >= 0:
                os.close(fd)
        agree("map its peers' buffers", why)

    def _barrier(self, why: str) -> None:
        """Meet every rank, each with the deadline, so a rank left alone (its peers passed other shapes and did
        not ``why``) raises instead of waiting for the process group's timeout."""
        waits.barrier(self.group, self.timeout_s, f"LamportWorkspace.{why} (every rank must {why}: do all ranks "
                      "pass the same shape?)", "AllReduce(timeout_s=...)")

    def grow(self, required_bytes: int) -> None:
        """Reallocate (collectively) to hold ``required_bytes`` per buffer, rounded up to ``GROWTH_BYTES``."""
        self.check()
        torch.cuda.synchronize(self.device)
        self._barrier("grow")  # no peer still runs a kernel on the old buffers
        self._runtime.destroy()
        self._allocate(_round_up(required_bytes, GROWTH_BYTES))

    def check(self) -> None:
        """Raise the error a kernel recorded (a peer timed out or sent a different shape), if any."""
        if self._runtime is None:
            raise RuntimeError("the LamportWorkspace was destroyed")
        err = self._runtime.error()
        if err:
            raise RuntimeError(f"moe_a2a all-reduce: {err}; the workspace cannot be used again")

    def destroy(self) -> None:
        """Free the buffers (after every kernel on them finished). Collective."""
        if self._runtime is not None:
            torch.cuda.synchronize(self.device)
            self._barrier("destroy")
            self._runtime.destroy()
            self._runtime = None

    def allreduce(self, x: torch.Tensor, op: AllReduceFusionOp, bias, residual, norm_weight, scale, eps: float,
                  two_shot: bool, num_blocks: int = 0):
        """Launch on the current stream; ``x`` is ``[num_tokens, hidden]``, the rest as ``AllReduceParams``.
        Returns the outputs in ``AllReduce.forward``'s order. Checked by the caller (``check_params``)."""
        self.check()
        if x.element_size() != self.element_size:
            raise ValueError(f"this workspace serves {self.element_size}-byte elements, got {x.dtype}")
        tokens, hidden = x.shape
        need = _buffer_bytes(self.world_size, tokens, hidden, self.element_size, bool(two_shot))
        if need > self._buffer_size_bytes:
            self.grow(need)
        x = _aligned(x)
        norm = op in NORM_OPS
        out_norm = torch.empty_like(x) if op != AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8 else None
        residual_out = torch.empty_like(x) if norm else None
        quant = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if op in FP8_OPS else None
        if not num_blocks:
            num_blocks = min(tokens, self.default_blocks)
        if norm and residual.shape != x.shape:
            residual = residual.reshape(x.shape)
        self._runtime.allreduce(x, _aligned(bias), _aligned(residual) if norm else None,
                                _aligned(norm_weight) if norm else None,
                                scale.reshape(1).float() if quant is not None else None, float(eps), norm,
                                two_shot, int(num_blocks), out_norm, residual_out, quant)
        if op == AllReduceFusionOp.NONE:
            return (out_norm,)
        if op == AllReduceFusionOp.RESIDUAL_RMS_NORM:
            return out_norm, residual_out
        if op == AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8:
            return quant, residual_out
        return out_norm, quant, residual_out


    def mixed(self, x: torch.Tensor, send_first, send_rows: int, src_block, out_blocks: int,
              num_blocks: int = 0) -> torch.Tensor:
        """The mixed TP x DP one-shot on the current stream (``moe_a2a.comm.mixed``'s fused mode).

        ``x`` ``[rows, hidden]`` float16/bfloat16: rank ``p`` receives rows ``send_first[p]`` to
        ``send_first[p] + send_rows`` of it; returns ``[out_blocks * send_rows, hidden]`` whose block ``b`` is the
        sum, in rank order (float32 accumulation), of what the ranks ``s`` with ``src_block[s] == b`` sent here.
        Every rank calls it with the same ``send_rows``, ``hidden`` and dtype; grows the workspace (collectively)
        when the message needs it."""
        self.check()
        if x.element_size() != self.element_size:
            raise ValueError(f"this workspace serves {self.element_size}-byte elements, got {x.dtype}")
        need = mixed_buffer_bytes(self.world_size, send_rows, x.shape[1], x.dtype)
        if need > self._buffer_size_bytes:
            self.grow(need)
        out = torch.empty(out_blocks * send_rows, x.shape[1], dtype=x.dtype, device=x.device)
        self._runtime.mixed(_aligned(x), list(send_first), int(send_rows), list(src_block), int(out_blocks),
                            int(num_blocks or min(out_blocks * send_rows, self.default_blocks)), out)
        return out


    def mixed_two_shot(self, x: torch.Tensor, send_first, own_rows, scatter_src, gather_dst, out_first,
                       out_rows: int, num_blocks: int = 0) -> torch.Tensor:
        """The mixed TP x DP two-shot on the current stream (``moe_a2a.comm.mixed``'s bytes-saving fused mode).

        Per owner rank ``p`` (lists of one entry per rank): ``p`` sums rows ``send_first[p]`` to
        ``send_first[p] + own_rows[p]`` of ``x`` ``[rows, hidden]`` over the ranks in the bit mask
        ``scatter_src[p]`` (rank order, float32 accumulation) and sends the sum to the ranks in ``gather_dst[p]``,
        which store it at row ``out_first[p]`` of the returned ``[out_rows, hidden]``. Every rank passes the same
        lists; grows the workspace (collectively) when the message needs it."""
        self.check()
        if x.element_size() != self.element_size:
            raise ValueError(f"this workspace serves {self.element_size}-byte elements, got {x.dtype}")
        need = mixed_buffer_bytes(self.world_size, max(own_rows), x.shape[1], x.dtype, two_shot=True)
        if need > self._buffer_size_bytes:
            self.grow(need)
        out = torch.empty(out_rows, x.shape[1], dtype=x.dtype, device=x.device)
        self._runtime.mixed_two_shot(_aligned(x), list(send_first), list(own_rows), list(scatter_src),
                                     list(gather_dst), list(out_first),
                                     int(num_blocks or min(self.world_size * max(own_rows), self.default_blocks)), out)
        return out


def mixed_buffer_bytes(tp_size: int, send_rows: int, hidden_dim: int, dtype: torch.dtype,
                       two_shot: bool = False) -> int:
    """Bytes one Lamport buffer needs for a mixed call whose messages have ``send_rows x hidden_dim``
    elements: the one-shot's ``tp_size`` slots, or the two-shot's scatter and gather slots."""
    elem = _element_size(dtype)
    return HEADER_BYTES_PER_RANK * tp_size + (2 if two_shot else 1) * tp_size * send_rows * hidden_dim * elem


def _aligned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` contiguous and 16-byte aligned (the kernels load 16 bytes at a time)."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()
