"""DeepEP's own test scripts (``tests/test_intranode.py``, ``tests/test_low_latency.py`` of a DeepEP checkout)
run unchanged on moe_a2a: ``import deep_ep`` finds a package that is ``moe_a2a`` under DeepEP's names, and
``from utils import init_dist`` finds DeepEP's ``utils.py`` with one function replaced, so ranks can share a
GPU (a gloo group, as NCCL takes one rank per GPU; rank r on GPU r % count, under MPS).

Set ``DEEPEP_SRC`` to the checkout (e.g. DeepEP v1.2.1); skipped otherwise. The scripts check their own
results (DeepEP's assertions, DeepEP's tolerances) and exit non-zero on a failure.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from harness import skip_reason
from moe_a2a.launch import free_port, mps_if_needed

pytestmark = pytest.mark.gpu
SOURCE = os.environ.get("DEEPEP_SRC", "")

SHIM_INIT = '''\
"""DeepEP's public names, moe_a2a's implementation."""
from moe_a2a import Buffer, Config, EventOverlap  # noqa: F401
'''

SHIM_UTILS = '''\
"""DeepEP's tests/utils.py with init_dist for ranks that share GPUs (on gloo)."""
import importlib.util
import os

import torch.distributed as dist

_spec = importlib.util.spec_from_file_location("deepep_test_utils", os.path.join(os.environ["DEEPEP_TESTS"], "utils.py"))
_utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_utils)
globals().update({k: v for k, v in vars(_utils).items() if not k.startswith("__")})


def _all_gather_into_tensor(output, input, group=None, async_op=False):
    """gloo has no all_gather_into_tensor of these shapes: gather into output's per-rank slices instead."""
    chunks = list(output.view(-1, *input.shape).unbind(0))
    return dist.all_gather(chunks, input.contiguous(), group=group, async_op=async_op)


dist.all_gather_into_tensor = _all_gather_into_tensor


def init_dist(local_rank, num_local_ranks):
    ip, port = os.getenv("MASTER_ADDR", "127.0.0.1"), int(os.getenv("MASTER_PORT", "8361"))
    dist.init_process_group(backend="gloo", init_method=f"tcp://{ip}:{port}", world_size=num_local_ranks,
                            rank=local_rank)
    torch.set_default_dtype(torch.bfloat16)
    torch.set_default_device("cuda")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size(), dist.new_group(list(range(num_local_ranks)))
'''


def _run_script(tmp_path, script, args, num_ranks, timeout):
    shim = tmp_path / "shim"
    (shim / "deep_ep").mkdir(parents=True)
    (shim / "deep_ep" / "__init__.py").write_text(SHIM_INIT)
    (shim / "utils.py").write_text(SHIM_UTILS)
    # A script's own directory comes first on sys.path: run a copy beside the shim so `utils` is the shim's.
    tests = os.path.join(SOURCE, "tests")
    shutil.copy(os.path.join(tests, script), shim / script)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, DEEPEP_TESTS=tests, MASTER_PORT=str(free_port()), NCCL_NVLS_ENABLE="0",
               PYTHONPATH=os.pathsep.join([str(shim), tests, root, os.environ.get("PYTHONPATH", "")]))
    with mps_if_needed(num_ranks):
        done = subprocess.run([sys.executable, str(shim / script), "--num-processes", str(num_ranks),
                               *args], env=env, capture_output=True, text=True, timeout=timeout)
    tail = textwrap.shorten(done.stdout[-3000:] + done.stderr[-3000:], 6000, placeholder="...")
    assert done.returncode == 0, f"DeepEP's {script} failed on moe_a2a (exit {done.returncode}): {tail}"


def _skip(num_ranks):
    if not SOURCE:
        return "set DEEPEP_SRC to a DeepEP checkout to run its test scripts"
    if not os.path.isfile(os.path.join(SOURCE, "tests", "test_intranode.py")):
        return f"DEEPEP_SRC={SOURCE} has no tests/test_intranode.py"
    return skip_reason(num_ranks)


@pytest.mark.skipif(_skip(8) is not None, reason=str(_skip(8)))
def test_deepep_intranode_script(tmp_path):
    _run_script(tmp_path, "test_intranode.py", [], 8, timeout=600)


@pytest.mark.skipif(_skip(8) is not None, reason=str(_skip(8)))
@pytest.mark.parametrize("options", [[], ["--use-logfmt"]], ids=["bf16-fp8", "logfmt"])
def test_deepep_low_latency_script(tmp_path, options):
    _run_script(tmp_path, "test_low_latency.py", options, 8, timeout=600)
