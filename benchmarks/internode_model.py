"""Analytical RDMA time of internode dispatch/combine, written to docs/perf/internode_model.{json,md}.

Model: every rank sends each token once to every *other* node that holds one of its top-k experts
(NVLink forwards it inside that node), so RDMA bytes per rank = tokens x E[remote nodes hit] x row bytes.
Routing is uniform top-k without repeats; P(node hit) = 1 - C(E - E/N, k) / C(E, k). Time = bytes over the
NIC bandwidth of one rank: the 400 Gb/s line rate (50 GB/s) and the 43-58 GB/s per rank DeepEP reports on
H800 + ConnectX-7. Combine sends the same rows back in BF16.

Usage: python benchmarks/internode_model.py [OUT_DIR]
"""
import json
import os
import sys
from math import comb

TOKENS, HIDDEN, TOPK, EXPERTS, RANKS_PER_NODE = 4096, 7168, 8, 256, 8
BANDWIDTHS_GBPS = {"line rate 50 GB/s": 50.0, "DeepEP measured 43 GB/s": 43.0, "DeepEP measured 58 GB/s": 58.0}


def model(num_nodes: int) -> dict:
    per_node = EXPERTS // num_nodes
    p_hit = 1 - comb(EXPERTS - per_node, TOPK) / comb(EXPERTS, TOPK)
    remote_nodes = (num_nodes - 1) * p_hit
    rows = {"BF16": HIDDEN * 2, "FP8": HIDDEN + HIDDEN // 128 * 4}
    out = {"num_nodes": num_nodes, "num_ranks": num_nodes * RANKS_PER_NODE, "p_node_hit": p_hit,
           "remote_nodes_per_token": remote_nodes, "calls": {}}
    for call, row in (("dispatch BF16", rows["BF16"]), ("dispatch FP8", rows["FP8"]), ("combine BF16", rows["BF16"])):
        nbytes = TOKENS * remote_nodes * row
        out["calls"][call] = {"rdma_bytes_per_rank": nbytes,
                              "time_us": {k: nbytes / (bw * 1e9) * 1e6 for k, bw in BANDWIDTHS_GBPS.items()}}
    return out


def main(argv) -> None:
    out_dir = argv[0] if argv else "docs/perf"
    results = [model(n) for n in (2, 4, 8)]
    with open(os.path.join(out_dir, "internode_model.json"), "w") as f:
        json.dump({"shape": dict(tokens=TOKENS, hidden=HIDDEN, topk=TOPK, experts=EXPERTS,
                                 ranks_per_node=RANKS_PER_NODE), "results": results}, f, indent=1)
    lines = ["| ranks (nodes) | remote nodes / token | call | RDMA MB / rank | us at 50 GB/s | us at 43-58 GB/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for call, c in r["calls"].items():
            t = c["time_us"]
            lines.append(f"| {r['num_ranks']} ({r['num_nodes']}) | {r['remote_nodes_per_token']:.2f} | {call} | "
                         f"{c['rdma_bytes_per_rank'] / 1e6:.1f} | {t['line rate 50 GB/s']:.0f} | "
                         f"{t['DeepEP measured 58 GB/s']:.0f}-{t['DeepEP measured 43 GB/s']:.0f} |")
    with open(os.path.join(out_dir, "internode_model.md"), "w") as f:
        f.write("# Internode dispatch/combine: analytical RDMA time\n\n" + __doc__.split("\n\n")[1] + "\n\n"
                f"Shape: {TOKENS} tokens per rank, hidden {HIDDEN}, top-{TOPK} of {EXPERTS} experts, "
                f"{RANKS_PER_NODE} GPUs and one NIC per GPU per node; command `python benchmarks/internode_model.py`.\n"
                "These are expectations for real clusters until the internode kernels can be measured on them.\n\n"
                + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
