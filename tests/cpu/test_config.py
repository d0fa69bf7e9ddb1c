"""Configs, size hints and the tuned SM counts behind the default configs."""
import json

import pytest

from moe_a2a import Buffer, Config, tuning


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


def test_tuned_num_sms_caps_default_configs(tmp_path, monkeypatch):
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
        tuning.read_table.cache_clear()
