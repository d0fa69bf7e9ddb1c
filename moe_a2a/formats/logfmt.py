"""LogFMT: 10-bit log-domain values with one log range per 64 channels (``docs/logfmt.md``).

Each value is a sign bit and a 9-bit magnitude code ``m``: ``m = 0`` is zero, ``m = 1..511`` is
``2 ** (lo + (m - 1) * step)`` with ``step = (hi - lo) / 510``, where ``[lo, hi]`` is the log2 range of the
64-channel group it belongs to, stored as two float16 numbers. Codes are packed four to five bytes.

Wire form of ``[n, hidden]`` values: ``codes [n, hidden * 5 // 4]`` uint8 and ``ranges [n, hidden // 64, 2]``
float16 (``lo``, ``hi``): 10.5 bits a value, 66% of BF16's bytes.
"""
from __future__ import annotations

from typing import Tuple

import torch

GROUP = 64  # channels sharing one log range
NUM_LEVELS = 511  # nonzero magnitude codes 1..511
#: Widest log2 span of one group: magnitudes below ``2 ** (hi - LOG_SPAN)`` share the smallest level or
#: become zero, so one tiny value cannot coarsen the grid of the whole group.
LOG_SPAN = 16.0


def _round_f16(v: torch.Tensor, up: bool) -> torch.Tensor:
    """``v`` (float32) as float16, rounded up (``up``) or down, so the stored range still covers ``v``."""
    h = v.to(torch.float16)
    if up:
        return torch.where(h.float() < v, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return torch.where(h.float() > v, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"LogFMT takes [num_tokens, hidden] values, got shape {list(x.shape)}")
    if x.size(1) % GROUP:
        raise ValueError(f"LogFMT needs hidden divisible by {GROUP}, got hidden={x.size(1)}")


def _grid(ranges: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lo, step)`` float32 ``[n, groups, 1]`` from the stored float16 ranges (the same on both sides)."""
    lo, hi = ranges[..., 0].float(), ranges[..., 1].float()
    return lo.unsqueeze(-1), ((hi - lo) / (NUM_LEVELS - 1)).unsqueeze(-1)


def logfmt_encode(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Encode finite ``[n, hidden]`` values (any float dtype) as ``(codes uint8, ranges float16)``.

    Rounding is to the nearest level in the log domain (relative error at most ``2 ** (step / 2) - 1``);
    magnitudes below half the smallest level ``2 ** lo`` become zero.
    """
    _check(x)
    n, hidden = x.shape
    g = x.float().view(n, hidden // GROUP, GROUP)
    mag = g.abs()
    nonzero = mag > 0
    log_mag = torch.log2(mag)  # -inf at zeros
    hi = log_mag.amax(2)
    lo = torch.where(nonzero, log_mag, torch.full_like(log_mag, float("inf"))).amin(2)
    lo = torch.maximum(lo, hi - LOG_SPAN)
    empty = ~nonzero.any(2)  # all-zero groups: any finite range, every code 0
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    ranges = torch.stack([_round_f16(lo, up=False), _round_f16(hi, up=True)], dim=-1)
    lo_q, step = _grid(ranges)
    level = torch.where(step > 0, (log_mag - lo_q) / torch.where(step > 0, step, 1.0), torch.zeros_like(g))
    level = torch.round(level.clamp(0, NUM_LEVELS - 1)).to(torch.int64) + 1
    level = torch.where(mag < torch.exp2(lo_q) * 0.5, torch.zeros_like(level), level)
    codes = level | ((g < 0) & (level > 0)).to(torch.int64) << 9
    # Four 10-bit codes into five bytes, little-endian.
    quads = codes.view(n, hidden // 4, 4)
    word = quads[..., 0] | quads[..., 1] << 10 | quads[..., 2] << 20 | quads[..., 3] << 30
    shifts = torch.arange(0, 40, 8, device=x.device)
    packed = ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).view(n, hidden * 5 // 4)
    return packed, ranges


def logfmt_decode(codes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Decode ``(codes [n, hidden * 5 // 4] uint8, ranges [n, hidden // 64, 2] float16)`` to ``[n, hidden]``
    float32."""
    n, num_bytes = codes.shape
    if num_bytes % 5 or ranges.shape != (n, num_bytes * 4 // 5 // GROUP, 2) or ranges.dtype != torch.float16:
        raise ValueError(f"LogFMT codes {list(codes.shape)} and ranges {list(ranges.shape)} {ranges.dtype} "
                         f"disagree: expected ranges [{n}, {num_bytes * 4 // 5 // GROUP}, 2] float16")
    hidden = num_bytes * 4 // 5
    b = codes.view(n, hidden // 4, 5).to(torch.int64)
    word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24 | b[..., 4] << 32
    shifts = torch.arange(0, 40, 10, device=codes.device)
    c = ((word.unsqueeze(-1) >> shifts) & 0x3FF).view(n, hidden // GROUP, GROUP)
    level, negative = c & 0x1FF, (c >> 9).bool()
    lo, step = _grid(ranges)
    value = torch.exp2(lo + (level - 1).float() * step)
    value = torch.where(level > 0, value, torch.zeros_like(value))
    return torch.where(negative, -value, value).view(n, hidden)
