"""NVFP4: e2m1 values packed two per byte, an FP8 e4m3 scale per 16 values, and a float32 global scale.

``x ~= e2m1 * block_scale * global_scale``, the layout NVFP4 GEMM inputs take (block scales row-major here;
GEMMs that want them swizzled swizzle after the dispatch). Element ``2i`` of a row sits in the low nibble
of byte ``i``, element ``2i + 1`` in the high nibble; a nibble is a sign bit (bit 3) and a 3-bit index
into ``E2M1_VALUES``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def nvfp4_quantize(x: torch.Tensor, global_scale: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``[n, hidden]`` (hidden divisible by 16) to NVFP4.

    ``global_scale`` (float32, ``[]``): by default ``amax(|x|) / (6 * 448)``, so the largest block scale is
    e4m3's largest value. Values round to the nearest e2m1 value, ties to the even code.

    Returns ``(packed [n, hidden // 2] uint8, block_scales [n, hidden // 16] float8_e4m3fn,
    global_scale [] float32)``.
    """
    if x.dim() != 2 or x.size(1) % BLOCK:
        raise ValueError(f"NVFP4 takes [num_tokens, hidden] with hidden divisible by {BLOCK}, got {list(x.shape)}")
    n, hidden = x.shape
    blocks = x.float().view(n, hidden // BLOCK, BLOCK)
    if global_scale is None:
        amax = blocks.abs().amax() if blocks.numel() else torch.zeros((), device=x.device)
        global_scale = torch.clamp(amax, min=1e-12) / (E2M1_MAX * E4M3_MAX)
    global_scale = global_scale.to(torch.float32).reshape(())
    block_scales = (blocks.abs().amax(2) / E2M1_MAX / global_scale).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = block_scales.float().unsqueeze(2) * global_scale
    scaled = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), torch.zeros_like(blocks))
    mag = scaled.abs().clamp(max=E2M1_MAX)
    mid = torch.tensor(_MIDPOINTS, device=x.device)
    below, above = torch.bucketize(mag, mid, right=False), torch.bucketize(mag, mid, right=True)
    # At a midpoint the two candidates differ by one: keep the even code.
    index = torch.where((below != above) & (below % 2 == 1), above, below)
    nibble = index | ((scaled < 0) & (index > 0)).to(torch.int64) << 3
    pairs = nibble.view(n, hidden // 2, 2)
    packed = (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)
    return packed, block_scales, global_scale


def nvfp4_dequantize(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``[n, hidden]`` float32 from NVFP4 parts; ``global_scale`` is ``[]``/``[1]`` or one per row ``[n]``."""
    n, half = packed.shape
    hidden = half * 2
    if block_scales.shape != (n, hidden // BLOCK):
        raise ValueError(f"block_scales has shape {list(block_scales.shape)}, expected [{n}, {hidden // BLOCK}]")
    p = packed.to(torch.int64)
    nibble = torch.stack([p & 0xF, p >> 4], dim=-1).view(n, hidden)
    table = torch.tensor(E2M1_VALUES, device=packed.device)
    value = table[nibble & 0x7] * torch.where(nibble >= 8, -1.0, 1.0)
    g = global_scale.float()
    g = g.view(n, 1, 1) if g.numel() == n and g.dim() == 1 and n != 1 else g.reshape(())
    out = value.view(n, hidden // BLOCK, BLOCK) * block_scales.float().unsqueeze(2) * g
    return out.view(n, hidden)
