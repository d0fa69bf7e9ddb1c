"""Benchmark of the mixed TP x DP collectives: every valid (op, mode) of ``MixedCommHandler`` against the unfused
sequence of torch collectives, per-rank sizes 8 KiB to 256 MiB, one JSON.

    python -m benchmarks mixed-comm --num-ranks 8 --local-size 4 --local-tp 2 --inter-dp 2 --out mixed.json
    python -m benchmarks mixed-comm --device cpu --num-ranks 4 --local-size 2 --local-tp 2 --max-bytes 64K

Spawns ``--num-ranks`` processes: on CUDA one GPU per rank with a ``cpu:gloo,cuda:nccl`` default group; with
more ranks than GPUs they share the GPUs under CUDA MPS on a gloo group (NCCL cannot put two ranks of a group
on one GPU): the fused mode is then the only mode and ``unfused`` runs the torch composition on gloo over
host copies of the tensors (``x.cpu()``, the collectives, ``.to(device)``), the one torch path left there,
and ``floor`` is one device-to-device copy of the bytes every rank writes (they share the GPU's memory);
``--device cpu`` runs on gloo (a smoke test). ``--local-size`` splits the ranks into (virtual) nodes. Rows are
``--row-bytes`` wide (8 KiB, the autotuner's base), and
"bytes" is the per-rank input of the gather-type ops and the per-rank output of the scatter-type ops (the
autotuner's size measure). Per size and op:

* ``unfused``: the torch composition, called directly: ``all_reduce`` over TP then ``all_gather_into_tensor``
  over DP (or ``reduce_scatter_tensor`` over DP then ``all_reduce`` over TP; a plain collective over the world
  when only TP or DP is present);
* one row per valid mode (the fused mode up to the sizes it takes), and ``AUTOTUNE`` (the mode the autotuner
  picks, timed like the others);
* time: median over ``--iters`` calls (each timed alone) after ``--warmup``, the slowest rank's (CUDA events on
  GPU);
  ``speedup``: unfused time over the mode's time; ``max_abs_diff``: the mode's output against unfused's.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.common import commit, virtual_nodes_env
from moe_a2a.launch import RanksFailed, mps_if_needed, spawn
from moe_a2a.comm import MixedCommHandler, MixedCommMode, MixedCommOp, run_mixed_comm
from moe_a2a.comm.mixed import FUSED_MODES

_GATHER = (MixedCommOp.ALLREDUCE, MixedCommOp.ALLGATHER, MixedCommOp.ALLREDUCE_ALLGATHER)
# torch >= 2.14 names them *_single (the *_tensor names still work but warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def unfused(h: MixedCommHandler, op: MixedCommOp, x: torch.Tensor, host: bool = False) -> torch.Tensor:
    """The sequence of plain torch collectives the fused operation replaces (``host``: on copies in host
    memory, for CUDA tensors on a gloo group)."""
    if host:
        return unfused(h, op, x.cpu()).to(x.device)
    p = h.para_info
    if op == MixedCommOp.ALLREDUCE:
        out = x.clone()
        dist.all_reduce(out)
        return out
    if op in (MixedCommOp.ALLGATHER, MixedCommOp.ALLREDUCE_ALLGATHER):
        red = x.clone()
        if op == MixedCommOp.ALLREDUCE_ALLGATHER:
            dist.all_reduce(red, group=h.tp_comm_group)
        out = torch.empty(x.shape[0] * p.dp_size, *x.shape[1:], dtype=x.dtype, device=x.device)
        _all_gather(out, red, group=h.dp_comm_group if p.use_mixed else None)
        return out
    out = torch.empty(x.shape[0] // p.dp_size, *x.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x.contiguous(), group=h.dp_comm_group if p.use_mixed else None)
    if op == MixedCommOp.REDUCESCATTER_ALLREDUCE:
        dist.all_reduce(out, group=h.tp_comm_group)
    return out


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call: the median over ``iters`` calls timed one by one (CUDA events on GPU), the slowest
    rank's. The median keeps a call that waited for a late peer's launch (host skew) from setting the figure."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        per_call = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        per_call = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            per_call.append(time.perf_counter() - t0)
    worst = torch.tensor([statistics.median(per_call)], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())


def copy_floor(nbytes: int, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds of one device-to-device copy of ``nbytes`` (rank 0 alone; the others wait)."""
    t = 0.0
    if dist.get_rank() == 0:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(warmup):
            dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3 / iters
    out = torch.tensor([t], dtype=torch.float64)
    dist.broadcast(out, 0)
    return float(out.item())


def run_rank(rank: int, size: int, args) -> list:
    """Every measurement of this rank's process (the same list on every rank)."""
    shared = args.device == "cuda" and size > torch.cuda.device_count()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    local = args.local_size or size
    if device.type == "cuda" and local < size:  # nodes on this one host: NVSHMEM over peer-to-peer and loopback
        virtual_nodes_env()
    h = MixedCommHandler(rank, size, rank % local, local, rank // local, size // local, args.local_tp,
                         args.local_dp, args.inter_tp, args.inter_dp, dtype, device, use_autotune=True,
                         autotune_max_bytes=max(args.max_bytes, 8192))
    p = h.para_info
    hidden = args.row_bytes // torch.empty((), dtype=dtype).element_size()
    results = []
    sizes = []
    b = args.min_bytes
    while b <= args.max_bytes:
        sizes.append(b)
        b *= 2
    gen = torch.Generator(device=device).manual_seed(rank)
    for op in h.valid_op_list:
        for nbytes in sizes:
            rows = max(1, nbytes // args.row_bytes)
            if op not in _GATHER:
                rows *= p.dp_size
            x = torch.empty(rows, hidden, dtype=dtype, device=device).uniform_(-0.5, 0.5, generator=gen)
            ref = unfused(h, op, x, host=shared)
            t_ref = timed(lambda: unfused(h, op, x, host=shared), device, args.warmup, args.iters)
            row = {"op": op.name, "bytes": nbytes, "mode": "unfused", "time_us": t_ref * 1e6, "speedup": 1.0,
                   "max_abs_diff": 0.0}
            results.append(row)
            if shared:  # every rank writes its output once: one copy of all of them through the GPU's memory
                t_floor = copy_floor(size * ref.numel() * ref.element_size(), device, args.warmup, args.iters)
                results.append({"op": op.name, "bytes": nbytes, "mode": "floor", "time_us": t_floor * 1e6,
                                "speedup": t_ref / t_floor, "max_abs_diff": 0.0})
            chosen = h.select_autotune_mode(op, x)
            for mode in h.valid_mode_list:
                if mode in FUSED_MODES and h.fused_refuses(op, x, mode):  # too large for this mode
                    continue
                out = run_mixed_comm(op, h, x, mode=mode)
                diff = (out.float() - ref.float()).abs().max().item()
                t = timed(lambda: run_mixed_comm(op, h, x, mode=mode), device, args.warmup, args.iters)
                name = mode.name if mode != MixedCommMode.AUTOTUNE else f"AUTOTUNE({chosen.name})"
                results.append({"op": op.name, "bytes": nbytes, "mode": name, "time_us": t * 1e6,
                                "speedup": t_ref / t, "max_abs_diff": diff})
            if shared:  # each row's time over the copy floor
                for r in results:
                    if r["op"] == op.name and r["bytes"] == nbytes:
                        r["x_floor"] = r["time_us"] / (t_floor * 1e6)
            if rank == 0 and not args.quiet:
                line = " ".join(f"{r['mode']}={r['time_us']:.1f}us" for r in results if r["op"] == op.name
                                and r["bytes"] == nbytes)
                print(f"{op.name} {nbytes} B: {line}", flush=True)
    info = {"tp_size": p.tp_size, "dp_size": p.dp_size, "local_tp_size": p.local_tp_size,
            "local_dp_size": p.local_dp_size, "inter_tp_size": p.inter_tp_size, "inter_dp_size": p.inter_dp_size,
            "local_size": p.local_size, "inter_size": p.inter_size,
            "autotune_map": {o.name: {k: m.name for k, m in v.items()} for o, v in h.autotune_map.items()}}
    h.shutdown()
    return [info, results]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks mixed-comm", description=__doc__.split("\n")[0])
    ap.add_argument("--num-ranks", type=int, default=torch.cuda.device_count() or 4)
    ap.add_argument("--local-size", type=int, default=None, help="ranks per (virtual) node; default: all")
    ap.add_argument("--local-tp", type=int, default=None)
    ap.add_argument("--local-dp", type=int, default=None)
    ap.add_argument("--inter-tp", type=int, default=None)
    ap.add_argument("--inter-dp", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-bytes", type=parse_bytes, default=8 << 10)
    ap.add_argument("--max-bytes", type=parse_bytes, default=256 << 20)
    ap.add_argument("--row-bytes", type=parse_bytes, default=8 << 10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    shared = args.device == "cuda" and args.num_ranks > torch.cuda.device_count()
    backend = "cpu:gloo,cuda:nccl" if args.device == "cuda" and not shared else "gloo"
    try:
        with mps_if_needed(args.num_ranks) if shared else contextlib.nullcontext():
            info, results = spawn(run_rank, args.num_ranks, args, backend=backend,
                                  cuda_device=args.device == "cuda", timeout=3600.0)[0]
    except RanksFailed as exc:
        raise SystemExit(f"benchmark ranks failed: {exc}") from None
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "num_ranks": args.num_ranks, "dtype": args.dtype, "row_bytes": args.row_bytes,
              "shared_gpu": shared, "commit": commit(),
              "command": "python -m benchmarks mixed-comm " + " ".join(sys.argv[1:] if argv is None else argv),
              "topology": info, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(report))
    if not args.quiet:
        print(markdown(report))
    return report


def markdown(report: dict) -> str:
    """One table per op: a row per size, a column per mode (microseconds, speedup over unfused)."""
    t = report["topology"]
    lines = [f"# Mixed collectives: {report['num_ranks']} ranks on {report['device']}, {report['dtype']}",
             "", f"TP {t['tp_size']} (node {t['local_tp_size']} x inter {t['inter_tp_size']}), DP {t['dp_size']} "
             f"(node {t['local_dp_size']} x inter {t['inter_dp_size']}), {t['inter_size']} node(s) of "
             f"{t['local_size']}; `{report['command']}`", ""]
    for op in dict.fromkeys(r["op"] for r in report["results"]):
        rows = [r for r in report["results"] if r["op"] == op]
        modes = list(dict.fromkeys(r["mode"].split("(")[0] for r in rows))
        lines += [f"## {op}", "", "| bytes/rank | " + " | ".join(modes) + " |",
                  "|---:|" + "---:|" * len(modes)]
        for nbytes in dict.fromkeys(r["bytes"] for r in rows):
            cells = {r["mode"].split("(")[0]: r for r in rows if r["bytes"] == nbytes}

            def cell(m):  # "-" where the mode does not take this size
                if m not in cells:
                    return "-"
                c = cells[m]
                return f"{c['time_us']:.1f} us ({c['speedup']:.2f}x)" + (f" {c['mode'][len(m):]}" if c["mode"] != m else "")
            lines.append(f"| {nbytes} | " + " | ".join(cell(m) for m in modes) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
