"""Command line: ``python -m moe_a2a {train,bench,demo} ...``."""
from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "train": ("moe_a2a.train", "train a recipe: train RECIPE.yaml [key=value ...] [--dry-run]"),
    "bench": ("moe_a2a.bench", "benchmarks on a GPU: bench {intranode,low-latency,internode,moe-layer} [options]"),
    "demo": ("moe_a2a.demo", "multi-rank dispatch/combine demo on CPU"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print("usage: python -m moe_a2a COMMAND [args]\n\ncommands:")
        for name, (_, text) in _COMMANDS.items():
            print(f"  {name:7s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
