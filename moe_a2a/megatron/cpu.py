"""Run megatron-core MoE layers on CPU (gloo process groups), for tests, CI and the tiny recipe.

megatron-core's MoE path assumes a GPU in a few places that have nothing to do with the math:

* ``torch.cuda.current_device()`` picks the device of new tensors (router, experts, tensor-parallel
  mappings such as ``gather_from_sequence_parallel_region``);
* the ``alltoall`` dispatcher creates a ``torch.cuda.Stream`` for its device-to-host copies and
  records events on it, and turns its split sizes into numpy arrays only when they are CUDA tensors
  (``all_to_all_single`` rejects the CPU tensors it would otherwise get);
* the RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``) saves and
  restores the CUDA generator;
* the attention softmax builds its default causal mask with ``device="cuda"`` (and megatron-core
  0.19's dispatchers allocate flags that way: inside ``token_dispatcher`` the tensor factories read
  ``device="cuda"`` as the host);
* sequence-parallel gathers and reduce-scatters use collectives gloo lacks (all-gather of unequal
  sizes, reduce-scatter); the context routes them through padded all-gathers and all-reduces;
* megatron-core 0.16.1 leaves ``te_general_gemm`` unbound in ``moe_utils`` when Transformer Engine is
  missing, so the router's gating GEMM raises ``NameError``.

``cpu_context()`` patches exactly these for the duration of a ``with`` block and restores every
patched attribute on exit. By default it does nothing at all when CUDA is available: GPU runs see
megatron unchanged (``enabled=True`` forces it, for CPU runs on a GPU machine). Inside the block ``torch.cuda.current_device()`` returns ``torch.device("cpu")``, streams
and events are no-ops (CPU work is synchronous), and the "device" RNG is a private CPU generator, so
the tracker's fork/restore logic runs as written. Note that random ops inside a tracker fork (e.g.
dropout) still draw from the default CPU generator, because CPU kernels know no other one.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

_lock = threading.Lock()
_depth = 0
_undo: list = []


class _Event:
    """Stand-in for ``torch.cuda.Event``: CPU work is complete when it is recorded."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True


class _Stream:
    """Stand-in for ``torch.cuda.Stream``: every operation runs in order on the host."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()
_rng = torch.Generator(device="cpu")


def _get_rng_state(device=None, *args, **kwargs) -> torch.Tensor:
    return _rng.get_state()


def _set_rng_state(new_state, device=None, *args, **kwargs) -> None:
    _rng.set_state(new_state)


def _manual_seed(seed: int) -> None:
    _rng.manual_seed(int(seed))


@functools.lru_cache(maxsize=8)
def _causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _gather_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """All-gather along dim 0 with per-rank sizes; gloo's all_gather needs equal sizes, so pad."""
    import torch.distributed as dist

    world = group.size()
    if world == 1:
        return input_
    input_ = input_.contiguous()
    sizes = output_split_sizes or [input_.size(0)] * world
    longest = max(sizes)
    padded = torch.nn.functional.pad(input_, (0, 0) * (input_.dim() - 1) + (0, longest - input_.size(0)))
    out = torch.empty((world * longest,) + tuple(input_.shape[1:]), dtype=input_.dtype)
    dist.all_gather_into_tensor(out, padded, group=group)
    return torch.cat([out[r * longest:r * longest + n] for r, n in enumerate(sizes)])


def _reduce_scatter_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """Reduce-scatter along dim 0 (gloo has no reduce_scatter): all-reduce, keep this rank's rows."""
    import torch.distributed as dist

    world = group.size()
    if world == 1:
        return input_
    sizes = input_split_sizes or [input_.size(0) // world] * world
    if sum(sizes) != input_.size(0):
        raise ValueError(f"reduce-scatter split sizes {list(sizes)} do not sum to {input_.size(0)} rows")
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(sizes[:group.rank()])
    return total[start:start + sizes[group.rank()]].clone()


class _HostTorch:
    """``torch`` for one megatron module, with ``device="cuda"`` in tensor factories read as the host.

    megatron-core 0.19's token dispatchers allocate flags with a literal ``device='cuda'``; only the
    factories below are redirected, everything else is ``torch`` itself.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _fn=value, **kwargs):
                device = kwargs.get("device")
                if device is not None and torch.device(device).type == "cuda":
                    kwargs["device"] = "cpu"
                return _fn(*args, **kwargs)
            return factory
        return value


def _current_stream(device=None):
    return _DEFAULT_STREAM


@contextlib.contextmanager
def _stream_ctx(stream=None):
    yield


def _patch(obj, name: str, value) -> None:
    missing = object()
    old = getattr(obj, name, missing)
    _undo.append((obj, name, old, missing))
    setattr(obj, name, value)


def _apply() -> None:
    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: torch.device("cpu"))
    _patch(cuda, "Stream", _Stream)
    _patch(cuda, "Event", _Event)
    _patch(cuda, "current_stream", _current_stream)
    _patch(cuda, "default_stream", _current_stream)
    _patch(cuda, "stream", _stream_ctx)
    _patch(cuda, "synchronize", lambda device=None: None)
    _patch(cuda, "get_rng_state", _get_rng_state)
    _patch(cuda, "set_rng_state", _set_rng_state)
    _patch(cuda, "manual_seed", _manual_seed)
    _patch(cuda, "manual_seed_all", _manual_seed)
    _patch(cuda.random, "get_rng_state", _get_rng_state)
    _patch(cuda.random, "set_rng_state", _set_rng_state)
    # Tensor.record_stream is only meaningful for CUDA caching-allocator blocks.
    _patch(torch.Tensor, "record_stream", lambda self, stream: None)
    try:
        from megatron.core.tensor_parallel import mappings
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # megatron-core not installed: only the torch.cuda patches apply
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    # The default causal mask is built with device="cuda"; build it on the host instead.
    for module in (tutils, fused_softmax):
        if hasattr(module, "get_default_causal_mask"):
            _patch(module, "get_default_causal_mask", _causal_mask)
    _patch(mappings, "_gather_along_first_dim", _gather_first_dim)
    _patch(mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_first_dim)
    _patch(mrandom, "_set_cuda_rng_state", _set_rng_state)
    _patch(mrandom, "_get_cuda_rng_state", _get_rng_state)
    from megatron.core.transformer.moe import token_dispatcher

    # The alltoall dispatcher turns its split sizes into numpy arrays only for CUDA tensors;
    # all_to_all_single rejects the CPU tensors it would otherwise pass on.
    for module in (moe_utils, token_dispatcher):
        if hasattr(module, "maybe_move_tensor_to_cpu"):
            _patch(module, "maybe_move_tensor_to_cpu", _to_host)
    _patch(token_dispatcher, "torch", _HostTorch())
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None)


def _restore() -> None:
    while _undo:
        obj, name, old, missing = _undo.pop()
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def cpu_context(enabled: bool | None = None) -> Iterator[bool]:
    """Make megatron-core's MoE path runnable on CPU tensors inside the block.

    Args:
        enabled: ``None`` (default) patches only when ``torch.cuda.is_available()`` is false;
            ``False`` never patches. ``True`` patches even with CUDA present (useful to run a CPU
            test on a GPU machine); tensors are then still created on CPU.

    Yields:
        ``True`` when the patches are active. Nested uses are reference-counted; the outermost
        exit restores every patched attribute.
    """
    global _depth
    active = (not torch.cuda.is_available()) if enabled is None else bool(enabled)
    if not active:
        yield False
        return
    with _lock:
        if _depth == 0:
            _apply()
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()
