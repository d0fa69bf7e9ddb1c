"""Tensors living in a ``Buffer``'s registered memory, tracked so that none is read after it was overwritten.

Two fast modes hand out views of the buffer instead of fresh tensors: a dispatch with ``recv_x_in_buffer``
returns its received rows in the buffer, and ``get_next_combine_buffer`` returns the area a combine reads
its input from. Both views are overwritten by the buffer's next dispatch, combine or
``get_next_combine_buffer``. Between producing such a view and reading it, a training schedule may run
another operation on the same buffer (another micro-batch's dispatch in an overlap schedule, a second MoE
layer sharing the cached buffer).

The rule, kept by ``moe_a2a.fused_a2a`` and the Megatron dispatcher:

* every operation on a buffer starts with ``begin(buffer)``: each view of that buffer still held is first
  copied out (under autograd when it requires grad, so gradients still reach its producer), then the
  buffer's epoch advances;
* whoever produces a view registers it with ``hold(buffer, view)``, recording the epoch (every held view
  must be claimed: the hold keeps a reference until then);
* whoever reads it asks ``claim(view)`` for the tensor to read: the view itself when its epoch is current,
  its copy when an operation ran in between, and ``RuntimeError`` if the epoch moved without a copy
  (an operation that bypassed ``begin``), never stale rows.

In the usual order (dispatch, permute, ..., unpermute, combine) nothing is copied. On backends without a
registered buffer the views are ordinary tensors and the same bookkeeping runs, so it is tested on CPU.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch

__all__ = ["begin", "hold", "claim", "stats", "Residency"]


class _Held:
    __slots__ = ("view", "epoch", "copy")

    def __init__(self, view: torch.Tensor, epoch: int) -> None:
        self.view, self.epoch, self.copy = view, epoch, None


class Residency:
    """The epoch of one buffer and the views of it handed out and not yet claimed."""

    def __init__(self) -> None:
        self.epoch = 0
        self.copies = 0  # views copied out because an operation came before their reader
        self._held: Dict[int, _Held] = {}

    def begin(self) -> None:
        """Copy out every held view still alive, then advance the epoch (call before each operation)."""
        for entry in self._held.values():
            if entry.copy is None:
                with torch.enable_grad():  # also inside an autograd Function's forward
                    entry.copy = entry.view.clone()
                self.copies += 1
        self.epoch += 1

    def hold(self, view: torch.Tensor) -> torch.Tensor:
        # A strong reference until claimed keeps the Python object, and so the key, the same while autograd
        # passes the tensor from its producer to its reader.
        self._held[id(view)] = _Held(view, self.epoch)
        return view

    def claim(self, view: torch.Tensor) -> Optional[torch.Tensor]:
        """The tensor to read for ``view``, or None if ``view`` is not held here."""
        entry = self._held.get(id(view))
        if entry is None or entry.view is not view:
            return None
        del self._held[id(view)]
        if entry.copy is not None:
            return entry.copy
        if entry.epoch != self.epoch:
            raise RuntimeError(
                f"a tensor in the communication buffer was overwritten before it was read: it was written at "
                f"operation {entry.epoch} of its buffer, which has run {self.epoch - entry.epoch} more since, "
                "bypassing moe_a2a.resident.begin (call the buffer through moe_a2a.fused_a2a, or turn the "
                "buffer-resident mode off)")
        return view

    def __len__(self) -> int:
        return len(self._held)


_residency: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def of(buffer) -> Residency:
    """The ``Residency`` of ``buffer`` (created on first use; forgotten with the buffer)."""
    state = _residency.get(buffer)
    if state is None:
        state = _residency[buffer] = Residency()
    return state


def begin(buffer) -> None:
    """Start an operation on ``buffer``: copy out its held views, advance its epoch."""
    of(buffer).begin()


def hold(buffer, view: torch.Tensor) -> torch.Tensor:
    """Register ``view``, valid until ``buffer``'s next operation; returns it."""
    return of(buffer).hold(view)


def claim(t: torch.Tensor) -> torch.Tensor:
    """The tensor to read in place of ``t``: ``t`` itself unless it is a held view that an operation on its
    buffer has since overwritten, in which case its copy. Claiming ends the hold; other tensors pass as is."""
    if not isinstance(t, torch.Tensor):
        return t
    for state in list(_residency.values()):
        got = state.claim(t)
        if got is not None:
            return got
    return t


def stats(buffer) -> Dict[str, int]:
    """``{"epoch", "copies", "held"}`` of ``buffer``: operations begun, views copied out, views held now."""
    state = of(buffer)
    return {"epoch": state.epoch, "copies": state.copies, "held": len(state)}
