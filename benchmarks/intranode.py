"""Intranode benchmark: ``python -m benchmarks intranode [options]``.

Spawns N ranks (sharing GPU 0 under CUDA MPS when there are fewer GPUs than ranks), runs the intranode
kernels on DeepEP's shapes and reports, per shape and SM count:

* ``dispatch``: the dispatch kernel alone (cached mode: same rows, no count exchange);
* ``dispatch_full``: layout + count exchange (host sync) + dispatch, what a first call costs;
* ``combine``: the combine kernel, its input an ordinary tensor (staged into the buffer by the kernel, in
  token windows pipelined with the pull); ``combine_windows0``: staged by the copy engine, then one barrier,
  then the pull; ``combine_windows4`` / ``16``: other window counts (``set_combine_windows``);
* ``combine_zero_copy``: the same combine with its input written into the buffer beforehand, outside the
  timed region (``get_next_combine_buffer``, as the expert or un-permute kernel writing it would);
* ``floor``: the copy engine moving the same bytes, measured in the same run; ``x floor`` is the kernel
  time over it. Ranks sharing one GPU: one device-to-device copy of every rank's bytes (they share its
  memory). One rank per GPU: every rank copies, at once, the bytes it sends to each peer straight into
  that peer's memory (one stream per peer), the NVLink roofline;
* ``nccl``: with one rank per GPU, NCCL ``all_to_all_single`` on the same routing with the permutations
  Megatron's ``alltoall`` dispatcher does around it (one row per (token, expert) pair, sorted by expert,
  then chunks sorted by local expert; combine undoes both and sums with the top-k weights), BF16 only;
* ``reference``: the reference backend (``all_to_all_single`` on gloo, CPU tensors) on small shapes;
* ``deepep``: DeepEP's ``Buffer`` on the same inputs, SM count and routing (``dispatch``, ``dispatch_full``,
  ``combine``), when ``deep_ep`` is importable (``--deepep``; ``benchmarks/deepep_baseline.py``).

Bandwidth is counted as DeepEP counts it: bytes a rank receives in dispatch (FP8 rows count their
scales) and sends in combine, over the kernel time (median of timed loops after warm-up, CUDA events).
Writes a JSON (device, commit, command, results) and a Markdown table; ``--plot`` adds a PNG.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from . import deepep_baseline
from .common import (FP8, add_shape_args, commit, copy_floor_us, gather, inputs, ints, max_num_sms_per_rank,
                     one_rank_per_gpu, peer_copy_floor_us, row_bytes, run_ranks, time_kernels, time_us, write_report)


class MegatronAllToAll:
    """NCCL all-to-all with the permutations of Megatron's ``alltoall`` token dispatcher (the baseline).

    Dispatch: one row per (token, expert) pair sorted by expert (``permute``), ``all_to_all_single``,
    then the received chunks reordered from (source rank, local expert) to (local expert, source rank).
    Combine: the inverse reorder, ``all_to_all_single`` back, rows scaled by their top-k weight and
    summed into their tokens (``unpermute``). Split sizes are computed once (cached routing).
    """

    def __init__(self, group, topk_idx, topk_weights, num_experts, num_ranks, hidden):
        num_tokens, device = topk_idx.size(0), topk_idx.device
        num_local = num_experts // num_ranks
        # -1 entries go to a spare column that is dropped, so they cannot overwrite a real expert's entry.
        column = torch.where(topk_idx >= 0, topk_idx, num_experts)
        dense = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=device)
        dense = dense.scatter_(1, column, True)[:, :num_experts]
        probs = torch.zeros(num_tokens, num_experts + 1, device=device)
        probs = probs.scatter_(1, column, topk_weights.float())[:, :num_experts]
        self.token_idx = dense.t().nonzero(as_tuple=True)[1]  # expert-major, as Megatron's permute
        self.probs = probs.t()[dense.t()]
        per_expert = dense.sum(0)
        self.input_splits = per_expert.view(num_ranks, num_local).sum(1).tolist()
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=group)  # [source rank * local expert]
        recv_counts = recv_counts.view(num_ranks, num_local)
        self.output_splits = recv_counts.sum(1).tolist()
        starts = torch.cumsum(recv_counts.flatten(), 0) - recv_counts.flatten()
        order = torch.arange(num_ranks * num_local, device=device).view(num_ranks, num_local).t().flatten()
        self.chunk_perm = torch.cat([torch.arange(int(starts[c]), int(starts[c] + recv_counts.flatten()[c]),
                                                  device=device) for c in order.tolist()])
        self.chunk_inverse = torch.empty_like(self.chunk_perm)
        self.chunk_inverse[self.chunk_perm] = torch.arange(self.chunk_perm.numel(), device=device)
        self.group, self.num_tokens, self.hidden = group, num_tokens, hidden

    def dispatch(self, x):
        permuted = x.index_select(0, self.token_idx)
        out = x.new_empty(sum(self.output_splits), self.hidden)
        dist.all_to_all_single(out, permuted, self.output_splits, self.input_splits, group=self.group)
        return out.index_select(0, self.chunk_perm)

    def combine(self, y):
        back = y.index_select(0, self.chunk_inverse)
        out = y.new_empty(self.token_idx.numel(), self.hidden)
        dist.all_to_all_single(out, back, self.input_splits, self.output_splits, group=self.group)
        weighted = (out * self.probs.unsqueeze(1)).to(y.dtype)
        return torch.zeros(self.num_tokens, self.hidden, dtype=y.dtype, device=y.device).index_add_(
            0, self.token_idx, weighted)


def _worker(rank, num_ranks, opts):
    from moe_a2a.backends import intranode
    from moe_a2a.backends.reference import ReferenceBackend
    from moe_a2a.config import Config

    device = torch.device("cuda", torch.cuda.current_device())
    max_sms = max(opts["sms"])
    hint_cfg = Config(max_sms)
    nvl = max(hint_cfg.get_nvl_buffer_size_hint(max(opts["hidden"]) * 2, num_ranks), opts["min_nvl_bytes"])
    kern = intranode.IntranodeBackend(rank, num_ranks, dist.group.WORLD, nvl, gather, 60.0)
    ref = ReferenceBackend(rank, num_ranks, dist.group.WORLD, num_ranks)
    num_experts, topk = opts["experts"], opts["topk"]
    w, loops, iters = opts["warmup"], opts["loops"], opts["iters"]
    per_gpu = one_rank_per_gpu(num_ranks)
    nccl = dist.new_group(backend="nccl") if per_gpu else None
    ep = deepep_baseline.load(opts["deepep"])
    deepep = deepep_baseline.DeepEPCalls(ep, dist.group.WORLD, num_ranks, max(opts["hidden"])) if ep else None
    rows: List[Dict] = []
    for hidden in opts["hidden"]:
        for num_tokens in opts["tokens"]:
            for dtype in opts["dtypes"]:
                fp8 = dtype == "fp8"
                x, scales, idx, weights = inputs(rank, num_tokens, hidden, num_experts, topk, fp8, device)
                layout = intranode.get_dispatch_layout(idx, num_experts, num_ranks, num_ranks)
                for num_sms in opts["sms"]:
                    cfg = Config(num_sms)
                    bytes_per_row = row_bytes(hidden, fp8)
                    handle, mine = time_kernels(kern, x, scales, idx, weights, layout, num_experts, num_ranks,
                                                num_ranks, cfg, w, loops, iters, zero_copy=True)
                    everyone = gather(mine)
                    floors = {}
                    if per_gpu:
                        # Rows this rank sends to each peer: dispatch pushes them there, combine brings them back.
                        send_rows = gather(layout[0].tolist())
                        floors["dispatch"] = peer_copy_floor_us([n * bytes_per_row for n in send_rows[rank]])
                        floors["combine"] = peer_copy_floor_us([send_rows[d][rank] * hidden * 2
                                                                 for d in range(num_ranks)])
                    elif rank == 0:
                        floors["dispatch"] = copy_floor_us(sum(m["dispatch_bytes"] for m in everyone))
                        floors["combine"] = copy_floor_us(sum(m["combine_bytes"] for m in everyone))
                    if per_gpu and not fp8 and num_sms == opts["sms"][0]:
                        floors.update(_time_megatron_alltoall(nccl, x, idx, weights, num_experts, num_ranks,
                                                              w, loops, iters))
                    if deepep is not None:
                        calls = deepep.calls(x, scales, idx, weights, num_experts, num_sms)
                        mine = {f"deepep_{op}": time_us(fn, w, loops, iters if op != "dispatch_full" else
                                                        max(1, iters // 2)) for op, fn in calls.items()}
                        floors.update({k: max(v) for k, v in zip(mine, zip(*gather(list(mine.values()))))})
                    dist.barrier()
                    ref_us = None
                    if num_tokens <= opts["reference_max_tokens"] and num_sms == opts["sms"][0]:
                        ref_us = _time_reference(ref, rank, num_ranks, x, scales, idx, weights, layout, cfg)
                    if rank == 0:
                        new = _rows(num_ranks, dtype, hidden, num_tokens, num_sms, everyone, floors, ref_us)
                        rows.extend(new)
                        print(_format_rows(new), flush=True)
                    del handle
    kern.destroy()
    return rows


def _time_megatron_alltoall(group, x, idx, weights, num_experts, num_ranks, warmup, loops, iters) -> Dict:
    """Slowest rank's dispatch and combine time of the NCCL baseline (``MegatronAllToAll``)."""
    base = MegatronAllToAll(group, idx, weights, num_experts, num_ranks, x.size(1))
    y = base.dispatch(x)
    times = dict(nccl_dispatch=time_us(lambda: base.dispatch(x), warmup, loops, iters),
                 nccl_combine=time_us(lambda: base.combine(y), warmup, loops, iters))
    return {k: max(v) for k, v in zip(times, zip(*gather(list(times.values()))))}


def _time_reference(ref, rank, num_ranks, x, scales, idx, weights, layout, cfg) -> float:
    from moe_a2a.backends.base import DispatchRequest

    xc = (x.view(torch.uint8) if x.dtype == FP8 else x).cpu()
    sc = scales.cpu() if scales is not None else None
    lay = [t.cpu() if t is not None else None for t in layout]
    ic, wc = idx.cpu(), weights.cpu()
    samples = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        ref.dispatch(DispatchRequest(xc, cfg, sc, is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                                     topk_idx=ic, topk_weights=wc))
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _rows(num_ranks, dtype, hidden, num_tokens, num_sms, everyone, floors, ref_us):
    out = []
    for op, key, bytes_key in (("layout", "layout_us", "dispatch_bytes"),
                               ("dispatch", "dispatch_us", "dispatch_bytes"),
                               ("dispatch_full", "dispatch_full_us", "dispatch_bytes"),
                               ("dispatch_in_buffer", "dispatch_in_buffer_us", "dispatch_bytes"),
                               ("dispatch_sm_staging", "dispatch_sm_staging_us", "dispatch_bytes"),
                               ("combine", "combine_us", "combine_bytes"),
                               ("combine_zero_copy", "combine_zero_copy_us", "combine_bytes"),
                               # the combine with one barrier (copy-engine staging) or in 4 / 16 windows
                               *((f"combine_windows{n}", f"combine_windows{n}_us", "combine_bytes") for n in (0, 4, 16))):
        if not all(key in m for m in everyone):  # the zero-copy input did not fit num_nvl_bytes
            continue
        slowest = max(m[key] for m in everyone)
        moves = op != "layout"  # the layout kernel moves no rows: no bandwidth, no floor
        bw = statistics.mean(m[bytes_key] / m[key] / 1e3 for m in everyone) if moves else None  # GB/s per rank
        combine = op.startswith("combine")
        floor = floors["combine" if combine else "dispatch"] if moves else 0
        nccl = floors.get("nccl_combine" if combine else "nccl_dispatch")
        same_call = "combine" if op.startswith("combine_windows") else op.replace("_sm_staging", "")
        deepep = floors.get(f"deepep_{same_call}")  # DeepEP's same call
        out.append(dict(ranks=num_ranks, dtype=dtype, hidden=hidden, tokens=num_tokens, num_sms=num_sms, op=op,
                        time_us=round(slowest, 1), algbw_gbps=round(bw, 1) if moves else None,
                        floor_us=round(floor, 1) if moves else None,
                        x_floor=round(slowest / floor, 3) if floor > 0 else None,
                        nccl_us=round(nccl, 1) if nccl is not None else None,
                        deepep_us=round(deepep, 1) if deepep is not None else None,
                        deepep_x_floor=round(deepep / floor, 3) if deepep is not None and floor > 0 else None,
                        reference_us=round(ref_us, 1) if (ref_us is not None and op == "dispatch") else None,
                        recv_rows_per_rank=[m["num_recv"] for m in everyone]))
    return out


def _format_rows(rows) -> str:
    head = ("| ranks | dtype | hidden | tokens | SMs | op | time (us) | algbw/rank (GB/s) | floor (us) | x floor | "
            "DeepEP (us) | DeepEP x floor | NCCL+permute (us) | reference (us) |")
    lines = [head, "|" + "---|" * 14]

    def show(value):
        return "" if value is None else value

    for r in rows:
        lines.append(f"| {r['ranks']} | {r['dtype']} | {r['hidden']} | {r['tokens']} | {r['num_sms']} | {r['op']} | "
                     f"{r['time_us']} | {show(r['algbw_gbps'])} | {show(r['floor_us'])} | {show(r['x_floor'])} | "
                     f"{show(r.get('deepep_us'))} | {show(r.get('deepep_x_floor'))} | {show(r.get('nccl_us'))} | "
                     f"{show(r['reference_us'])} |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    """Bandwidth vs tokens per (ranks, dtype, op) at the largest hidden size and SM count measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = max(r["hidden"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ranks in sorted({r["ranks"] for r in rows}):
        sms = max(r["num_sms"] for r in rows if r["ranks"] == ranks)
        for dtype in sorted({r["dtype"] for r in rows}):
            for op in ("dispatch", "combine", "combine_zero_copy"):
                pts = sorted((r["tokens"], r["algbw_gbps"]) for r in rows if r["ranks"] == ranks and
                             r["dtype"] == dtype and r["op"] == op and r["hidden"] == hidden and r["num_sms"] == sms)
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=f"EP{ranks} {dtype} {op} ({sms} SMs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("algorithm bandwidth per rank (GB/s)")
    ax.set_title(f"moe_a2a intranode, hidden {hidden}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks intranode", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8", help="comma-separated rank counts (default 8)")
    add_shape_args(p, sms="8,16,24", warmup=3, iters=6)
    p.add_argument("--reference-max-tokens", type=int, default=512)
    p.add_argument("--min-nvl-bytes", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default docs/perf/intranode_<device>.json)")
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    p.add_argument("--deepep", choices=("auto", "on", "off"), default="auto",
                   help="DeepEP's Buffer as a baseline in the same run: auto = when deep_ep is importable")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks intranode needs a CUDA device", file=sys.stderr)
        return 2
    from moe_a2a.backends import intranode
    if not intranode.extension_available():
        print("benchmarks intranode needs the compiled extension moe_a2a._C", file=sys.stderr)
        return 2

    ep = deepep_baseline.load(args.deepep)  # "on" without deep_ep stops here, before any rank starts
    all_rows: List[Dict] = []
    for num_ranks in ints(args.ranks):
        fit = max_num_sms_per_rank(num_ranks)
        sms = [s for s in ints(args.sms) if s <= fit]
        skipped = [s for s in ints(args.sms) if s > fit]
        if skipped:
            print(f"EP{num_ranks}: skipping {skipped} SMs per rank (only {fit} fit with every rank resident)")
        if not sms:
            continue
        opts = dict(tokens=ints(args.tokens), hidden=ints(args.hidden), sms=sms, dtypes=args.dtypes.split(","),
                    experts=args.experts, topk=args.topk, warmup=args.warmup, loops=args.loops, iters=args.iters,
                    reference_max_tokens=args.reference_max_tokens, min_nvl_bytes=args.min_nvl_bytes,
                    deepep=args.deepep)
        results = run_ranks(_worker, num_ranks, opts)
        all_rows.extend(results[0])

    device = torch.cuda.get_device_name(0)
    report = dict(device=device, num_gpus=torch.cuda.device_count(), torch=torch.__version__, commit=commit(),
                  deepep=getattr(ep, "__version__", "unknown version") if ep is not None else None,
                  command="python -m benchmarks intranode " + " ".join(argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  shared_gpu=torch.cuda.device_count() < max(ints(args.ranks)),
                  floor="copy engine: one device-to-device copy on the shared GPU, or, with one rank per GPU, "
                        "every rank's peer copies at once (NVLink)", results=all_rows)
    out = args.out or os.path.join("docs", "perf", f"intranode_{device.replace(' ', '_')}.json")
    table = _format_rows(all_rows)
    write_report(report, table, out, f"intranode on {device}")
    if args.plot:
        plot(all_rows, os.path.splitext(out)[0] + ".png")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
