"""Fused collectives around the MoE layer (TensorRT-LLM's ``AllReduce`` API, FlashInfer's workspace sizing).

``AllReduce(group, strategy, dtype).forward(input, all_reduce_params=AllReduceParams(...))`` sums over the
group and fuses bias, residual add, RMSNorm and FP8 quantization; ``MoEAllReduce`` first reduces each
token's expert outputs. ``reference`` is the oracle (torch collectives, fixed rank order).
"""
from . import reference
from .allreduce import AllReduce, MoEAllReduce, check_params, moe_local_reduction
from .types import AllReduceFusionOp, AllReduceParams, AllReduceStrategy, MoEAllReduceParams
from .workspace import (NUM_LAMPORT_BUFFERS, LamportWorkspace, choose_strategy, get_required_buffer_size_bytes,
                        kernels_available, load_table)

__all__ = [
    "AllReduce", "AllReduceFusionOp", "AllReduceParams", "AllReduceStrategy", "MoEAllReduce", "MoEAllReduceParams",
    "LamportWorkspace", "NUM_LAMPORT_BUFFERS", "get_required_buffer_size_bytes", "choose_strategy",
    "kernels_available", "load_table", "reference", "check_params", "moe_local_reduction",
]
