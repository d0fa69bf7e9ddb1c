"""``moe_a2a.limits`` equals the kernels' compile-time limits: in the C++ sources, and in the built
``moe_a2a._nvshmem`` (the extension that exports its limits); and Buffer's checks of those limits."""
import os
import re
import subprocess
import sys

import pytest

from moe_a2a import _native, checks, limits

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

# (Python limit, file under csrc/, C++ constant or pattern whose first group is the value)
_MIRRORS = [
    ("MAX_NVL_PEERS", "kernels/api.cuh", "kMaxRanks"),
    ("MAX_NVL_PEERS", "kernels/low_latency.cuh", "kLLMaxRanks"),
    ("MAX_NVL_PEERS", "nvshmem/internode.cuh", "kMaxLocalRanks"),
    ("MAX_NVL_PEERS", "comm/allreduce.cuh", "kArMaxRanks"),
    ("MAX_TOPK", "nvshmem/internode.cuh", "kMaxTopk"),
    ("MAX_TOPK", "kernels/low_latency.cuh", "kLLMaxTopk"),
    ("MAX_NODES", "nvshmem/internode.cuh", "kMaxNodes"),
    ("LOW_LATENCY_MAX_EXPERTS", "kernels/low_latency.cuh", "kLLMaxExperts"),
    ("INTERNODE_LOW_LATENCY_MAX_TOKENS", "nvshmem/low_latency.cuh", "kMaxTokens"),
    ("LAYOUT_MAX_EXPERTS", "runtime.cpp", r"num_experts <= (\d+), \"the layout kernel"),
]


def _cpp_value(path: str, name: str) -> int:
    with open(os.path.join(_CSRC, path)) as f:
        text = f.read()
    pattern = name if "(" in name else rf"constexpr\s+int\s+{name}\s*=\s*(\d+)\s*;"
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{name} in csrc/{path}: expected one definition, found {found}"
    return int(found[0])


@pytest.mark.skipif(not os.path.isdir(_CSRC), reason="no csrc/ beside the tests (an installed package)")
@pytest.mark.parametrize("python_name,path,cpp_name", _MIRRORS)
def test_python_limits_equal_the_cpp_sources(python_name, path, cpp_name):
    assert getattr(limits, python_name) == _cpp_value(path, cpp_name), \
        f"moe_a2a.limits.{python_name} disagrees with {cpp_name} in csrc/{path}"


@pytest.mark.skipif(not os.path.isdir(_CSRC), reason="no csrc/ beside the tests (an installed package)")
def test_combine_schedule_constants_equal_the_cpp_sources():
    from moe_a2a.backends import intranode
    assert intranode.MAX_COMBINE_WINDOWS == _cpp_value("kernels/api.cuh", "kMaxCombineWindows")
    assert intranode.COMBINE_WINDOWS_MIN_SMS == _cpp_value("kernels/api.cuh", "kMinWindowSms")


_NVSHMEM_ATTRS = """
import os, moe_a2a._nvshmem as m
print(m.max_local_ranks, m.max_topk, m.max_nodes, m.ll_max_experts, m.ll_max_topk, m.ll_max_tokens, flush=True)
os._exit(0)
"""


@pytest.mark.skipif(not _native.present("_nvshmem"), reason="moe_a2a._nvshmem is not built")
def test_python_limits_equal_the_built_nvshmem_extension():
    # In a process of its own that leaves without exit handlers: NVSHMEM's host library must not load into the
    # test process (see test_build.py).
    done = subprocess.run([sys.executable, "-c", _NVSHMEM_ATTRS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [int(v) for v in done.stdout.split()] == [
        limits.MAX_NVL_PEERS, limits.MAX_TOPK, limits.MAX_NODES, limits.LOW_LATENCY_MAX_EXPERTS, limits.MAX_TOPK,
        limits.INTERNODE_LOW_LATENCY_MAX_TOKENS]


def test_kernel_limit_checks():
    # What Buffer checks before a call runs on the CUDA kernels (the kernels do not check again).
    checks.at_most("topk_idx's top-k width", limits.MAX_TOPK, limits.MAX_TOPK, "the CUDA kernels")
    with pytest.raises(ValueError, match=r"topk_idx's top-k width is 33; the CUDA kernels take at most 32"):
        checks.at_most("topk_idx's top-k width", limits.MAX_TOPK + 1, limits.MAX_TOPK, "the CUDA kernels")
    for hidden, element_size in ((8, 2), (7168, 2), (16, 1), (128, 1), (4, 4)):
        checks.kernel_rows("x", hidden, element_size)
    with pytest.raises(ValueError, match=r"x: rows of hidden size 7164 \(14328 bytes\) must be a multiple of 16 "
                                         r"bytes .*hidden a multiple of 8 for 2-byte elements"):
        checks.kernel_rows("x", 7164, 2)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        checks.kernel_rows("x", 24, 1)
