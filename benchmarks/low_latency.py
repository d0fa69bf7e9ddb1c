"""``python -m benchmarks low-latency``: latency of the low-latency kernels and the copy-engine floor.

For each EP size, ranks are spawned on the visible GPUs (ranks beyond the GPU count share a GPU; a private
CUDA MPS daemon is started for them unless one is set up already, so their kernels run together). Each rank routes ``--tokens`` random tokens to
``--topk`` of ``--experts`` experts and runs, back to back, FP8 dispatch + BF16 combine (and BF16
dispatch + zero-copy BF16 combine), timed per call with CUDA events; then hook mode, where the send and
the receive kernels are timed separately (the receive launched once every rank's sends have landed).
In the same run, a device-to-device ``cudaMemcpyAsync`` of the bytes the ranks sharing a GPU send (FP8
tokens with scales for dispatch, BF16 rows for combine) gives the floor. Overheads that show at this
size are measured too: an empty kernel of the kernels' launch shape (back to back, and alone between two
events) and a flag round trip between ranks 0 and 1 (release store, acquire spin; others idle), and the
time a one-kernel FP8 dispatch spends waiting for its latest source (the kernel's wait counters).
With ``--num-ranks-per-node L`` (below the EP size) the group forms virtual nodes of ``L`` ranks and the
NVSHMEM kernels that serve low-latency calls across nodes run instead (NVSHMEM over the whole group; on
one host its peers are reached through the GPU's memory, so the figures show the kernels' own costs, not a
network's); the launch and flag probes are skipped there. Results go to ``docs/perf/`` as JSON and Markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
from typing import Dict, List

import torch
import torch.distributed as dist

from moe_a2a.launch import RanksFailed

from .common import commit, gather, run_ranks, virtual_nodes_env


def _phases(everyone: List[dict]) -> Dict[str, Dict[str, float]]:
    """Median over calls and ranks of each phase of the one-kernel FP8 dispatch and BF16 combine, in us,
    from the kernels' GPU-clock stamps (start, send phase done, block 0 past its waits, end): ``gap`` is the
    time from the rank's previous kernel end to this kernel's start (launch and scheduling), ``spread`` the
    range of the start over the ranks sharing rank 0's GPU (one clock)."""
    out = {}
    for op, name in ((0, "dispatch_fp8"), (1, "combine_bf16")):
        parts = {"gap": [], "send": [], "wait": [], "receive": [], "kernel": [], "spread": []}
        calls = len(everyone[0]["clocks"])
        for i in range(calls):
            starts = []
            for r in everyone:
                start, sent, ready, end = r["clocks"][i][op]
                prev_end = r["clocks"][i][0][3] if op == 1 else (r["clocks"][i - 1][1][3] if i > 0 else None)
                if prev_end is not None:
                    parts["gap"].append((start - prev_end) / 1e3)
                parts["send"].append((sent - start) / 1e3)
                parts["wait"].append((ready - sent) / 1e3)
                parts["receive"].append((end - ready) / 1e3)
                parts["kernel"].append((end - start) / 1e3)
                if r["device"] == everyone[0]["device"]:
                    starts.append(start)
            parts["spread"].append((max(starts) - min(starts)) / 1e3)
        out[name] = {k: statistics.median(v) for k, v in parts.items() if v}
    return out


def _stats(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    return {"median": statistics.median(s), "p99": s[min(len(s) - 1, int(0.99 * len(s)))], "samples": len(s)}


def _sleep_us(us: float) -> None:
    """Keep the stream busy so the host can queue what follows before it starts (about 2 cycles per ns)."""
    torch.cuda._sleep(int(us * 2000))


def _timed_alone(fn):
    """Run ``fn`` once after every rank is idle (barrier, then a short device sleep so peers' work has landed);
    returns ``(fn's result, its GPU time in us)``."""
    dist.barrier()
    _sleep_us(1000)  # longer than the host takes to queue fn, so only GPU time is measured
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    return out, start.elapsed_time(end) * 1e3


def _bench_rank(rank: int, num_ranks: int, args) -> dict:
    from moe_a2a.backends.base import LowLatencyCombineRequest as Combine
    from moe_a2a.backends.base import LowLatencyDispatchRequest
    from moe_a2a.backends.low_latency import LowLatencyBackend
    from moe_a2a.config import get_low_latency_rdma_size_hint

    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    M, hidden, K, E = args.tokens, args.hidden, args.topk, args.experts
    L = E // num_ranks
    across_nodes = _across_nodes(num_ranks, args)
    if across_nodes:  # the NVSHMEM kernels, NVSHMEM over the whole group (as a multi-node Buffer runs them)
        from moe_a2a.backends.internode_low_latency import InternodeLowLatencyBackend
        virtual_nodes_env()
        backend = InternodeLowLatencyBackend
    else:
        backend = LowLatencyBackend
    num_bytes = get_low_latency_rdma_size_hint(M, hidden, num_ranks, E)
    kern = backend(rank, num_ranks, dist.group.WORLD, num_bytes, gather, args.timeout, num_sms=args.num_sms)
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(M, hidden, generator=gen).to(torch.bfloat16).to(device)
    idx = torch.rand(M, E, generator=gen).topk(K, dim=1).indices.to(device)
    w = torch.rand(M, K, generator=gen).to(device)
    y = torch.randn(L, M * num_ranks, hidden, generator=gen).to(torch.bfloat16).to(device)
    dispatch_fp8 = LowLatencyDispatchRequest(x, idx, M, E, use_fp8=True)
    dispatch_bf16 = LowLatencyDispatchRequest(x, idx, M, E, use_fp8=False)

    def pair(fp8: bool):
        handle = kern.dispatch(dispatch_fp8 if fp8 else dispatch_bf16).handle
        kern.combine(Combine(y, idx, w, handle))

    for _ in range(args.warmup):
        pair(True)
    torch.cuda.synchronize()

    # Back to back: FP8 dispatch, BF16 combine, BF16 dispatch, zero-copy BF16 combine (its buffer holds the
    # rows the BF16 combine two calls earlier copied there: same routing, same layout).
    times = {"dispatch_fp8": [], "combine_bf16": [], "dispatch_bf16": [], "combine_bf16_zero_copy": []}
    skip = 3  # the first calls of a batch absorb the ranks' start skew
    for _ in range(args.batches):
        dist.barrier()
        torch.cuda.synchronize()
        _sleep_us(1500 * args.iters)  # the host queues every call of the batch before the first starts
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5 * args.iters)]
        for i in range(args.iters):
            e = ev[5 * i:5 * i + 5]
            e[0].record()
            handle = kern.dispatch(dispatch_fp8).handle
            e[1].record()
            kern.combine(Combine(y, idx, w, handle))
            e[2].record()
            handle = kern.dispatch(dispatch_bf16).handle
            buf = kern.get_next_combine_buffer(handle)
            e[3].record()
            kern.combine(Combine(buf, idx, w, handle))
            e[4].record()
        torch.cuda.synchronize()
        for i in range(skip, args.iters):
            e = ev[5 * i:5 * i + 5]
            times["dispatch_fp8"].append(e[0].elapsed_time(e[1]) * 1e3)
            times["combine_bf16"].append(e[1].elapsed_time(e[2]) * 1e3)
            times["dispatch_bf16"].append(e[2].elapsed_time(e[3]) * 1e3)
            times["combine_bf16_zero_copy"].append(e[3].elapsed_time(e[4]) * 1e3)

    # Hook mode: send kernels alone, then receive kernels once all data has landed.
    hook = {"dispatch_send": [], "dispatch_recv": [], "combine_send": [], "combine_recv": []}
    for _ in range(args.hook_iters):
        (_, _, _, handle, recv_hook), send_us = _timed_alone(
            lambda: kern.dispatch(LowLatencyDispatchRequest(x, idx, M, E, return_recv_hook=True)))
        _, recv_us = _timed_alone(recv_hook)
        hook["dispatch_send"].append(send_us)
        hook["dispatch_recv"].append(recv_us)
        (_, recv_hook), send_us = _timed_alone(lambda: kern.combine(Combine(y, idx, w, handle, return_recv_hook=True)))
        _, recv_us = _timed_alone(recv_hook)
        hook["combine_send"].append(send_us)
        hook["combine_recv"].append(recv_us)
    # Where the one-kernel FP8 dispatch spends its time waiting: the kernel's per-source wait counters
    # (dispatch_wait_recv_cost_stats, ns), per call, for the source this rank waited on longest.
    # Same schedule as the timed batches: queued behind a device sleep, back to back with the combines.
    # The IPC kernels also stamp their phases on the GPU clock (one clock for all ranks sharing a GPU).
    wait_ns = torch.zeros(num_ranks, num_ranks, dtype=torch.int64, device=device)  # row r: rank r's waits
    clocks = torch.zeros(args.iters, 2, 4, dtype=torch.int64, device=device)  # [call, dispatch/combine, stamp]
    clocks[:, :, 0] = -1  # the start is a minimum over the blocks
    stamped = not across_nodes
    dist.barrier()
    torch.cuda.synchronize()
    _sleep_us(1500 * args.iters)
    for i in range(args.iters):
        if stamped:
            kern.set_phase_clock(clocks[i, 0])
        handle = kern.dispatch(LowLatencyDispatchRequest(
            x, idx, M, E, dispatch_wait_recv_cost_stats=wait_ns if i >= skip else None)).handle
        if stamped:
            kern.set_phase_clock(clocks[i, 1])
        kern.combine(Combine(y, idx, w, handle))
    if stamped:
        kern.set_phase_clock(None)
    torch.cuda.synchronize()
    wait_us = float(wait_ns[rank].max()) / 1e3 / (args.iters - skip)
    clocks = clocks[skip:].tolist() if stamped else None
    kern.raise_if_error()
    # The launch and flag probes exist for the IPC kernels only.
    probes = None if across_nodes else _probes(kern, rank, num_ranks, args.iters)

    pairs = int((idx >= 0).sum())
    sent = {"dispatch_fp8": pairs * (hidden + hidden // 128 * 4), "dispatch_bf16": pairs * hidden * 2,
            "combine_bf16": pairs * hidden * 2, "combine_bf16_zero_copy": pairs * hidden * 2}
    everyone = gather({"device": str(device), "sent": sent, "times": times, "hook": hook, "probes": probes,
                        "wait_us": wait_us, "clocks": clocks})
    same_gpu = [r for r in everyone if r["device"] == str(device)]
    floor = {}
    dist.barrier()
    if rank == 0:
        # The ranks sharing this GPU move all their bytes through its memory at once.
        for name in sent:
            floor[name] = _copy_floor_us(sum(r["sent"][name] for r in same_gpu), device, args.iters)
    dist.barrier()
    kern.destroy()
    if rank != 0:
        return {}
    merged = {name: [t for r in everyone for t in r["times"][name]] for name in times}
    merged_hook = {name: [t for r in everyone for t in r["hook"][name]] for name in hook}
    row = {"num_ranks": num_ranks, "ranks_per_gpu": len(same_gpu), "num_sms": kern.num_sms, "tokens": M,
           "hidden": hidden, "topk": K, "experts": E,
           "ranks_per_node": args.num_ranks_per_node if across_nodes else num_ranks}
    for name, samples in merged.items():
        st = _stats(samples)
        bytes_per_rank = statistics.mean(r["sent"][name] for r in everyone)
        row[name] = {"latency_us": st, "bytes_per_rank": bytes_per_rank,
                     "bandwidth_gbps": bytes_per_rank / st["median"] / 1e3,
                     "copy_floor_us": floor[name], "ratio_to_floor": st["median"] / floor[name]}
    row["hook"] = {name: _stats(samples) for name, samples in merged_hook.items()}
    # Mean over ranks of each rank's longest wait for one source, per FP8 dispatch (one kernel).
    row["dispatch_fp8_wait_us"] = statistics.mean(r["wait_us"] for r in everyone)
    row["phases_us"] = _phases(everyone) if everyone[0]["clocks"] is not None else None
    row["overheads_us"] = None if across_nodes else {
        "empty_kernel_back_to_back": statistics.median(r["probes"]["empty_back_to_back"] for r in everyone),
        "empty_kernel_alone": statistics.median(r["probes"]["empty_alone"] for r in everyone),
        "flag_round_trip": everyone[0]["probes"].get("flag_round_trip")}
    return row


def _across_nodes(num_ranks: int, args) -> bool:
    """Whether ``--num-ranks-per-node`` splits this group into several (virtual) nodes."""
    return args.num_ranks_per_node is not None and args.num_ranks_per_node < num_ranks


def _probes(kern, rank: int, num_ranks: int, iters: int) -> dict:
    """Launch and signalling costs on every rank at once: an empty kernel of the kernels' launch shape,
    back to back (per launch) and alone between two events; then ``iters * 50`` flag round trips between
    ranks 0 and 1 (timed on the device) while the other ranks idle."""
    out = {}
    dist.barrier()
    torch.cuda.synchronize()
    _sleep_us(200 * iters)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    ev[0].record()
    for i in range(iters):
        kern.empty_kernel()
        ev[i + 1].record()
    torch.cuda.synchronize()
    out["empty_back_to_back"] = statistics.median(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(iters))
    out["empty_alone"] = statistics.median(_timed_alone(kern.empty_kernel)[1] for _ in range(5))
    dist.barrier()
    if num_ranks > 1 and rank < 2:
        ns = kern.flag_round_trip(1 - rank, iters * 50, iters * 5)
        torch.cuda.synchronize()
        ns = ns.tolist()
        out["flag_round_trip"] = ns[0] / max(ns[1], 1) / 1e3
    dist.barrier()
    kern.raise_if_error()
    return out


def _copy_floor_us(num_bytes: int, device, iters: int, rounds: int = 3) -> float:
    """Device-to-device copy time of ``num_bytes``: the lowest of ``rounds`` medians of ``iters`` copies
    (a floor: a round slowed by clocks or a neighbour should not raise it)."""
    src = torch.empty(max(num_bytes, 16), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    medians = []
    for _ in range(rounds):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        _sleep_us(100)
        ev[0].record()
        for i in range(iters):
            dst.copy_(src)
            ev[i + 1].record()
        torch.cuda.synchronize()
        medians.append(statistics.median(ev[i].elapsed_time(ev[i + 1]) * 1e3 for i in range(iters)))
    return min(medians)


def _run(num_ranks: int, args) -> dict:
    """Rank 0's row of one EP size (ranks beyond the GPU count share GPUs under MPS)."""
    try:
        return run_ranks(_bench_rank, num_ranks, args, timeout=args.timeout * 20 + 300)[0]
    except RanksFailed as exc:
        raise RuntimeError(f"EP{num_ranks} failed: {exc}") from None


def _table(rows: List[dict]) -> str:
    lines = ["| EP | ranks/node | ranks/GPU | SMs/rank | call | median us | p99 us | GB/s per rank | copy floor us | "
             "ratio |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for name in ("dispatch_fp8", "dispatch_bf16", "combine_bf16", "combine_bf16_zero_copy"):
            m = r[name]
            lines.append(f"| {r['num_ranks']} | {r['ranks_per_node']} | {r['ranks_per_gpu']} | {r['num_sms']} | {name} | "
                         f"{m['latency_us']['median']:.1f} | {m['latency_us']['p99']:.1f} | "
                         f"{m['bandwidth_gbps']:.1f} | {m['copy_floor_us']:.1f} | {m['ratio_to_floor']:.2f} |")
    lines += ["", "Hook mode (send kernel alone; receive kernel after every rank's sends landed):", "",
              "| EP | dispatch send us | dispatch recv us | combine send us | combine recv us | "
              "one-kernel FP8 dispatch: wait for the latest source us |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h = r["hook"]
        lines.append(f"| {r['num_ranks']} | " + " | ".join(
            f"{h[n]['median']:.1f} (p99 {h[n]['p99']:.1f})"
            for n in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")) +
            f" | {r['dispatch_fp8_wait_us']:.1f} |")
    staged = [r for r in rows if r.get("phases_us")]
    if staged:
        lines += ["", "Phases of the one-kernel calls (GPU clock stamps; median over calls and ranks, us): gap = "
                  "previous kernel's end to this start on the rank; send = start to the send phase's last "
                  "arrival; wait = from there until block 0 saw every source; receive = from there to the "
                  "latest block's end; kernel = start to end (the kernel's GPU time, as a profiler reports it), "
                  "also as a ratio to the copy floor; spread = range of the start over the ranks sharing a GPU:", "",
                  "| EP | call | gap | send | wait | receive | kernel | kernel / floor | start spread |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in staged:
            for name, p in r["phases_us"].items():
                lines.append(f"| {r['num_ranks']} | {name} | " + " | ".join(
                    f"{p[k]:.1f}" for k in ("gap", "send", "wait", "receive", "kernel")) +
                    f" | {p['kernel'] / r[name]['copy_floor_us']:.2f} | {p['spread']:.1f} |")
    lines += ["", "Overheads (every rank at once; round trip between ranks 0 and 1, the others idle):", "",
              "| EP | empty kernel back to back us | empty kernel alone us | flag round trip us |",
              "|---:|---:|---:|---:|"]
    for r in rows:
        o = r["overheads_us"]
        if o is None:
            continue
        trip = "-" if o["flag_round_trip"] is None else f"{o['flag_round_trip']:.2f}"
        lines.append(f"| {r['num_ranks']} | {o['empty_kernel_back_to_back']:.1f} | {o['empty_kernel_alone']:.1f} | "
                     f"{trip} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks low-latency", description=__doc__.splitlines()[0])
    p.add_argument("--num-ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank (num_max_dispatch_tokens_per_rank)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--num-sms", type=int, default=None, help="blocks per kernel (default: SMs / ranks per GPU)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--iters", type=int, default=20, help="back-to-back calls per batch")
    p.add_argument("--hook-iters", type=int, default=30)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--num-ranks-per-node", type=int, default=None,
                   help="ranks per (virtual) node: smaller groups run the NVSHMEM kernels across nodes")
    p.add_argument("--out", default="docs/perf", help="directory for the JSON and Markdown results ('' for none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks low-latency needs a CUDA device", file=sys.stderr)
        return 2
    for n in args.num_ranks:
        if args.experts % n:
            p.error(f"--experts {args.experts} is not divisible by {n} ranks")
    rows = []
    for n in args.num_ranks:
        rows.append(_run(n, args))
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name(0)
    report = {"benchmark": "low_latency", "device": device, "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "results": rows}
    table = _table(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "low_latency_" + re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
        if args.num_ranks_per_node is not None:
            name += f"_{args.num_ranks_per_node}_per_node"
        stem = os.path.join(args.out, name)
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"# Low-latency kernels on {device}\n\n{report['gpus']} GPU(s), commit {report['commit']}, "
                    f"torch {report['torch']}, {report['date']}. {rows[0]['tokens']} tokens per rank, hidden "
                    f"{rows[0]['hidden']}, top-{rows[0]['topk']} of {rows[0]['experts']} experts. Ranks sharing a "
                    "GPU run under CUDA MPS; the copy floor is one device-to-device copy of the bytes all ranks "
                    "on that GPU send (read + write), measured in the same run.\n\n" + table + "\n")
        print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
