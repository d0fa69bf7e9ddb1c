"""The tiny recipe trains on 2 gloo ranks (EP 2, the moe_a2a dispatcher): loss falls, outputs are
written, the checkpoint's tensors carry global keys (experts by global index), a checkpoint that does
not fit the recipe is refused, and resuming from a checkpoint gives the same next-step losses as the
uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moe_a2a.train.cli import main
from moe_a2a.train.recipe import load, parallel_sizes

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

from moe_a2a.train.loop import select_checkpoint, write_manifest  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny_moe_cpu.yaml"
# Small and fast: 2 ranks, short sequences; warmup short enough that 6 steps learn something.
FAST = ["parallel.world_size=2", "parallel.expert=2", "model.seq_length=64", "train.micro_batch_size=4",
        "train.eval_batches=2", "train.warmup_steps=2", "train.eval_interval=3", "train.log_interval=1",
        "output.progress=false"]


def test_tiny_recipe_trains_and_resumes(tmp_path, capfd, monkeypatch):
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
        assert key in capfd.readouterr().err
    # Damage is found from the sizes and checksums written at save time: a truncated file or 4 KiB of flipped
    # bytes in the latest checkpoint falls back to the newest complete one, with a warning.
    broken = tmp_path / "broken"
    shutil.copytree(full / "checkpoints", broken / "checkpoints")
    step6 = broken / "checkpoints" / "step_0000006"
    distcp = max(step6.glob("*.distcp"), key=lambda p: p.stat().st_size)
    original = distcp.read_bytes()
    recipe = load(TINY, [*FAST, f"output.dir={broken}"])
    sizes = parallel_sizes(recipe)
    assert select_checkpoint(recipe, sizes) == (6, [])
    # Each rank checksummed the files it wrote; the manifest lists every file of the step.
    listed = set(json.loads((step6 / "manifest.json").read_text()))
    assert listed == {str(p.relative_to(step6)) for p in step6.rglob("*") if p.name != "manifest.json"}
    middle = len(original) // 2
    for damaged, problem in ((original[:middle], f"{distcp.name} has {middle} bytes, {len(original)} were written"),
                             (original[:middle] + bytes(b ^ 0xFF for b in original[middle:middle + 4096])
                              + original[middle + 4096:], f"{distcp.name} does not match its checksum")):
        distcp.write_bytes(damaged)
        step, warnings = select_checkpoint(recipe, sizes)
        assert step == 3 and len(warnings) == 1 and problem in warnings[0], warnings
        assert "resuming from step 3 instead" in warnings[0]
    # With no complete checkpoint left the run is refused before any rank starts.
    shutil.rmtree(broken / "checkpoints" / "step_0000003")
    (step6 / ".metadata").unlink()
    assert main([str(TINY), *FAST, "train.steps=7", f"output.dir={broken}"]) == 2
    err = capfd.readouterr().err
    assert "no complete checkpoint to resume" in err and ".metadata is missing" in err, err
    assert (full / "log.json").stat().st_mtime_ns == mtime

    # A checkpoint holding non-finite values (damaged before its checksums were taken): refused at load on every
    # rank with a clear error, exit non-zero, nothing saved after it.
    nan_run = tmp_path / "nan"
    shutil.copytree(full / "checkpoints", nan_run / "checkpoints")
    step6 = nan_run / "checkpoints" / "step_0000006"
    distcp = max(step6.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(distcp.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # float32 NaNs
    distcp.write_bytes(bytes(data))
    write_manifest(step6)
    assert main([str(TINY), *FAST, "train.steps=9", "train.checkpoint_interval=1", f"output.dir={nan_run}"]) == 1
    err = capfd.readouterr().err
    assert "step_0000006 holds non-finite values" in err and len(err.strip().splitlines()) == 2, err
    assert (nan_run / "checkpoints" / "latest").read_text().strip() == "6"
    assert sorted(p.name for p in (nan_run / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]

    # A run that stopped at step 3: its checkpoint, a damaged step 6 that "latest" names, and the directory of a
    # save that was killed half-way.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    for step in ("step_0000003", "step_0000006"):
        shutil.copytree(full / "checkpoints" / step, part / "checkpoints" / step)
    (part / "checkpoints" / "step_0000006" / "rank_00001.pt").write_bytes(b"")
    shutil.copytree(full / "checkpoints" / "step_0000003", part / "checkpoints" / "step_0000004.partial")
    (part / "checkpoints" / "latest").write_text("6\n")
    # matplotlib absent in the ranks: the plot is skipped with a one-line note, the run succeeds.
    shadow = tmp_path / "no_matplotlib"
    (shadow / "matplotlib").mkdir(parents=True)
    (shadow / "matplotlib" / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    monkeypatch.syspath_prepend(str(shadow))  # spawned ranks start with the parent's sys.path
    # Resumed on the HybridEP path of the moe_a2a dispatcher: it computes the same as the DeepEP-style
    # path (see test_megatron_dispatcher.py), so the losses match as well.
    assert main([str(TINY), *FAST, "train.steps=6", "train.checkpoint_interval=3", f"output.dir={part}",
                 "dispatcher.backend=hybridep"]) == 0
    out, err = capfd.readouterr()
    assert "rank_00001.pt has 0 bytes" in err and "resuming from step 3 instead" in err, err
    assert "resumed at step 3" in out and "step_0000004.partial, left by a run stopped while saving" in out, out
    assert "note: matplotlib is not installed, so no loss.png" in out, out
    assert not (part / "loss.png").exists() and not (part / "checkpoints" / "step_0000004.partial").exists()
    assert select_checkpoint(load(TINY, [*FAST, f"output.dir={part}"]), sizes) == (6, [])  # rewritten whole
    resumed = json.loads((part / "log.json").read_text())
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["train"][:3] == log["train"][:3]  # history restored from the checkpoint
    # Step 4 checks the weights; steps 5 and 6 also the Adam moments.
    for i in (3, 4, 5):
        assert resumed["train"][i]["loss"] == pytest.approx(log["train"][i]["loss"], abs=1e-6)
        assert resumed["train"][i]["grad_norm"] == pytest.approx(log["train"][i]["grad_norm"], rel=1e-5)


def _non_finite_body(rank, num_ranks):
    import math
    from types import SimpleNamespace

    import torch

    from moe_a2a.train.loop import Trainer, TrainingStopped

    fake = SimpleNamespace(device=torch.device("cpu"), rank=rank, _ckpt_root=lambda: Path("runs/x/checkpoints"))
    Trainer._stop_if_not_finite(fake, 5, torch.tensor(2.5, requires_grad=True), 0.7)  # finite: goes on
    # One rank's non-finite loss (or the gradient norm) stops every rank at the same step.
    for loss, norm in ((float("nan") if rank == 1 else 2.5, 0.7), (2.5, math.inf)):
        with pytest.raises(TrainingStopped, match="step 6: .* not finite; stopped before the optimizer step"):
            Trainer._stop_if_not_finite(fake, 6, torch.tensor(loss), norm)


def test_non_finite_loss_or_gradient_stops_every_rank():
    from dist_utils import run_distributed

    run_distributed(_non_finite_body, 2)


def _spawned_ranks(pid):
    """Process ids of the ranks the runner ``pid`` spawned (multiprocessing children running spawn_main)."""
    ranks = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            ranks.append(int(entry.name))
    return sorted(ranks)


def test_stalled_rank_stops_the_run_within_the_timeout(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    timeout_s = 4
    cmd = [sys.executable, "-m", "moe_a2a", "train", str(TINY), *FAST, "train.steps=500",
           f"train.timeout_s={timeout_s}", f"output.dir={tmp_path / 'run'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("MOE_A2A_TIMEOUT_S", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # training has started once the first validation loss is out
            if "validation loss" in line:
                break
        ranks = _spawned_ranks(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGSTOP)  # a rank that stops answering, as a hung or swapped-out process does
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            for pid in _spawned_ranks(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    assert proc.returncode == 1, err
    # The bound the README states: train.timeout_s, the report of who is missing, the runner's grace to stop.
    assert waited < timeout_s + 30, (waited, err)
    assert "error: ranks exited with codes" in err and ("timed out" in err.lower() or "Timed out" in err), err
