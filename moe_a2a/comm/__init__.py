"""Collectives beyond dispatch/combine: all-gather/reduce-scatter with uneven sizes, Helix all-to-all,
and mixed TP x DP all-reduce + all-gather / reduce-scatter + all-reduce."""
from .gather_scatter import allgather, cp_allgather, reducescatter

__all__ = ["allgather", "cp_allgather", "reducescatter"]
