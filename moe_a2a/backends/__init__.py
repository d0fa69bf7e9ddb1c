"""Backends behind ``moe_a2a.Buffer``: ``reference`` (torch.distributed) and ``intranode`` (CUDA kernels)."""
