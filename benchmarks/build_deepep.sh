#!/usr/bin/env bash
# Build a DeepEP source tree in place as the baseline of `python -m benchmarks intranode`: intranode kernels
# only (NVSHMEM off, even where NVSHMEM is installed), sm_90. Then: PYTHONPATH=DEEPEP_SRC:$PYTHONPATH.
# Usage: benchmarks/build_deepep.sh DEEPEP_SRC   (a checkout of DeepEP, e.g. its v1.2.1 tag)
set -euo pipefail
src=${1:?usage: benchmarks/build_deepep.sh DEEPEP_SRC}
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
cccl="$cuda_home/targets/x86_64-linux/include/cccl"
[[ -d $cccl ]] && export CPLUS_INCLUDE_PATH="$cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
cd "$src"
# DeepEP's setup.py builds its NVSHMEM kernels whenever it finds the nvidia.nvshmem package: hide it.
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} python3 - <<'PY'
import importlib.util
import runpy
import sys

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.startswith("nvidia.nvshmem") else find_spec(name, *a, **k)
sys.argv = ["setup.py", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
PY
PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import deep_ep; print('deep_ep built:', deep_ep.__file__)"
