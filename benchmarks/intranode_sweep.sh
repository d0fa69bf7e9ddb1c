#!/usr/bin/env bash
# The intranode sweep behind docs/perf/intranode_*.{json,md}: DeepEP's shapes (4096 tokens per rank,
# hidden 7168, top-8 of 256 experts), token and hidden sweeps, BF16 and FP8, 8/16/24 SMs per rank.
# Usage: benchmarks/intranode_sweep.sh [OUTDIR]   (default docs/perf)
set -euo pipefail
out=${1:-docs/perf}
nvl=1000000000  # 1 GB per rank: every shape below runs in one round
bench() { python3 -m benchmarks intranode --min-nvl-bytes "$nvl" "$@"; }
bench --ranks 8 --tokens 128,512,1024,4096 --hidden 7168 --sms 8,16 --dtypes bf16,fp8 --out "$out/intranode_ep8.json"
bench --ranks 8 --tokens 4096 --hidden 2048,4096 --sms 16 --dtypes bf16 --reference-max-tokens 0 \
      --out "$out/intranode_ep8_hidden.json"
bench --ranks 4 --tokens 4096 --hidden 7168 --sms 8,16,24 --dtypes bf16,fp8 --out "$out/intranode_ep4.json"
bench --ranks 2 --tokens 4096 --hidden 7168 --sms 8,16,24 --dtypes bf16,fp8 --out "$out/intranode_ep2.json"
