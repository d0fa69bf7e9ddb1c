"""Benchmarks of moe_a2a on GPUs: ``python -m benchmarks COMMAND [options]``.

They ship with the source tree, not with the installed package. Each command is a module with a
``main(argv)``; ``common`` holds what they share (launching ranks, timing, copy-engine floors, reports):

* ``intranode``: the normal dispatch/combine kernels inside one node, with NCCL and reference baselines;
* ``low-latency``: latency of the low-latency kernels, hook mode, phase split and launch overheads;
* ``internode``: the NVSHMEM kernels across (virtual) nodes;
* ``all-reduce``: the fused all-reduce (one-shot, two-shot, + RMSNorm) against the unfused sequence;
* ``mixed-comm``: the mixed TP x DP collectives of ``MixedCommHandler`` against torch collectives;
* ``tune-intranode``: measure the SM counts the intranode kernels need and write their table.

Results are JSON plus a Markdown table, by default under ``docs/perf/``.
"""
