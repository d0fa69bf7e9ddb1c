"""Helix all-to-all: the exchange of partial attention outputs across a context-parallel (CP) group.

Two forms, as in TensorRT-LLM:

* ``alltoall_helix(inputs, group)``: ``inputs`` is ``num_lists * group_size`` tensors; within each list of
  ``group_size`` consecutive tensors (equal shapes and dtypes) entry ``j`` goes to group rank ``j``. For each
  list the result is one tensor ``[group_size, *shape]`` whose row ``j`` came from rank ``j``. Differentiable
  (the backward is the same exchange of the gradients).
* ``HelixAllToAllNative.get(group).alltoall_native(partial_o, softmax_stats)``: the fixed-layout form.
  ``partial_o`` is ``[..., cp_size, kv_lora_rank]`` float16/bfloat16 and ``softmax_stats`` is
  ``[..., cp_size, 2]`` float32; slice ``[..., j, :]`` goes to rank ``j`` and the outputs (same shapes) hold
  in ``[..., j, :]`` what rank ``j`` sent. The exchange runs through a fixed per-rank workspace sized as
  TensorRT-LLM sizes its Helix FIFOs (``get_helix_workspace_size_per_rank``: per peer and channel a FIFO of 4
  entries of 128 KiB plus a 256-byte sender and receiver record; channels from the SM count). This backend
  stages each round's sends in the first half of the FIFO area and what it receives in the second (half a
  peer's FIFO bytes per peer and round); larger messages go in several rounds. The rounds move with
  ``torch.distributed.all_to_all_single``; the workspace's size and API are those a kernel over the same
  memory needs. ``as_torch_strided_tensor`` returns this rank's workspace only
  (not every rank's, as TensorRT-LLM's mapped multi-node memory does).

``group`` is a ProcessGroup, ``None`` (default group) or a mapping-like object with ``cp_group_pg``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .gather_scatter import (all_to_all_single, comm_device, default_timeout_s, exchange_objects,
                             group_rank_size, resolve_group)

HELIX_FIFO_DEPTH = 4                 # entries per (peer, channel) FIFO
HELIX_FIFO_ENTRY_BYTES = 128 * 1024  # bytes per entry
HELIX_FIFO_TOTAL_BYTES = HELIX_FIFO_DEPTH * HELIX_FIFO_ENTRY_BYTES
HELIX_FIFO_INFO_BYTES = 256          # one head/tail record (256-byte aligned); a sender and a receiver one per FIFO
MAX_GROUP_COUNT_PER_BLOCK = 8        # peers one block serves
_ALIGN = 16


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


# ------------------------------------------------------------------------------- alltoall_helix
def _helix_exchange(inputs: List[torch.Tensor], group, rank: int, size: int, step: str,
                    timeout_s: float) -> List[torch.Tensor]:
    num_lists = len(inputs) // size
    device = comm_device(group)
    shapes = [inputs[il * size].shape for il in range(num_lists)]
    dtypes = [inputs[il * size].dtype for il in range(num_lists)]
    if num_lists == 1:  # one list: stack and exchange in its own dtype
        send = torch.stack([t.to(device) for t in inputs])
        recv = torch.empty_like(send)
        all_to_all_single(recv, send, None, None, group, step, timeout_s)
        return [recv.to(inputs[0].device)]
    nbytes = [_aligned(inputs[il * size].numel() * inputs[il * size].element_size()) for il in range(num_lists)]
    per_peer = sum(nbytes)
    send = torch.zeros(size, per_peer, dtype=torch.uint8, device=device)
    for j in range(size):
        off = 0
        for il in range(num_lists):
            b = _bytes(inputs[il * size + j])
            send[j, off:off + b.numel()] = b.to(device)
            off += nbytes[il]
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, None, None, group, step, timeout_s)
    outs, off = [], 0
    for il in range(num_lists):
        n = inputs[il * size].numel() * inputs[il * size].element_size()
        block = recv[:, off:off + n].contiguous()
        out = (block.view(dtypes[il]) if n else torch.empty(size, 0, dtype=dtypes[il], device=device))
        outs.append(out.reshape(size, *shapes[il]).to(inputs[il * size].device))
        off += nbytes[il]
    return outs


class _Helix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *inputs):
        ctx.spec = spec
        group, rank, size, step, timeout_s = spec
        return tuple(_helix_exchange(list(inputs), group, rank, size, step, timeout_s))

    @staticmethod
    def backward(ctx, *grads):
        group, rank, size, step, timeout_s = ctx.spec
        # out[il][j] came from rank j's inputs[il * size + me]: send gradient row j back to rank j.
        rows = [g[j] for g in grads for j in range(size)]
        back = _helix_exchange(rows, group, rank, size, f"{step} backward", timeout_s)
        return (None, *[b[j] for b in back for j in range(size)])


def alltoall_helix(inputs: List[torch.Tensor], group=None, *, check_peers: bool = True,
                   timeout_s: Optional[float] = None) -> List[torch.Tensor]:
    """All-to-all of lists of tensors across ``group`` (see the module docstring).

    Args:
        inputs: ``num_lists * group_size`` tensors; tensors ``il * group_size + j`` (``j`` in the group) share
            one shape and dtype and go to group rank ``j``.
        group: ProcessGroup, None (default group) or a mapping with ``cp_group_pg``.
    Returns:
        ``num_lists`` tensors ``[group_size, *shape]``: row ``j`` of list ``il`` came from rank ``j``. A group of
        one rank returns ``inputs`` unchanged.
    """
    pg = resolve_group(group, "cp_group_pg")
    rank, size = group_rank_size(pg)
    if not isinstance(inputs, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"alltoall_helix: inputs must be a list of tensors, got "
                        f"{type(inputs).__name__}" + ("" if not isinstance(inputs, (list, tuple)) else
                                                      " with non-tensor entries"))
    if size == 1:
        return list(inputs)
    if len(inputs) == 0 or len(inputs) % size:
        raise ValueError(f"alltoall_helix: inputs has {len(inputs)} tensors, expected a positive multiple of "
                         f"the group size {size}")
    metas = []
    for il in range(len(inputs) // size):
        ref = inputs[il * size]
        for j in range(1, size):
            t = inputs[il * size + j]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(f"alltoall_helix: inputs[{il * size + j}] is {list(t.shape)} {t.dtype}, but "
                                 f"list {il} starts with {list(ref.shape)} {ref.dtype}; every tensor of a list "
                                 f"must have the same shape and dtype")
        metas.append((tuple(ref.shape), str(ref.dtype)))
    timeout_s = default_timeout_s(timeout_s)
    if check_peers:
        peers = exchange_objects(metas, pg, "alltoall_helix shape exchange", timeout_s)
        for peer, m in enumerate(peers):
            if m != peers[0]:
                raise ValueError(f"alltoall_helix: rank {peer} passes lists {m}, rank 0 passes {peers[0]} "
                                 f"((shape, dtype) per list); every rank must pass the same")
    spec = (pg, rank, size, "alltoall_helix", timeout_s)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return list(_Helix.apply(spec, *inputs))
    return _helix_exchange(list(inputs), *spec)


# ---------------------------------------------------------------------------- native (workspace)
def helix_max_channel_count(cp_size: int, sm_count: Optional[int] = None) -> int:
    """Channels (parallel FIFOs per peer): a send and a receive block per group of 8 peers on every SM.

    ``sm_count`` defaults to the current CUDA device's, or 1 without CUDA.
    """
    if sm_count is None:
        sm_count = (torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
                    if torch.cuda.is_available() else 1)
    blocks_per_channel = 2 * -(-cp_size // MAX_GROUP_COUNT_PER_BLOCK)
    return max(sm_count // blocks_per_channel, 1)


def get_helix_workspace_size_per_rank(cp_size: int, num_channels: Optional[int] = None,
                                      fifo_bytes: int = HELIX_FIFO_TOTAL_BYTES) -> int:
    """Bytes of workspace each rank needs: per peer and channel a FIFO and two 256-byte records."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an int >= 1, got {cp_size!r}")
    if fifo_bytes < 2 * _ALIGN or fifo_bytes % (2 * _ALIGN):
        raise ValueError(f"fifo_bytes must be a positive multiple of {2 * _ALIGN}, got {fifo_bytes}")
    channels = helix_max_channel_count(cp_size) if num_channels is None else num_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"num_channels must be an int >= 1, got {channels!r}")
    return cp_size * channels * (fifo_bytes + 2 * HELIX_FIFO_INFO_BYTES)


class HelixWorkspace:
    """One rank's Helix workspace: ``[FIFOs: cp_size x channels x fifo_bytes | records]``.

    This backend stages through the FIFO area: its first half holds what a round sends (``slot_bytes`` per
    peer, half of a peer's FIFO bytes), its second half what the round receives.
    """

    def __init__(self, group, num_channels: Optional[int] = None, fifo_bytes: int = HELIX_FIFO_TOTAL_BYTES):
        self.group = group
        self.cp_rank, self.cp_size = group_rank_size(group)
        self.num_channels = helix_max_channel_count(self.cp_size) if num_channels is None else int(num_channels)
        self.fifo_bytes = int(fifo_bytes)
        self.size_bytes = get_helix_workspace_size_per_rank(self.cp_size, self.num_channels, self.fifo_bytes)
        self.fifo_area = self.cp_size * self.num_channels * self.fifo_bytes
        self.slot_bytes = self.num_channels * self.fifo_bytes // 2  # per peer, per direction, per round
        self.buffer = torch.empty(self.size_bytes, dtype=torch.uint8, device=comm_device(group))

    def as_torch_strided_tensor(self, dtype: torch.dtype) -> torch.Tensor:
        """This rank's workspace viewed as a 1-d tensor of ``dtype`` (its size is a multiple of 64 bytes)."""
        return self.buffer.view(dtype)

    def send_area(self) -> torch.Tensor:
        """``cp_size * slot_bytes`` uint8: a round's pieces for every peer, back to back."""
        return self.buffer[:self.fifo_area // 2]

    def recv_area(self) -> torch.Tensor:
        """``cp_size * slot_bytes`` uint8: a round's pieces from every peer, back to back."""
        return self.buffer[self.fifo_area // 2:self.fifo_area]

    def records(self) -> torch.Tensor:
        return self.buffer[self.fifo_area:]


def initialize_helix_workspace(workspace_tensor: torch.Tensor, cp_rank: int, cp_size: int,
                               num_channels: Optional[int] = None,
                               fifo_bytes: int = HELIX_FIFO_TOTAL_BYTES) -> None:
    """Clear the head/tail records of this rank's workspace (the FIFO bytes need no initialization).

    ``num_channels``/``fifo_bytes`` must be those the workspace was sized with (same defaults).
    """
    raw = workspace_tensor.view(torch.uint8).view(-1)
    channels = helix_max_channel_count(cp_size) if num_channels is None else num_channels
    size = get_helix_workspace_size_per_rank(cp_size, channels, fifo_bytes)
    if not 0 <= cp_rank < cp_size or raw.numel() != size:
        raise ValueError(f"workspace of {raw.numel()} bytes with cp_rank {cp_rank} does not fit cp_size {cp_size} "
                         f"and {channels} channel(s): expected {size} bytes and 0 <= cp_rank < cp_size")
    raw[cp_size * channels * fifo_bytes:].zero_()


class HelixAllToAllNative:
    """Helix all-to-all over a per-group workspace; get one with ``HelixAllToAllNative.get(group)``."""

    _cache: Dict[tuple, "HelixAllToAllNative"] = {}  # (group, num_channels, fifo_bytes) -> instance

    def __init__(self, group, workspace: HelixWorkspace, workspace_tensor: torch.Tensor):
        """Private: use ``get()``."""
        self.group = group
        self.workspace = workspace
        self.workspace_tensor = workspace_tensor
        self.cp_rank, self.cp_size = workspace.cp_rank, workspace.cp_size

    @staticmethod
    def get(group=None, num_channels: Optional[int] = None,
            fifo_bytes: int = HELIX_FIFO_TOTAL_BYTES) -> "HelixAllToAllNative":
        """The cached instance for ``group`` (ProcessGroup, None or a mapping with ``cp_group_pg``).

        ``num_channels`` (default: from the SM count) and ``fifo_bytes`` size the workspace. The first call on
        a group is collective (every rank of the group must make it).
        """
        pg = resolve_group(group, "cp_group_pg")
        key = (pg, num_channels, int(fifo_bytes))  # the group itself: an id could be reused after destruction
        if key not in HelixAllToAllNative._cache:
            ws = HelixWorkspace(pg, num_channels, fifo_bytes)
            tensor = ws.as_torch_strided_tensor(torch.uint64)
            initialize_helix_workspace(tensor, ws.cp_rank, ws.cp_size, ws.num_channels, ws.fifo_bytes)
            if ws.cp_size > 1:
                dist.barrier(group=pg)  # every rank's workspace exists before the first exchange
            HelixAllToAllNative._cache[key] = HelixAllToAllNative(pg, ws, tensor)
        return HelixAllToAllNative._cache[key]

    @staticmethod
    def clear_cache() -> None:
        """Drop every cached instance (their workspaces are freed when no longer referenced)."""
        HelixAllToAllNative._cache.clear()

    def _check(self, partial_o: torch.Tensor, softmax_stats: torch.Tensor) -> None:
        cp = self.cp_size
        for name, t in (("partial_o", partial_o), ("softmax_stats", softmax_stats)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if partial_o.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"partial_o must be float16 or bfloat16, got {partial_o.dtype}")
        if softmax_stats.dtype != torch.float32:
            raise TypeError(f"softmax_stats must be float32, got {softmax_stats.dtype}")
        if partial_o.dim() < 2 or partial_o.shape[-2] != cp:
            raise ValueError(f"partial_o must be [..., cp_size={cp}, kv_lora_rank], got {list(partial_o.shape)}")
        want = [*partial_o.shape[:-2], cp, 2]
        if list(softmax_stats.shape) != want:
            raise ValueError(f"softmax_stats must be {want} ([..., cp_size, 2] with partial_o's leading dims), "
                             f"got {list(softmax_stats.shape)}")
        if softmax_stats.device != partial_o.device:
            raise ValueError(f"softmax_stats is on {softmax_stats.device}, partial_o on {partial_o.device}")

    def alltoall_native(self, partial_o: torch.Tensor, softmax_stats: torch.Tensor, *, check_peers: bool = True,
                        timeout_s: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exchange ``[..., j, :]`` slices with rank ``j``.

        Args:
            partial_o: ``[..., cp_size, kv_lora_rank]`` float16/bfloat16.
            softmax_stats: ``[..., cp_size, 2]`` float32.
        Returns:
            ``(partial_o_out, softmax_stats_out)``, same shapes and dtypes; ``[..., j, :]`` came from rank ``j``.
        """
        self._check(partial_o, softmax_stats)
        timeout_s = default_timeout_s(timeout_s)
        if self.cp_size == 1:
            return partial_o.clone(), softmax_stats.clone()
        if check_peers:
            mine = (tuple(partial_o.shape), str(partial_o.dtype))
            peers = exchange_objects(mine, self.group, "alltoall_native shape exchange", timeout_s)
            for peer, m in enumerate(peers):
                if m != peers[0]:
                    raise ValueError(f"alltoall_native: rank {peer} passes partial_o {m}, rank 0 passes "
                                     f"{peers[0]}; every rank must pass the same shape and dtype")
        cp, ws = self.cp_size, self.workspace
        device = ws.buffer.device
        # One message per peer j: partial_o[..., j, :] then softmax_stats[..., j, :] (both contiguous).
        po = partial_o.movedim(-2, 0).contiguous().to(device)    # [cp, ..., kv]
        st = softmax_stats.movedim(-2, 0).contiguous().to(device)  # [cp, ..., 2]
        po_bytes = po[0].numel() * po.element_size()
        msg = torch.cat([po.view(cp, -1).view(torch.uint8).view(cp, -1) if po_bytes else
                         torch.empty(cp, 0, dtype=torch.uint8, device=device),
                         st.view(cp, -1).view(torch.uint8).view(cp, -1)], dim=1)
        out = torch.empty_like(msg)
        send, recv, slot = ws.send_area(), ws.recv_area(), ws.slot_bytes
        for start in range(0, msg.shape[1], slot):  # a round per slot-full of every peer's message
            n = min(slot, msg.shape[1] - start)
            # This round's pieces packed back to back, so a short last round moves only what it holds.
            s_round = send[:cp * n].view(cp, n)
            r_round = recv[:cp * n].view(cp, n)
            s_round.copy_(msg[:, start:start + n])
            all_to_all_single(r_round, s_round, None, None, self.group,
                              f"alltoall_native round {start // slot}", timeout_s)
            out[:, start:start + n].copy_(r_round)
        po_out = out[:, :po_bytes].contiguous().view(po.dtype).view(po.shape) if po_bytes else torch.empty_like(po)
        st_out = out[:, po_bytes:].contiguous().view(torch.float32).view(st.shape)
        return (po_out.movedim(0, -2).contiguous().to(partial_o.device),
                st_out.movedim(0, -2).contiguous().to(softmax_stats.device))
