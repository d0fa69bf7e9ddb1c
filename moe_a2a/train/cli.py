"""The commands ``python -m moe_a2a train`` (``main``: the recipe runner, ``TRAIN_HELP``) and
``python -m moe_a2a demo`` (``demo``: dispatch and combine across CPU ranks, checked end to end)."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from typing import Any, Dict, List, Optional

from .recipe import RecipeError, describe, environment_problem, load, output_dir, parallel_sizes

USAGE = "usage: python -m moe_a2a train RECIPE.yaml [section.key=value ...] [--dry-run]"
TRAIN_HELP = """Recipe runner: ``python -m moe_a2a train RECIPE.yaml [section.key=value ...] [--dry-run]``.

Builds a megatron-core GPT model with MoE layers from a YAML recipe (``recipes/``), sets up the
process groups, trains a byte-level language model on the shipped corpus and reports training loss,
tokens/s and the loss on a held-out split. Writes, under ``output.dir`` (default ``runs/NAME``):
``log.json`` (recipe, per-step loss and throughput, validation losses), ``loss.png`` and
``checkpoints/`` (per saved step, a ``torch.distributed.checkpoint`` of the tensors under global keys
plus a small file per rank; a rerun with the same layout resumes from the latest).

Launch: on CPU the runner spawns ``parallel.world_size`` gloo ranks itself; on GPUs run it under
``torchrun --nproc-per-node N`` (or let it spawn one NCCL rank per visible GPU). Bad input (unknown or
duplicate key, sizes that do not divide, a dispatcher or device that cannot run here, a missing corpus,
memory beyond this host's, an output directory that cannot be written) exits with code 2 and a message
naming the key, before anything is written. A damaged latest checkpoint falls back to the newest complete
one (with a warning). A non-finite loss or gradient, a rank that dies, or one that stalls for longer than
``train.timeout_s`` ends the run with exit code 1 (within ``train.timeout_s + 30`` seconds).
"""


# ----------------------------------------------------------------------------- checks before launch
def runnable_here(recipe: Dict[str, Any], world_size: Optional[int] = None) -> Optional[str]:
    """``None`` if this machine can run the recipe, else the reason (naming the key)."""
    import torch

    tr, disp = recipe["train"], recipe["dispatcher"]
    sizes = parallel_sizes(recipe, world_size)
    if tr["device"] == "cuda":
        if not torch.cuda.is_available():
            return "train.device='cuda' but no CUDA device is available here"
        if "RANK" not in os.environ and torch.cuda.device_count() < sizes["world"]:
            return (f"parallel.world_size={sizes['world']} needs {sizes['world']} GPUs on this node, found "
                    f"{torch.cuda.device_count()}; launch multi-node runs with torchrun")
    if tr["device"] == "cpu" and tr["dtype"] != "float32":
        return f"train.dtype={tr['dtype']!r} on CPU: use float32 (CPU runs are for correctness, not speed)"
    if importlib.util.find_spec("megatron.core") is None:
        return "megatron-core is not installed (pip install megatron-core)"
    if sizes["pp"] > 1:
        return "parallel.pipeline > 1 is not supported by this runner (use Megatron-LM's pretrain_gpt.py)"
    from .model import have_transformer_engine

    if sizes["tp"] > 1 and not (tr["device"] == "cuda" and have_transformer_engine()):
        return ("parallel.tensor > 1 needs Transformer Engine on GPU: megatron's local (torch) layer norms "
                "do not support the sequence parallelism MoE layers require with tensor parallelism")
    moe = recipe["moe"]
    if (moe["grouped_gemm"] or moe["permute_fusion"]) and not have_transformer_engine():
        key = "moe.grouped_gemm" if moe["grouped_gemm"] else "moe.permute_fusion"
        return f"{key}=true needs Transformer Engine, which is not installed"
    if disp["type"] in ("moe_a2a", "flex"):
        try:
            from .. import fused_a2a  # noqa: F401
        except ImportError as exc:
            return f"dispatcher.type={disp['type']!r} needs moe_a2a.fused_a2a: {exc}"
        if tr["device"] == "cuda" and importlib.util.find_spec("moe_a2a._C") is None:
            return (f"dispatcher.type={disp['type']!r} on GPU needs the compiled moe_a2a._C extension "
                    f"(pip install -e . where nvcc is found)")
    ranks_here = int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None
    return environment_problem(recipe, world_size, ranks_here)


def _parse_args(argv: List[str]):
    dry_run = "--dry-run" in argv
    rest = [a for a in argv if a != "--dry-run"]
    if any(a in ("-h", "--help") for a in rest):
        return None, [], dry_run
    if not rest:
        raise RecipeError(f"missing RECIPE argument\n{USAGE}")
    flags = [a for a in rest[1:] if a.startswith("-")]
    if flags or rest[0].startswith("-"):
        raise RecipeError(f"unknown option {(flags or rest)[0]!r}\n{USAGE}")
    return rest[0], rest[1:], dry_run


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, overrides, dry_run = _parse_args(argv)
        if path is None:
            print(TRAIN_HELP.strip() + "\n\n" + USAGE)
            return 0
        recipe = load(path, overrides)
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        sizes = parallel_sizes(recipe, world)
        reason = runnable_here(recipe, world)
        if importlib.util.find_spec("megatron.core") is not None:
            _quiet_imports()
            from .model import megatron_rejects

            rejected = megatron_rejects(recipe, sizes)
            if rejected:
                raise RecipeError(rejected)
        resume_step = None
        if reason is None and not dry_run:
            from .loop import select_checkpoint

            resume_step, warnings = select_checkpoint(recipe, sizes)
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(describe(recipe, world))
        print(f"  runs here  {'yes' if reason is None else 'no: ' + reason}")
        print(f"  output     {output_dir(recipe)} (not written by --dry-run)")
        return 0
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if "RANK" in os.environ:  # launched by torchrun: this process is one rank
        return _torchrun_rank(recipe, sizes["world"], resume_step)
    return _spawn(recipe, sizes["world"], resume_step)


#: Seconds the other ranks have, once one failed, to report their own error before the runner kills them.
STOP_GRACE_S = 5.0


def _spawn(recipe: Dict[str, Any], world: int, resume_step: Optional[int] = None) -> int:
    """Run the recipe on ``world`` ranks of this machine (``launch.spawn``); 0, or 1 when a rank failed."""
    from ..launch import RanksFailed, spawn

    tr = recipe["train"]
    cuda = tr["device"] == "cuda"
    try:
        # No deadline for the whole run: it takes as long as its steps do. A stalled rank makes its peers'
        # collectives time out after train.timeout_s (the group's timeout); they fail and report it, and
        # the runner kills what is left STOP_GRACE_S later (SIGKILL reaches a stopped process too).
        spawn(_train_rank, world, recipe, resume_step, backend="nccl" if cuda else "gloo", cuda_device=cuda,
              timeout=math.inf, grace=STOP_GRACE_S, group_timeout=tr["timeout_s"])
    except RanksFailed as exc:
        # The ranks reported their own errors; a rank that failed before training (joining the group) has its
        # traceback printed by multiprocessing.
        codes = [exc.exit_codes.get(r) for r in range(world)]
        killed = f"; ranks {exc.hung} killed {STOP_GRACE_S:g} s after the first failure" if exc.hung else ""
        print(f"error: ranks exited with codes {codes}{killed}", file=sys.stderr, flush=True)
        return 1
    return 0


def _quiet_imports() -> None:
    """Silence import-time notices of optional GPU packages (apex, TE, CUDA_HOME) on CPU runs;
    every warning raised while training still shows."""
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for pattern in ("Apex is not installed", ".*Transformer Engine.*", ".*all_gather_into_tensor.*",
                    ".*moe_ffn_hidden_size is not set.*", ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _torchrun_rank(recipe: Dict[str, Any], world: int, resume_step: Optional[int]) -> int:
    """This process is one rank of a torchrun launch (``RANK``, ``LOCAL_RANK``, ``MASTER_*`` in the
    environment): join the group, train, leave."""
    import datetime

    import torch
    import torch.distributed as dist

    rank, cuda = int(os.environ["RANK"]), recipe["train"]["device"] == "cuda"
    if cuda:  # before the group: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=recipe["train"]["timeout_s"]))
    _train_rank(rank, world, recipe, resume_step)
    dist.destroy_process_group()
    _exit_now(0)
    return 0


def _train_rank(rank: int, world: int, recipe: Dict[str, Any], resume_step: Optional[int]) -> None:
    """Train the recipe on this rank (its process group is up; ``launch.spawn`` calls it on spawned ranks).
    Returns when the run is done; a failure is reported here and ends the process with code 1."""
    import torch

    from ..backends.waits import CollectiveError
    from .loop import TrainingStopped

    tr = recipe["train"]
    _quiet_imports()
    torch.set_num_threads(tr["threads_per_rank"])
    # Every wait on a peer ends after train.timeout_s: the collectives of every group (the process group's
    # timeout) and the dispatcher's Buffer (unless MOE_A2A_TIMEOUT_S says otherwise).
    os.environ.setdefault("MOE_A2A_TIMEOUT_S", str(tr["timeout_s"]))
    try:
        from .loop import train

        train(recipe, parallel_sizes(recipe, world), resume_step)
    except (TrainingStopped, CollectiveError) as exc:
        # Every rank raises TrainingStopped at the same step: one line says it. A collective that failed is
        # reported by each rank that saw it (naming the missing peer where it can).
        if rank == 0 or isinstance(exc, CollectiveError):
            print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        _exit_now(1)
    except BaseException:
        import traceback

        traceback.print_exc()
        _exit_now(1)


def _exit_now(code: int) -> None:
    """Leave at once (``launch.leave``): a collective abandoned by a failure may keep the process group from
    shutting down, and after a finished run gloo's threads may still release work during interpreter shutdown."""
    from ..launch import leave

    leave(code)


# ----------------------------------------------------------------------------- demo
def _demo_rank(rank: int, num_ranks: int, args) -> None:
    import torch
    import torch.distributed as dist

    from .. import Buffer

    num_experts = args.experts
    per_rank = num_experts // num_ranks
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).bfloat16()
    topk_weights, topk_idx = torch.rand(args.tokens, num_experts, generator=gen).softmax(1).topk(args.topk, dim=1)
    expert_scale = torch.arange(1, num_experts + 1, dtype=torch.float32) / num_experts  # expert e multiplies by this

    # Room for both directions: the default combine config may need more than the dispatch one.
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(args.hidden * 2, num_ranks)
                        for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)))
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)

    # Each received token: sum over its local experts of weight * scale_e * x.
    local_scale = expert_scale[rank * per_rank:(rank + 1) * per_rank]
    factor = (recv_w * torch.where(recv_idx >= 0, local_scale[recv_idx.clamp(min=0)], 0)).sum(1, keepdim=True)
    expert_out = (recv_x.float() * factor).bfloat16()
    combined, _, _ = buffer.combine(expert_out, handle)

    want = x.float() * (topk_weights * expert_scale[topk_idx]).sum(1, keepdim=True)
    err = (combined.float() - want).abs().max().item() if args.tokens else 0.0
    ok = err <= 0.05 * max(1.0, want.abs().max().item())
    print(f"rank {rank}: sent {num_tokens_per_rank.tolist()} tokens to ranks, received {recv_x.size(0)} "
          f"(per local expert {per_expert}), combine max error {err:.4f} {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        raise RuntimeError(f"rank {rank}: combined tokens differ from the local MoE by {err:.4f}")


def demo(argv: Optional[List[str]] = None) -> int:
    """``python -m moe_a2a demo``: dispatch and combine across CPU ranks, checked end to end.

    Spawns ``--ranks`` gloo processes. Each routes random BF16 tokens to top-k experts, dispatches them,
    applies one scalar "expert" per local expert, combines with the routing weights, and checks the result
    against the same MoE computed locally. Prints what each rank sent and received.
    """
    from ..launch import RanksFailed, spawn

    parser = argparse.ArgumentParser(prog="python -m moe_a2a demo", description=demo.__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    args = parser.parse_args(argv)
    if args.experts % args.ranks or args.topk > args.experts:
        print(f"error: --experts ({args.experts}) must be divisible by --ranks ({args.ranks}) and >= --topk",
              file=sys.stderr)
        return 2
    try:
        spawn(_demo_rank, args.ranks, args, timeout=600.0)
    except RanksFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(f"demo: {args.ranks} ranks dispatched and combined {args.tokens} tokens each, results match")
    return 0


__all__ = ["demo", "main", "runnable_here"]
