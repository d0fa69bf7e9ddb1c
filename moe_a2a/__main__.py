"""Command line: ``python -m moe_a2a {train,demo,bench} ...``."""
from __future__ import annotations

import importlib
import os
import sys

# command -> (module, function called with the remaining arguments, help line)
_COMMANDS = {
    "train": ("moe_a2a.train.cli", "main", "train a recipe: train RECIPE.yaml [key=value ...] [--dry-run]"),
    "demo": ("moe_a2a.train.cli", "demo", "multi-rank dispatch/combine demo on CPU"),
    "bench": (None, None, "benchmarks on a GPU (source tree only): bench {intranode,low-latency,internode,...} "
              "[options]"),
}


def _bench(argv) -> int:
    """``python -m benchmarks`` of the source tree this package sits in."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
        print("python -m moe_a2a bench: the benchmarks ship with the source tree (benchmarks/ next to moe_a2a/), "
              "not with the installed package", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.__main__ import main as bench_main

    return bench_main(argv, prog="python -m moe_a2a bench")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print("usage: python -m moe_a2a COMMAND [args]\n\ncommands:")
        for name, (_, _, text) in _COMMANDS.items():
            print(f"  {name:7s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "bench":
        return _bench(argv[1:])
    module, function, _ = _COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
