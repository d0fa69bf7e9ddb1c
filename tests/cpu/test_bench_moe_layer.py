"""Smoke test of the MoE-layer benchmark: 2 CPU ranks on gloo, tiny shapes, every mode in the JSON."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks import moe_layer  # noqa: E402


def test_moe_layer_benchmark_cpu_two_ranks(tmp_path, capsys):
    out = tmp_path / "moe_layer.json"
    assert moe_layer.main(["--device", "cpu", "--ranks", "2", "--tokens", "12", "--hidden", "32", "--ffn", "16",
                           "--experts", "4", "--topk", "2", "--warmup", "0", "--loops", "1", "--iters", "1",
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["ranks"] == 2
    assert list(report["results"]) == list(moe_layer.MODES)
    for mode, r in report["results"].items():
        assert r["step_us"] > 0 and r["no_gemm_step_us"] > 0, mode
        assert r["comm_share"] == pytest.approx(r["no_gemm_step_us"] / r["step_us"])
        assert r["ratio_to_plain"] == pytest.approx(r["step_us"] / report["results"]["plain"]["step_us"])
        # Every mode computes the same layer (bf16 rows, float32 sums).
        assert r["max_abs_diff_out"] < 5e-2 and r["max_abs_diff_grad_x"] < 5e-2, (mode, r)
    assert report["transport"]["all_to_all"] == "gloo"
    printed = capsys.readouterr().out
    assert all(mode in printed for mode in moe_layer.MODES) and str(out) in printed


def test_moe_layer_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--modes"):
        moe_layer.main(["--device", "cpu", "--modes", "plain,nccl"])
    with pytest.raises(ValueError, match="--ranks 3"):
        moe_layer.main(["--device", "cpu", "--ranks", "3", "--experts", "4"])
