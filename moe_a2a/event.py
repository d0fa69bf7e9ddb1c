"""Events for overlapping communication with compute (DeepEP's ``EventHandle``/``EventOverlap``).

On CUDA an ``EventHandle`` records a ``torch.cuda.Event`` on the current stream. On CPU every
operation is synchronous, so the handle records nothing and waiting on it is a no-op.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch


class EventHandle:
    """A point on a stream: records a CUDA event on the current (or given) stream when CUDA is in use."""

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None, device: Optional[torch.device] = None):
        self.event = None
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available() and \
            torch.cuda.is_initialized()
        if use_cuda:
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: "torch.cuda.Stream") -> None:
        """Make ``stream`` wait for this event (no-op on CPU)."""
        if self.event is not None:
            stream.wait_event(self.event)

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class EventOverlap:
    """An optional event plus tensors to keep alive until it completes.

    Usable as a context manager: ``with event: ...`` runs the body, then makes the current stream wait.
    """

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[Any, ...]] = None):
        self.event = event
        # Holding references keeps the caching allocator from reusing memory a kernel may still touch.
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event. Requires an event (``async_finish=True``)."""
        if self.event is None:
            raise ValueError("this EventOverlap holds no event; pass async_finish=True to get one")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
