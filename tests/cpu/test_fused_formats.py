"""fused_a2a with fewer bytes: FP8 combine (forward, and backward on request) and NVFP4 dispatch."""
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a.fp8 import fp8_to_float, per_token_cast_to_fp8
from moe_a2a.formats import nvfp4_dequantize, nvfp4_quantize
from moe_a2a.fused_a2a import fused_combine, fused_combine_fp8, fused_dispatch, get_buffer

HIDDEN = 128


def _routing(gen, num_tokens, num_experts, topk):
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    idx[torch.rand(num_tokens, topk, generator=gen) < 0.2] = -1
    return idx


def _body(rank, num_ranks):
    gen = torch.Generator().manual_seed(50 + rank)
    num_experts, topk, num_tokens = 2 * num_ranks, 2, 11 + 3 * rank
    group = dist.group.WORLD
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    idx = _routing(gen, num_tokens, num_experts, topk)
    probs = torch.rand(num_tokens, topk, generator=gen)

    # BF16 dispatch: the reference for the NVFP4 one below.
    probs_a = probs.clone().requires_grad_()
    recv_x, recv_idx, recv_probs, per_expert, handle = fused_dispatch(x.bfloat16(), idx, probs_a, num_experts,
                                                                      group)
    g_probs = torch.randn(recv_probs.shape, generator=gen)
    (recv_probs * g_probs).sum().backward()

    # FP8 combine forward: the BF16 combine of the decoded rows; backward stays BF16 (exact cached dispatch).
    y = (recv_x.detach().float() * 1.5).bfloat16().requires_grad_()
    out, _ = fused_combine_fp8(y, group, handle)
    want, _, _ = get_buffer(group, HIDDEN * 4).combine(fp8_to_float(*per_token_cast_to_fp8(y.detach())), handle)
    assert torch.equal(out, want.bfloat16())
    g_out = torch.randn(out.shape, generator=gen).bfloat16()
    out.backward(g_out)
    plain_y = y.detach().clone().requires_grad_()
    plain, _ = fused_combine(plain_y, group, handle)
    plain.backward(g_out)
    assert torch.equal(y.grad, plain_y.grad)
    assert not torch.equal(out, plain)
    # FP8 backward on request: the cached dispatch of the FP8-cast gradient.
    y8 = y.detach().clone().requires_grad_()
    out8, _ = fused_combine_fp8(y8, group, handle, use_fp8_backward=True)
    out8.backward(g_out)
    want_grad, _, _, _, _, _ = get_buffer(group, HIDDEN * 2).dispatch(per_token_cast_to_fp8(g_out), handle=handle)
    assert torch.equal(y8.grad, fp8_to_float(*want_grad).bfloat16())

    # NVFP4 dispatch: the same routing, bytes unchanged, routing weights' gradient as with BF16 tokens.
    parts = nvfp4_quantize(x)
    probs_b = probs.clone().requires_grad_()
    recv4, recv_idx4, recv_probs4, per_expert4, handle4 = fused_dispatch(parts, idx, probs_b, num_experts, group)
    assert torch.equal(recv_idx4, recv_idx) and torch.equal(per_expert4, per_expert)
    assert torch.equal(recv_probs4, recv_probs.detach())
    assert recv4[0].dtype == torch.uint8 and recv4[1].dtype == torch.float8_e4m3fn and recv4[2].dtype == torch.float32
    # Same source rows as the BF16 dispatch: decoded NVFP4 is within its bound of the BF16 tokens.
    recv_x = recv_x.detach()
    block_max = recv_x.float().abs().view(-1, HIDDEN // 16, 16).amax(2, keepdim=True).expand(-1, -1, 16)
    err = (nvfp4_dequantize(*recv4) - recv_x.float()).abs().view(-1, HIDDEN // 16, 16)
    assert bool((err <= 0.25 * block_max + 0.02 * recv_x.float().abs().amax()).all())
    (recv_probs4 * g_probs).sum().backward()
    assert torch.equal(probs_b.grad, probs_a.grad)


def test_fused_formats():
    run_distributed(_body, 2)
