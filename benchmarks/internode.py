"""Internode benchmark: ``python -m benchmarks internode [options]``.

Spawns ``nodes * ranks_per_node`` ranks as virtual nodes (sharing GPU 0 under CUDA MPS when there are
fewer GPUs than ranks): NVSHMEM between the ranks of one local index, the intranode kernels inside each
node. Reports per shape and SM count, as ``python -m benchmarks intranode`` does:

* ``dispatch``: cached dispatch (both stages, no count exchange);
* ``dispatch_full``: layout + count exchange (host sync) + both stages;
* ``combine``: both stages backwards;
* ``floor``: a device-to-device copy of every rank's received (dispatch) or sent (combine) bytes, in the
  same run; ``x floor`` is the kernel time over it. On one GPU the "RDMA" puts are copies through the
  same memory, so this measures the kernels' overheads, not a network.

``rdma_rows`` counts the rows each rank received over the RDMA stage from other nodes (a token once
per node, however many ranks of the node want it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from typing import Dict, List

import torch
import torch.distributed as dist

from .common import (add_shape_args, commit, copy_floor_us, gather, inputs, ints, max_num_sms_per_rank, run_ranks,
                     time_kernels, virtual_nodes_env, write_report)


def _worker(rank, num_ranks, opts):
    from moe_a2a.backends import internode, intranode
    from moe_a2a.config import Config

    virtual_nodes_env()
    device = torch.device("cuda", torch.cuda.current_device())
    per_node = opts["per_node"]
    hint = Config(max(opts["sms"]))
    hidden_bytes = max(opts["hidden"]) * 2
    nvl = hint.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)
    rdma = hint.get_rdma_buffer_size_hint(hidden_bytes, num_ranks, per_node)
    kern = internode.InternodeBackend(rank, num_ranks, per_node, nvl, rdma, gather, 60.0)
    num_experts, topk = opts["experts"], opts["topk"]
    w, loops, iters = opts["warmup"], opts["loops"], opts["iters"]
    rows: List[Dict] = []
    for hidden in opts["hidden"]:
        for num_tokens in opts["tokens"]:
            for dtype in opts["dtypes"]:
                fp8 = dtype == "fp8"
                x, scales, idx, weights = inputs(rank, num_tokens, hidden, num_experts, topk, fp8, device)
                layout = intranode.get_dispatch_layout(idx, num_experts, num_ranks, per_node)
                for num_sms in opts["sms"]:
                    cfg = Config(num_sms)
                    handle, mine = time_kernels(kern, x, scales, idx, weights, layout, num_experts, num_ranks,
                                                per_node, cfg, w, loops, iters)
                    mine["rdma_rows"] = sum(row[kern.node] for m, row in enumerate(handle.rdma_counts)
                                            if m != kern.node)
                    everyone = gather(mine)
                    floors = {}
                    if rank == 0:
                        floors["dispatch"] = copy_floor_us(sum(m["dispatch_bytes"] for m in everyone))
                        floors["combine"] = copy_floor_us(sum(m["combine_bytes"] for m in everyone))
                    dist.barrier()
                    if rank == 0:
                        rows.extend(_rows(num_ranks, per_node, dtype, hidden, num_tokens, num_sms, everyone, floors))
                        print(_format_rows(rows[-3:]), flush=True)
    kern.check()
    kern.destroy()
    return rows


def _rows(num_ranks, per_node, dtype, hidden, num_tokens, num_sms, everyone, floors):
    out = []
    for op, key, bytes_key in (("dispatch", "dispatch_us", "dispatch_bytes"),
                               ("dispatch_full", "dispatch_full_us", "dispatch_bytes"),
                               ("combine", "combine_us", "combine_bytes")):
        slowest = max(m[key] for m in everyone)
        bw = statistics.mean(m[bytes_key] / m[key] / 1e3 for m in everyone)  # GB/s per rank
        floor = floors["combine" if op == "combine" else "dispatch"]
        out.append(dict(ranks=num_ranks, nodes=num_ranks // per_node, dtype=dtype, hidden=hidden, tokens=num_tokens,
                        num_sms=num_sms, op=op, time_us=round(slowest, 1), algbw_gbps=round(bw, 1),
                        floor_us=round(floor, 1), x_floor=round(slowest / floor, 3) if floor > 0 else None,
                        recv_rows_per_rank=[m["num_recv"] for m in everyone],
                        rdma_rows_per_rank=[m["rdma_rows"] for m in everyone]))
    return out


def _format_rows(rows) -> str:
    head = "| ranks | nodes | dtype | hidden | tokens | SMs | op | time (us) | algbw/rank (GB/s) | floor (us) | x floor |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['ranks']} | {r['nodes']} | {r['dtype']} | {r['hidden']} | {r['tokens']} | {r['num_sms']} | "
                     f"{r['op']} | {r['time_us']} | {r['algbw_gbps']} | {r['floor_us']} | {r['x_floor']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks internode", description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="2x4", help="comma-separated NODESxRANKS_PER_NODE (default 2x4)")
    add_shape_args(p, sms="8,16", warmup=2, iters=4)
    p.add_argument("--out", default=None, help="JSON path (default docs/perf/internode_<device>.json)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("benchmarks internode needs a CUDA device", file=sys.stderr)
        return 2
    from moe_a2a.backends import internode
    if not internode.available():
        print("benchmarks internode needs the compiled extensions moe_a2a._C and moe_a2a._nvshmem", file=sys.stderr)
        return 2
    all_rows: List[Dict] = []
    for topo in args.topology.split(","):
        nodes, per_node = (int(v) for v in topo.lower().split("x"))
        num_ranks = nodes * per_node
        fit = max_num_sms_per_rank(num_ranks)
        sms = [s for s in ints(args.sms) if s <= fit]
        if not sms:
            print(f"{topo}: no SM count of {args.sms} fits ({fit} per rank)")
            continue
        opts = dict(per_node=per_node, tokens=ints(args.tokens), hidden=ints(args.hidden), sms=sms,
                    dtypes=args.dtypes.split(","), experts=args.experts, topk=args.topk, warmup=args.warmup,
                    loops=args.loops, iters=args.iters)
        results = run_ranks(_worker, num_ranks, opts)
        all_rows.extend(results[0])
    device = torch.cuda.get_device_name(0)
    report = dict(device=device, num_gpus=torch.cuda.device_count(), torch=torch.__version__, commit=commit(),
                  command="python -m benchmarks internode " + " ".join(argv or sys.argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  virtual_nodes=True, results=all_rows)
    out = args.out or os.path.join("docs", "perf", f"internode_{device.replace(' ', '_')}.json")
    table = _format_rows(all_rows)
    write_report(report, table, out, f"internode (virtual nodes) on {device}")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
