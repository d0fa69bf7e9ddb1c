"""The training loop of one rank: data, forward/backward, gradient sync, AdamW, eval, logs, checkpoints.

Gradients are averaged the way megatron's DDP does it: dense parameters over the data-parallel group,
expert parameters (``param.allreduce == False``) over the expert-data-parallel group, and parameters
marked ``sequence_parallel`` summed over the tensor-parallel group first. bf16 runs keep float32
master weights and Adam states.

Checkpoints (``checkpoints/step_N/``) hold the tensors (weights, master weights, AdamW states) in
``torch.distributed.checkpoint`` format under global keys: a tensor replicated over ranks has one key
and is stored once, an expert's weights are keyed by its global expert index and a tensor-parallel
shard by its TP rank, so no rank's distinct tensor is taken for another's. Step, history, RNG states
and optimizer hyper-parameters go to a small ``rank_R.pt`` per rank; ``meta.json`` records the recipe
and layout; ``manifest.json`` the size and SHA-256 of every file; ``checkpoints/latest`` is written once
every rank has finished. A resume needs the same parallel layout; it verifies the files first and falls back
to the newest complete checkpoint when the latest one is damaged. A non-finite loss or gradient stops the run
before the optimizer step, so no non-finite state is ever saved.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .corpus import ByteCorpus, load_corpus
from .recipe import RecipeError, output_dir


# Recipe sections a checkpoint must agree with to be resumed (shapes and parallel layout).
CHECKPOINT_KEYS = ("model", "moe", "parallel")
# meta.json's "format": tensors in torch.distributed.checkpoint under global keys, the rest per rank, and a
# manifest of every file's size and checksum.
CHECKPOINT_FORMAT = "dcp-global-keys-2"


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); every rank raises it at the same step."""


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _owner(name: str, world: int) -> int:
    """The rank that checksums file ``name`` of a checkpoint: the writer of a per-rank file, else rank 0."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp|rank_(\d+)\.pt", name)
    rank = int(next(g for g in m.groups() if g is not None)) if m else 0
    return rank if rank < world else 0


def file_digests(step_dir: Path, rank: int = 0, world: int = 1) -> Dict[str, Dict[str, Any]]:
    """Size and SHA-256 of the files of ``step_dir`` that ``rank`` of ``world`` checksums (all of them for
    ``world == 1``): each rank reads the files it wrote, so the ranks share the reading."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in files if _owner(p.name, world) == rank}


def write_manifest(step_dir: Path, digests: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
    """Record the size and SHA-256 of every file of a checkpoint (``digests``, or computed here), so a load can
    tell a damaged one."""
    digests = file_digests(step_dir) if digests is None else digests
    _write_atomic(step_dir / MANIFEST, json.dumps(dict(sorted(digests.items())), indent=1).encode())


def checkpoint_problem(step_dir: Path) -> Optional[str]:
    """Why ``step_dir`` is not a complete, undamaged checkpoint, or None (every file's size and checksum)."""
    if not step_dir.is_dir():
        return "the directory does not exist"
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST} (an unfinished copy, or written by an older version)"
    if "meta.json" not in manifest or ".metadata" not in manifest:
        return f"{MANIFEST} lists no meta.json or .metadata"
    for name, want in manifest.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def select_checkpoint(recipe: Dict[str, Any], sizes: Dict[str, int]) -> Tuple[Optional[int], List[str]]:
    """The step to resume from (None: start afresh) and warnings about damaged checkpoints skipped.

    Tries the step ``checkpoints/latest`` names, then older complete ones: each is verified against the
    sizes and checksums written at save time. Checked before any rank starts.

    Raises:
        RecipeError: no complete checkpoint is left, or the chosen one was written with another parallel
            layout or model shape.
    """
    root = output_dir(recipe) / "checkpoints"
    latest = root / "latest"
    if not (recipe["train"]["resume"] and latest.is_file()):
        return None, []
    text = latest.read_text().strip()
    newest = int(text) if text.isdigit() else None
    steps = sorted((int(m[1]) for m in (re.fullmatch(r"step_(\d+)", p.name) for p in root.iterdir()) if m),
                   reverse=True)
    steps = [s for s in steps if newest is None or s <= newest]
    if newest is not None and newest not in steps:
        steps.insert(0, newest)
    warnings = []
    for step in steps:
        step_dir = root / f"step_{step:07d}"
        problem = checkpoint_problem(step_dir)
        if problem is None:
            _check_compatible(recipe, sizes, step_dir)
            if warnings:
                warnings[-1] += f"; resuming from step {step} instead"
            return step, warnings
        warnings.append(f"checkpoint {step_dir} is damaged: {problem}")
    found = "; ".join(warnings) or f"latest is {text!r}"
    raise RecipeError(f"no complete checkpoint to resume under {root} ({found}); set train.resume=false or use "
                      "another output.dir")


def _check_compatible(recipe: Dict[str, Any], sizes: Dict[str, int], step_dir: Path) -> None:
    meta = json.loads((step_dir / "meta.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RecipeError(f"checkpoint {step_dir} is not a torch.distributed.checkpoint of format "
                          f"{CHECKPOINT_FORMAT!r} (an older one); use another output.dir or train.resume=false")
    want = {"world": sizes["world"], **{k: v for k, v in sizes.items() if k != "world"}}
    if meta["layout"] != want:
        raise RecipeError(f"checkpoint {step_dir} was written with parallel layout {meta['layout']}, the recipe "
                          f"gives {want}; use another output.dir or train.resume=false")
    for section in ("model", "moe"):
        for key, value in recipe[section].items():
            if meta[section].get(key) != value:
                raise RecipeError(f"{section}.{key}={value!r} differs from the checkpoint in {step_dir} "
                                  f"({meta[section].get(key)!r}); use another output.dir or train.resume=false")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _allreduce(tensors: List[torch.Tensor], group, scale: float = 1.0) -> None:
    if not tensors or dist.get_world_size(group) == 1:
        if scale != 1.0:
            for t in tensors:
                t.mul_(scale)
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(synced)


class Trainer:
    """State of one rank's run; ``train()`` below drives it."""

    def __init__(self, recipe: Dict[str, Any], sizes: Dict[str, int]):
        from megatron.core import parallel_state as ps

        from .model import build_model, initialize_parallel, transformer_config

        self.recipe, self.sizes, self.ps = recipe, sizes, ps
        tr = recipe["train"]
        self.device = torch.device("cuda", torch.cuda.current_device()) if tr["device"] == "cuda" \
            else torch.device("cpu")
        initialize_parallel(sizes, tr["seed"], tr["timeout_s"])
        torch.manual_seed(tr["seed"])
        self.config = transformer_config(recipe, sizes)
        self.model = build_model(recipe, self.config, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # float32 master copies for bf16 models; the optimizer steps on these.
        self.master = [p.detach().float().clone().requires_grad_(True) if p.dtype != torch.float32 else p
                       for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=tr["lr"], betas=(tr["adam_beta1"], tr["adam_beta2"]),
                                           weight_decay=tr["weight_decay"])
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.corpus = ByteCorpus(load_corpus(recipe["data"]["corpus"]), recipe["model"]["seq_length"],
                                 recipe["data"]["valid_fraction"])
        self.rank = dist.get_rank()
        self.out = output_dir(recipe)
        self.step = 0
        self.history: Dict[str, list] = {"train": [], "valid": []}

    # ------------------------------------------------------------------------------------ steps
    def lr_at(self, step: int) -> float:
        tr = self.recipe["train"]
        if step <= tr["warmup_steps"]:
            return tr["lr"] * step / max(1, tr["warmup_steps"])
        progress = (step - tr["warmup_steps"]) / max(1, tr["steps"] - tr["warmup_steps"])
        return tr["min_lr"] + 0.5 * (tr["lr"] - tr["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))

    def _forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        position_ids = torch.arange(tokens.size(1), device=self.device).unsqueeze(0).expand_as(tokens)
        losses = self.model(tokens, position_ids, None, labels=labels)  # [b, s] float32
        return losses.float().mean()

    def _sync_grads(self) -> None:
        ps = self.ps
        dense, expert, seq_par = [], [], []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (expert if getattr(p, "allreduce", True) is False else dense).append(p.grad)
            if getattr(p, "sequence_parallel", False) and self.sizes["tp"] > 1:
                seq_par.append(p.grad)
        _allreduce(seq_par, ps.get_tensor_model_parallel_group())
        _allreduce(dense, ps.get_data_parallel_group(), 1.0 / ps.get_data_parallel_world_size())
        # Each expert's gradient already sums the tokens of every data-parallel rank that routed to it (the
        # all-to-all brought them), so the mean over data-parallel replicas is a sum over the expert-data-
        # parallel copies divided by the full data-parallel size, as Megatron's DDP scales it.
        _allreduce(expert, ps.get_expert_data_parallel_group(), 1.0 / ps.get_data_parallel_world_size())

    def _grad_norm(self) -> float:
        """L2 norm of the whole model's gradient, each shard counted once."""
        ps = self.ps
        dense = torch.zeros((), dtype=torch.float32, device=self.device)
        expert = torch.zeros((), dtype=torch.float32, device=self.device)
        tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
        for p in self.params:
            sharded = getattr(p, "tensor_model_parallel", False)
            if getattr(p, "allreduce", True) is False:
                if sharded or etp_rank == 0:
                    expert += p.grad.float().pow(2).sum()
            elif sharded or tp_rank == 0:
                dense += p.grad.float().pow(2).sum()
        if self.sizes["tp"] > 1:
            dist.all_reduce(dense, group=ps.get_tensor_model_parallel_group())
        emp = ps.get_expert_tensor_and_model_parallel_group()
        if dist.get_world_size(emp) > 1:
            dist.all_reduce(expert, group=emp)
        return float((dense + expert).sqrt())

    def train_step(self) -> Dict[str, float]:
        tr = self.recipe["train"]
        self.model.train()
        step = self.step + 1
        start = time.perf_counter()
        tokens, labels = self.corpus.train_batch(step, tr["micro_batch_size"], self.dp_rank, tr["seed"])
        for p in self.params:
            p.grad = None
        loss = self._forward(tokens, labels)
        loss.backward()
        self._sync_grads()
        norm = self._grad_norm()
        self._stop_if_not_finite(step, loss, norm)
        clip = tr["grad_clip"]
        scale = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = p.grad.float()
            if scale != 1.0:
                m.grad.mul_(scale)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        loss_avg = loss.detach().clone()
        dist.all_reduce(loss_avg, group=self.ps.get_data_parallel_group())
        loss_avg = float(loss_avg) / self.dp_size
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.step = step
        tokens_per_step = tokens.numel() * self.dp_size
        record = {"step": step, "loss": loss_avg, "lr": lr, "grad_norm": norm,
                  "tokens_per_s": tokens_per_step / elapsed, "time_s": elapsed}
        self.history["train"].append(record)
        return record

    def _stop_if_not_finite(self, step: int, loss: torch.Tensor, norm: float) -> None:
        """Raise ``TrainingStopped`` on every rank if any rank's loss or the gradient norm is not finite
        (one flag all-reduced over the whole job), before the optimizer could take the values in."""
        loss = float(loss.detach())
        bad = torch.tensor([0.0 if (math.isfinite(loss) and math.isfinite(norm)) else 1.0],
                           device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise TrainingStopped(
                f"step {step}: the loss ({loss:.4g} on rank {self.rank}) or the gradient norm ({norm:.4g}) is "
                f"not finite; stopped before the optimizer step. The weights and checkpoints stay finite: lower "
                f"train.lr or raise train.warmup_steps, then resume from {self._ckpt_root()}")

    @torch.no_grad()
    def evaluate(self) -> float:
        tr = self.recipe["train"]
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for tokens, labels in self.corpus.valid_batches(tr["micro_batch_size"], tr["eval_batches"],
                                                       self.dp_rank, self.dp_size):
            total += self._forward(tokens, labels).double()
            count += 1
        dist.all_reduce(total, group=self.ps.get_data_parallel_group())
        value = float(total) / (count * self.dp_size)
        self.history["valid"].append({"step": self.step, "loss": value})
        return value

    # ------------------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def layout(self) -> Dict[str, int]:
        return {"world": dist.get_world_size(), **{k: v for k, v in self.sizes.items() if k != "world"}}

    def _global_keys(self) -> List[str]:
        """The checkpoint key of each entry of ``self.params``: what the tensor holds, not where it lives.

        Dense parameters replicated over ranks keep their module name (DCP stores one copy). A tensor
        that differs between ranks gets a key no other rank's different tensor has: local expert ``i``
        of an MoE layer becomes ``global_expert_{g}`` (``g`` from the layer's ``local_expert_indices``),
        and a tensor-parallel shard (``tensor_model_parallel`` with TP > 1, or ETP > 1 for experts)
        gains ``.tp{rank}of{size}`` / ``.etp{rank}of{size}``. An expert tensor of a form not recognized
        here is keyed by its EP and ETP rank, which is exact for the same layout.
        """
        ps = self.ps
        moe_prefixes = {f"{name}.experts.": list(module.local_expert_indices)
                        for name, module in self.model.named_modules() if hasattr(module, "local_expert_indices")}
        ep_rank, etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
        names = {id(p): n for n, p in self.model.named_parameters()}
        keys = []
        for p in self.params:
            name = names[id(p)]
            if getattr(p, "allreduce", True) is False:  # an expert parameter
                prefix = next((pre for pre in moe_prefixes if name.startswith(pre)), None)
                rest = name[len(prefix):] if prefix else ""
                # SequentialMLP: local_experts.{i}.linear_fc1.weight; TEGroupedMLP: linear_fc1.weight{i}.
                seq = re.fullmatch(r"local_experts\.(\d+)\.(.+)", rest)
                grouped = re.fullmatch(r"(linear_fc[12]\.(?:weight|bias))(\d+)", rest)
                if prefix and (seq or grouped):
                    i, tail = (int(seq[1]), seq[2]) if seq else (int(grouped[2]), grouped[1])
                    key = f"{prefix}global_expert_{moe_prefixes[prefix][i]}.{tail}"
                elif prefix:  # GroupedMLP: one tensor holds all local experts
                    idx = moe_prefixes[prefix]
                    key = f"{prefix}global_experts_{idx[0]}_to_{idx[-1]}.{rest}"
                else:
                    key = f"{name}.ep{ep_rank}of{self.sizes['ep']}"
                if getattr(p, "tensor_model_parallel", False) and self.sizes["etp"] > 1:
                    key += f".etp{etp_rank}of{self.sizes['etp']}"
            elif getattr(p, "tensor_model_parallel", False) and self.sizes["tp"] > 1:
                key = f"{name}.tp{ps.get_tensor_model_parallel_rank()}of{self.sizes['tp']}"
            else:
                key = name
            keys.append(key)
        if len(set(keys)) != len(keys):
            dups = sorted({k for k in keys if keys.count(k) > 1})
            raise RuntimeError(f"checkpoint keys collide on rank {self.rank}: {dups}")
        return keys

    def _tensor_state(self) -> Dict[str, torch.Tensor]:
        """The tensors to save under their global keys: weights, float32 master copies (bf16 runs) and
        AdamW states. They alias the live tensors, so ``dcp.load`` writes straight into them."""
        state: Dict[str, torch.Tensor] = {}
        for key, p, m in zip(self._global_keys(), self.params, self.master):
            state[f"model.{key}"] = p.detach()
            if m is not p:
                state[f"master.{key}"] = m.detach()
            for name, value in self.optimizer.state.get(m, {}).items():
                state[f"optimizer.{name}.{key}"] = value
        return state

    def _rank_state(self) -> Dict[str, Any]:
        """What is not a model tensor: step, history, RNG states, optimizer hyper-parameters and the
        model's non-parameter state (buffers, extra state), which may differ between ranks."""
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from ..megatron.cpu import _rng

        params = {n for n, _ in self.model.named_parameters()}
        return {"step": self.step, "layout": self.layout(), "history": self.history,
                "rng_cpu": torch.get_rng_state(),
                "rng_device": torch.cuda.get_rng_state() if self.device.type == "cuda" else _rng.get_state(),
                "rng_tracker": get_cuda_rng_tracker().get_states(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups],
                "model_extra": {k: v for k, v in self.model.state_dict().items() if k not in params}}

    def save(self) -> None:
        """Write ``checkpoints/step_N/``: a ``torch.distributed.checkpoint`` of the tensors (one copy of
        each global key), ``rank_R.pt`` per rank for the rest, ``meta.json``, ``manifest.json`` (sizes and
        checksums); then ``latest`` -> N. Refuses (``TrainingStopped``) to save non-finite tensors.

        Everything goes to ``step_N.partial/`` first, renamed once every rank has finished, so a step
        directory is always complete (a rerun with ``train.resume=false`` replaces the old one).
        """
        import torch.distributed.checkpoint as dcp

        step_dir = self._ckpt_root() / f"step_{self.step:07d}"
        partial = step_dir.with_name(step_dir.name + ".partial")
        state = self._tensor_state()
        bad = torch.tensor([float(any(t.is_floating_point() and not bool(torch.isfinite(t).all())
                                      for t in state.values()))], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise TrainingStopped(f"step {self.step}: the weights or optimizer states are not finite; not saving them")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run that stopped while saving
            partial.mkdir(parents=True)
        dist.barrier()
        # Plain tensors under one key on several ranks are replicas: DCP writes one of them.
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial))
        torch.save(self._rank_state(), partial / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            meta = {"step": self.step, "layout": self.layout(), "format": CHECKPOINT_FORMAT,
                    **{k: self.recipe[k] for k in CHECKPOINT_KEYS}}
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        dist.barrier()  # every rank's files are complete before the step is published
        # Every rank checksums the files it wrote; rank 0 writes the manifest of them all.
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, file_digests(partial, self.rank, dist.get_world_size()))
        if self.rank == 0:
            write_manifest(partial, {name: d for share in shares for name, d in share.items()})
            if step_dir.exists():
                shutil.rmtree(step_dir)
            os.replace(partial, step_dir)
            _write_atomic(self._ckpt_root() / "latest", f"{self.step}\n".encode())
        dist.barrier()  # no rank goes on (or resumes) before "latest" is written

    def maybe_resume(self, step: Optional[int]) -> bool:
        """Load checkpoint ``step`` (None: start afresh), chosen and verified by ``select_checkpoint``."""
        import torch.distributed.checkpoint as dcp
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        from ..megatron.cpu import _rng

        if step is None:
            return False
        step_dir = self._ckpt_root() / f"step_{step:07d}"
        rank_path = step_dir / f"rank_{self.rank:05d}.pt"
        extra = torch.load(rank_path, map_location="cpu", weights_only=False)
        if extra["layout"] != self.layout():
            raise RuntimeError(f"checkpoint {rank_path} was written with parallel layout {extra['layout']}, this run "
                               f"has {self.layout()}; use a new output.dir or the same layout")
        reader = dcp.FileSystemReader(step_dir)
        saved = reader.read_metadata().state_dict_metadata
        # AdamW creates its states at the first step: allocate them (as it does) to load into. Keys
        # are optimizer.{state name}.{global key}; state names have no dots. "step" stays on the host
        # unless the optimizer is capturable or fused.
        step_on_host = not (self.optimizer.defaults.get("capturable") or self.optimizer.defaults.get("fused"))
        optim_names: Dict[str, List[str]] = {}
        for k in saved:
            if k.startswith("optimizer."):
                _, name, key = k.split(".", 2)
                optim_names.setdefault(key, []).append(name)
        for key, m in zip(self._global_keys(), self.master):
            self.optimizer.state[m] = {
                name: torch.empty(saved[f"optimizer.{name}.{key}"].size,
                                  dtype=saved[f"optimizer.{name}.{key}"].properties.dtype,
                                  device="cpu" if name == "step" and step_on_host else m.device)
                for name in optim_names.get(key, [])}
        state = self._tensor_state()
        for key, value in state.items():
            if key not in saved or tuple(saved[key].size) != tuple(value.shape):
                found = "does not hold" if key not in saved else f"holds shape {tuple(saved[key].size)} for"
                raise RuntimeError(f"checkpoint {step_dir} {found} {key}, which this run needs with shape "
                                   f"{tuple(value.shape)}; use a new output.dir or the checkpoint's recipe")
        dcp.load(state, storage_reader=reader)
        bad = [key for key, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        flag = torch.tensor([float(bool(bad))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            where = f" ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} on rank {self.rank})" if bad else ""
            raise TrainingStopped(f"checkpoint {step_dir} holds non-finite values{where}; resume from an earlier "
                                  f"step (set checkpoints/latest) or train.resume=false")
        model_state = self.model.state_dict()
        model_state.update(extra["model_extra"])
        self.model.load_state_dict(model_state)
        for group, hyper in zip(self.optimizer.param_groups, extra["param_groups"]):
            group.update(hyper)
        torch.set_rng_state(extra["rng_cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng_device"])
        else:
            _rng.set_state(extra["rng_device"])
        get_cuda_rng_tracker().set_states(extra["rng_tracker"])
        self.step, self.history = extra["step"], extra["history"]
        return True

    # ------------------------------------------------------------------------------------ outputs
    def write_log(self, wall_s: float, final: bool) -> None:
        if self.rank != 0:
            return
        log = {"recipe": self.recipe, "layout": self.layout(), "step": self.step, "final": final,
               "wall_s": wall_s, "train": self.history["train"], "valid": self.history["valid"]}
        _write_atomic(self.out / "log.json", json.dumps(log, indent=1, default=str).encode())

    def plot(self) -> Optional[Path]:
        if self.rank != 0 or not self.recipe["output"]["plot"]:
            return None
        try:
            import matplotlib
        except ImportError:
            print("note: matplotlib is not installed, so no loss.png (pip install matplotlib, or output.plot=false)",
                  flush=True)
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        train = self.history["train"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.6, label="train")
        valid = self.history["valid"]
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation (held out)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per byte)")
        disp = self.recipe["dispatcher"]
        ax.set_title(f"{self.recipe['name']}: dispatcher {disp['type']}/{disp['backend']}, "
                     f"EP {self.sizes['ep']} TP {self.sizes['tp']}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out / "loss.png"
        fig.tight_layout()
        fig.savefig(path.with_name("loss.png.tmp.png"), dpi=100)
        os.replace(path.with_name("loss.png.tmp.png"), path)
        plt.close(fig)
        return path


def _progress(enabled: bool, total: int, initial: int):
    """A tqdm bar on a terminal; logs (CI, files) get the periodic lines only."""
    import sys

    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)


def remove_unfinished(root: Path) -> List[Path]:
    """Remove what a run killed while saving left under ``root`` (``step_N.partial/``, ``latest.tmp``)."""
    gone = sorted(root.glob("step_*.partial")) + sorted(root.glob("latest.tmp"))
    for path in gone:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return gone


def train(recipe: Dict[str, Any], sizes: Dict[str, int], resume_step: Optional[int] = None) -> None:
    """Run (or resume, from ``resume_step`` as ``select_checkpoint`` chose it) the recipe on this rank."""
    from ..megatron import cpu_context, install

    tr = recipe["train"]
    wall = time.perf_counter()
    with cpu_context(enabled=tr["device"] == "cpu"):
        install()
        t = Trainer(recipe, sizes)
        say = print if t.rank == 0 else (lambda *a, **k: None)
        if t.rank == 0:
            t.out.mkdir(parents=True, exist_ok=True)
            for path in remove_unfinished(t._ckpt_root()):
                say(f"removed {path}, left by a run stopped while saving", flush=True)
        resumed = t.maybe_resume(resume_step)
        disp = recipe["dispatcher"]
        say(f"{recipe['name']}: {sizes['world']} ranks (TP {sizes['tp']}, EP {sizes['ep']}, DP {sizes['dp']}), "
            f"dispatcher {disp['type']}/{disp['backend']} ({type(_dispatcher(t.model)).__name__}), "
            f"{sum(p.numel() for p in t.params)} parameters on rank 0"
            + (f"; resumed at step {t.step}" if resumed else ""), flush=True)
        if not resumed:
            say(f"step {0:>5d} | validation loss {t.evaluate():.4f}", flush=True)
        elif t.step >= tr["steps"]:
            say(f"already trained to step {t.step} in {t.out}; pass train.resume=false (or a larger "
                f"train.steps) to train again", flush=True)
        bar = _progress(t.rank == 0 and recipe["output"]["progress"], tr["steps"], t.step)
        while t.step < tr["steps"]:
            rec = t.train_step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            last = t.step == tr["steps"]
            if t.step % tr["eval_interval"] == 0 or last:
                val = t.evaluate()
                window = t.history["train"][-tr["log_interval"]:]
                tok_s = sum(r["tokens_per_s"] for r in window) / len(window)
                line = (f"step {t.step:>5d} | train loss {rec['loss']:.4f} | validation loss {val:.4f} | "
                        f"{tok_s:,.0f} tokens/s")
                if bar is not None:
                    bar.write(line)
                else:
                    say(line, flush=True)
                t.write_log(time.perf_counter() - wall, final=False)
            if (tr["checkpoint_interval"] and t.step % tr["checkpoint_interval"] == 0) or last:
                t.save()
        if bar is not None:
            bar.close()
        wall_s = time.perf_counter() - wall
        t.write_log(wall_s, final=True)
        png = t.plot()
        valid = t.history["valid"]
        if valid:
            say(f"validation loss {valid[0]['loss']:.4f} (step {valid[0]['step']}) -> {valid[-1]['loss']:.4f} "
                f"(step {valid[-1]['step']}); {wall_s:.1f} s from model build to end")
        say(f"wrote {t.out / 'log.json'}" + (f", {png}" if png else "") + f", {t._ckpt_root()}", flush=True)
        t.ps.destroy_model_parallel()


def _dispatcher(model):
    for module in model.modules():
        if hasattr(module, "token_dispatcher"):
            return module.token_dispatcher
    return None
