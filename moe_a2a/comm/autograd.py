"""Backward of the fused all-reduce, as Megatron's reduce-from-tensor-parallel region defines it.

The all-reduce of a row-parallel layer's partial outputs passes the output gradient through unchanged
(every rank holds the same loss, counted once), so ``d input = d sum``. The fused epilogue differentiates
as written: ``residual_out = sum + bias + residual`` and ``norm = rmsnorm(residual_out) * norm_weight``
give gradients for the input, the bias, the residual and the norm weight. No collective runs backward.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import accumulate_dtype
from .types import AllReduceFusionOp, NORM_OPS


def _sum_rows(g: torch.Tensor, hidden: int) -> torch.Tensor:
    return g.reshape(-1, hidden).sum(dim=0)


class FusedAllReduceFunction(torch.autograd.Function):
    """``run(input, bias, residual, norm_weight, scale) -> outputs`` with the backward above."""

    @staticmethod
    def forward(ctx, run: Callable, op: int, eps: float, x, bias, residual, norm_weight, scale):
        outputs = run(x, bias, residual, norm_weight, scale)
        ctx.op, ctx.eps = AllReduceFusionOp(op), eps
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype,
                      None if norm_weight is None else norm_weight.dtype)
        if ctx.op in NORM_OPS:
            ctx.save_for_backward(outputs[-1], norm_weight)
            for o in outputs:
                if o.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                    ctx.mark_non_differentiable(o)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        if ctx.op == AllReduceFusionOp.NONE:
            g = grads[0]
            gbias = _sum_rows(g, g.shape[-1]) if ctx.has_bias and ctx.needs_input_grad[4] else None
            return None, None, None, g, gbias, None, None, None
        residual_out, weight = ctx.saved_tensors
        hidden = residual_out.shape[-1]
        acc = accumulate_dtype(residual_out.dtype)
        r = residual_out.to(acc).reshape(-1, hidden)
        g_res = grads[-1]
        g_res = torch.zeros_like(r) if g_res is None else g_res.to(acc).reshape(-1, hidden)
        # The norm output is the first output except for QUANT_FP8, which returns only the quantized norm.
        g_norm = None if ctx.op == AllReduceFusionOp.RESIDUAL_RMS_NORM_QUANT_FP8 else grads[0]
        g_r, g_w = g_res, None
        if g_norm is not None:
            g_norm = g_norm.to(acc).reshape(-1, hidden)
            inv = torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + ctx.eps)
            gnw = g_norm * weight.to(acc)
            g_r = g_res + inv * gnw - r * inv.pow(3) * (gnw * r).mean(dim=-1, keepdim=True)
            g_w = (g_norm * r * inv).sum(dim=0)
        shape = residual_out.shape
        gx = g_r.reshape(shape).to(ctx.dtypes[0]) if ctx.needs_input_grad[3] else None
        gbias = g_r.sum(dim=0).to(ctx.dtypes[0]) if ctx.has_bias and ctx.needs_input_grad[4] else None
        gresid = g_r.reshape(shape).to(ctx.dtypes[1]) if ctx.needs_input_grad[5] else None
        if g_w is None or not ctx.needs_input_grad[6]:
            gweight = torch.zeros_like(weight) if ctx.needs_input_grad[6] else None
        else:
            gweight = g_w.to(ctx.dtypes[2])
        return None, None, None, gx, gbias, gresid, gweight, None
