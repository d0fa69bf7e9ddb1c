"""The tiny recipe trains on 2 gloo ranks (EP 2, the moe_a2a dispatcher): loss falls, outputs are
written, the checkpoint's tensors carry global keys (experts by global index), a checkpoint that does
not fit the recipe is refused, and resuming from a checkpoint gives the same next-step losses as the
uninterrupted run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_a2a.train import main

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_moe_cpu.yaml"
# Small and fast: 2 ranks, short sequences; warmup short enough that 6 steps learn something.
FAST = ["parallel.world_size=2", "parallel.expert=2", "model.seq_length=64", "train.micro_batch_size=4",
        "train.eval_batches=2", "train.warmup_steps=2", "train.eval_interval=3", "train.log_interval=1",
        "output.progress=false"]


def test_tiny_recipe_trains_and_resumes(tmp_path, capsys):
    full = tmp_path / "full"
    assert main([str(TINY), *FAST, "train.steps=6", "train.checkpoint_interval=3", f"output.dir={full}"]) == 0
    log = json.loads((full / "log.json").read_text())
    assert log["final"] and [r["step"] for r in log["train"]] == [1, 2, 3, 4, 5, 6]
    train = [r["loss"] for r in log["train"]]
    valid = {r["step"]: r["loss"] for r in log["valid"]}
    assert sorted(valid) == [0, 3, 6]
    assert train[-1] < train[0] - 0.3, train
    assert valid[6] < valid[0] - 0.3, valid
    assert all(r["tokens_per_s"] > 0 for r in log["train"])
    assert (full / "loss.png").stat().st_size > 1000
    assert (full / "checkpoints" / "latest").read_text().strip() == "6"

    # The tensors are one torch.distributed.checkpoint under global keys: the two ranks' 4 local experts
    # appear as global experts 0-7 (under their local names, rank 1's experts would be deduplicated
    # away as replicas of rank 0's), and Adam states sit under the key of the weight they belong to.
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(full / "checkpoints" / "step_0000006").read_metadata().state_dict_metadata)
    experts = "model.decoder.layers.{}.mlp.experts.global_expert_{}.linear_fc{}.weight"
    want = {experts.format(layer, e, fc) for layer in (0, 1) for e in range(8) for fc in (1, 2)}
    assert {k for k in keys if ".experts." in k and k.startswith("model.")} == want
    assert not any("local_experts" in k for k in keys)
    for name in ("decoder.layers.1.mlp.router.weight", "embedding.word_embeddings.weight",
                 experts.format(1, 7, 2)[len("model."):]):
        assert {f"model.{name}", f"optimizer.exp_avg.{name}", f"optimizer.exp_avg_sq.{name}",
                f"optimizer.step.{name}"} <= keys

    # A checkpoint that does not fit the recipe is refused before any rank starts.
    mtime = (full / "log.json").stat().st_mtime_ns
    for bad, key in ((["parallel.world_size=4", "parallel.expert=4"], "parallel layout"),
                     (["model.hidden_size=64"], "model.hidden_size=64")):
        assert main([str(TINY), *FAST, "train.steps=7", f"output.dir={full}", *bad]) == 2
        assert key in capsys.readouterr().err
    # A step directory without a complete torch.distributed.checkpoint (an older format, or a copy
    # that lost files) is refused the same way.
    broken = tmp_path / "broken"
    shutil.copytree(full / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "step_0000006" / ".metadata").unlink()
    assert main([str(TINY), *FAST, "train.steps=7", f"output.dir={broken}"]) == 2
    assert "not a torch.distributed.checkpoint" in capsys.readouterr().err
    assert (full / "log.json").stat().st_mtime_ns == mtime

    # A run that stopped at step 3: its checkpoint, and nothing after.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_0000003", part / "checkpoints" / "step_0000003")
    (part / "checkpoints" / "latest").write_text("3\n")
    # Resumed on the HybridEP path of the moe_a2a dispatcher: it computes the same as the DeepEP-style
    # path (see test_megatron_dispatcher.py), so the losses match as well.
    assert main([str(TINY), *FAST, "train.steps=6", "train.checkpoint_interval=3", f"output.dir={part}",
                 "dispatcher.backend=hybridep"]) == 0
    resumed = json.loads((part / "log.json").read_text())
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["train"][:3] == log["train"][:3]  # history restored from the checkpoint
    # Step 4 checks the weights; steps 5 and 6 also the Adam moments.
    for i in (3, 4, 5):
        assert resumed["train"][i]["loss"] == pytest.approx(log["train"][i]["loss"], abs=1e-6)
        assert resumed["train"][i]["grad_norm"] == pytest.approx(log["train"][i]["grad_norm"], rel=1e-5)
