"""Collectives around the MoE layer, on the same runtime and oracle pattern as the dispatcher.

* Fused all-reduce (TensorRT-LLM's ``AllReduce`` API, FlashInfer's workspace sizing):
  ``AllReduce(group, strategy, dtype).forward(input, all_reduce_params=AllReduceParams(...))`` sums over the
  group and fuses bias, residual add, RMSNorm and FP8 quantization; ``MoEAllReduce`` first reduces each
  token's expert outputs. ``reference`` is the oracle (torch collectives, fixed rank order).
* All-gather / reduce-scatter with uneven ``sizes`` and lists, ``cp_allgather``, the Helix all-to-all.
* Mixed TP x DP collectives: ``MixedCommHandler`` (all-reduce + all-gather, reduce-scatter + all-reduce).
"""
from . import reference
from .allreduce import AllReduce, MoEAllReduce, check_params, moe_local_reduction
from .gather_scatter import allgather, cp_allgather, reducescatter
from .helix import HelixAllToAllNative, alltoall_helix, get_helix_workspace_size_per_rank
from .mixed import MixedCommHandler, MixedCommMode, MixedCommOp, ParallelInfo, run_mixed_comm
from .types import AllReduceFusionOp, AllReduceParams, AllReduceStrategy, MoEAllReduceParams
from .workspace import (NUM_LAMPORT_BUFFERS, LamportWorkspace, choose_strategy, get_required_buffer_size_bytes,
                        kernels_available, load_table)

__all__ = [
    "AllReduce", "AllReduceFusionOp", "AllReduceParams", "AllReduceStrategy", "MoEAllReduce", "MoEAllReduceParams",
    "LamportWorkspace", "NUM_LAMPORT_BUFFERS", "get_required_buffer_size_bytes", "choose_strategy",
    "kernels_available", "load_table", "reference", "check_params", "moe_local_reduction",
    "allgather", "cp_allgather", "reducescatter", "alltoall_helix", "HelixAllToAllNative",
    "get_helix_workspace_size_per_rank", "MixedCommHandler", "MixedCommMode", "MixedCommOp", "ParallelInfo",
    "run_mixed_comm",
]
