#!/usr/bin/env bash
# Every benchmark command end to end on small shapes (minutes, not the real measurements); logs in OUTDIR.
# Usage: benchmarks/smoke_check.sh OUTDIR   (after a build: python3 setup.py build_ext --inplace)
# One line per command with its exit status; results are written under OUTDIR, never docs/perf/.
set -uo pipefail
out=${1:?usage: benchmarks/smoke_check.sh OUTDIR}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
fail=0
run() {  # NAME COMMAND...
  local name=$1; shift
  timeout 300 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(tail -1 "$out/$name.log")"
  (( rc == 0 )) || fail=1
}
small=(--tokens 128 --hidden 2048 --sms 8 --dtypes bf16,fp8 --warmup 1 --loops 1 --iters 1)
run intranode python3 -m benchmarks intranode --ranks 2,4 "${small[@]}" --reference-max-tokens 128 \
    --out "$out/intranode.json"
run alias python3 -m moe_a2a bench intranode --ranks 2 "${small[@]}" --reference-max-tokens 0 \
    --out "$out/alias.json"
run low-latency python3 -m benchmarks low-latency --num-ranks 2 4 --tokens 32 --hidden 2048 --experts 16 \
    --warmup 2 --batches 1 --iters 5 --hook-iters 2 --out "$out"
if python3 -c "import moe_a2a._nvshmem" 2>/dev/null; then
  run low-latency-internode python3 -m benchmarks low-latency --num-ranks 4 --num-ranks-per-node 2 --tokens 32 \
      --hidden 2048 --experts 16 --warmup 2 --batches 1 --iters 5 --hook-iters 2 --out "$out"
  run internode python3 -m benchmarks internode --topology 2x2 "${small[@]}" --out "$out/internode.json"
else
  echo "internode: skipped (moe_a2a._nvshmem not built)"
fi
run formats python3 -m benchmarks formats --backend cuda --num-ranks 2 --tokens 16 --hidden 1024 --experts 8 \
    --iters 2 --loops 1 --json "$out/formats.json"
run all-reduce python3 -m benchmarks all-reduce --ranks 2 --max-bytes 1048576 --warmup 1 --loops 1 --iters 2 \
    --out "$out/allreduce.json"
run sm-copy python3 -m benchmarks sm-copy --ranks 2 --sms 8 --mib 4 --row-bytes 14336 --warmup 1 --loops 1 \
    --iters 2 --out "$out/sm_copy.json"
if (( gpus >= 2 )); then
  run mixed-comm python3 -m benchmarks mixed-comm --num-ranks 2 --max-bytes 64K --warmup 1 --iters 2 --quiet \
      --out "$out/mixed_comm.json"
else
  run mixed-comm python3 -m benchmarks mixed-comm --device cpu --num-ranks 2 --max-bytes 16K --warmup 1 --iters 1 \
      --quiet --out "$out/mixed_comm.json"
fi
exit $fail
