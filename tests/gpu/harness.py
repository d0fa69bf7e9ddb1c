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
from moe_a2a.layout import compute_layout


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


FP8 = torch.float8_e4m3fn


class Case:
    """Per-rank inputs of one normal-mode round trip, identical on every backend: tokens (BF16, or FP8 with
    per-128 scales), routing and weights, and the layout computed on the CPU (``per_node`` ranks per node;
    default: one node)."""

    def __init__(self, rank, num_ranks, seed, num_tokens, hidden, num_experts, topk, fp8=False, mode="skew",
                 per_node=None):
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        self.num_experts, self.fp8 = num_experts, fp8
        self.per_node = num_ranks if per_node is None else per_node
        self.topk_idx = routing(num_tokens, num_experts, topk, gen, mode)
        self.topk_weights = torch.rand(num_tokens, topk, generator=gen)
        x = torch.randn(num_tokens, hidden, generator=gen)
        if fp8:
            self.x = (x * 8).to(FP8)
            self.x_scales = torch.rand(num_tokens, hidden // 128, generator=gen) + 0.5
        else:
            self.x, self.x_scales = x.to(torch.bfloat16), None
        self.layout = compute_layout(self.topk_idx, num_experts, num_ranks, self.per_node)
        self.gen = gen


def round_trip_cases(rank, num_ranks, seed, skewed_tokens):
    """``Case`` arguments of the round-trip sweep: token counts 0, 1, odd and large (rank 0 sends
    ``skewed_tokens``, the others 37), hidden 16/1032/2048/4096/7168, top-k 1..8, experts 8..256, FP8."""
    counts = torch.Generator().manual_seed(seed)
    many = [int(v) for v in torch.randint(1, 700, (num_ranks,), generator=counts)]
    zero_first = [0] + many[1:]
    e_small = max(8, num_ranks)
    return [
        dict(num_tokens=many[rank], hidden=7168, num_experts=256, topk=8),
        dict(num_tokens=many[rank], hidden=7168, num_experts=256, topk=8, fp8=True),
        dict(num_tokens=zero_first[rank], hidden=2048, num_experts=e_small, topk=1),
        dict(num_tokens=1 if rank else 0, hidden=4096, num_experts=e_small, topk=2),
        dict(num_tokens=many[rank] // 2 + 1, hidden=2048, num_experts=64, topk=6, mode="last_rank"),
        dict(num_tokens=skewed_tokens if rank == 0 else 37, hidden=7168, num_experts=256, topk=8),
        # Rows of 129 and 2 16-byte words: lanes of a warp run different numbers of copy iterations.
        dict(num_tokens=many[rank] // 3 + 1, hidden=1032, num_experts=e_small, topk=2),
        dict(num_tokens=many[rank] // 3 + 1, hidden=16, num_experts=e_small, topk=2),
    ]


def as_bytes(t):
    """FP8 tensors as bytes (``torch.equal`` and indexing on raw values), others unchanged."""
    return t.contiguous().view(torch.uint8) if t.dtype == FP8 else t


def assert_same(name, got, want):
    """Bitwise equal (after moving both to the CPU), naming the first differing positions."""
    assert got is not None and want is not None, f"{name}: one side is None"
    got, want = as_bytes(got.cpu()), as_bytes(want.cpu())
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"{name} differs at {bad}")
