"""Build script: the CUDA extension ``moe_a2a._C`` is optional.

It is compiled when torch was built with CUDA and nvcc is found, unless ``MOE_A2A_SKIP_CUDA_BUILD=1``.
Architectures come from ``TORCH_CUDA_ARCH_LIST`` (for example ``"9.0"``); the default is sm_90 only,
which keeps the build short. Without the extension the package still installs and imports: the
reference backend serves every entry point and GPU-only paths raise a clear error.

The internode extension ``moe_a2a._nvshmem`` (NVSHMEM RDMA kernels, relocatable device code linked
against ``libnvshmem_device.a``) is built as well when NVSHMEM is found: ``NVSHMEM_HOME``, or the
``nvidia-nvshmem-cu13`` wheel that CUDA builds of torch install. ``MOE_A2A_SKIP_NVSHMEM_BUILD=1`` skips it.
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


def _find_nvshmem():
    """The NVSHMEM root (with include/nvshmem.h and lib/libnvshmem_device.a), or None."""
    candidates = [os.environ.get("NVSHMEM_HOME", "")]
    candidates += [os.path.join(p, "nvidia", "nvshmem") for p in sys.path if p]
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "nvshmem.h")) and \
                os.path.isfile(os.path.join(root, "lib", "libnvshmem_device.a")):
            return os.path.abspath(root)
    return None


# Relocatable device code for NVSHMEM's device library; torch's defines that hide the half/bfloat16
# operators break NVSHMEM's reduction headers, so they are undone for this module; the deprecation
# warnings silenced come from those headers under C++20.
_NVSHMEM_NVCC_FLAGS = ["-rdc=true", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                       "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                       "-diag-suppress=3012,3013"]


def _nvshmem_extension(CUDAExtension, include_dirs, nvcc_flags):
    """``moe_a2a._nvshmem`` when NVSHMEM is found, else None (the internode kernels are then unavailable)."""
    if os.environ.get("MOE_A2A_SKIP_NVSHMEM_BUILD", "0") == "1":
        print("moe_a2a: MOE_A2A_SKIP_NVSHMEM_BUILD=1, not building the internode kernels", file=sys.stderr)
        return None
    root = _find_nvshmem()
    if root is None:
        print("moe_a2a: NVSHMEM not found (set NVSHMEM_HOME), not building the internode kernels", file=sys.stderr)
        return None
    lib = os.path.join(root, "lib")
    # The wheel ships only the versioned host library; link it by file name.
    host_lib = "libnvshmem_host.so" if os.path.exists(os.path.join(lib, "libnvshmem_host.so")) else \
        "libnvshmem_host.so.3"
    return CUDAExtension(
        name="moe_a2a._nvshmem",
        sources=[os.path.join("csrc", "nvshmem", "bindings.cpp"), os.path.join("csrc", "nvshmem", "internode.cu"),
                 os.path.join("csrc", "nvshmem", "low_latency.cu"), os.path.join("csrc", "nvshmem", "mixed.cu")],
        include_dirs=include_dirs + [os.path.join(root, "include")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags + _NVSHMEM_NVCC_FLAGS,
                            # Device link against NVSHMEM's device library. Not through dlink=True: torch adds
                            # -dlto there, which the library (no LTO IR) cannot take.
                            "nvcc_dlink": ["-dlink", f"-L{lib}", "-lnvshmem_device"]},
        extra_link_args=[f"-L{lib}", f"-l:{host_lib}", "-l:libnvshmem_device.a", f"-Wl,-rpath,{lib}"],
    )


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
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "kernels", "*.cu")) +
                     glob.glob(os.path.join("csrc", "comm", "*.cpp")) + glob.glob(os.path.join("csrc", "comm", "*.cu")))
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
    nvshmem = _nvshmem_extension(CUDAExtension, include_dirs, nvcc_flags)
    return [ext] + ([nvshmem] if nvshmem is not None else []), {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
