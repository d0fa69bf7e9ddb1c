"""Multi-rank GPU harness: N spawned ranks on the visible GPUs, sharing one GPU under CUDA MPS if needed.

Ranks beyond the GPU count share ``cuda:0``. Their kernels spin on each other, so they must run at the
same time: the harness starts an MPS control daemon (private pipe/log directories) when there are fewer
GPUs than ranks, stops it afterwards, and gives each rank few enough SMs (``rank_num_sms``) that every
rank's blocks are resident together. The kernels cannot tell this from N GPUs.
"""
from __future__ import annotations

import faulthandler
import shutil

import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a.backends import intranode
from moe_a2a.backends.base import DispatchRequest
from moe_a2a.launch import max_num_sms_per_rank, mps_if_needed


def skip_reason(num_ranks: int = 1):
    """Why the GPU tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not intranode.extension_available():
        return "moe_a2a._C is not built"
    if num_ranks > torch.cuda.device_count() and shutil.which("nvidia-cuda-mps-control") is None:
        return f"{num_ranks} ranks on {torch.cuda.device_count()} GPU(s) need CUDA MPS (nvidia-cuda-mps-control)"
    return None


def rank_num_sms(num_ranks: int, most: int = 24) -> int:
    """Even SM count per rank such that every rank's blocks fit on the GPUs at once."""
    return max(2, min(most, max_num_sms_per_rank(num_ranks)) // 2 * 2)


def set_rank_device(rank: int) -> torch.device:
    faulthandler.enable()  # a rank that dies in native code still leaves a stack
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def run_ranks(fn, num_ranks: int, *args, timeout: float = 600.0) -> None:
    """``fn(rank, num_ranks, *args)`` on ``num_ranks`` spawned ranks (gloo group), under MPS if needed."""
    with mps_if_needed(num_ranks):
        run_distributed(fn, num_ranks, *args, timeout=timeout)


def synchronize_after_fault() -> None:
    """Wait for the device after a test made a kernel fail on purpose. A failed kernel traps, and the trap
    ends the CUDA context of every process on that GPU under MPS, so a synchronize may raise here."""
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        pass


def expect_fault(call) -> None:
    """``call()`` then a synchronize must raise ``RuntimeError``: the call's kernel failed (or, under MPS, a
    peer's failure ended this process's CUDA context), and its outputs must not be read as valid."""
    try:
        call()
        torch.cuda.synchronize()
    except RuntimeError:
        return
    raise AssertionError("a kernel that waited for a missing rank returned without an error")


def gather(obj) -> list:
    """``obj`` of every rank of the default group (what the backends take as ``all_gather_object``)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def routing(num_tokens, num_experts, topk, gen, mode="skew") -> torch.Tensor:
    """Top-k ids without repeats: skewed to low experts, with -1 slots; or (``mode="last_rank"``) every
    token to the last experts."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if mode == "last_rank":
        scores[:, -topk:] += 2.0
    else:
        scores += torch.linspace(1.0, 0.0, num_experts)
    idx = scores.topk(topk, dim=1).indices
    if mode != "last_rank":
        idx[torch.rand(num_tokens, topk, generator=gen) < 0.15] = -1
    return idx


def check_repeats(round_trip, iterations: int, check_every: int) -> None:
    """Call ``round_trip() -> (recv_x, combined)`` ``iterations`` times on one buffer: every
    ``check_every`` calls the results must equal the first call's bit for bit (no drift), and device
    memory must not grow (no leak)."""
    first_x, first_out = round_trip()
    torch.cuda.synchronize()
    mem = torch.cuda.memory_allocated()
    for it in range(iterations):
        recv_x, out = round_trip()
        if it % check_every == check_every - 1:
            torch.cuda.synchronize()
            assert torch.equal(recv_x, first_x), f"dispatch drifted at iteration {it}"
            assert torch.equal(out, first_out), f"combine drifted at iteration {it}"
    del recv_x, out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= mem, "device memory grew over repeated calls"


def dispatch_request(x, scales, config, layout=None, topk_idx=None, topk_weights=None, handle=None,
                     **options) -> DispatchRequest:
    """A ``DispatchRequest`` for a backend called directly: routed by ``layout`` (the 4-tuple of
    ``compute_layout`` or the layout kernel), or cached with ``handle``. ``options``: the request's other
    fields (``expert_alignment``, ``num_worst_tokens``, ``recv_x_in_buffer``, ...)."""
    routing = {} if layout is None else dict(is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    return DispatchRequest(x, config, scales, handle, **routing, topk_idx=topk_idx, topk_weights=topk_weights,
                           **options)
