"""Wire formats: LogFMT and NVFP4 codecs, FP8/LogFMT combines and NVFP4 dispatch on the reference backend."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a import Buffer, _native
from moe_a2a.fp8 import fp8_to_float, per_token_cast_to_fp8
from moe_a2a.formats import logfmt_decode, logfmt_encode, nvfp4_dequantize, nvfp4_quantize
from moe_a2a.formats.logfmt import LOG_SPAN

# Measured bounds (docs/logfmt.md, README "Formats"): LogFMT relative error per value, FP8 e4m3 relative error.
LOGFMT_REL = 0.011
FP8_REL = 2.0 ** -4


def _wide_values(gen, n=48, hidden=256):
    """Random bf16 rows with magnitudes over many octaves, all-zero groups, tiny and negative values."""
    x = torch.randn(n, hidden, generator=gen) * torch.exp2(torch.randint(-20, 20, (n, 1), generator=gen).float())
    x *= torch.exp2(torch.rand(n, hidden, generator=gen) * 12 - 6)  # 12 octaves inside a group
    x[0, :64] = 0
    x[1, 5] = 1e-30
    x[2, 64:128] = -x[2, 64:128].abs()
    return x.bfloat16()


# ---------------------------------------------------------------------------------------------- LogFMT
def test_logfmt_bound():
    x = _wide_values(torch.Generator().manual_seed(0)).float()
    codes, ranges = logfmt_encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == (x.size(0), x.size(1) * 5 // 4)
    assert ranges.dtype == torch.float16 and ranges.shape == (x.size(0), x.size(1) // 64, 2)
    y = logfmt_decode(codes, ranges)
    group_max = x.abs().view(x.size(0), -1, 64).amax(2, keepdim=True).expand(-1, -1, 64).reshape(x.shape)
    # Within the span: relative; below it (values under 2**-16 of the group's largest): absolute.
    bound = torch.maximum(LOGFMT_REL * x.abs(), group_max * 2.0 ** -LOG_SPAN)
    err = (y - x).abs()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max()}"
    assert bool((y[x == 0] == 0).all())
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())
    rel = (err / x.abs())[x.abs() > group_max * 2.0 ** -8]
    assert 1e-4 < float(rel.max()) <= LOGFMT_REL  # lossy, but within the stated bound
    assert float(rel.mean()) < 0.006  # uniform in the log domain: about a quarter of the step


def test_logfmt_bit_layout():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 4] = 1.0, -1.0, 4.0  # range [0, 2]: levels 1 and 511
    codes, ranges = logfmt_encode(x)
    assert ranges[0, 0].tolist() == [0.0, 2.0]
    # Codes 1, 512 | 1, 0, 0 in the first five bytes; code 511 opens the second group of five.
    word = 1 | (512 | 1) << 10
    assert codes[0, :5].tolist() == [(word >> s) & 0xFF for s in range(0, 40, 8)]
    assert codes[0, 5:10].tolist() == [511 & 0xFF, 511 >> 8, 0, 0, 0]
    assert logfmt_decode(codes, ranges)[0, :5].tolist() == [1.0, -1.0, 0.0, 0.0, 4.0]


@pytest.mark.skipif(not _native.present("_C"), reason="moe_a2a._C is not built")
def test_logfmt_kernel_codec_matches_reference():
    """The low-latency kernels' LogFMT code (csrc/kernels/wire_format.cuh), run on the CPU, against the Python
    codec: same ranges and codes but where two log2 implementations straddle a rounding boundary (then one
    level apart), and the same decoding of the same bytes."""
    C = _native.load("_C")
    x = _wide_values(torch.Generator().manual_seed(3), n=96, hidden=512).float()
    x[3, :64] = 2.5  # a group of equal values: step 0, every code level 1
    codes, ranges = C.logfmt_encode_host(x)
    want_codes, want_ranges = logfmt_encode(x)
    assert codes.shape == want_codes.shape and ranges.shape == want_ranges.shape and ranges.dtype == torch.float16
    assert float((ranges == want_ranges).float().mean()) > 0.999
    level = lambda c: _unpacked(c) & 0x1FF  # noqa: E731
    sign = lambda c: _unpacked(c) >> 9  # noqa: E731
    same_ranges = (ranges == want_ranges).all(2).repeat_interleave(64, dim=1)
    assert torch.equal(sign(codes)[same_ranges], sign(want_codes)[same_ranges])
    step_apart = (level(codes) - level(want_codes)).abs()[same_ranges]
    assert int(step_apart.max()) <= 1 and float((step_apart == 0).float().mean()) > 0.999
    # Decoding: the same bytes give the same values (exp2 of the same float32 argument, within an ulp).
    assert torch.allclose(C.logfmt_decode_host(want_codes, want_ranges), logfmt_decode(want_codes, want_ranges),
                          rtol=2e-7, atol=0)
    assert torch.equal(C.logfmt_decode_host(*logfmt_encode(torch.zeros(2, 64))), torch.zeros(2, 64))
    y = C.logfmt_decode_host(codes, ranges)  # and the kernels' round trip keeps the stated bound
    group_max = x.abs().view(x.size(0), -1, 64).amax(2, keepdim=True).expand(-1, -1, 64).reshape(x.shape)
    assert bool(((y - x).abs() <= torch.maximum(LOGFMT_REL * x.abs(), group_max * 2.0 ** -LOG_SPAN)).all())


@pytest.mark.skipif(not _native.present("_C"), reason="moe_a2a._C is not built")
def test_native_wire_format_names_and_hidden_checked():
    """The one wire-format parser every native combine uses refuses a name its path does not send (naming
    the ones it does) and a hidden size that does not split into the format's blocks."""
    C = _native.load("_C")
    x = torch.ones(2, 192, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="the row encoding sends fp8, logfmt rows, got 'bf16'"):
        C.encode_combine_rows_host(x, "bf16", False)
    with pytest.raises(RuntimeError, match="got 'e5m2'"):
        C.encode_combine_rows_host(x, "e5m2", False)
    with pytest.raises(RuntimeError, match="the row encoding in fp8 needs hidden divisible by 128, got 192"):
        C.encode_combine_rows_host(x, "fp8", False)
    assert C.encode_combine_rows_host(x, "logfmt", False).shape == (2, 384)  # 192 = three LogFMT groups


@pytest.mark.skipif(not _native.present("_C"), reason="moe_a2a._C is not built")
@pytest.mark.parametrize("wire_format", ["fp8", "logfmt"])
def test_kernel_row_layout_and_in_place_encoding(wire_format):
    """The combine kernels' rows (csrc/kernels/wire_format.cuh: each block's values, then its scale or range,
    in the first bytes of a BF16 slot), encoded as a warp does it, pass by pass, run on the CPU: encoding a row
    over itself gives the same bytes as into a separate slot (no pass overwrites bytes a later pass reads),
    and decoding gives the Python codec's values (FP8 within one e4m3 step: x * (1 / scale) against
    x / scale)."""
    C = _native.load("_C")
    gen = torch.Generator().manual_seed(5)
    hidden = 7168 if wire_format == "fp8" else 2112  # 2112: LogFMT groups, no whole 256-channel pass at the end
    x = _wide_values(gen, n=6, hidden=hidden)
    x[1] = 0  # an all-zero row
    out = C.encode_combine_rows_host(x, wire_format, False)
    over = C.encode_combine_rows_host(x, wire_format, True)
    used = hidden // 128 * 132 if wire_format == "fp8" else hidden // 64 * 84
    assert out.shape == (6, 2 * hidden) and out.dtype == torch.uint8
    assert torch.equal(over[:, :used], out[:, :used])
    assert not out[:, used:].any()  # nothing written past the encoded bytes
    got = C.decode_combine_rows_host(over, hidden, wire_format)
    if wire_format == "logfmt":
        assert torch.equal(got, C.logfmt_decode_host(*C.logfmt_encode_host(x.float())))
        want = logfmt_decode(*logfmt_encode(x.float()))
        assert torch.allclose(got, want, rtol=2e-7, atol=0)  # same codes, exp2 within an ulp
    else:
        q, scales = per_token_cast_to_fp8(x)
        want = fp8_to_float(q, scales)
        scale = scales.repeat_interleave(128, dim=1)
        # One e4m3 step at each value: 2**(exponent - 3) of the scaled value, 2**-9 below the normals (2**-6).
        exponent = torch.log2(want.abs() / scale).floor().clamp(min=-6)
        step = scale * torch.exp2(exponent - 3)
        assert bool(((got - want).abs() <= step * (1 + 2 ** -20)).all())  # a tie one way or the other
        assert float((got != want).float().mean()) < 0.01
    assert not got[1].any()


def _unpacked(codes: torch.Tensor) -> torch.Tensor:
    """10-bit codes ``[n, hidden]`` int64 from packed bytes ``[n, hidden * 5 / 4]``."""
    b = codes.view(codes.size(0), -1, 5).to(torch.int64)
    word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24 | b[..., 4] << 32
    return ((word.unsqueeze(-1) >> torch.arange(0, 40, 10)) & 0x3FF).view(codes.size(0), -1)


def test_logfmt_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by 64"):
        logfmt_encode(torch.randn(2, 96))
    codes, ranges = logfmt_encode(torch.randn(2, 128))
    with pytest.raises(ValueError, match="disagree"):
        logfmt_decode(codes, ranges[:, :1])


# ---------------------------------------------------------------------------------------------- NVFP4
def test_nvfp4_codes_and_rounding():
    # Block amax 6 with global scale 1: block scale exactly 1, so values map straight to e2m1 codes.
    row = torch.tensor([0.5, 6.0, -1.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.2, 7.0, 0.0, -6.0, 2.9, 1.1])
    packed, scales, g = nvfp4_quantize(row.clamp(-6, 6).view(1, 16), torch.tensor(1.0))
    assert scales.float().tolist() == [[1.0]]
    assert packed[0, 0] == (1 | 7 << 4)  # element 0 in the low nibble
    want = [0.5, 6.0, -1.5, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, 6.0, 0.0, -6.0, 3.0, 1.0]  # ties to even
    assert nvfp4_dequantize(packed, scales, g)[0].tolist() == want


def test_nvfp4_bound():
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 3
    packed, scales, g = nvfp4_quantize(x)
    assert packed.shape == (32, 128) and scales.shape == (32, 16) and g.shape == ()
    y = nvfp4_dequantize(packed, scales, g)
    block_max = x.abs().view(32, 16, 16).amax(2, keepdim=True).expand(-1, -1, 16).reshape(x.shape)
    # e2m1 spacing is at most 2 (between 4 and 6) on a grid scaled to the block max (6), block scales round
    # to e4m3 (relative 2**-4): the error stays below a quarter of the block max.
    assert bool(((y - x).abs() <= 0.25 * block_max).all())
    assert float(((y - x).abs() / block_max).mean()) < 0.05


# ---------------------------------------------------------------------------------------------- on ranks
def _buffer(hidden, **kw):
    n = dist.get_world_size()
    nvl = max(Buffer.get_dispatch_config(n).get_nvl_buffer_size_hint(hidden * 4, n),
              Buffer.get_combine_config(n).get_nvl_buffer_size_hint(hidden * 4, n))
    return Buffer(dist.group.WORLD, nvl, kw.pop("num_rdma_bytes", 0), **kw)


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _normal_body(rank, num_ranks):
    gen = torch.Generator().manual_seed(10 + rank)
    hidden, num_experts, topk = 256, 4 * num_ranks, 3
    buffer = _buffer(hidden)
    num_tokens = 19 + 4 * rank
    topk_idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    topk_idx[torch.rand(num_tokens, topk, generator=gen) < 0.2] = -1
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])

    # NVFP4 dispatch: the bytes arrive unchanged, each row with its source's global scale.
    x = torch.randn(num_tokens, hidden, generator=gen) * (rank + 1)
    parts = nvfp4_quantize(x)
    recv, recv_idx, _, _, handle, _ = buffer.dispatch(parts, topk_idx=topk_idx, **args)
    # float8 tensors do not pickle: gather the scales as bytes.
    all_parts = [(p, sc.view(torch.float8_e4m3fn), g) for p, sc, g in
                 _gather((parts[0], parts[1].view(torch.uint8), parts[2]))]
    all_idx = _gather(topk_idx)
    per_rank = num_experts // num_ranks
    src = [(s, t) for s in range(num_ranks) for t in range(all_idx[s].size(0))
           if any(e >= 0 and e // per_rank == rank for e in all_idx[s][t].tolist())]
    assert len(recv) == 3 and recv[0].shape == (len(src), hidden // 2) and recv[2].shape == (len(src),)
    for i, (s, t) in enumerate(src):
        assert torch.equal(recv[0][i], all_parts[s][0][t])
        assert torch.equal(recv[1][i].view(torch.uint8), all_parts[s][1][t].view(torch.uint8))
        assert float(recv[2][i]) == float(all_parts[s][2])
    if src:  # per-row global scales decode every row as its source encoded it
        want = torch.cat([nvfp4_dequantize(all_parts[s][0][t:t + 1], all_parts[s][1][t:t + 1], all_parts[s][2])
                          for s, t in src])
        assert torch.equal(nvfp4_dequantize(*recv), want)
    cached, *_ = buffer.dispatch(parts, handle=handle)  # cached dispatch moves the same bytes
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(cached, recv))
    # Block scales not a multiple of 4 bytes (hidden 80: 5 of them) travel padded, the global scale last.
    narrow = nvfp4_quantize(torch.randn(num_tokens, 80, generator=gen), torch.tensor(0.01 * (rank + 1)))
    got, *_ = buffer.dispatch(narrow, handle=handle)
    all_narrow = [(p, sc.view(torch.float8_e4m3fn), g) for p, sc, g in
                  _gather((narrow[0], narrow[1].view(torch.uint8), narrow[2]))]
    for i, (s, t) in enumerate(src):
        assert torch.equal(got[0][i], all_narrow[s][0][t])
        assert torch.equal(got[1][i].view(torch.uint8), all_narrow[s][1][t].view(torch.uint8))
        assert float(got[2][i]) == float(all_narrow[s][2])
    with pytest.raises(ValueError, match="global scale"):
        buffer.dispatch((parts[0], parts[1], parts[2].double()), handle=handle)
    with pytest.raises(ValueError, match="block scales"):
        buffer.dispatch((parts[0], parts[1][:, 1:], parts[2]), handle=handle)

    # FP8 combine: exactly the BF16 path applied to the decoded rows; within the FP8 bound of the BF16 result.
    y = (torch.randn(handle.num_recv_tokens, hidden, generator=gen) * (1 + rank)).bfloat16()
    got, _, _ = buffer.combine(y, handle, use_fp8=True)
    decoded = fp8_to_float(*per_token_cast_to_fp8(y))
    want, _, _ = buffer.combine(decoded, handle)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    exact, _, _ = buffer.combine(y.float(), handle)
    copies, _, _ = buffer.combine(y.float().abs(), handle)
    # FP8 per copy (plus e4m3's subnormal floor, 2**-19 of the block max), then the BF16 rounding of the result.
    floor = 2.0 ** -17 * copies.amax(1, keepdim=True)
    assert bool(((got.float() - exact).abs() <= FP8_REL * copies + 2.0 ** -7 * exact.abs() + floor).all())
    assert not torch.equal(got, exact.bfloat16())  # the format was applied
    with pytest.raises(ValueError, match="divisible by 128"):
        buffer.combine(y[:, :192].contiguous(), handle, use_fp8=True)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_normal_mode_formats(num_ranks):
    run_distributed(_normal_body, num_ranks)


def _low_latency_body(rank, num_ranks):
    gen = torch.Generator().manual_seed(20 + rank)
    hidden, max_tokens, num_experts, topk = 256, 9, 2 * num_ranks, 2
    buffer = _buffer(hidden, low_latency_mode=True, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
        max_tokens, hidden, num_ranks, num_experts))
    num_tokens = max_tokens - rank
    x = torch.randn(num_tokens, hidden, generator=gen).bfloat16()
    topk_idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    topk_w = torch.rand(num_tokens, topk, generator=gen)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk_idx, max_tokens, num_experts, use_fp8=False)
    # Expert outputs spanning several octaves per row, so the log ranges matter.
    scale = torch.exp2(torch.rand(recv_x.shape, generator=gen) * 8 - 4)
    y = (recv_x.float() * scale).bfloat16()
    exact, _, _ = buffer.low_latency_combine(y, topk_idx, topk_w, handle)
    # Sum of |weighted copies|: the scale of each token's error.
    magnitude, _, _ = buffer.low_latency_combine(y.abs(), topk_idx, topk_w.abs(), handle)
    for kw, rel in (({"use_logfmt": True}, LOGFMT_REL), ({"use_fp8": True}, FP8_REL)):
        got, _, hook = buffer.low_latency_combine(y, topk_idx, topk_w, handle, return_recv_hook=True, **kw)
        hook()
        err = (got.float() - exact.float()).abs()
        # Per value error, then the final BF16 rounding of both results (2**-8 relative each).
        # (plus the floors: LogFMT's 2**-16 and e4m3's 2**-19 of the group / block max).
        floor = 2.0 ** -15 * magnitude.float().amax(1, keepdim=True)
        assert bool((err <= rel * magnitude.float() + 2.0 ** -7 * magnitude.float() + floor).all()), kw
        assert float(err.max()) > 0, kw  # the format was applied
    with pytest.raises(ValueError, match="exclusive"):
        buffer.low_latency_combine(y, topk_idx, topk_w, handle, use_logfmt=True, use_fp8=True)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_low_latency_combine_formats(num_ranks):
    run_distributed(_low_latency_body, num_ranks)


def test_low_latency_logfmt_needs_hidden_64():
    run_distributed(_logfmt_hidden_body, 2)


def _logfmt_hidden_body(rank, num_ranks):
    hidden, max_tokens, num_experts = 96, 4, 2
    buffer = _buffer(hidden, low_latency_mode=True, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(
        max_tokens, hidden, num_ranks, num_experts))
    x = torch.randn(3, hidden).bfloat16()
    idx = torch.tensor([[0], [1], [1]])
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, max_tokens, num_experts, use_fp8=False)
    with pytest.raises(ValueError, match="divisible by 64"):
        buffer.low_latency_combine(recv, idx, torch.ones(3, 1), handle, use_logfmt=True)
