"""The compiled extensions (``moe_a2a._C``, ``moe_a2a._nvshmem``): loaded on first use, shut down once at exit.

Importing ``moe_a2a`` loads no native code. A CPU run (reference backend) never loads the extensions, and a
run inside one node never loads NVSHMEM's host library: each native library brings its own static state
(NVSHMEM's links a CUDA runtime of its own), and state that is never created cannot fail at exit.

At exit one handler (registered when ``moe_a2a`` is imported, so it runs before torch's own) releases, while the
interpreter and CUDA are still whole: the native runtimes (IPC and NVSHMEM buffers), newest first, then the
module-level caches that hold process groups (``fused_a2a``'s buffers). Otherwise those caches are emptied
during interpreter teardown, in no defined order, and a gloo process group destroyed then runs its C++
destructor (joining worker threads, freeing pending work that holds Python objects) after Python stopped
being able to run it safely.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import threading
import weakref
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_modules = {}
_live = []  # weak references to objects with a destroy() method, in creation order
_caches = []  # functions that drop module-level state holding process groups


def present(name: str) -> bool:
    """Whether ``moe_a2a.<name>`` was built (looked up on disk; nothing is loaded)."""
    if name in _modules:
        return _modules[name] is not None
    try:
        return importlib.util.find_spec(f"{__package__}.{name}") is not None
    except (ImportError, ValueError):
        return False


def load(name: str) -> Optional[ModuleType]:
    """``moe_a2a.<name>`` (loaded now if it was not), or None where it was not built or cannot load."""
    with _lock:
        if name not in _modules:
            try:
                _modules[name] = importlib.import_module(f"{__package__}.{name}")
            except ImportError:
                _modules[name] = None
        return _modules[name]


class Lazy:
    """A stand-in for an extension module that loads it at the first attribute access.

    ``bool(lazy)`` says whether the module exists without loading it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __bool__(self) -> bool:
        return present(self._name)

    def __getattr__(self, attr: str):
        module = load(self._name)
        if module is None:
            raise RuntimeError(f"moe_a2a.{self._name} is not built: install with a CUDA build of torch and nvcc "
                               "available")
        return getattr(module, attr)


def cuda_context_usable(device=None) -> bool:
    """Whether this process's CUDA context still works (False after a kernel trapped). Waits for the device."""
    import torch
    try:
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def track(obj) -> None:
    """Have ``obj.destroy(at_exit=True)`` run at interpreter exit unless ``obj`` is gone by then."""
    with _lock:
        _live.append(weakref.ref(obj))


def clear_at_exit(fn) -> None:
    """Have ``fn()`` (which drops a module-level cache) run at exit, after the native runtimes are released."""
    with _lock:
        _caches.append(fn)


def shutdown() -> None:
    """Destroy every tracked native object still alive, newest first (run once at exit; safe to call again).

    Errors are reported, not raised: a process that finished its work exits with status 0.
    """
    with _lock:
        refs, _live[:] = _live[::-1], []
        caches = list(_caches)
    for ref in refs:
        obj = ref()
        if obj is not None:
            _report(f"releasing {type(obj).__name__}", obj.destroy, at_exit=True)
    for fn in caches:
        _report(f"clearing {getattr(fn, '__qualname__', fn)}", fn)


def _report(what: str, fn, **kwargs) -> None:
    try:
        fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - exit must go on; say what failed
        import sys
        print(f"moe_a2a: {what} at exit failed: {e}", file=sys.stderr)


atexit.register(shutdown)
