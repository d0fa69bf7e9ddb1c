"""Single-process checks: configs, size hints, FP8 casts, layout definition."""
import pytest
import torch

from moe_a2a import Buffer, Config, checks, limits, tuning
from moe_a2a.fp8 import fp8_to_float, pack_ue8m0, per_token_cast_to_fp8, unpack_ue8m0
from moe_a2a.layout import compute_layout


def test_configs_and_hints():
    for num_ranks in (1, 2, 4, 8, 16, 32, 64):
        for op, get in (("dispatch", Buffer.get_dispatch_config), ("combine", Buffer.get_combine_config)):
            config = get(num_ranks)
            tuned = tuning.tuned_num_sms(op, num_ranks)
            assert config.num_sms == (Buffer.num_sms if tuned is None else min(tuned, Buffer.num_sms))
            nvl = config.get_nvl_buffer_size_hint(7168 * 2, num_ranks)
            rdma = config.get_rdma_buffer_size_hint(7168 * 2, num_ranks)
            assert nvl > config.num_channels * min(num_ranks, 8) * config.num_max_nvl_chunked_recv_tokens * 7168 * 2
            assert (rdma > 0) == (num_ranks > 8)
    with pytest.raises(ValueError, match="no dispatch config for 12 ranks"):
        Buffer.get_dispatch_config(12)
    with pytest.raises(ValueError, match="hidden_bytes must be a positive int"):
        Config().get_nvl_buffer_size_hint(0, 8)
    with pytest.raises(ValueError, match="must not exceed"):
        Config(20, 300, 256)
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) > 2 * 256 * 128 * 7168 * 2
    with pytest.raises(ValueError, match="divisible by num_ranks"):
        Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 100)


def test_kernel_limit_checks():
    # What Buffer checks before a call runs on the CUDA kernels (the kernels do not check again).
    checks.at_most("topk_idx's top-k width", limits.MAX_TOPK, limits.MAX_TOPK, "the CUDA kernels")
    with pytest.raises(ValueError, match=r"topk_idx's top-k width is 33; the CUDA kernels take at most 32"):
        checks.at_most("topk_idx's top-k width", limits.MAX_TOPK + 1, limits.MAX_TOPK, "the CUDA kernels")
    for hidden, element_size in ((8, 2), (7168, 2), (16, 1), (128, 1), (4, 4)):
        checks.kernel_rows("x", hidden, element_size)
    with pytest.raises(ValueError, match=r"x: rows of hidden size 7164 \(14328 bytes\) must be a multiple of 16 "
                                         r"bytes .*hidden a multiple of 8 for 2-byte elements"):
        checks.kernel_rows("x", 7164, 2)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        checks.kernel_rows("x", 24, 1)


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


def test_layout_definition():
    topk_idx = torch.tensor([[0, 5, -1], [7, 6, 5], [-1, -1, -1], [1, 0, 2]])
    ntpr, ntprdma, ntpe, in_rank = compute_layout(topk_idx, 8, 4, 2)
    assert in_rank.tolist() == [[True, False, True, False], [False, False, True, True],
                                [False, False, False, False], [True, True, False, False]]
    assert ntpr.tolist() == [2, 1, 2, 1]
    assert ntprdma.tolist() == [2, 2]
    assert ntpe.tolist() == [2, 1, 1, 0, 0, 2, 1, 1]
    assert compute_layout(topk_idx, 8, 4, 8)[1] is None


def test_tuned_num_sms_caps_default_configs(tmp_path, monkeypatch):
    import json

    assert tuning.choose({8: 440.0, 16: 294.0, 24: 300.0}, 0.05) == 16
    assert tuning.choose({8: 896.0, 16: 524.0, 24: 419.0}, 0.05) == 24
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": {"2": {"dispatch": 16, "combine": 24}}}))
    monkeypatch.setattr(tuning, "TABLE_PATH", str(path))
    try:
        monkeypatch.setattr(Buffer, "num_sms", 20)
        assert Buffer.get_dispatch_config(2).num_sms == 16  # more did not help
        assert Buffer.get_combine_config(2).num_sms == 20  # tuned 24, capped by Buffer.num_sms
        assert Buffer.get_dispatch_config(4).num_sms == 20  # not measured: Buffer.num_sms
        with pytest.raises(ValueError, match="op must be"):
            tuning.tuned_num_sms("notify", 2)
    finally:
        tuning._read.cache_clear()


def test_low_latency_phases_and_hook():
    from moe_a2a.backends import low_latency as ll

    launched = []
    assert ll._run_phases(launched.append, False, "dispatch") is None
    assert launched == [ll._SEND | ll._RECV]  # one kernel, both phases
    launched.clear()
    hook = ll._run_phases(launched.append, True, "combine")
    assert launched == [ll._SEND]  # the receive waits for the hook
    hook()
    assert launched == [ll._SEND, ll._RECV]
    with pytest.raises(RuntimeError, match="combine hook was already called"):
        hook()
    assert launched == [ll._SEND, ll._RECV]


def test_low_latency_bench_phase_clock():
    """The benchmark's phase split of the kernels' clock stamps (ns), and its table row."""
    from benchmarks.low_latency import _phases

    def call(start, sent, ready, end):
        return [start, sent, ready, end]

    # Two ranks on one GPU, two calls of (dispatch, combine) each.
    r0 = {"device": "cuda:0", "clocks": [[call(1000, 3000, 4000, 9000), call(10000, 20000, 21000, 30000)],
                                         [call(32000, 34000, 35000, 40000), call(41000, 51000, 52000, 61000)]]}
    r1 = {"device": "cuda:0", "clocks": [[call(3000, 5000, 6000, 11000), call(12000, 22000, 23000, 32000)],
                                         [call(36000, 38000, 39000, 44000), call(45000, 55000, 56000, 65000)]]}
    got = _phases([r0, r1])
    d, c = got["dispatch_fp8"], got["combine_bf16"]
    assert (d["send"], d["wait"], d["receive"], d["kernel"]) == (2.0, 1.0, 5.0, 8.0)
    assert d["gap"] == 3.0  # previous combine's end to the next dispatch's start: 2 us and 4 us
    assert d["spread"] == 3.0  # starts 2 us and 4 us apart
    assert (c["send"], c["wait"], c["receive"], c["kernel"], c["gap"]) == (10.0, 1.0, 9.0, 20.0, 1.0)
