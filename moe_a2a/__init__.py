"""moe_a2a: expert-parallel token dispatch and combine for Mixture-of-Experts training.

``Buffer`` has DeepEP's API; ``moe_a2a.fused_a2a`` has Megatron-core's autograd functions.
"""
from .buffer import Buffer
from .config import Config
from .event import EventHandle, EventOverlap
from .handles import DispatchHandle, LowLatencyHandle

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "DispatchHandle", "LowLatencyHandle"]
