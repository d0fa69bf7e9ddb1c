#!/usr/bin/env bash
# The fused all-reduce on a GPU machine: build, its GPU tests, its benchmark; logs and results in OUTDIR.
# Usage: benchmarks/allreduce_check.sh OUTDIR [tests|bench|all]   (default all)
set -uo pipefail
out=${1:?usage: benchmarks/allreduce_check.sh OUTDIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start ))s] $*"; }

step build
MOE_A2A_SKIP_NVSHMEM_BUILD=${MOE_A2A_SKIP_NVSHMEM_BUILD:-1} MAX_JOBS=${MAX_JOBS:-16} \
  python3 setup.py build_ext --inplace >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python3 -c "from moe_a2a import _C; assert hasattr(_C, 'AllReduceWorkspace')" || exit 1

if [[ $what == tests || $what == all ]]; then
  timeout 60 python3 -m pytest -q tests/cpu/test_build.py >"$out/test_build.log" 2>&1
  step "test_build: rc=$? $(tail -1 "$out/test_build.log")"
  timeout 420 python3 -m pytest -q -x tests/gpu/test_allreduce.py >"$out/test_allreduce.log" 2>&1
  step "test_allreduce: rc=$? $(tail -1 "$out/test_allreduce.log")"
fi

if [[ $what == bench || $what == all ]]; then
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  timeout 400 python3 -m benchmarks all-reduce --ranks 8 --out "$out/allreduce_ep8.json" >"$out/bench.log" 2>&1
  step "bench ranks 8: rc=$?"
  if (( gpus >= 2 )); then
    ranks=$(python3 -c "print(','.join(str(n) for n in (2, 4, 8) if n <= $gpus))")
    timeout 400 python3 -m benchmarks all-reduce --ranks "$ranks" --write-table --out "$out/allreduce_nvlink.json" \
      >>"$out/bench.log" 2>&1
    step "bench ranks $ranks: rc=$?"
  fi
fi
step done
