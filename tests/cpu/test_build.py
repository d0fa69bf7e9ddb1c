"""The CUDA extension is built wherever it can be: CI compiles ``csrc/`` and this test proves it did."""
import os
import shutil

import pytest
import torch

from moe_a2a.backends import intranode


def _can_build():
    if os.environ.get("MOE_A2A_SKIP_CUDA_BUILD", "0") == "1":
        return "MOE_A2A_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found"
    return None


@pytest.mark.skipif(_can_build() is not None, reason=str(_can_build()))
def test_extension_was_built():
    assert intranode.extension_available(), "nvcc and a CUDA torch are present but moe_a2a._C was not built"
    from moe_a2a import _C
    for name in ("get_dispatch_layout", "Runtime", "AllReduceWorkspace"):
        assert hasattr(_C, name), f"moe_a2a._C lacks {name}"


def test_import_never_needs_the_extension():
    # The backend module imports either way and says whether the kernels are there.
    assert isinstance(intranode.extension_available(), bool)


@pytest.mark.skipif(_can_build() is not None, reason=str(_can_build()))
def test_internode_extension_was_built_where_nvshmem_is_found():
    import importlib.util
    import sys

    found = any(os.path.isfile(os.path.join(p, "nvidia", "nvshmem", "include", "nvshmem.h")) for p in sys.path if p)
    if os.environ.get("MOE_A2A_SKIP_NVSHMEM_BUILD", "0") == "1" or not (found or os.environ.get("NVSHMEM_HOME")):
        pytest.skip("NVSHMEM not found or its build skipped")
    assert importlib.util.find_spec("moe_a2a._nvshmem") is not None, \
        "NVSHMEM is installed but moe_a2a._nvshmem (the internode kernels) was not built"
    # It loads (no GPU needed), in a process of its own that leaves without running exit handlers: with NVSHMEM's
    # host library loaded, about 1 exit in 40 aborts inside it ("terminate called without an active exception"),
    # which is why only groups spanning nodes load it, and why this test process must not.
    import subprocess
    code = "import os, moe_a2a._nvshmem as m; print(hasattr(m, 'Runtime'), flush=True); os._exit(0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stdout + done.stderr


_RAISE_FROM_NATIVE = """
import moe_a2a._C as C
for args, expected in (((5, 2, 1 << 20, 1.0), "rank 5 out of range"),
                       ((0, 99, 1 << 20, 1.0), "1..8 ranks, got 99")):
    try:
        C.LowLatencyRuntime(*args)
    except RuntimeError as e:
        assert expected in str(e), str(e)
    else:
        raise AssertionError("no error for " + repr(args))
print("ok")
"""


@pytest.mark.skipif(not intranode.extension_available(), reason="moe_a2a._C is not built")
def test_native_errors_reach_python():
    # Argument checks in the extension throw C++ exceptions; they must surface as RuntimeError, not kill
    # the process. A child process, so that a crash fails this test instead of the whole run.
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _RAISE_FROM_NATIVE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", \
        f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr[-2000:]}"
