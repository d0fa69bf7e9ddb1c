"""Recipes: every shipped recipe validates (``--dry-run``); bad input exits 2, names the key, writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from moe_a2a.train import recipe as rc
from moe_a2a.train.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
TINY = next(p for p in RECIPES if p.name == "tiny_moe_cpu.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_dry_run(path, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([str(path), f"output.dir={out}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "params" in text and "memory" in text and "runs here" in text
    assert not out.exists()


def test_gpu_recipes_have_real_shapes():
    shapes = {p.stem: rc.load(p) for p in RECIPES}
    names = " ".join(shapes)
    for expected in ("deepseek", "qwen3", "mixtral"):
        assert expected in names, f"no {expected} recipe in {names}"
    qwen = next(r for n, r in shapes.items() if "qwen3" in n)
    assert (qwen["model"]["hidden_size"], qwen["moe"]["num_experts"], qwen["moe"]["topk"]) == (2048, 128, 8)
    mixtral = next(r for n, r in shapes.items() if "mixtral" in n)
    assert (mixtral["model"]["hidden_size"], mixtral["moe"]["num_experts"], mixtral["moe"]["topk"]) == (4096, 8, 2)
    for name, recipe in shapes.items():
        if name != "tiny_moe_cpu":
            assert recipe["train"]["device"] == "cuda" and recipe["train"]["dtype"] == "bf16", name
            # sized to fit an 80 GB GPU by the runner's own estimate
            assert rc.memory_estimate(recipe)["total"] < 80e9, name


@pytest.mark.parametrize("args, message", [
    (["model.hiden_size=64"], "model.hiden_size"),
    (["bogus=1"], "bogus"),
    (["train.steps=many"], "train.steps='many'"),
    (["parallel.expert=3"], "parallel.world_size=4 is not divisible"),
    (["moe.num_experts=6"], "moe.num_experts=6 is not divisible by parallel.expert=4"),
    (["model.num_attention_heads=3"], "model.hidden_size=128 is not divisible by model.num_attention_heads=3"),
    (["dispatcher.type=nccl"], "dispatcher.type='nccl'"),
    (["train.device=cuda"], "train.device='cuda'"),
    (["dispatcher.type=flex", "parallel.world_size=1", "parallel.expert=1"], "TPxEP > 1"),
    (["train.steps"], "section.key=value"),
    (["moe.router_enable_expert_bias=true"], "megatron-core rejects this recipe: Expert bias"),
    (["--resume"], "unknown option '--resume'"),
    (["name=../../elsewhere"], "without path separators or '..'"),
    (["data.corpus=/nonexistent/corpus.txt"], "data.corpus='/nonexistent/corpus.txt'"),
    (["model.seq_length=10000000"], "each split needs at least seq_length + 1"),
    (["train.micro_batch_size=100000"], "GiB of memory"),
    (["train.timeout_s=0"], "train.timeout_s=0"),
])
def test_bad_input_exits_2_and_writes_nothing(args, message, capsys, tmp_path):
    out = tmp_path / "out"
    if args[0].startswith("moe.router_enable_expert_bias"):
        pytest.importorskip("megatron.core")
    if args == ["train.device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available: this recipe would run here")
    assert main([str(TINY), f"output.dir={out}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_bad_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n  colour: blue\n")
    assert main([str(bad)]) == 2
    assert "model.colour" in capsys.readouterr().err
    # A key given twice is refused (plain YAML keeps the last one silently).
    bad.write_text("train:\n  steps: 3\n  lr: 0.01\n  steps: 4\n")
    assert main([str(bad)]) == 2
    assert "key 'steps' appears twice in one mapping (lines 2 and 4)" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_output_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out, message in ((blocker, "exists and is not a directory"),
                         (blocker / "run", "cannot be created: '" + str(blocker) + "' is not a directory")):
        assert main([str(TINY), f"output.dir={out}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "not a directory"
    import os

    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main([str(TINY), f"output.dir={locked / 'run'}"]) == 2
        assert "is not writable" in capsys.readouterr().err


def test_overrides_parse_yaml_values():
    recipe = rc.load(TINY, ["train.lr=1e-3", "moe.capacity_factor=1.5", "output.plot=false",
                            "moe.layer_freq=[1, 0]"])
    assert recipe["train"]["lr"] == 1e-3 and recipe["moe"]["capacity_factor"] == 1.5
    assert recipe["output"]["plot"] is False and rc.moe_layer_pattern(recipe) == [1, 0]
