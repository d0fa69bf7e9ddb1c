"""Measure the SM count the intranode kernels need per world size and write ``moe_a2a/data/intranode_tuning.json``.

For each rank count (one rank per GPU: the SM needs of ranks sharing a GPU differ, see ``moe_a2a.tuning``),
runs ``python -m benchmarks intranode`` over the SM counts on DeepEP's shape, BF16, and records for
dispatch and combine the fewest SMs whose time is within ``--tolerance`` of the fastest, with the times.
Entries for other rank counts already in the table are kept.

    python -m benchmarks tune-intranode --ranks 2,4,8 --sms 8,12,16,20,24,28,32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch

from moe_a2a import tuning

from . import intranode
from .common import ints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks tune-intranode", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--sms", default="8,12,16,20,24,28,32")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--tolerance", type=float, default=0.05, help="slack over the fastest time (default 5%%)")
    p.add_argument("--out", default=tuning.TABLE_PATH)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tuning needs CUDA devices", file=sys.stderr)
        return 2
    table = {"entries": dict(tuning.load_table(args.out)["entries"])}
    for num_ranks in ints(args.ranks):
        if not 1 < num_ranks <= torch.cuda.device_count():
            print(f"{num_ranks} ranks: skipped, needs one GPU per rank ({torch.cuda.device_count()} GPUs here)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            command = ["--ranks", str(num_ranks), "--sms", args.sms, "--tokens", str(args.tokens),
                       "--hidden", str(args.hidden), "--dtypes", "bf16", "--reference-max-tokens", "0",
                       "--min-nvl-bytes", "1000000000", "--out", out]
            if intranode.main(command) != 0:
                return 1
            with open(out) as f:
                run = json.load(f)
        entry = {"device": run["device"], "commit": run["commit"], "date": run["date"],
                 "command": run["command"], "tolerance": args.tolerance, "times_us": {}}
        for op in ("dispatch", "combine"):
            times = {r["num_sms"]: r["time_us"] for r in run["results"] if r["op"] == op}
            entry[op] = tuning.choose(times, args.tolerance)
            entry["times_us"][op] = {str(k): v for k, v in sorted(times.items())}
        table["entries"][str(num_ranks)] = entry
        print(f"{num_ranks} ranks: dispatch {entry['dispatch']} SMs, combine {entry['combine']} SMs "
              f"({entry['times_us']})")
    table["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
