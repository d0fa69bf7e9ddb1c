"""megatron-core integration: a token dispatcher on moe_a2a, ``install()``, and a CPU context.

    import moe_a2a.megatron as mm
    mm.install()   # flex + deepep/hybridep now run on moe_a2a; "moe_a2a" is a dispatcher type
    config = TransformerConfig(..., moe_token_dispatcher_type="moe_a2a",
                               moe_flex_dispatcher_backend="deepep")   # or "hybridep"

    with mm.cpu_context():   # only needed on machines without CUDA (tests, CI, the tiny recipe)
        ...

``MoEA2ATokenDispatcher`` is imported lazily: it needs megatron-core, the rest of this package does not.
"""
from __future__ import annotations

from .cpu import cpu_context
from .install import DISPATCHER_TYPE, add_dispatcher_choice, install, is_installed, uninstall

__all__ = ["MoEA2ATokenDispatcher", "DISPATCHER_TYPE", "add_dispatcher_choice", "cpu_context", "install",
           "is_installed", "uninstall"]


def __getattr__(name):
    if name == "MoEA2ATokenDispatcher":
        from .dispatcher import MoEA2ATokenDispatcher

        return MoEA2ATokenDispatcher
    raise AttributeError(f"module 'moe_a2a.megatron' has no attribute {name!r}")
