#!/usr/bin/env bash
# Build, GPU tests and benchmarks in one go on a GPU machine; logs and results go to OUTDIR.
# Usage: benchmarks/gpu_check.sh OUTDIR [tests|bench|all]   (default all)
# Ranks beyond the GPU count share GPUs under CUDA MPS (the harness and the benchmarks start it).
# NVLink multicast stays off. Set MOE_A2A_COMMIT when the tree is a copy without its own git metadata.
# DEEPEP_SRC=<DeepEP checkout>: its own test scripts run on moe_a2a (tests/gpu/test_deepep_scripts.py), and it is
# built (benchmarks/build_deepep.sh) and timed beside the intranode kernels.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start ))s] $*"; }

step build
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
python3 -c "import moe_a2a._C" || exit 1
python3 -c "import moe_a2a._nvshmem" 2>/dev/null || step "moe_a2a._nvshmem not built: internode tests will skip"
nvidia-smi topo -m >"$out/topology.txt" 2>&1

if [[ $what == tests || $what == all ]]; then
  # The extension's argument errors must reach Python as RuntimeError with this torch build too.
  timeout 60 python3 -m pytest -q tests/cpu/test_build.py >"$out/test_build.log" 2>&1
  step "test_build: rc=$? $(tail -1 "$out/test_build.log")"
  # Every GPU test file, one at a time (each starts its own MPS daemon); seconds allowed per file.
  for file in tests/gpu/test_*.py; do
    name=$(basename "$file" .py)
    case $name in test_intranode|test_low_latency|test_internode|test_megatron_resident_gpu) limit=400 ;; test_deepep_scripts) limit=1200 ;; *) limit=240 ;; esac
    timeout "$limit" python3 -m pytest -q "$file" >"$out/$name.log" 2>&1
    step "$name: rc=$? $(tail -1 "$out/$name.log")"
  done
fi

if [[ $what == bench || $what == all ]]; then
  if [[ -n ${DEEPEP_SRC:-} ]]; then
    benchmarks/build_deepep.sh "$DEEPEP_SRC" >"$out/deepep_build.log" 2>&1
    step "DeepEP build: rc=$? $(tail -1 "$out/deepep_build.log")"
    export PYTHONPATH="$DEEPEP_SRC:$PYTHONPATH"
  fi
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  bench() { python3 -m benchmarks "$@" >>"$out/bench.log" 2>&1; step "bench $1: rc=$?"; }
  bench intranode --ranks 8 --tokens 128,4096 --sms 8,16 --dtypes bf16,fp8 --reference-max-tokens 0 \
        --min-nvl-bytes 1000000000 --out "$out/intranode_ep8.json"
  if (( gpus >= 2 )); then
    ranks=$(python3 -c "print(','.join(str(n) for n in (2, 4, 8) if n <= $gpus))")
    bench intranode --ranks "$ranks" --tokens 4096 --sms 8,16,24 --dtypes bf16,fp8 --reference-max-tokens 0 \
          --min-nvl-bytes 1000000000 --out "$out/intranode_nvlink.json"
    python3 -m benchmarks tune-intranode --ranks "$ranks" --out "$out/intranode_tuning.json" >>"$out/bench.log" 2>&1
    step "tune: rc=$?"
  fi
  bench low-latency --num-ranks 8 4 2 --out "$out"
  bench low-latency --num-ranks 4 --num-ranks-per-node 2 --out "$out"
  bench low-latency --num-ranks 8 --num-ranks-per-node 4 --out "$out"
  bench internode --topology 2x2,2x4 --tokens 4096 --sms 16 --dtypes bf16,fp8 --out "$out/internode.json"
  bench moe-layer --ranks 8 --loops 3 --iters 3 --out "$out/moe_layer_ep8.json"
  bench formats --backend cuda --num-ranks 8 --tokens 128 --hidden 7168 --experts 256 --topk 8 --iters 20 \
        --json "$out/formats_ep8.json"
  if (( gpus >= 2 )); then
    bench moe-layer --ranks "${ranks##*,}" --out "$out/moe_layer_nvlink.json"
  fi
fi
step done
