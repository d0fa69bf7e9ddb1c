"""Backends behind ``moe_a2a.Buffer``, one module per transport: ``reference`` and ``reference_low_latency``
(torch.distributed, the oracle), ``intranode`` and ``low_latency`` (CUDA IPC kernels inside one node),
``internode`` and ``internode_low_latency`` (NVSHMEM kernels across nodes); ``residency``: SMs per rank."""
