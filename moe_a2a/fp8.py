"""FP8 (e4m3) casts with one float32 scale per 128 channels, as the dispatch kernels use them."""
from __future__ import annotations

from typing import Tuple

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
#: Smallest amax a block is scaled for, so an all-zero block gets a finite scale.
MIN_AMAX = 1e-4


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cast ``[num_tokens, hidden]`` to FP8 e4m3 with one scale per 128 channels.

    Returns ``(x_fp8 [num_tokens, hidden] float8_e4m3fn, scales [num_tokens, hidden // 128] float32)`` with
    ``x ~= x_fp8 * scales`` blockwise. With ``round_scale`` each scale is rounded up to a power of two, so
    the scales can be stored as UE8M0 exponents.
    """
    num_tokens, hidden = x.shape
    if hidden % BLOCK:
        raise ValueError(f"FP8 casting needs hidden divisible by {BLOCK}, got hidden={hidden}")
    blocks = x.float().view(num_tokens, hidden // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=2).clamp(min=MIN_AMAX)
    scales = amax / FP8_MAX
    if round_scale:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    x_fp8 = (blocks / scales.unsqueeze(2)).view(num_tokens, hidden).to(torch.float8_e4m3fn)
    return x_fp8, scales


def fp8_to_float(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Undo ``per_token_cast_to_fp8``: ``[num_tokens, hidden]`` float32."""
    num_tokens, hidden = x_fp8.shape
    blocks = x_fp8.float().view(num_tokens, hidden // BLOCK, BLOCK) * scales.float().unsqueeze(2)
    return blocks.view(num_tokens, hidden)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two float32 scales ``[n, hidden // 128]`` into ``[n, hidden // 512]`` int32.

    Each int32 holds four UE8M0 exponent bytes (the float32 biased exponent), lowest channel block first.
    """
    n, num_scales = scales.shape
    if num_scales % 4:
        raise ValueError(f"UE8M0 packing needs hidden divisible by 512, got {num_scales} scales per token")
    exponents = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.int64)
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=scales.device)
    packed = (exponents.view(n, num_scales // 4, 4) << shifts).sum(dim=2)
    # Reinterpret the unsigned 32-bit pattern as int32.
    return torch.where(packed >= (1 << 31), packed - (1 << 32), packed).to(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_ue8m0``: ``[n, hidden // 512]`` int32 to ``[n, hidden // 128]`` float32."""
    n, groups = packed.shape
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=packed.device)
    exponents = (packed.to(torch.int64).unsqueeze(2) >> shifts) & 0xFF
    return (exponents.to(torch.int32) << 23).view(torch.float32).view(n, groups * 4)
