"""What the compiled kernels can take: the one Python copy of their compile-time limits.

Each constant names the C++ constant(s) it mirrors; ``tests/cpu/test_limits.py`` reads them from ``csrc/``
(and from ``moe_a2a._nvshmem``, which exports its own) and fails when the two disagree. ``Buffer`` checks a
call against these limits once, before it hands the call to a kernel backend; the reference backend has
none of them. Sizing assumptions (how much room the size hints budget per token) live in ``config``.
"""
from __future__ import annotations

#: Ranks of one NVLink domain (node): the size of every peer table of the intranode kernels.
#: Mirrors ``kMaxRanks`` (csrc/kernels/api.cuh, intranode normal mode), ``kLLMaxRanks``
#: (csrc/kernels/low_latency.cuh, intranode low-latency mode), ``kMaxLocalRanks`` (csrc/nvshmem/internode.cuh,
#: ranks per node of the internode kernels) and ``kArMaxRanks`` (csrc/comm/allreduce.cuh, all-reduce).
MAX_NVL_PEERS = 8

#: Top-k columns (expert ids and weights) a token may carry on the kernels. Mirrors ``kMaxTopk``
#: (csrc/nvshmem/internode.cuh) and ``kLLMaxTopk`` (csrc/kernels/low_latency.cuh); the intranode normal-mode
#: kernels move one column per lane of a warp (csrc/kernels/intranode.cu, ``lane < K``), also 32.
MAX_TOPK = 32

#: Nodes (the NVSHMEM team of one local index) the internode kernels serve. Mirrors ``kMaxNodes``
#: (csrc/nvshmem/internode.cuh).
MAX_NODES = 32

#: Experts of a low-latency call; also the most ranks of an internode low-latency group (every rank holds an
#: expert). Mirrors ``kLLMaxExperts`` (csrc/kernels/low_latency.cuh).
LOW_LATENCY_MAX_EXPERTS = 1024

#: ``num_max_dispatch_tokens_per_rank`` of the internode low-latency kernels: a count shares its signal with a
#: 16-bit tag. Mirrors ``kMaxTokens`` (csrc/nvshmem/low_latency.cuh).
INTERNODE_LOW_LATENCY_MAX_TOKENS = 65535

#: Experts the layout kernel counts. Mirrors the bound in ``get_dispatch_layout`` (csrc/runtime.cpp).
LAYOUT_MAX_EXPERTS = 8192

#: Bytes the kernels move a row in: a row of ``hidden * element_size`` bytes must be a multiple of it (16-byte
#: vector loads and stores; csrc/runtime.cpp, csrc/nvshmem/bindings.cpp).
ROW_ALIGN_BYTES = 16
