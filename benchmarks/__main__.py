"""``python -m benchmarks COMMAND [options]``: run one benchmark (``COMMAND --help`` for its options)."""
from __future__ import annotations

import importlib
import sys

# command -> (module of this package, one line of help)
COMMANDS = {
    "intranode": ("intranode", "normal dispatch/combine kernels in one node, NCCL and reference baselines"),
    "low-latency": ("low_latency", "low-latency kernels: latency, hook mode, phases, overheads"),
    "internode": ("internode", "NVSHMEM kernels across virtual nodes (--topology NODESxRANKS)"),
    "all-reduce": ("allreduce", "fused all-reduce (+ RMSNorm) against the unfused sequence"),
    "mixed-comm": ("mixed_comm", "MixedCommHandler's TP x DP collectives against torch collectives"),
    "moe-layer": ("moe_layer", "a whole MoE layer step through fused_a2a (plain, buffer-resident) and all_to_all"),
    "sm-copy": ("sm_copy", "the roofline of SM traffic through the intranode mappings (probe kernel)"),
    "formats": ("formats", "bytes, time and error of each wire format against BF16"),
    "tune-intranode": ("tune_intranode", "measure the intranode SM counts and write their table"),
}


def usage(prog: str = "python -m benchmarks") -> str:
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:15s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{prog}: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__ or 'benchmarks'}.{COMMANDS[argv[0]][0]}")
    rc = module.main(argv[1:])
    return rc if isinstance(rc, int) else 0  # some return their report


if __name__ == "__main__":
    sys.exit(main())
