"""Build script: the CUDA extension ``moe_a2a._C`` is optional.

It is compiled when torch was built with CUDA and nvcc is found, unless ``MOE_A2A_SKIP_CUDA_BUILD=1``.
Architectures come from ``TORCH_CUDA_ARCH_LIST`` (for example ``"9.0"``); the default is sm_90 only,
which keeps the build short. Without the extension the package still installs and imports: the
reference backend serves every entry point and GPU-only paths raise a clear error.
"""
import glob
import os
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """Set CUDA_HOME when unset: torch guesses it from nvcc's directory, which is wrong for wrapper scripts
    that stand outside the toolkit; take the first candidate that has the CUDA headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


def _extension_modules():
    if os.environ.get("MOE_A2A_SKIP_CUDA_BUILD", "0") == "1":
        print("moe_a2a: MOE_A2A_SKIP_CUDA_BUILD=1, building the pure-Python package", file=sys.stderr)
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("moe_a2a: torch not importable at build time, building the pure-Python package", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("moe_a2a: no CUDA torch or no nvcc, building the pure-Python package", file=sys.stderr)
        return [], {}

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch_list:
        arch_list = "9.0"
        # torch reads this variable itself; set it so it does not add every known architecture.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    gencode = []
    for arch in arch_list.replace(";", " ").split():
        ptx = arch.endswith("+PTX")
        digits = arch.replace("+PTX", "").replace(".", "")
        gencode.append(f"-gencode=arch=compute_{digits},code=sm_{digits}")
        if ptx:
            gencode.append(f"-gencode=arch=compute_{digits},code=compute_{digits}")

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    if not sources:
        print("moe_a2a: no CUDA sources found, building the pure-Python package", file=sys.stderr)
        return [], {}
    cccl = os.path.join(CUDA_HOME, "targets", "x86_64-linux", "include", "cccl")
    include_dirs = [os.path.join(root, "csrc")] + ([cccl] if os.path.isdir(cccl) else [])
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + gencode
    ext = CUDAExtension(
        name="moe_a2a._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
