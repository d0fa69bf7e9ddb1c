"""FP8 e4m3 casts with per-128 scales, and UE8M0 packing of power-of-two scales."""
import pytest
import torch

from moe_a2a.fp8 import fp8_to_float, pack_ue8m0, per_token_cast_to_fp8, unpack_ue8m0


def test_fp8_cast_round_trip():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(33, 1024, generator=gen) * torch.logspace(-3, 3, 33).unsqueeze(1)).bfloat16()
    x[3] = 0  # an all-zero token gets a finite scale
    for round_scale in (False, True):
        q, scales = per_token_cast_to_fp8(x, round_scale)
        assert q.dtype == torch.float8_e4m3fn and scales.shape == (33, 8)
        assert torch.isfinite(scales).all()
        err = (fp8_to_float(q, scales) - x.float()).abs()
        # e4m3 keeps 3 mantissa bits: relative error below 2^-4 of the block maximum (plus rounding of scales).
        block_max = x.float().abs().view(33, 8, 128).amax(2).repeat_interleave(128, 1)
        assert bool((err <= block_max * 2 ** -3 + 1e-6).all())
        if round_scale:
            assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
            assert torch.equal(unpack_ue8m0(pack_ue8m0(scales)), scales)
    with pytest.raises(ValueError, match="divisible by 128"):
        per_token_cast_to_fp8(x[:, :100])
