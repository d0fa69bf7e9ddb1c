"""How many SMs a rank's kernels may take so that every block of every rank is resident at once.

The kernels of the normal and low-latency modes spin on each other: a block waits for blocks of its own
grid (grid barriers) and for the blocks of its peers' grids. That only ends if all of them run at the same
time, so the blocks of all ranks sharing one GPU (ranks under CUDA MPS, or virtual nodes) must fit on its
SMs together, one block per SM. Other work on the GPU (GEMMs on other streams) only delays blocks: it
finishes and frees its SMs, and the communication stream has the highest priority, so its blocks are
placed first. With more blocks than SMs, a kernel waits for blocks that cannot start until it times out.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch


def device_id(device: torch.device) -> str:
    """A name of ``device`` that is the same in every process using that GPU (its UUID where known)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else f"{props.name}:{getattr(props, 'pci_bus_id', device.index)}"


def most_ranks_per_device(device_ids: Sequence[str]) -> int:
    """The largest number of ranks that share one GPU, from every rank's ``device_id`` (same on every rank)."""
    return max(Counter(device_ids).values())


def sm_budget(num_device_sms: int, ranks_per_device: int) -> int:
    """SMs per rank (even: a sender and a receiver block per channel) such that the blocks of
    ``ranks_per_device`` ranks fit on ``num_device_sms`` SMs together."""
    return max(2, num_device_sms // ranks_per_device // 2 * 2)
