"""Low-latency calls read like DeepEP's in a profile: one kernel per call named ``dispatch`` / ``combine``.

DeepEP's ``tests/test_low_latency.py`` times its kernels by name through the torch profiler: in the profile
table exactly one line may contain ``dispatch`` and one ``combine`` (``Errors of the kernel ... in the
profiling table`` otherwise), with one launch per call, two with ``return_recv_hook`` (send, then the
hook's receive). Profiling scripts written against DeepEP keep working only if moe_a2a's calls launch one
kernel each whose name says so, and nothing else they launch carries either word.
"""
import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, set_rank_device, skip_reason
from moe_a2a import Buffer
from moe_a2a.backends import low_latency

pytestmark = pytest.mark.gpu

NAMES = ("dispatch", "combine")


def _kernel_launches(prof):
    """``{kernel name: launches}`` of the CUDA kernels in a profile."""
    out = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0) + 1
    return out


def _profile(rank, num_ranks):
    device = set_rank_device(rank)
    hidden, max_tokens, num_experts, topk = 7168, 128, 8 * num_ranks, 8
    nbytes = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
    buffer = Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True, backend="cuda", explicitly_destroy=True)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(max_tokens, hidden, generator=gen).bfloat16().to(device)
    idx = torch.rand(max_tokens, num_experts, generator=gen).topk(topk, dim=1).indices.to(device)
    w = torch.rand(max_tokens, topk, generator=gen).to(device)

    def step(use_fp8, hook):
        recv_x, _, handle, _, recv_hook = buffer.low_latency_dispatch(
            x, idx, max_tokens, num_experts, use_fp8=use_fp8, return_recv_hook=hook)
        if hook:
            recv_hook()
        y = torch.randn(recv_x[0].shape if use_fp8 else recv_x.shape, device=device).bfloat16()
        _, _, combine_hook = buffer.low_latency_combine(y, idx, w, handle, return_recv_hook=hook)
        if hook:
            combine_hook()

    for use_fp8 in (False, True):
        for hook in (False, True):
            step(use_fp8, hook)  # warm up (first-launch attributes, allocator)
            torch.cuda.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(use_fp8, hook)
                torch.cuda.synchronize()
            dist.barrier()
            where = f"fp8={use_fp8} hook={hook}"
            launches = _kernel_launches(prof)
            for name in NAMES:
                matching = {k: n for k, n in launches.items() if name in k}
                # One kernel per call, launched once (twice with the hook: send, then receive).
                assert len(matching) == 1, f"{where}: kernels matching {name!r}: {matching} (all: {launches})"
                assert list(matching.values()) == [2 if hook else 1], f"{where}: {matching}"
            both = [k for k in launches if all(n in k for n in NAMES)]
            assert not both, f"{where}: kernels named after both calls: {both}"
            # DeepEP's own check, on the same table it prints.
            table = prof.key_averages().table(sort_by="cuda_time_total", max_name_column_width=100)
            for name in NAMES:
                lines = [line for line in table.splitlines() if name in line]
                assert len(lines) == 1, f"{where}: Errors of the kernel {name} in the profiling table:\n{table}"
    buffer.destroy()


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_low_latency_profile_names(num_ranks):
    reason = skip_reason(num_ranks) or (None if low_latency.available() else "no low-latency kernels in this build")
    if reason:
        pytest.skip(reason)
    run_ranks(_profile, num_ranks)
