"""moe_a2a: expert-parallel token dispatch and combine for Mixture-of-Experts training.

``Buffer`` has DeepEP's API; ``moe_a2a.fused_a2a`` has Megatron-core's autograd functions.
"""
from .buffer import Buffer
from .config import Config
from .event import EventHandle, EventOverlap
from .handles import DispatchHandle, HandleIdentity, LowLatencyHandle
from .backends.waits import CollectiveError
from . import fused_a2a
from .fused_a2a import (FusedCombine, FusedDispatch, HybridEPCombine, HybridEPDispatch, HybridEPHandle, fused_combine,
                        fused_dispatch, get_buffer, get_hidden_bytes, hybrid_ep_combine, hybrid_ep_dispatch,
                        init_hybrid_ep_buffer, reset_hybrid_ep_buffer, set_deepep_num_sms)

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "EventHandle", "EventOverlap", "DispatchHandle", "HandleIdentity", "LowLatencyHandle",
    "CollectiveError", "fused_a2a",
    "FusedDispatch", "FusedCombine", "HybridEPDispatch", "HybridEPCombine", "HybridEPHandle", "fused_dispatch",
    "fused_combine", "hybrid_ep_dispatch", "hybrid_ep_combine", "get_buffer", "get_hidden_bytes",
    "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer", "set_deepep_num_sms",
]
