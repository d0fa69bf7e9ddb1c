"""The public API on CUDA tensors: Buffer and fused_a2a on the kernels, against the reference backend."""
import pytest
import torch
import torch.distributed as dist

from harness import rank_num_sms, run_ranks, set_rank_device, skip_reason
from moe_a2a import Buffer, fused_a2a, fused_combine, fused_dispatch
from moe_a2a.backends import low_latency
from moe_a2a.fp8 import per_token_cast_to_fp8
from moe_a2a.limits import MAX_TOPK


def _routing(num_tokens, num_experts, topk, gen, device):
    scores = torch.rand(num_tokens, num_experts, generator=gen) + torch.linspace(1, 0, num_experts)
    idx = scores.topk(topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < 0.1] = -1
    return idx.to(device), torch.rand(num_tokens, topk, generator=gen).to(device)


def _normal(rank, num_ranks, use_nccl=False):
    device = set_rank_device(rank)
    # One rank per GPU: the handles travel over NCCL and the reference runs NCCL's all-to-all on the GPUs.
    group = dist.new_group(backend="nccl") if use_nccl else dist.group.WORLD
    Buffer.set_num_sms(rank_num_sms(num_ranks))
    hidden, num_experts, topk = 2048, 8 * num_ranks, 4
    config = Buffer.get_dispatch_config(num_ranks)
    nvl = config.get_nvl_buffer_size_hint(hidden * 4, num_ranks)  # room for float32 rows too
    kernels = Buffer(group, nvl, backend="cuda")
    reference = Buffer(group, nvl, backend="reference")
    assert kernels.backend == "cuda" and reference.backend == "reference"
    gen = torch.Generator().manual_seed(rank)
    for num_tokens in (0 if rank == 1 else 300, 1, 1024):
        x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().to(device)
        idx, w = _routing(num_tokens, num_experts, topk, gen, device)
        layouts = [b.get_dispatch_layout(idx, num_experts) for b in (kernels, reference)]
        for a, b in zip(layouts[0][:4], layouts[1][:4]):
            assert (a is None and b is None) or torch.equal(a, b)
        ntpr, _, ntpe, in_rank, _ = layouts[0]
        outs = [b.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                           topk_idx=idx, topk_weights=w, expert_alignment=4) for b in (kernels, reference)]
        for a, b in zip(outs[0][:3], outs[1][:3]):
            assert torch.equal(a, b)
        assert outs[0][3] == outs[1][3]
        handle = outs[0][4]
        # FP8 cached dispatch, bit for bit.
        x_fp8 = per_token_cast_to_fp8(x)
        (kx, ks), *_ = kernels.dispatch(x_fp8, handle=handle)
        (rx, rs), *_ = reference.dispatch(x_fp8, handle=handle)
        assert torch.equal(kx.view(torch.uint8), rx.view(torch.uint8)) and torch.equal(ks, rs)
        # float32 tokens are not what the kernels take: the reference serves them with the same handle.
        fx, *_ = kernels.dispatch(x.float(), handle=handle)
        assert torch.equal(fx, outs[0][0].float())
        # Combine with weights and two biases, within BF16 rounding of the float32 sum.
        y = (outs[0][0].float() * (rank + 1)).bfloat16()
        bias = (torch.randn(num_tokens, hidden, generator=gen).bfloat16().to(device),) * 2
        ck, cwk, _ = kernels.combine(y, handle, topk_weights=outs[0][2], bias=bias)
        cr, cwr, _ = reference.combine(y, handle, topk_weights=outs[0][2], bias=bias)
        torch.testing.assert_close(ck, cr, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(cwk, cwr)
        # The same rows written in place (zero-copy input): the same bits; the reference's is a plain tensor.
        for b, want, want_w in ((reference, cr, cwr), (kernels, ck, cwk)):
            buf = b.get_next_combine_buffer(handle)
            assert buf.shape == y.shape and buf.dtype == torch.bfloat16
            buf.copy_(y)
            got, got_w, _ = b.combine(buf, handle, topk_weights=outs[0][2], bias=bias)
            assert torch.equal(got, want) and torch.equal(got_w, want_w)
        kernels.dispatch(x, handle=handle)  # restages tokens where the combine input was
        with pytest.raises(ValueError, match="overwrote it"):  # on every rank, empty views included
            kernels.combine(buf, handle)

    # Bad input for the kernels raises on every rank before any communication: more top-k columns than they
    # carry, rows that are no whole 16-byte pieces.
    wide = torch.full((16, MAX_TOPK + 1), -1, dtype=torch.int64, device=device)
    ntpr, _, ntpe, in_rank, _ = kernels.get_dispatch_layout(wide, num_experts)
    x = torch.zeros(16, hidden, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=f"take at most {MAX_TOPK}"):
        kernels.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe,
                         topk_idx=wide)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        kernels.dispatch(x[:, :hidden - 4], num_tokens_per_rank=ntpr, is_token_in_rank=in_rank,
                         num_tokens_per_expert=ntpe)

    # fused_a2a forward and backward on the kernels equal the reference's.
    x = torch.randn(200, hidden, generator=gen).bfloat16().to(device)
    idx, w = _routing(200, num_experts, topk, gen, device)
    grads = []
    for group_backend in ("cuda", "reference"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        if group_backend == "reference":
            fused_a2a._buffers[group] = reference  # same sizes, so get_buffer keeps it
        recv_x, recv_idx, recv_w, tokens_per_expert, handle = fused_dispatch(xs, idx, ws, num_experts, group)
        out, _ = fused_combine(recv_x * (recv_w.sum(1, keepdim=True) + 1).bfloat16(), group, handle)
        out.float().square().sum().backward()
        grads.append((out.detach(), xs.grad, ws.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    _hybrid_ep(rank, num_ranks, group, device, kernels, reference, gen)
    dist.barrier()
    torch.cuda.synchronize()


def _hybrid_ep(rank, num_ranks, group, device, kernels, reference, gen):
    """HybridEP forward and backward: its un-permute writes the combine input into the kernels' buffer. Five
    local experts: 40 at 8 ranks, more than the 32 top-k columns the kernels carry (the routing map travels
    as each token's list of routed experts)."""
    hidden, num_local, sms = 2048, 5, rank_num_sms(num_ranks)
    x = torch.randn(300, hidden, generator=gen).bfloat16().to(device)
    routing_map = torch.rand(300, num_local * num_ranks, generator=gen).to(device) < 0.3
    probs = torch.rand(300, num_local * num_ranks, generator=gen).to(device)
    results = []
    for buffer in (kernels, reference):
        fused_a2a.init_hybrid_ep_buffer(group, hidden, 300, num_local, sms, sms, False)
        fused_a2a._hybrid_ep_buffer = fused_a2a._hybrid_ep_buffer._replace(buffer=buffer)
        xs, ps = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, out_probs, _, _, handle = fused_a2a.hybrid_ep_dispatch(xs, routing_map, ps, group, num_local, sms, sms)
        combined = fused_a2a.hybrid_ep_combine(out * 2, handle, None, None)
        (combined.float().square().sum() + out_probs.square().sum()).backward()
        results.append((combined.detach(), xs.grad, ps.grad))
    fused_a2a.reset_hybrid_ep_buffer()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _low_latency(rank, num_ranks):
    device = set_rank_device(rank)
    hidden, max_tokens, num_experts = 2048, 32, 4 * num_ranks
    nbytes = Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, num_ranks, num_experts)
    kernels = Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True, backend="cuda")
    reference = Buffer(dist.group.WORLD, 0, nbytes, low_latency_mode=True, backend="reference")
    gen = torch.Generator().manual_seed(rank)
    for num_tokens in (max_tokens, 0 if rank == 0 else 3):
        x = torch.randn(num_tokens, hidden, generator=gen).bfloat16().to(device)
        idx, w = _routing(num_tokens, num_experts, 4, gen, device)
        k = kernels.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=False)
        r = reference.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=False)
        assert torch.equal(k[1], r[1])
        for local in range(num_experts // num_ranks):
            n = int(r[1][local])
            # Same (source, token) set per expert, compared through the handles' source info.
            kh, rh = k[2], r[2]
            assert torch.equal(kh.layout_range[local] & 0xFFFFFFFF, rh.layout_range[local] & 0xFFFFFFFF)
            ko = torch.argsort(kh.src_info[local, :n].long() + 10 ** 6 * _source_of(kh, local, n))
            ro = torch.argsort(rh.src_info[local, :n].long() + 10 ** 6 * _source_of(rh, local, n))
            assert torch.equal(k[0][local, :n][ko], r[0][local, :n][ro])
        y = (k[0].float() * 0.5).bfloat16()
        ck, _, _ = kernels.low_latency_combine(y, idx, w, k[2])
        yr = (r[0].float() * 0.5).bfloat16()
        cr, _, _ = reference.low_latency_combine(yr, idx, w, r[2])
        torch.testing.assert_close(ck, cr, rtol=1e-2, atol=1e-2)
    dist.barrier()
    torch.cuda.synchronize()


def _source_of(handle, local, n):
    """Source rank of each of the first ``n`` slots of ``local``, from ``layout_range``."""
    begin, count = handle.layout_range[local] >> 32, handle.layout_range[local] & 0xFFFFFFFF
    slot = torch.arange(n, device=begin.device).unsqueeze(1)
    inside = (slot >= begin.unsqueeze(0)) & (slot < (begin + count).unsqueeze(0))
    return inside.long().argmax(1)


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_buffer_on_kernels(num_ranks):
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_normal, num_ranks)


def test_buffer_on_kernels_nccl_group():
    """One rank per GPU with an NCCL group, as on a real node."""
    num_ranks = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_ranks < 2:
        pytest.skip("needs two or more GPUs (NCCL puts one rank on each)")
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_normal, min(num_ranks, 8), True)


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_buffer_low_latency_on_kernels(num_ranks):
    reason = skip_reason(num_ranks) or (None if low_latency.available() else "no low-latency kernels in this build")
    if reason:
        pytest.skip(reason)
    run_ranks(_low_latency, num_ranks)
