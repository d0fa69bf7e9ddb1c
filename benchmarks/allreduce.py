"""All-reduce benchmark: the Lamport kernels (one-shot, two-shot, AUTO, fused RMSNorm) against the unfused sequence.

    python -m benchmarks all-reduce --ranks 8 --out docs/perf/allreduce.json [--write-table]

Spawns N ranks (sharing GPU 0 under CUDA MPS when there are fewer GPUs than ranks) and times, per message
size (bytes of ``[tokens, hidden]`` per rank, 8 KiB to 256 MiB by default):

* ``oneshot`` / ``twoshot`` / ``auto``: ``AllReduce`` with that strategy, fusion ``NONE``;
* ``fused``: ``AUTO`` with ``RESIDUAL_RMS_NORM`` (all-reduce, residual add, RMSNorm in one kernel);
* ``unfused``: all-reduce, then ``+ residual`` and ``torch.nn.functional.rms_norm`` as separate torch ops; the
  all-reduce is NCCL with one rank per GPU, the project's ``AUTO`` kernel when ranks share a GPU (NCCL
  cannot run several ranks on one GPU);
* ``nccl``: ``torch.distributed.all_reduce`` alone, with one rank per GPU;
* ``*_graph``: one-shot, two-shot and fused replayed from a CUDA graph (small messages: without the host's
  Python and launch overhead, which otherwise dominates them);
* ``auto_2x_blocks`` / ``fused_2x_blocks``: ``auto`` and ``fused`` with twice the default blocks per kernel (two
  per SM, as the kernels' launch bounds allow), where the message has more rows than the default count (without
  ``--blocks``): whether more rows in flight per SM shorten the row-by-row norm path.

Columns: time (median of timed loops, CUDA events), bus bandwidth ``bytes * 2 (N - 1) / N / time`` (NCCL's
definition), the copy floor and the ratio to it, and ``launch``: the time of an empty kernel launch. The
floor: ranks sharing one GPU, a device-to-device copy of ``N * bytes`` by one rank while the others wait (every
rank's input read once and its output written once, the least memory traffic of any all-reduce); one rank per
GPU, each rank copying ``2 * bytes / N`` into every peer at once (the bus bytes over NVLink). ``--write-table``
writes the measured one-shot/two-shot times to the table ``AUTO`` reads (``moe_a2a/data/allreduce_tuning.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_a2a.comm import AllReduce, AllReduceFusionOp, AllReduceParams, AllReduceStrategy
from moe_a2a.comm import workspace as ws_mod

from moe_a2a.launch import ranks_per_gpu

from .common import (commit, copy_floor_us, gather, ints, one_rank_per_gpu, peer_copy_floor_us, run_ranks, time_us,
                     write_report)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sizes(lo: int, hi: int) -> List[int]:
    """``lo``, ``4 lo``, ``16 lo``, ... up to ``hi``, and ``hi``."""
    out = []
    while lo < hi:
        out.append(lo)
        lo *= 4
    return out + [hi]


def _launch_us(warmup, loops, iters) -> float:
    t = torch.empty(1, device="cuda")
    return time_us(lambda: t.zero_(), warmup, loops, iters)


def _graphed(fn):
    """``fn`` captured in a CUDA graph (after one eager call, which sizes the workspace); returns its replay.
    Replays launch the kernel with no Python or launch overhead on the host, as graph-captured models do."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def _worker(rank: int, num_ranks: int, opts: Dict) -> Dict:
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = _DTYPES[opts["dtype"]]
    hidden = opts["hidden"]
    elem = torch.empty((), dtype=dtype).element_size()
    multi_gpu = one_rank_per_gpu(num_ranks)
    nccl_group = dist.new_group(backend="nccl") if multi_gpu else None
    ars = {name: AllReduce(None, st, timeout_s=opts["timeout_s"], num_blocks=opts["blocks"])
           for name, st in (("oneshot", AllReduceStrategy.ONESHOT), ("twoshot", AllReduceStrategy.TWOSHOT),
                            ("auto", AllReduceStrategy.AUTO))}
    # The workspaces' default: one block per SM for each rank sharing the GPU; two per SM fit as well.
    default_blocks = max(1, torch.cuda.get_device_properties(device).multi_processor_count // ranks_per_gpu(num_ranks))
    if not opts["blocks"]:
        ars["auto_2x"] = AllReduce(None, AllReduceStrategy.AUTO, timeout_s=opts["timeout_s"],
                                   num_blocks=2 * default_blocks)
    w, l, it = opts["warmup"], opts["loops"], opts["iters"]
    launch = _launch_us(w, l, it)
    rows = []
    for size in opts["sizes"]:
        tokens = max(1, size // (hidden * elem))
        nbytes = tokens * hidden * elem
        g = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        g = torch.Generator(device=device).manual_seed(1 << 20)  # residual and weight: the same on every rank
        residual = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        weight = torch.rand(hidden, device=device, dtype=dtype, generator=g) + 0.5
        fused = AllReduceParams(AllReduceFusionOp.RESIDUAL_RMS_NORM, residual=residual, norm_weight=weight)
        ops = {}
        if nbytes <= opts["oneshot_max_bytes"]:
            ops["oneshot"] = lambda: ars["oneshot"](x)
        ops["twoshot"] = lambda: ars["twoshot"](x)
        ops["auto"] = lambda: ars["auto"](x)
        ops["fused"] = lambda: ars["auto"](x, all_reduce_params=fused)
        if "auto_2x" in ars and tokens > default_blocks:
            ops["auto_2x_blocks"] = lambda: ars["auto_2x"](x)
            ops["fused_2x_blocks"] = lambda: ars["auto_2x"](x, all_reduce_params=fused)
        if multi_gpu:
            def nccl():
                y = x.clone()
                dist.all_reduce(y, group=nccl_group)
                return y
            ops["nccl"] = nccl
            reduce_fn = nccl
        else:
            reduce_fn = lambda: ars["auto"](x)

        def unfused():
            r = reduce_fn() + residual
            return F.rms_norm(r.float(), (hidden,), weight.float(), 1e-6).to(dtype), r
        ops["unfused"] = unfused
        if nbytes <= opts["graph_max_bytes"]:
            for name in [n for n in ("oneshot", "twoshot", "fused") if n in ops]:
                ops[name + "_graph"] = _graphed(ops[name])
        if multi_gpu:
            floor = peer_copy_floor_us([0 if d == rank else max(16, 2 * nbytes // num_ranks)
                                        for d in range(num_ranks)])
        else:
            # Rank 0 alone, the others idle at the gather: every rank copying at once would time their contention.
            torch.cuda.synchronize()
            dist.barrier()
            floor = max(gather(copy_floor_us(num_ranks * nbytes) if rank == 0 else 0.0))
        for name, fn in ops.items():
            t = time_us(fn, w, l, it)
            times = [None] * num_ranks
            dist.all_gather_object(times, t)
            t = max(times)  # the slowest rank
            for ar in ars.values():
                ws = ar.workspace(elem)
                if ws is not None:
                    ws.check()
            rows.append({"ranks": num_ranks, "dtype": opts["dtype"], "hidden": hidden, "tokens": tokens,
                         "bytes": nbytes, "op": name, "time_us": round(t, 2),
                         "busbw_gbps": round(nbytes * 2 * (num_ranks - 1) / num_ranks / t / 1e3, 1),
                         "floor_us": round(floor, 2), "x_floor": round(t / floor, 2), "launch_us": round(launch, 2)})
    for ar in ars.values():
        ar.destroy()
    return {"rows": rows}


def _table(rows) -> str:
    lines = ["| ranks | bytes | tokens | op | time (us) | bus GB/s | floor (us) | x floor | x plain AR |",
             "|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["ranks"], r["bytes"]): r["time_us"] for r in rows if r["op"] == "auto"}
    for r in rows:
        base = plain.get((r["ranks"], r["bytes"]))
        lines.append(f"| {r['ranks']} | {r['bytes']} | {r['tokens']} | {r['op']} | {r['time_us']} | "
                     f"{r['busbw_gbps']} | {r['floor_us']} | {r['x_floor']} | "
                     f"{'' if not base else round(r['time_us'] / base, 2)} |")
    return "\n".join(lines)


def tuning_entries(rows) -> Dict[str, List[Dict]]:
    """One-shot/two-shot times per rank count and message size, as ``choose_strategy`` reads them."""
    out: Dict[str, List[Dict]] = {}
    by = {}
    for r in rows:
        if r["op"] in ("oneshot", "twoshot"):
            by.setdefault((r["ranks"], r["bytes"]), {})[r["op"]] = r["time_us"]
    for (ranks, nbytes), t in sorted(by.items()):
        if "oneshot" in t and "twoshot" in t:
            out.setdefault(str(ranks), []).append({"bytes": nbytes, "oneshot_us": t["oneshot"],
                                                   "twoshot_us": t["twoshot"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks all-reduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8", help="comma-separated rank counts")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--min-bytes", type=int, default=8 << 10)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--oneshot-max-bytes", type=int, default=64 << 20,
                   help="skip one-shot above this message size (it reads N times the bytes)")
    p.add_argument("--blocks", type=int, default=0, help="blocks per kernel (0: the default)")
    p.add_argument("--graph-max-bytes", type=int, default=4 << 20,
                   help="also time one-shot, two-shot and fused replayed from a CUDA graph up to this size")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--out", default="allreduce_bench.json")
    p.add_argument("--write-table", action="store_true", help=f"write {ws_mod.TABLE_PATH}")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the all-reduce benchmark needs CUDA", file=sys.stderr)
        return 2
    if not ws_mod.kernels_available():
        print("moe_a2a._C lacks the all-reduce kernels: build it first", file=sys.stderr)
        return 2
    opts = {"dtype": args.dtype, "hidden": args.hidden, "sizes": _sizes(args.min_bytes, args.max_bytes),
            "oneshot_max_bytes": args.oneshot_max_bytes, "graph_max_bytes": args.graph_max_bytes,
            "blocks": args.blocks, "warmup": args.warmup, "loops": args.loops, "iters": args.iters,
            "timeout_s": args.timeout_s}
    rows = []
    for n in ints(args.ranks):
        rows += run_ranks(_worker, n, opts)[0]["rows"]
    report = {"device": torch.cuda.get_device_name(0), "num_gpus": torch.cuda.device_count(),
              "commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "command": "python -m benchmarks all-reduce " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    table = _table(rows)
    write_report(report, table, args.out, "moe_a2a all-reduce")
    print(table)
    if args.write_table:
        old = ws_mod.load_table(ws_mod.TABLE_PATH)
        entries = dict(old.get("entries", {}))
        entries.update(tuning_entries(rows))
        with open(ws_mod.TABLE_PATH, "w") as f:
            json.dump({"entries": entries, "device": report["device"], "commit": report["commit"],
                       "command": report["command"], "date": report["date"]}, f, indent=1)
        print(f"wrote {ws_mod.TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
