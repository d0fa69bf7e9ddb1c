"""Wire formats with CUDA tensors through ``Buffer``: the kernels' FP8/LogFMT low-latency combines, FP8 normal
combine and NVFP4 dispatch against the CPU reference, and the reference backend on CUDA tensors likewise."""
import pytest
import torch
import torch.distributed as dist

from harness import run_ranks, set_rank_device, skip_reason
from moe_a2a import Buffer
from moe_a2a.formats import nvfp4_quantize

pytestmark = pytest.mark.gpu
HIDDEN, MAX_TOKENS, NUM_EXPERTS = 256, 16, 8


def _ll_buffer(**kw):
    n = dist.get_world_size()
    return Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, n, NUM_EXPERTS),
                  low_latency_mode=True, **kw)


def _inputs(rank, device):
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(MAX_TOKENS - rank, HIDDEN, generator=gen).bfloat16()
    idx = torch.rand(x.size(0), NUM_EXPERTS, generator=gen).topk(3, dim=1).indices
    w = torch.rand(x.size(0), 3, generator=gen)
    return x.to(device), idx.to(device), w.to(device)


def _normal_fp8_body(rank, num_ranks):
    """FP8 rows in the normal combine on the intranode kernels, through ``Buffer``: within the format's bound
    of the BF16 combine (per copy half an e4m3 step: 2**-4 of the value)."""
    device = set_rank_device(rank)
    x, idx, w = _inputs(rank, device)
    n = dist.get_world_size()
    nvl = Buffer.get_combine_config(n).get_nvl_buffer_size_hint(HIDDEN * 2, n) * 2
    normal = Buffer(dist.group.WORLD, nvl, 0)
    assert normal.backend == "cuda"
    layout = normal.get_dispatch_layout(idx, NUM_EXPERTS)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    recv_x, _, _, _, nhandle, _ = normal.dispatch(x, topk_idx=idx, **args)
    bf16, _, _ = normal.combine(recv_x, nhandle)
    fp8, _, _ = normal.combine(recv_x, nhandle, use_fp8=True)
    magnitude, _, _ = normal.combine(recv_x.abs(), nhandle)
    excess = (fp8.float() - bf16.float()).abs() - (2 ** -4 * magnitude.float() + 2 ** -7 * bf16.float().abs() + 1e-3)
    assert bool((excess <= 0).all()), float(excess.max())
    torch.cuda.synchronize()


def _nvfp4_body(rank, num_ranks):
    """NVFP4 dispatch on the intranode kernels moves the same bytes as the reference backend (CPU tensors)."""
    device = set_rank_device(rank)
    x, idx, _ = _inputs(rank, device)
    n = dist.get_world_size()
    nvl = Buffer.get_combine_config(n).get_nvl_buffer_size_hint(HIDDEN * 2, n) * 2
    kernels, reference = Buffer(dist.group.WORLD, nvl, 0), Buffer(dist.group.WORLD, nvl, 0, backend="reference")
    assert kernels.backend == "cuda"
    layout = kernels.get_dispatch_layout(idx, NUM_EXPERTS)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    cpu_args = {k: v.cpu() for k, v in args.items()}
    # hidden 96: six block scales, padded to eight bytes before the global scale.
    for hidden in (HIDDEN, 96):
        parts = nvfp4_quantize(x[:, :hidden].float() * (rank + 1))
        recv, recv_idx, _, counts, handle, _ = kernels.dispatch(parts, topk_idx=idx, **args)
        want, want_idx, _, want_counts, _, _ = reference.dispatch(tuple(p.cpu() for p in parts),
                                                                    topk_idx=idx.cpu(), **cpu_args)
        assert counts == want_counts and torch.equal(recv_idx.cpu(), want_idx)
        assert recv[0].dtype == torch.uint8 and recv[1].dtype == torch.float8_e4m3fn and recv[2].dtype == torch.float32
        for got, exp in zip(recv, want):
            assert torch.equal(got.cpu().view(torch.uint8), exp.view(torch.uint8))
        cached, *_ = kernels.dispatch(parts, handle=handle)
        for got, exp in zip(cached, want):
            assert torch.equal(got.cpu().view(torch.uint8), exp.view(torch.uint8))
    with pytest.raises(ValueError, match="NVFP4 packed values"):  # 24 bytes a row: not whole 16-byte pieces
        kernels.dispatch(nvfp4_quantize(x[:, :48].float()), topk_idx=idx, **args)
    torch.cuda.synchronize()


@pytest.mark.skipif(skip_reason(2) is not None, reason=str(skip_reason(2)))
def test_nvfp4_dispatch_on_kernels():
    run_ranks(_nvfp4_body, 2)


@pytest.mark.skipif(skip_reason(2) is not None, reason=str(skip_reason(2)))
def test_normal_fp8_combine_on_kernels():
    run_ranks(_normal_fp8_body, 2)


def _formats_body(rank, num_ranks, backend):
    """Low-latency combines in every wire format through ``Buffer`` on CUDA tensors (``backend``: "reference"
    or "cuda"), against the reference backend on CPU tensors."""
    device = set_rank_device(rank)
    x, idx, w = _inputs(rank, device)
    gpu, cpu = _ll_buffer(backend=backend), _ll_buffer(backend="reference")
    assert gpu.backend == backend
    recv, _, handle, _, _ = gpu.low_latency_dispatch(x, idx, MAX_TOKENS, NUM_EXPERTS, use_fp8=False)
    recv_c, _, handle_c, _, _ = cpu.low_latency_dispatch(x.cpu(), idx.cpu(), MAX_TOKENS, NUM_EXPERTS, use_fp8=False)
    if backend == "reference":  # the kernels leave unused slots unwritten; their combine reads valid ones only
        assert torch.equal(recv.cpu(), recv_c)
    magnitude, _, _ = cpu.low_latency_combine(recv_c.abs(), idx.cpu(), w.cpu(), handle_c)
    # Each copy's largest value in its 128-channel block, summed like the copies (the weights are positive).
    blocks = recv_c.abs().float().unflatten(-1, (-1, 128))
    block_max = blocks.amax(-1, keepdim=True).expand_as(blocks).flatten(-2).bfloat16()
    block_bound, _, _ = cpu.low_latency_combine(block_max, idx.cpu(), w.cpu(), handle_c)
    # Both sides round each element correctly, but a quotient on a rounding tie may land on either side of it
    # on two devices: one level of the format apart at most. LogFMT: one level is 2.2% of the value; FP8 e4m3:
    # one level is at most 2**-4 of the block's largest value. Then BF16 rounding of the sum.
    bound = {"bf16": 0.01 * magnitude.float(), "logfmt": 0.03 * magnitude.float(),
             "fp8": 2 ** -4 * block_bound.float() + 0.01 * magnitude.float()}
    for kw, name in (({}, "bf16"), ({"use_fp8": True}, "fp8"), ({"use_logfmt": True}, "logfmt")):
        got, _, _ = gpu.low_latency_combine(recv, idx, w, handle, **kw)
        want, _, _ = cpu.low_latency_combine(recv_c, idx.cpu(), w.cpu(), handle_c, **kw)
        diff = (got.cpu().float() - want.float()).abs()
        assert bool((diff <= bound[name] + 1e-3).all()), (name, diff.max().item())
        if backend == "cuda":  # zero copy: the registered buffer is encoded in place and read by the peers
            gpu.get_next_low_latency_combine_buffer(handle).copy_(recv)
            got, _, _ = gpu.low_latency_combine(recv, idx, w, handle, zero_copy=True, **kw)
            diff = (got.cpu().float() - want.float()).abs()
            assert bool((diff <= bound[name] + 1e-3).all()), (name, "zero copy", diff.max().item())
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reference_formats_on_cuda_tensors():
    run_ranks(_formats_body, 2, "reference")


@pytest.mark.skipif(skip_reason(2) is not None, reason=str(skip_reason(2)))
def test_kernel_formats_on_cuda_tensors():
    run_ranks(_formats_body, 2, "cuda")
