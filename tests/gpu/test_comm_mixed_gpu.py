"""moe_a2a.comm on CUDA tensors.

* NCCL (one GPU per rank, 2/4/8 ranks): the CPU test bodies run unchanged on a ``cpu:gloo,cuda:nccl`` default
  group (every collective then runs on NCCL, CPU inputs staged through the GPU), plus CUDA inputs, the
  MixedCommHandler on CUDA with virtual nodes, and its default settings at model sizes.
* gloo with CUDA tensors (2/4/8 ranks sharing the GPUs): results come back on the inputs' device.
* The MixedCommHandler's fused mode on 2/4/8 ranks sharing one GPU (under MPS) over a gloo group.
"""
import re
import time

import pytest
import torch
import torch.distributed as dist

import test_comm_gather as cpu_gather
import test_comm_mixed as cpu_mixed
from dist_utils import run_distributed
from harness import expect_fault, run_ranks, set_rank_device, skip_reason, synchronize_after_fault
from moe_a2a.comm import (HelixAllToAllNative, MixedCommHandler, MixedCommMode, allgather, alltoall_helix,
                          reducescatter, run_mixed_comm)
from moe_a2a.comm.gather_scatter import sum_in_order
from moe_a2a.comm.workspace import kernels_available

pytestmark = pytest.mark.gpu


def _need(num_gpus):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.device_count() < num_gpus:
        pytest.skip(f"NCCL needs one GPU per rank: {num_gpus} ranks, {torch.cuda.device_count()} GPU(s)")


def _cuda_inputs(rank, size):
    dev = torch.device("cuda", torch.cuda.current_device())
    sizes = [r % 3 + 1 for r in range(size)]
    xs = cpu_gather.inputs(7, size, lambda r: (4, sizes[r], 64), torch.bfloat16)
    out = allgather([xs[rank].to(dev), None], dim=1, sizes=sizes)
    assert out[1] is None and out[0].device == dev and torch.equal(out[0].cpu(), torch.cat(xs, 1))
    big = cpu_gather.inputs(8, size, lambda r: (size * 128, 7168), torch.bfloat16)
    got = reducescatter(big[rank].to(dev), dim=0)
    assert got.device == dev and torch.equal(got.cpu(), sum_in_order(big, torch.bfloat16).chunk(size)[rank])
    x = big[rank][:, :64].double().to(dev).requires_grad_(True)
    reducescatter(x, dim=0).sum().backward()
    assert torch.equal(x.grad.cpu(), torch.ones(size * 128, 64, dtype=torch.float64))
    ins = [t.to(dev) for t in cpu_gather.inputs(9, size, lambda r: (3, 512), torch.float16)]
    assert alltoall_helix(ins)[0].device == dev
    po = cpu_gather.inputs(10, size, lambda r: (16, size, 512), torch.bfloat16)
    st = cpu_gather.inputs(11, size, lambda r: (16, size, 2), torch.float32)
    got_po, got_st = HelixAllToAllNative.get().alltoall_native(po[rank].to(dev), st[rank].to(dev))
    assert torch.equal(got_po.cpu(), torch.stack([po[j][..., rank, :] for j in range(size)], dim=-2))
    assert torch.equal(got_st.cpu(), torch.stack([st[j][..., rank, :] for j in range(size)], dim=-2))
    HelixAllToAllNative.clear_cache()


def _mixed_cuda(rank, size):
    dev = torch.device("cuda", torch.cuda.current_device())
    if size >= 4:
        half = size // 2
        configs = [(half, (2, None, 1, None)), (half, (None, 2, 2, None)), (half, (2, None, None, None))]
    else:
        configs = [(size, (None,) * 4), (size, (1, None, None, None))]
    for i, (local_size, split) in enumerate(configs):
        h = cpu_mixed.make_handler(rank, size, local_size, split, device="cuda", use_autotune=(i == 0),
                                   dtype=torch.float16 if i == 1 else torch.bfloat16)
        assert h.device == dev and h.grid_size == torch.cuda.get_device_properties(dev).multi_processor_count
        cpu_mixed.check_all_modes(h, rank, size, seed=200 + i, dtype=h.dtype, rows=16, hidden=256)
        h.shutdown()
    # Defaults a user would leave alone: no split given (all TP), autotune on, model-sized rows.
    h = MixedCommHandler(rank, size, rank, size, 0, 1, None, None, None, None, torch.bfloat16, dev)
    xs = cpu_gather.inputs(300, size, lambda r: (256, 7168), torch.bfloat16)
    got = h.allreduce(xs[rank].to(dev)).double().cpu()
    ref = sum_in_order([x.double() for x in xs], torch.float64)
    assert torch.allclose(got, ref, rtol=2e-2, atol=5e-2)
    assert h.autotune_map and all(m != MixedCommMode.AUTOTUNE for v in h.autotune_map.values() for m in v.values())
    h.shutdown()


def _nccl_body(rank, size):
    torch.cuda.set_device(rank)
    cpu_gather._body(rank, size)
    _cuda_inputs(rank, size)
    _mixed_cuda(rank, size)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_comm_on_nccl(num_ranks):
    _need(num_ranks)
    run_distributed(_nccl_body, num_ranks, backend="cpu:gloo,cuda:nccl")


def _gloo_cuda_body(rank, size):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    xs = cpu_gather.inputs(1, size, lambda r: (2 * size, 3), torch.bfloat16)
    out = allgather(xs[rank].to(dev), dim=0)
    assert out.device == dev and torch.equal(out.cpu(), torch.cat(xs))
    got = reducescatter([xs[rank].to(dev).t().contiguous()], dim=1)[0]
    assert got.device == dev and torch.equal(got.cpu(), sum_in_order([x.t() for x in xs], torch.bfloat16)
                                             .chunk(size, dim=1)[rank])
    outs = alltoall_helix([t.to(dev) for t in cpu_gather.inputs(3, size, lambda r: (2, 8), torch.float16)])
    assert outs[0].device == dev and outs[0].shape == (size, 2, 8)
    po = cpu_gather.inputs(4, size, lambda r: (3, size, 64), torch.bfloat16)
    st = cpu_gather.inputs(5, size, lambda r: (3, size, 2), torch.float32)
    got_po, got_st = HelixAllToAllNative.get(None, 1, fifo_bytes=1024).alltoall_native(po[rank].to(dev),
                                                                                      st[rank].to(dev))
    assert got_po.device == dev
    assert torch.equal(got_po.cpu(), torch.stack([po[j][..., rank, :] for j in range(size)], dim=-2))
    assert torch.equal(got_st.cpu(), torch.stack([st[j][..., rank, :] for j in range(size)], dim=-2))
    HelixAllToAllNative.clear_cache()


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_cuda_tensors_over_gloo(num_ranks):
    """Ranks sharing the GPUs (any count), CUDA inputs through gloo: results on the inputs' device."""
    _need(1)
    run_distributed(_gloo_cuda_body, num_ranks)


def _gloo_kernel_body(rank, size):
    """CUDA tensors on a gloo group take the IPC kernel path of allgather / reducescatter (uneven sizes, any
    dim, autograd): bit for bit the torch composition (concatenation; sums in rank order, float32 accumulation)."""
    from moe_a2a.comm import gather_scatter
    dev = set_rank_device(rank)
    sizes = [r % 3 + 1 for r in range(size)]
    for dtype in (torch.bfloat16, torch.float32):
        xs = cpu_gather.inputs(21, size, lambda r: (sizes[r], 4, 64), dtype)  # uneven along dim 0
        out = allgather(xs[rank].to(dev), dim=0, sizes=sizes)
        assert out.device == dev and torch.equal(out.cpu(), torch.cat(xs))
        xs = cpu_gather.inputs(22, size, lambda r: (3, 5, 256), dtype)  # even, along dim 1
        assert torch.equal(allgather(xs[rank].to(dev), dim=1).cpu(), torch.cat(xs, 1))
        big = cpu_gather.inputs(23, size, lambda r: (sum(sizes), 512), dtype)
        got = reducescatter(big[rank].to(dev), dim=0, sizes=sizes)
        want = sum_in_order(big, dtype).split(sizes)[rank]
        assert got.device == dev and torch.equal(got.cpu(), want)
        wide = cpu_gather.inputs(24, size, lambda r: (8, 64 * size), dtype)
        got = reducescatter(wide[rank].to(dev), dim=1)
        assert torch.equal(got.cpu(), sum_in_order(wide, dtype).chunk(size, dim=1)[rank])
    assert len(gather_scatter._workspaces) == 2, "the kernel path was not taken"
    x = torch.randn(sizes[rank], 64, device=dev, requires_grad=True)
    allgather(x, dim=0, sizes=sizes).sum().backward()  # backward: a reduce-scatter on the kernels
    assert torch.equal(x.grad, torch.full_like(x, float(size)))
    gather_scatter.release_kernel_workspaces()


def _run_on_kernels(body, num_ranks):
    """``body`` on ``num_ranks`` ranks sharing the GPUs, skipped where the Lamport kernels cannot run."""
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    if not kernels_available():
        pytest.skip("moe_a2a._C has no all-reduce kernels")
    run_ranks(body, num_ranks, timeout=300.0)


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_gather_scatter_kernels_ranks_sharing_a_gpu(num_ranks):
    _run_on_kernels(_gloo_kernel_body, num_ranks)


def _fused_body(rank, size):
    """The fused modes (one-shot FUSED_OPT_WAITS_UC, two-shot FUSED_OPT_BYTES1_UC) on ranks sharing one GPU over a
    gloo group, where they are the only modes: every op of every one-node split against the unfused composition
    bit for bit (exact inputs) and to rounding (Gaussian), defaults left alone (the fixed rule takes the two-shot
    for the large messages), sizes from one row to a grown workspace, and clear refusals."""
    dev = set_rank_device(rank)
    splits = [(None, None, None, None), (1, None, None, None)] + ([(2, None, None, None)] if size >= 4 else [])
    for i, split in enumerate(splits):
        h = cpu_mixed.make_handler(rank, size, size, split, device=dev, use_autotune=(i == 0),
                                   dtype=torch.float16 if i == 1 else torch.bfloat16)
        assert h.fused_available and not h.torch_modes, h.fused_unavailable_reason
        # The default: the node's buffers in CUDA virtual memory, without falling back to cudaIpc handles.
        assert h._workspace.memory == "vmm" and h.virtual_memory_error is None, h.virtual_memory_error
        assert h.valid_mode_list == [MixedCommMode.FUSED_OPT_WAITS_UC, MixedCommMode.FUSED_OPT_BYTES1_UC] + (
            [MixedCommMode.AUTOTUNE] if i == 0 else [])
        for rows, hidden in ((2, 8), (16, 256), (40, 1032)):
            cpu_mixed.check_all_modes(h, rank, size, seed=400 + 10 * i + rows, dtype=h.dtype, rows=rows,
                                      hidden=hidden, gaussian=rows == 16)
        # Messages that grow the workspace past its first 8 MiB (size x rows x 4 KiB), then a small one between
        # them (the three buffers rotate over the grown workspace).
        for rows in (2200 // size, 3, 2200 // size):
            cpu_mixed.check_all_modes(h, rank, size, seed=500 + rows, dtype=h.dtype, rows=rows, hidden=2048,
                                      gaussian=False)
        op = h.valid_op_list[0]
        big = torch.ones(2200 // size, 2048, dtype=h.dtype, device=dev)
        if i > 0:  # no autotune: the fixed rule
            assert h.resolve_mode(op, big) == (MixedCommMode.FUSED_OPT_BYTES1_UC if h.para_info.use_tp
                                               else MixedCommMode.FUSED_OPT_WAITS_UC)
        with pytest.raises(ValueError, match="rows must be a multiple of 16 bytes, got 6"):
            run_mixed_comm(op, h, torch.ones(4 * h.para_info.dp_size, 3, dtype=h.dtype, device=dev))
        with pytest.raises(NotImplementedError, match="FUSED_OPT_WAITS_MC: it needs NVLink multicast"):
            run_mixed_comm(op, h, torch.ones(4, 8, dtype=h.dtype, device=dev), mode=MixedCommMode.FUSED_OPT_WAITS_MC)
        with pytest.raises(NotImplementedError, match="FUSED_OPT_BYTES2_UC: moe_a2a does not build it"):
            run_mixed_comm(op, h, torch.ones(4, 8, dtype=h.dtype, device=dev), mode=MixedCommMode.FUSED_OPT_BYTES2_UC)
        with pytest.raises(ValueError, match="mode NCCL_ONE is not valid"):
            run_mixed_comm(op, h, torch.ones(4, 8, dtype=h.dtype, device=dev), mode=MixedCommMode.NCCL_ONE)
        h.shutdown()


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_fused_mode_ranks_sharing_a_gpu(num_ranks):
    _run_on_kernels(_fused_body, num_ranks)


def _fused_cuda_ipc_body(rank, size):
    """The fused modes with the node's buffers shared by cudaIpc handles (``memory="cuda_ipc"``, the fallback where
    CUDA virtual memory cannot be shared): the same results as in virtual memory, through a workspace growth
    (new mappings)."""
    dev = set_rank_device(rank)
    split = (2, None, None, None) if size >= 4 else (None,) * 4
    h = cpu_mixed.make_handler(rank, size, size, split, device=dev, use_autotune=False, memory="cuda_ipc")
    assert h._workspace.memory == "cuda_ipc"
    for rows, hidden in ((2, 8), (16, 256), (2200 // size, 2048)):
        cpu_mixed.check_all_modes(h, rank, size, seed=800 + rows, dtype=h.dtype, rows=rows, hidden=hidden,
                                  gaussian=rows == 16)
    h.shutdown()


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_fused_mode_on_cuda_ipc_handles(num_ranks):
    _run_on_kernels(_fused_cuda_ipc_body, num_ranks)


def _fused_inter_body(rank, size):
    """The fused mode across two virtual nodes (the NVSHMEM one-shot: stores to the node's ranks, puts to the
    other node's) on ranks sharing one GPU over a gloo group, where it is the only mode: every op of several
    TP x DP splits against the unfused composition bit for bit (exact inputs) and to rounding (Gaussian),
    defaults left alone, many calls in a row (the two receive sets alternate), and clear refusals."""
    from test_internode import _nvshmem_env
    _nvshmem_env()
    dev = set_rank_device(rank)
    half = size // 2
    splits = [(None, None, None, None), (2, None, 1, None), (None, 2, 2, None)]
    if half >= 4:
        splits.append((2, None, None, None))
    for i, split in enumerate(splits):
        h = cpu_mixed.make_handler(rank, size, half, split, device=dev, use_autotune=(i == 0),
                                   dtype=torch.float16 if i == 1 else torch.bfloat16)
        assert h.fused_available and not h.torch_modes, h.fused_unavailable_reason
        assert h.valid_mode_list == [MixedCommMode.FUSED_OPT_WAITS_UC] + ([MixedCommMode.AUTOTUNE] if i == 0 else [])
        for rows, hidden in ((2, 8), (16, 256), (40, 1032), (300, 2048)):
            cpu_mixed.check_all_modes(h, rank, size, seed=600 + 10 * i + rows, dtype=h.dtype, rows=rows,
                                      hidden=hidden, gaussian=rows == 16)
        op = h.valid_op_list[0]
        xs = cpu_mixed.world_inputs(700 + i, size, (8 * h.para_info.dp_size, 512), h.dtype)
        want = cpu_mixed.expected(op, h.para_info, xs, h.dtype)
        mine = xs[rank].to(dev)
        outs = [run_mixed_comm(op, h, mine) for _ in range(50)]
        assert all(torch.equal(o.cpu(), want) for o in outs)
        slot_rows = (64 << 20) // size // 4096  # rows of 4 KiB in one source's slot
        too_big = torch.ones(h.para_info.dp_size * (slot_rows + 1), 2048, dtype=h.dtype, device=dev)
        with pytest.raises(ValueError, match="above the NVSHMEM one-shot's slot"):
            run_mixed_comm(op, h, too_big)
        with pytest.raises(NotImplementedError, match="FUSED_OPT_BYTES1_UC: moe_a2a does not build it across nodes"):
            run_mixed_comm(op, h, mine, mode=MixedCommMode.FUSED_OPT_BYTES1_UC)
        h.shutdown()


@pytest.mark.parametrize("num_ranks", [4, 8])
def test_fused_mode_across_virtual_nodes(num_ranks):
    from moe_a2a.comm import mixed_internode
    if not mixed_internode.available():
        pytest.skip("moe_a2a._nvshmem is not built (no NVSHMEM headers at build time)")
    _run_on_kernels(_fused_inter_body, num_ranks)


def _fused_inter_fault_body(rank, size, what):
    """The NVSHMEM one-shot's failures reach Python: ``shape``, the last rank sends rows of another width (every
    rank that compares its header records the shapes and the sender); ``missing``, the last rank does not call
    (the others time out naming a rank they waited for). Every calling rank raises (its own record, or under
    MPS a CUDA error: the first trap ends every process's kernels on the GPU) within the deadline."""
    from test_internode import _nvshmem_env
    _nvshmem_env()
    dev = set_rank_device(rank)
    h = cpu_mixed.make_handler(rank, size, size // 2, (None,) * 4, device=dev, use_autotune=False, timeout_s=2.0)
    x = torch.ones(4, 128, dtype=h.dtype, device=dev)
    assert torch.equal(h.allreduce(x).cpu(), torch.full((4, 128), float(size), dtype=h.dtype))  # all present
    torch.cuda.synchronize()
    dist.barrier()
    odd = size - 1
    start = time.monotonic()
    if what == "shape":
        expect_fault(lambda: h.allreduce(torch.ones(4, 64 if rank == odd else 128, dtype=h.dtype, device=dev)))
    elif rank != odd:
        expect_fault(lambda: h.allreduce(x))
    assert time.monotonic() - start < 2.0 + 20
    records = [None] * size
    dist.all_gather_object(records, h._nvshmem_workspace._rt.error())
    made = [(r, e) for r, e in enumerate(records) if e]
    assert made, records
    for r, e in made:
        if what == "shape":
            mine, theirs = (64, 128) if r == odd else (128, 64)
            assert re.search(rf"rank {r} got a message of shape \[4 rows, hidden {theirs}, dtype 2\] from rank "
                             rf"\d+ in call 2, its own is \[4 rows, hidden {mine}, dtype 2\]", e), e
        else:
            assert re.match(rf"rank {r} timed out after 2000 ms in the internode mixed one-shot \(call 2\) waiting "
                            rf"for rank \d+", e), e
    if what == "missing":
        assert any(f"waiting for rank {odd};" in e for _, e in made), made
    dist.barrier()
    synchronize_after_fault()  # no shutdown: a peer's CUDA context may be gone (no collective free)


@pytest.mark.parametrize("what", ["shape", "missing"])
def test_fused_mode_across_virtual_nodes_fails_clearly(what):
    from moe_a2a.comm import mixed_internode
    if not mixed_internode.available():
        pytest.skip("moe_a2a._nvshmem is not built (no NVSHMEM headers at build time)")
    reason = skip_reason(4)
    if reason:
        pytest.skip(reason)
    run_ranks(_fused_inter_fault_body, 4, what, timeout=120.0)
