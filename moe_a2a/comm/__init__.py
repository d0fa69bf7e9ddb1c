"""Collectives beyond dispatch/combine: all-gather/reduce-scatter with uneven sizes, Helix all-to-all,
and mixed TP x DP all-reduce + all-gather / reduce-scatter + all-reduce."""
from .gather_scatter import allgather, cp_allgather, reducescatter
from .mixed import MixedCommHandler, MixedCommMode, MixedCommOp, ParallelInfo, run_mixed_comm
from .helix import HelixAllToAllNative, alltoall_helix, get_helix_workspace_size_per_rank

__all__ = ["allgather", "cp_allgather", "reducescatter", "alltoall_helix", "HelixAllToAllNative",
           "get_helix_workspace_size_per_rank", "MixedCommHandler", "MixedCommMode", "MixedCommOp",
           "ParallelInfo", "run_mixed_comm"]
