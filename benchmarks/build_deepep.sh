#!/usr/bin/env bash
# Build a DeepEP source tree in place as the baseline of `python -m benchmarks intranode`: intranode kernels
# only (NVSHMEM off, even where NVSHMEM is installed), sm_90. Then: PYTHONPATH=DEEPEP_SRC:$PYTHONPATH.
# Usage: benchmarks/build_deepep.sh DEEPEP_SRC   (a checkout of DeepEP, e.g. its v1.2.1 tag)
set -euo pipefail
src=${1:?usage: benchmarks/build_deepep.sh DEEPEP_SRC}
# CUDA_HOME: the first of nvcc's toolkit and /usr/local/cuda that has the headers (nvcc may be a wrapper script).
if [[ -z ${CUDA_HOME:-} ]]; then
  for home in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
    [[ -f $home/include/cuda_runtime_api.h ]] && { export CUDA_HOME=$home; break; }
  done
fi
cuda_home=${CUDA_HOME:?no CUDA toolkit with headers found: set CUDA_HOME}
cccl="$cuda_home/targets/x86_64-linux/include/cccl"
[[ -d $cccl ]] && export CPLUS_INCLUDE_PATH="$cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
# torch's ATen CUDA headers include cuBLAS/cuSPARSE ones: where the toolkit lacks them, pip's nvidia packages
# have them.
if [[ ! -f $cuda_home/include/cusparse.h ]]; then
  extra=$(python3 -c "import glob, importlib.util, os
spec = importlib.util.find_spec('nvidia')
roots = list(spec.submodule_search_locations) if spec else []
print(':'.join(d for r in roots for d in sorted(glob.glob(os.path.join(r, '*', 'include')))))")
  [[ -n $extra ]] && export CPLUS_INCLUDE_PATH="$CPLUS_INCLUDE_PATH:$extra"
fi
cd "$src"
# DeepEP's setup.py builds its NVSHMEM kernels whenever it finds the nvidia.nvshmem package: hide it. Without
# NVSHMEM it still compiles with -rdc=true but skips the device link, so the module would not load: add it.
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} python3 - <<'PY'
import importlib.util
import runpy
import sys

import torch.utils.cpp_extension as cpp_extension

find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.startswith("nvidia.nvshmem") else find_spec(name, *a, **k)
cuda_extension = cpp_extension.CUDAExtension


def with_device_link(name, sources, *args, **kwargs):
    flags = kwargs.get("extra_compile_args", {})
    if "-rdc=true" in flags.get("nvcc", []) and "nvcc_dlink" not in flags:
        flags["nvcc_dlink"] = ["-dlink"]
    return cuda_extension(name, sources, *args, **kwargs)


cpp_extension.CUDAExtension = with_device_link
sys.argv = ["setup.py", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
PY
PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import deep_ep; print('deep_ep built:', deep_ep.__file__)"
