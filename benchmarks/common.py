"""What the benchmarks share: launching ranks, timing, copy-engine floors, inputs, options and reports.

Times are medians of timed loops after a warm-up, measured with CUDA events, with every rank started
together (a barrier before each loop). The floors are copy-engine copies of the same bytes measured in the
same run: one device-to-device copy when ranks share a GPU, and with one rank per GPU every rank copying
straight into its peers' memory at once (the NVLink roofline).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from typing import Dict, List

import torch
import torch.distributed as dist

from moe_a2a.launch import max_num_sms_per_rank, mps_if_needed, spawn

__all__ = ["FP8", "RANK_TIMEOUT_S", "add_shape_args", "commit", "copy_floor_us", "gather", "inputs", "ints",
           "max_num_sms_per_rank", "one_rank_per_gpu", "peer_copy_floor_us", "row_bytes", "run_ranks",
           "time_kernels", "time_us", "virtual_nodes_env", "write_report"]

FP8 = getattr(torch, "float8_e4m3fn", None)
# The longest sweeps run for minutes; a rank stuck past this is killed and reported.
RANK_TIMEOUT_S = 3600.0


def run_ranks(fn, num_ranks: int, *args, timeout: float = RANK_TIMEOUT_S) -> list:
    """``fn(rank, num_ranks, *args)`` on ``num_ranks`` ranks (gloo group, rank on GPU ``rank % GPUs``),
    sharing GPUs under CUDA MPS when there are more ranks than GPUs; the ranks' results by rank."""
    with mps_if_needed(num_ranks):
        return spawn(fn, num_ranks, *args, cuda_device=True, timeout=timeout)


def virtual_nodes_env() -> None:
    """NVSHMEM settings for virtual nodes on one host: peer-to-peer transport only, bootstrap over loopback,
    no NVLink multicast (each left as the environment sets it)."""
    for key, value in (("NVSHMEM_REMOTE_TRANSPORT", "none"), ("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(key, value)


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def time_us(fn, warmup: int, loops: int, iters: int) -> float:
    """Median over ``loops`` of the mean time of ``iters`` back-to-back calls, ranks started together."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(loops):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / iters)
    return statistics.median(samples)


def copy_floor_us(num_bytes: int, warmup: int = 2, loops: int = 5) -> float:
    """Copy-engine time of ``num_bytes`` device-to-device on this GPU."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0)
    del src, dst
    return statistics.median(samples)


def one_rank_per_gpu(num_ranks: int) -> bool:
    return 1 < num_ranks <= torch.cuda.device_count()


def peer_copy_floor_us(bytes_to: List[int], warmup: int = 2, loops: int = 5) -> float:
    """Time for this rank to copy ``bytes_to[d]`` bytes into GPU ``d``'s memory for every ``d`` at once.

    Called on every rank together (one rank per GPU), so all copies of the group overlap; the result
    is the slowest rank's median. Each peer gets its own stream (the local share is a local copy); CUDA
    events on this rank's GPU bracket them all: a start event every copy stream waits on, and an end
    event recorded once every copy stream is done.
    """
    me = torch.cuda.current_device()
    main = torch.cuda.current_stream()
    pairs = []
    for d, num_bytes in enumerate(bytes_to):
        if num_bytes:
            src = torch.empty(num_bytes, dtype=torch.uint8, device=me)
            dst = torch.empty(num_bytes, dtype=torch.uint8, device=d)
            pairs.append((src, dst, torch.cuda.Stream(device=me)))

    def copy_all() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for src, dst, stream in pairs:
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        return start.elapsed_time(end) * 1000.0

    for _ in range(warmup):
        copy_all()
    samples = []
    for _ in range(loops):
        dist.barrier()
        samples.append(copy_all())
    return max(gather(statistics.median(samples)))


def inputs(rank, num_tokens, hidden, num_experts, topk, fp8, device):
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1  # uniform routing, as DeepEP tests
    topk_idx = scores.topk(topk, dim=1).indices.to(device)
    topk_weights = torch.rand(num_tokens, topk, generator=gen).to(device)
    if fp8:
        amax = x.view(num_tokens, hidden // 128, 128).abs().amax(-1).clamp(min=1e-4)
        scales = amax / 448.0
        xq = (x.view(num_tokens, hidden // 128, 128) / scales.unsqueeze(-1)).view(num_tokens, hidden).to(FP8)
        return xq, scales.contiguous(), topk_idx, topk_weights
    return x.to(torch.bfloat16), None, topk_idx, topk_weights


def row_bytes(hidden: int, fp8: bool) -> int:
    """Bytes of one dispatched row: BF16, or FP8 with its float32 scale per 128 channels."""
    return hidden * (1 if fp8 else 2) + (hidden // 128 * 4 if fp8 else 0)


def time_kernels(kern, x, scales, idx, weights, layout, num_experts, num_ranks, per_node, cfg, warmup, loops,
                 iters, zero_copy=False):
    """This rank's times (us) of a backend's full dispatch (layout, count exchange and dispatch), the layout
    alone, cached dispatch and combine, on one routing. Returns ``(handle, dict)`` with the received rows and the bytes
    DeepEP counts: received for dispatch, sent back for combine. ``zero_copy``: also the combine of an
    input written into the buffer beforehand (``combine_zero_copy_us``) and the cached dispatch whose senders
    write the rows into the buffer (``dispatch_in_buffer_us``), where they fit on every rank. Backends whose
    staging copy engine can be turned off also time the cached dispatch with the kernel staging its input
    (``dispatch_sm_staging_us``), and those with a pipelined combine its other schedules (``combine_windows{n}_us``:
    n = 0, one barrier after the copy engine staged the input; 4 or 16 token windows)."""
    from moe_a2a.backends import intranode
    from moe_a2a.backends.base import CombineRequest, DispatchRequest
    from moe_a2a.config import combine_input_bytes

    def dispatch_request(lay, **extra):
        return DispatchRequest(x, cfg, scales, is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
                               topk_weights=weights, **extra)

    recv = kern.dispatch(dispatch_request(layout))
    handle, recv_weights = recv.handle, recv.recv_topk_weights
    num_recv, hidden = handle.num_recv_tokens, x.size(1)
    y = torch.randn(num_recv, hidden, device=x.device).to(torch.bfloat16)
    cached = DispatchRequest(x, cfg, scales, handle=handle)

    def full():
        kern.dispatch(dispatch_request(intranode.get_dispatch_layout(idx, num_experts, num_ranks, per_node)))

    t_full = time_us(full, warmup, loops, max(1, iters // 2))
    t_layout = time_us(lambda: intranode.get_dispatch_layout(idx, num_experts, num_ranks, per_node), warmup, loops,
                       iters)
    t_disp = time_us(lambda: kern.dispatch(cached), warmup, loops, iters)
    t_comb = time_us(lambda: kern.combine(CombineRequest(y, handle, cfg, recv_weights)), warmup, loops, iters)
    times = dict(num_recv=num_recv, dispatch_bytes=num_recv * row_bytes(hidden, scales is not None),
                 combine_bytes=num_recv * hidden * 2, dispatch_us=t_disp, dispatch_full_us=t_full, combine_us=t_comb,
                 layout_us=t_layout)
    if hasattr(kern, "set_copy_engine_staging"):  # the same calls with the kernel staging its input
        kern.set_copy_engine_staging(False)
        times["dispatch_sm_staging_us"] = time_us(lambda: kern.dispatch(cached), warmup, loops, iters)
        kern.set_copy_engine_staging(True)
    if hasattr(kern, "set_combine_windows"):  # the combine's other schedules (default: pipelined in windows)
        default_windows = kern.combine_windows
        comb = lambda: kern.combine(CombineRequest(y, handle, cfg, recv_weights))  # noqa: E731
        for n in (0, 4, 16):
            kern.set_combine_windows(n)
            times[f"combine_windows{n}_us"] = time_us(comb, warmup, loops, iters)
        kern.set_combine_windows(default_windows)
    if zero_copy and hasattr(kern, "dispatch_receive_rows"):
        room = kern.dispatch_receive_rows(hidden * x.element_size(), scales.size(1) if scales is not None else 0)
        if all(gather(num_recv <= room)):  # every rank takes the same path
            in_buffer = DispatchRequest(x, cfg, scales, handle=handle, recv_x_in_buffer=True)
            times["dispatch_in_buffer_us"] = time_us(lambda: kern.dispatch(in_buffer), warmup, loops, iters)
    if zero_copy and combine_input_bytes(num_recv, hidden * 2, idx.size(1)) <= kern.num_nvl_bytes:
        view = kern.get_next_combine_buffer(handle, hidden)
        view.copy_(y)  # stays valid over repeated combines: no dispatch runs in between
        times["combine_zero_copy_us"] = time_us(
            lambda: kern.combine(CombineRequest(view, handle, cfg, recv_weights)), warmup, loops, iters)
    return handle, times


def ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def add_shape_args(p: argparse.ArgumentParser, sms: str, warmup: int, iters: int) -> None:
    """The options every normal-mode benchmark takes: shapes (DeepEP's by default), SM counts, timing."""
    p.add_argument("--tokens", default="4096", help="tokens per rank, comma-separated")
    p.add_argument("--hidden", default="7168")
    p.add_argument("--sms", default=sms, help="SMs per rank; counts that cannot be co-resident are skipped")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--iters", type=int, default=iters)


def commit() -> str:
    """The commit measured: ``MOE_A2A_COMMIT`` when set (a copy of the tree whose git metadata is not its
    own), else git's HEAD, with ``+dirty`` when tracked files differ from it."""
    if os.environ.get("MOE_A2A_COMMIT"):
        return os.environ["MOE_A2A_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(report: Dict, table: str, out: str, title: str) -> None:
    """``report`` as JSON at ``out`` and a Markdown page (title, device, commit, command, ``table``) next to it.

    ``report["device"]`` names the GPU model the figures come from (every page says it)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    device = report.get("device") or "device not recorded"
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"# {title}\n\n{device}, commit `{report['commit']}`, {report['date']}\n\n`{report['command']}`\n\n"
                f"{table}\n")
