"""Processes that use moe_a2a exit with status 0, every time, with the compiled extensions present.

Each job is two processes on a gloo group: import moe_a2a, dispatch and combine on the reference backend
(forward and backward through ``fused_a2a``), leave. A CPU run loads no native module; half of the jobs load
``moe_a2a._C`` on purpose (what every GPU run inside one node loads), so its exit path is exercised too.
``moe_a2a._nvshmem`` is loaded only by groups that span nodes, never here.

What used to abort (core dump of a failing process): a gloo worker thread released a finished all-to-all work
after Python had dropped its own reference, during interpreter shutdown; releasing the work's tensors takes the
GIL, Python ended that thread inside a C++ frame, and libstdc++ called terminate. The reference backend now keeps
finished works alive (``reference._finished_works``), so the main thread releases them, or nobody at exit.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

from dist_utils import free_port

_BUILT = [name for name in ("_C",) if importlib.util.find_spec(f"moe_a2a.{name}") is not None]

_RANK = r"""
import os, sys
import torch, torch.distributed as dist
import moe_a2a
from moe_a2a import Buffer, fused_combine, fused_dispatch
if os.environ["LOAD_NATIVE"] == "1":
    from moe_a2a import _native
    for name in os.environ["NATIVE"].split(","):
        assert _native.load(name) is not None, name
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
group = dist.group.WORLD
gen = torch.Generator().manual_seed(rank)
x = torch.randn(24, 64, generator=gen)
idx = torch.randint(-1, 8, (24, 2), generator=gen)
weights = torch.rand(24, 2, generator=gen)
buf = Buffer(group, int(1e7))
ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, 8)
recv_x, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                                               num_tokens_per_expert=ntpe, topk_idx=idx, topk_weights=weights)
combined, _, _ = buf.combine(recv_x, handle)
xs = x.clone().requires_grad_()
out, _, _, _, h = fused_dispatch(xs, idx, weights, 8, group)
fused_combine(out * 2, group, h)[0].sum().backward()
assert xs.grad is not None
loaded = sorted(m for m in sys.modules if m in ("moe_a2a._C", "moe_a2a._nvshmem"))
assert loaded == (["moe_a2a._C"] if os.environ["LOAD_NATIVE"] == "1" else []), f"this CPU run loaded {loaded}"
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.skipif(not _BUILT, reason="no compiled extension in this build: nothing native to unload")
def test_processes_exit_cleanly_with_the_extension_present():
    jobs, failures = 15, []
    for first in range(0, jobs, 3):  # three jobs (six processes) at a time
        running = []
        for job in range(first, min(first + 3, jobs)):
            port = free_port()
            for rank in range(2):
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                           LOAD_NATIVE=str(job % 2), NATIVE=",".join(_BUILT))
                running.append((job, rank, subprocess.Popen([sys.executable, "-c", _RANK], env=env,
                                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                            text=True)))
        for job, rank, proc in running:
            try:
                output = proc.communicate(timeout=180)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                output = proc.communicate()[0] + "\n(killed after 180 s)"
            if proc.returncode != 0 or "terminate called" in output:
                failures.append(f"job {job} rank {rank}: exit {proc.returncode}\n{output[-1500:]}")
    assert not failures, f"{len(failures)} of {2 * jobs} processes did not exit cleanly:\n" + "\n".join(failures)
