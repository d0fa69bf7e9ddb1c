#!/usr/bin/env bash
# GPU tests and benchmarks of moe_a2a.comm (all-gather/reduce-scatter, Helix, MixedCommHandler) on one GPU
# machine; logs, JSON and Markdown go to OUTDIR. The fused modes need the extension (moe_a2a._C, _nvshmem).
# Usage: benchmarks/comm_mixed_check.sh OUTDIR [tests|bench|all]   (default all)
# NCCL needs one GPU per rank: topologies are chosen from the GPU count. NVLink multicast stays off.
set -uo pipefail
out=${1:?usage: benchmarks/comm_mixed_check.sh OUTDIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start ))s] $*"; }
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")

if [[ $what == tests || $what == all ]]; then
  timeout 580 python3 -m pytest -q tests/gpu/test_comm_mixed_gpu.py >"$out/test_comm_mixed_gpu.log" 2>&1
  step "test_comm_mixed_gpu: rc=$? $(tail -1 "$out/test_comm_mixed_gpu.log")"
fi

if [[ $what == bench || $what == all ]]; then
  bench() {  # NAME ARGS...
    local name=$1; shift
    timeout 580 python3 -m benchmarks mixed-comm --quiet --out "$out/mixed_comm_$name.json" "$@" \
      >>"$out/bench.log" 2>&1
    step "bench $name: rc=$?"
  }
  if (( gpus >= 8 )); then
    bench tp2xdp4_2nodes --num-ranks 8 --local-size 4 --local-tp 2 --inter-dp 2
    bench tp4xdp2_2nodes --num-ranks 8 --local-size 4 --local-tp 2 --inter-tp 2
    bench tp8 --num-ranks 8
  elif (( gpus >= 4 )); then
    bench tp2xdp2_2nodes --num-ranks 4 --local-size 2 --local-tp 2 --inter-dp 2
    bench tp2xdp2 --num-ranks 4 --local-tp 2
  elif (( gpus >= 2 )); then
    bench tp2 --num-ranks 2
    bench dp2 --num-ranks 2 --local-tp 1
  else  # ranks sharing the GPU under MPS (the caller starts it): the fused modes against the gloo composition
    bench tp4xdp2_shared --num-ranks 8 --local-tp 4 --min-bytes 1M --max-bytes 32M --iters 5
    bench tp2xdp4_2nodes_shared --num-ranks 8 --local-size 4 --local-tp 2 --inter-dp 2 --min-bytes 64K \
      --max-bytes 4M --iters 5
  fi
fi
