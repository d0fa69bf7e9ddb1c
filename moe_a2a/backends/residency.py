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
from typing import Optional, Sequence

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


def low_latency_num_sms(num_device_sms: int, device_ids: Sequence[str], num_sms: Optional[int]) -> int:
    """SMs (blocks) of a low-latency kernel: ``num_sms``, or by default the device's SMs divided among the
    ranks on it (``device_ids``: every rank's ``device_id``). A count that would not keep every rank's blocks
    resident together raises ``ValueError``."""
    budget = max(1, num_device_sms // most_ranks_per_device(device_ids))
    if num_sms is None:
        return budget
    if not 1 <= num_sms <= budget:
        raise ValueError(f"num_sms must be in [1, {budget}] (the device's SMs shared by the ranks on it, one "
                         f"block per SM), got {num_sms}")
    return num_sms
