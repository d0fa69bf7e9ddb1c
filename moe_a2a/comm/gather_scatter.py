"""All-gather and reduce-scatter along any dimension, with uneven ``sizes`` and lists of tensors.

TensorRT-LLM's ``allgather`` / ``reducescatter`` / ``cp_allgather`` semantics, on ``torch.distributed``
(gloo for CPU tensors, NCCL for CUDA tensors), and on the project's CUDA IPC kernels for CUDA tensors on a
gloo group (ranks sharing a GPU, where NCCL cannot run; one tensor at a time, float16/bfloat16/float32,
slices of a multiple of 16 bytes, messages up to the one-shot's buffer limit; the rest through host memory):

* ``allgather(x, group, dim=-1, sizes=None)``: the tensors of the group's ranks concatenated along ``dim``
  in group-rank order. Without ``sizes`` every rank passes the same shape and
  ``out.shape[dim] == x.shape[dim] * group_size``; with ``sizes`` (one int per rank) rank ``i`` passes
  ``x.shape[dim] == sizes[i]``, shapes may differ only along ``dim``, and ``out.shape[dim] == sum(sizes)``.
* ``reducescatter(x, group, dim=-1, sizes=None)``: the sum over ranks of ``x``, split along ``dim`` into
  ``group_size`` equal chunks (or chunks of ``sizes``), rank ``i`` keeping chunk ``i``. ``x.shape[dim]``
  must be divisible by the group size (or equal ``sum(sizes)``).
* A list of tensors (``None`` entries allowed) is handled in one collective; ``None`` entries come back as
  ``None`` at the same positions (every rank must have ``None`` at the same positions).
* A group of one rank returns the input unchanged.

The sum is taken in group-rank order (float32 accumulation for float16/bfloat16), so the result is the
same on every backend and every run. Both functions are differentiable: the backward of an all-gather is a
reduce-scatter of the gradient with the same ``dim`` and ``sizes``, and the reverse; every rank must run the
backward (the collectives line up).

Validation: bad arguments raise ``TypeError``/``ValueError`` before any communication. With
``check_peers=True`` (default) the ranks then exchange their shapes, dtypes and ``sizes`` (one small
collective) and every rank raises the same ``ValueError`` naming the rank that disagrees, instead of the
backend failing or hanging on mismatched buffers. ``check_peers=False`` skips that exchange (one fewer
round trip); mismatched inputs are then the caller's responsibility. On CPU (gloo) groups every wait has a
deadline (``timeout_s``, default ``MOE_A2A_TIMEOUT_S`` or 60 s) and raises ``TimeoutError`` naming the rank
and the step; NCCL groups rely on the process group's own timeout (a CPU-side wait would stall the stream).

``group`` is a ``torch.distributed`` process group, ``None`` for the default group, or a mapping-like
object with a ``tp_group_pg`` (``allgather``/``reducescatter``) or ``cp_group_pg`` (``cp_allgather``)
process group attribute, as TensorRT-LLM's ``Mapping`` has.
"""
from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

TensorOrList = Union[torch.Tensor, List[Optional[torch.Tensor]]]

_ALIGN = 16  # byte alignment of each tensor inside a packed message (so dtype views stay legal)


# ------------------------------------------------------------------------------------ group helpers
def resolve_group(group, attr: str = "tp_group_pg"):
    """A process group from ``group``: a ProcessGroup, None (default group) or an object with ``attr``."""
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, (list, tuple)) and list(group) == list(range(dist.get_world_size())):
        return dist.group.WORLD  # a list of ranks (TensorRT-LLM's form) is accepted for the whole world
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on ranks outside it
        raise ValueError(f"global rank {dist.get_rank()} is not a member of the given process group")
    pg = getattr(group, attr, None)
    if isinstance(pg, dist.ProcessGroup):
        return pg
    raise TypeError(f"group must be a torch.distributed.ProcessGroup, None (the default group), the list of all "
                    f"ranks, or an object with a ProcessGroup attribute '{attr}', got {group!r}; for a subset of "
                    f"ranks pass the group from dist.new_group(ranks)")


def group_rank_size(group) -> tuple:
    """(rank in ``group``, size of ``group``); ValueError if this process is not a member."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"global rank {dist.get_rank()} is not a member of the given process group "
                         f"(ranks {dist.get_process_group_ranks(group)})")
    return rank, dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where ``group``'s collectives run: the current CUDA device for NCCL groups, else the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_timeout_s(timeout_s: Optional[float]) -> float:
    value = float(timeout_s if timeout_s is not None else os.environ.get("MOE_A2A_TIMEOUT_S", 60.0))
    if value <= 0:
        raise ValueError(f"timeout_s must be positive, got {value}")
    return value


def wait(work, group, step: str, timeout_s: float) -> None:
    """Wait for ``work``; on CPU groups raise TimeoutError naming the rank and step after ``timeout_s``."""
    if work is None:
        return
    if comm_device(group).type == "cuda":
        work.wait()  # stream-ordered; the NCCL watchdog enforces the process group's timeout
        return
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        who = f"rank {dist.get_rank()} (rank {rank} of a group of {size})"
        if "timed out" in str(e).lower():
            raise TimeoutError(f"{who}: {step} did not complete within {timeout_s:g} s; a peer did not "
                               f"join") from e
        raise RuntimeError(f"{who}: {step} failed: {e}") from e


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group, step: str, timeout_s: float) -> None:
    """``out`` (``[size * inp.shape[0], *inp.shape[1:]]``, any view of that) = inputs in rank order."""
    out = out.view(-1, *inp.shape[1:]) if inp.dim() else out.view(-1)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    wait(fn(out, inp, group=group, async_op=True), group, step, timeout_s)


def all_to_all_single(out, inp, out_splits, in_splits, group, step: str, timeout_s: float) -> None:
    work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)
    wait(work, group, step, timeout_s)


def exchange_objects(obj, group, step: str, timeout_s: float) -> list:
    """``obj`` of every rank of ``group`` (picklable), with a deadline on each wait."""
    _, size = group_rank_size(group)
    device = comm_device(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    lengths = torch.empty(size, dtype=torch.int64, device=device)
    all_gather_single(lengths, torch.tensor([payload.numel()], device=device), group, step, timeout_s)
    lengths = lengths.tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload.to(device)
    gathered = torch.empty(size, max(lengths), dtype=torch.uint8, device=device)
    all_gather_single(gathered, padded, group, step, timeout_s)
    gathered = gathered.cpu()
    return [pickle.loads(gathered[r, :n].numpy().tobytes()) for r, n in enumerate(lengths)]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_in_order(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` left to right (float32 accumulation for half types), cast to ``dtype``."""
    acc = parts[0].to(accumulate_dtype(dtype), copy=True)
    for p in parts[1:]:
        acc += p
    return acc.to(dtype)


# ------------------------------------------------------------------------------------- validation
def _normalize(input, name: str):
    """(is_list, entries) with entries a list of Tensor-or-None; TypeError on anything else."""
    if isinstance(input, torch.Tensor):
        return False, [input]
    if isinstance(input, (list, tuple)):
        for i, t in enumerate(input):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: list entry {i} must be a torch.Tensor or None, got {type(t).__name__}")
        return True, list(input)
    raise TypeError(f"{name}: input must be a torch.Tensor or a list of tensors/None, got {type(input).__name__}")


def _check_dim(name: str, t: torch.Tensor, dim: int, where: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}: dim must be an int, got {type(dim).__name__}")
    if t.dim() == 0:
        raise ValueError(f"{name}: {where} is a 0-d tensor; it needs a dimension to {name} along")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"{name}: dim {dim} is out of range for {where} of shape {list(t.shape)}")
    return dim % t.dim()


def _check_sizes(name: str, sizes, group_size: int) -> Optional[List[int]]:
    if sizes is None:
        return None
    if not isinstance(sizes, (list, tuple)) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                   for s in sizes):
        raise ValueError(f"{name}: sizes must be a list of non-negative ints, got {sizes!r}")
    if len(sizes) != group_size:
        raise ValueError(f"{name}: sizes has {len(sizes)} entries, expected one per rank of the group "
                         f"({group_size})")
    return [int(s) for s in sizes]


def _meta(entries, dims, sizes, is_list):
    """What every rank must agree on, in a form that compares and prints well."""
    return (is_list, len(entries), sizes,
            [None if t is None else (str(t.dtype), d, tuple(t.shape)) for t, d in zip(entries, dims)])


def _check_peer_metas(name: str, metas: list, gather: bool) -> None:
    """Raise the same ValueError on every rank if any rank's input does not fit rank 0's."""
    first = metas[0]
    for peer, other in enumerate(metas[1:], start=1):
        if other[:3] != first[:3]:
            what = ("list length" if other[1] != first[1] else
                    "sizes" if other[2] != first[2] else "kind of input (tensor or list)")
            raise ValueError(f"{name}: ranks disagree on the {what}: rank {peer} passes {other[:3]}, "
                             f"rank 0 passes {first[:3]} (is_list, length, sizes)")
        for i, (a, b) in enumerate(zip(first[3], other[3])):
            where = f"list entry {i}" if first[0] else "the input"
            if (a is None) != (b is None):
                none_rank, tensor_rank = (peer, 0) if b is None else (0, peer)
                raise ValueError(f"{name}: {where} is None on rank {none_rank} but a tensor on rank "
                                 f"{tensor_rank}; None entries must match across ranks")
            if a is None:
                continue
            (dt_a, d_a, s_a), (dt_b, d_b, s_b) = a, b
            if dt_a != dt_b:
                raise ValueError(f"{name}: {where} has dtype {dt_b} on rank {peer} but {dt_a} on rank 0")
            along_dim_free = gather and first[2] is not None  # all-gather with sizes: shapes differ along dim
            same = (len(s_a) == len(s_b) and d_a == d_b and
                    all(x == y for k, (x, y) in enumerate(zip(s_a, s_b)) if not (along_dim_free and k == d_a)))
            if not same:
                rule = "except along dim (sizes given)" if along_dim_free else "exactly (sizes not given)"
                raise ValueError(f"{name}: {where} has shape {list(s_b)} on rank {peer} but {list(s_a)} on rank "
                                 f"0; shapes must match {rule}")


def _prepare(name: str, input, group, dim, sizes, gather: bool, check_peers: bool, timeout_s):
    """Validate locally, then (optionally) across ranks. Returns what the exchange needs."""
    is_list, entries = _normalize(input, name)
    pg = group
    rank, size = group_rank_size(pg)
    sizes = _check_sizes(name, sizes, size)
    dims = []
    for i, t in enumerate(entries):
        where = f"list entry {i}" if is_list else "input"
        if t is None:
            dims.append(None)
            continue
        d = _check_dim(name, t, dim, where)
        dims.append(d)
        n = t.shape[d]
        if gather and sizes is not None and n != sizes[rank]:
            raise ValueError(f"{name}: {where} has size {n} along dim {dim}, but sizes[{rank}] (this rank) "
                             f"is {sizes[rank]}")
        if not gather and sizes is not None and n != sum(sizes):
            raise ValueError(f"{name}: {where} has size {n} along dim {dim}, expected sum(sizes) = {sum(sizes)}")
        if not gather and sizes is None and n % size:
            raise ValueError(f"{name}: {where} has size {n} along dim {dim}, which is not divisible by the "
                             f"group size {size} (pass sizes for an uneven split)")
        if not gather and (t.dtype == torch.bool or t.is_complex() and t.dtype not in (torch.complex64,
                                                                                       torch.complex128)):
            raise TypeError(f"{name}: {where} has dtype {t.dtype}, which cannot be summed")
    timeout_s = default_timeout_s(timeout_s)
    if size > 1 and check_peers:
        metas = exchange_objects(_meta(entries, dims, sizes, is_list), pg, f"{name} shape exchange", timeout_s)
        _check_peer_metas(name, metas, gather)
    return is_list, entries, dims, sizes, rank, size, timeout_s


def _counts(t: torch.Tensor, d: int, sizes, size: int, gather: bool) -> List[int]:
    """Rows along ``d`` that each rank contributes (all-gather) or receives (reduce-scatter)."""
    if sizes is not None:
        return list(sizes)
    n = t.shape[d]
    return [n] * size if gather else [n // size] * size


# --------------------------------------------------------------------------------- byte packing
def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one slice along dim 0 of ``t`` (already moved to dim 0)."""
    return t.element_size() * int(torch.Size(t.shape[1:]).numel())


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` from the 1-d uint8 ``buf`` (aligned offset), as a view."""
    if buf.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=buf.device)
    return buf.view(dtype).reshape(shape)


# ----------------------------------------------------------------------- kernels over CUDA IPC
# CUDA tensors on a gloo group (ranks sharing a GPU, where NCCL cannot run) use the Lamport one-shot of the
# all-reduce workspace (moe_a2a.comm.workspace) instead of copies through host memory: every rank sends
# its rows (padded to the largest rank's count) to every peer, which keeps each source's rows (all-gather)
# or sums them in rank order with float32 accumulation (reduce-scatter), the same order as the gloo path.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_workspaces: dict = {}  # (group, dtype) -> LamportWorkspace, created collectively at the first call


def _kernel_workspace(moved: List[torch.Tensor], counts: List[List[int]], group):
    """The workspace for this call's kernel path, or None where the torch path serves. Decided from what
    every rank shares (device type, dtype, row shape, counts, backend), so all ranks take the same path."""
    from ..limits import MAX_NVL_PEERS
    from .mixed import FUSED_MAX_BUFFER_BYTES
    from .workspace import LamportWorkspace, kernels_available, mixed_buffer_bytes
    if len(moved) != 1 or comm_device(group).type != "cpu" or not moved[0].is_cuda:
        return None
    m, size = moved[0], dist.get_world_size(group)
    if m.dtype not in _KERNEL_DTYPES or not kernels_available() or size > MAX_NVL_PEERS:
        return None
    hidden = int(torch.Size(m.shape[1:]).numel())
    send_rows = max(counts[0])
    if hidden == 0 or send_rows == 0 or hidden * m.element_size() % 16:
        return None  # the kernels move 16-byte pieces of rows
    if mixed_buffer_bytes(size, send_rows, hidden, m.dtype) > FUSED_MAX_BUFFER_BYTES:
        return None  # a one-shot for small and medium messages
    key = (group, m.dtype)
    if key not in _workspaces:
        _workspaces[key] = LamportWorkspace(group, buffer_size_in_bytes=1, dtype=m.dtype)
    return _workspaces[key]


def release_kernel_workspaces() -> None:
    """Free the kernel path's workspaces (collective: every rank of their groups calls it)."""
    for ws in _workspaces.values():
        ws.destroy()
    _workspaces.clear()


def _kernel_gather(ws, m: torch.Tensor, counts: List[int], rank: int, size: int) -> torch.Tensor:
    """``m`` ``[counts[rank], ...]`` of every rank, concatenated along dim 0."""
    rows, hidden = max(counts), int(torch.Size(m.shape[1:]).numel())
    send = m.reshape(counts[rank], hidden)
    if counts[rank] < rows:
        send = torch.cat([send, send.new_zeros(rows - counts[rank], hidden)])
    out = ws.mixed(send, [0] * size, rows, list(range(size)), size).view(size, rows, hidden)
    if len(set(counts)) > 1:
        out = torch.cat([out[p, :counts[p]] for p in range(size)])
    return out.reshape(sum(counts), *m.shape[1:])


def _kernel_scatter(ws, m: torch.Tensor, counts: List[int], rank: int, size: int) -> torch.Tensor:
    """Rows ``sum(counts[:rank])`` to ``+ counts[rank]`` of the sum of every rank's ``m``."""
    rows, hidden = max(counts), int(torch.Size(m.shape[1:]).numel())
    send = m.reshape(m.shape[0], hidden)
    starts = [sum(counts[:p]) for p in range(size)]
    if starts[-1] + rows > send.shape[0]:  # every rank reads `rows` rows from its start
        send = torch.cat([send, send.new_zeros(starts[-1] + rows - send.shape[0], hidden)])
    out = ws.mixed(send, starts, rows, [0] * size, 1)
    return out[:counts[rank]].reshape(counts[rank], *m.shape[1:])


# ------------------------------------------------------------------------------------ core ops
def _gather_core(tensors: List[torch.Tensor], dims: List[int], counts: List[List[int]], group, rank: int,
                 size: int, step: str, timeout_s: float) -> List[torch.Tensor]:
    """All-gather each tensor along its dim; ``counts[i][p]`` = rows of tensor ``i`` from rank ``p``."""
    moved = [t.movedim(d, 0) for t, d in zip(tensors, dims)]
    ws = _kernel_workspace(moved, counts, group)
    if ws is not None:
        return [_kernel_gather(ws, moved[0], counts[0], rank, size).movedim(0, dims[0]).contiguous()]
    device = comm_device(group)
    if len(moved) == 1 and len(set(counts[0])) == 1:
        # One tensor, equal shapes: gather straight into the output (no packing).
        src = moved[0].contiguous().to(device)
        out = torch.empty(size * src.shape[0], *src.shape[1:], dtype=src.dtype, device=device)
        all_gather_single(out, src, group, step, timeout_s)
        return [out.to(tensors[0].device).movedim(0, dims[0]).contiguous()]
    rows = [_row_bytes(m) for m in moved]
    seg = [[_aligned(c[p] * rb) for p in range(size)] for c, rb in zip(counts, rows)]
    length = [sum(s[p] for s in seg) for p in range(size)]
    width = max(max(length), _ALIGN)
    send = torch.zeros(width, dtype=torch.uint8, device=device)
    off = 0
    for m, s in zip(moved, seg):
        b = _as_bytes(m)
        send[off:off + b.numel()] = b.to(device)
        off += s[rank]
    recv = torch.empty(size, width, dtype=torch.uint8, device=device)
    all_gather_single(recv, send, group, step, timeout_s)
    outs = []
    offsets = [0] * size
    for i, (m, c, rb) in enumerate(zip(moved, counts, rows)):
        pieces = []
        for p in range(size):
            buf = recv[p, offsets[p]:offsets[p] + c[p] * rb]
            pieces.append(_from_bytes(buf, m.dtype, (c[p], *m.shape[1:])))
            offsets[p] += seg[i][p]
        outs.append(torch.cat(pieces).to(tensors[i].device).movedim(0, dims[i]).contiguous())
    return outs


def _scatter_core(tensors: List[torch.Tensor], dims: List[int], counts: List[List[int]], group, rank: int,
                  size: int, step: str, timeout_s: float) -> List[torch.Tensor]:
    """Reduce-scatter each tensor along its dim; rank ``p`` keeps ``counts[i][p]`` rows of tensor ``i``."""
    moved = [t.movedim(d, 0) for t, d in zip(tensors, dims)]
    ws = _kernel_workspace(moved, counts, group)
    if ws is not None:
        return [_kernel_scatter(ws, moved[0], counts[0], rank, size).movedim(0, dims[0]).contiguous()]
    device = comm_device(group)
    if len(moved) == 1 and len(set(counts[0])) == 1:
        src = moved[0].contiguous().to(device)
        recv = torch.empty_like(src)
        all_to_all_single(recv, src, None, None, group, step, timeout_s)
        parts = recv.unflatten(0, (size, -1)).unbind(0)
        out = sum_in_order(parts, src.dtype)
        return [out.to(tensors[0].device).movedim(0, dims[0]).contiguous()]
    rows = [_row_bytes(m) for m in moved]
    send_parts, send_splits = [], []
    for p in range(size):
        split = 0
        for m, c, rb in zip(moved, counts, rows):
            start = sum(c[:p])
            b = _as_bytes(m[start:start + c[p]])
            pad = _aligned(b.numel()) - b.numel()
            send_parts += [b.to(device), torch.zeros(pad, dtype=torch.uint8, device=device)]
            split += b.numel() + pad
        send_splits.append(split)
    recv_split = sum(_aligned(c[rank] * rb) for c, rb in zip(counts, rows))
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(recv_split * size, dtype=torch.uint8, device=device)
    all_to_all_single(recv, send, [recv_split] * size, send_splits, group, step, timeout_s)
    outs, off = [], 0
    for m, c, rb, t, d in zip(moved, counts, rows, tensors, dims):
        n = c[rank] * rb
        parts = [_from_bytes(recv[p * recv_split + off:p * recv_split + off + n], m.dtype, (c[rank], *m.shape[1:]))
                 for p in range(size)]
        off += _aligned(n)
        outs.append(sum_in_order(parts, m.dtype).to(t.device).movedim(0, d).contiguous())
    return outs


class _Spec:
    """What the backward pass needs (not a tensor, so autograd leaves it alone)."""

    def __init__(self, group, rank, size, dims, counts, name, timeout_s):
        self.group, self.rank, self.size = group, rank, size
        self.dims, self.counts, self.name, self.timeout_s = dims, counts, name, timeout_s


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, *tensors):
        ctx.spec = spec
        return tuple(_gather_core(list(tensors), spec.dims, spec.counts, spec.group, spec.rank, spec.size,
                                  spec.name, spec.timeout_s))

    @staticmethod
    def backward(ctx, *grads):
        s = ctx.spec  # unused outputs arrive as zeros (autograd materializes them)
        out = _scatter_core(list(grads), s.dims, s.counts, s.group, s.rank, s.size, f"{s.name} backward",
                            s.timeout_s)
        return (None, *out)


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, *tensors):
        ctx.spec = spec
        return tuple(_scatter_core(list(tensors), spec.dims, spec.counts, spec.group, spec.rank, spec.size,
                                   spec.name, spec.timeout_s))

    @staticmethod
    def backward(ctx, *grads):
        s = ctx.spec
        out = _gather_core(list(grads), s.dims, s.counts, s.group, s.rank, s.size, f"{s.name} backward",
                           s.timeout_s)
        return (None, *out)


def _run(name: str, input, group, dim, sizes, gather: bool, check_peers: bool, timeout_s):
    is_list, entries, dims, sizes, rank, size, timeout_s = _prepare(
        name, input, group, dim, sizes, gather, check_peers, timeout_s)
    if size == 1:
        return input
    present = [i for i, t in enumerate(entries) if t is not None]
    if not present:
        return list(entries)
    tensors = [entries[i] for i in present]
    spec = _Spec(group, rank, size, [dims[i] for i in present],
                 [_counts(entries[i], dims[i], sizes, size, gather) for i in present], name, timeout_s)
    fn = _AllGather if gather else _ReduceScatter
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = fn.apply(spec, *tensors)
    else:
        core = _gather_core if gather else _scatter_core
        outs = core(tensors, spec.dims, spec.counts, group, rank, size, name, timeout_s)
    if not is_list:
        return outs[0]
    result = list(entries)
    for i, o in zip(present, outs):
        result[i] = o
    return result


# ------------------------------------------------------------------------------------ public API
def allgather(input: TensorOrList, group=None, dim: int = -1, sizes: Optional[List[int]] = None, *,
              check_peers: bool = True, timeout_s: Optional[float] = None) -> TensorOrList:
    """All-gather ``input`` (a tensor, or a list of tensors/None) along ``dim`` over ``group``.

    Args:
        input: any dtype and device the group's backend handles (CPU with gloo, CUDA with NCCL).
        group: ProcessGroup, None (default group) or a mapping with ``tp_group_pg``.
        dim: dimension to concatenate along (default -1).
        sizes: ``input.shape[dim]`` of every rank, for uneven gathers (default: all equal).
    Returns:
        The gathered tensor (or list, ``None`` entries kept): ``out.shape[dim] = sum(sizes)`` or
        ``input.shape[dim] * group_size``.
    """
    return _run("allgather", input, resolve_group(group, "tp_group_pg"), dim, sizes, True, check_peers, timeout_s)


def cp_allgather(input: TensorOrList, group=None, dim: int = -1, sizes: Optional[List[int]] = None, *,
                 check_peers: bool = True, timeout_s: Optional[float] = None) -> TensorOrList:
    """``allgather`` over the context-parallel group (``group`` or a mapping's ``cp_group_pg``)."""
    return _run("cp_allgather", input, resolve_group(group, "cp_group_pg"), dim, sizes, True, check_peers,
                timeout_s)


def reducescatter(input: TensorOrList, group=None, dim: int = -1, sizes: Optional[List[int]] = None, *,
                  check_peers: bool = True, timeout_s: Optional[float] = None) -> TensorOrList:
    """Sum ``input`` over ``group`` and keep this rank's chunk along ``dim``.

    Args:
        input: a tensor (or list of tensors/None) with ``shape[dim] == sum(sizes)`` or a multiple of the
            group size; numeric dtypes (float16/bfloat16 accumulate in float32).
        group: ProcessGroup, None (default group) or a mapping with ``tp_group_pg``.
        dim: dimension to split along (default -1).
        sizes: rows along ``dim`` each rank keeps (default: equal chunks).
    Returns:
        This rank's chunk of the sum: ``out.shape[dim] = sizes[rank]`` or ``input.shape[dim] // group_size``.
    """
    return _run("reducescatter", input, resolve_group(group, "tp_group_pg"), dim, sizes, False, check_peers,
                timeout_s)
