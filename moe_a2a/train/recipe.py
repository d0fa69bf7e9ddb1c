"""Training recipes: YAML schema, ``key=value`` overrides, validation and the dry-run report.

A recipe is a YAML mapping with the sections of ``SCHEMA``; every key is optional and takes the
default below. Validation happens before anything is launched or written: a bad recipe raises
``RecipeError`` naming the key and the value, which the command line turns into exit code 2.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class RecipeError(ValueError):
    """A recipe key or value that cannot be used; the message names it."""


_NUM = (int, float)
# section -> key -> (default, allowed types or tuple of allowed values)
SCHEMA: Dict[str, Dict[str, tuple]] = {
    "model": {
        "num_layers": (2, int), "hidden_size": (128, int), "num_attention_heads": (4, int),
        "num_query_groups": (None, int), "kv_channels": (None, int), "ffn_hidden_size": (512, int),
        "seq_length": (128, int), "vocab_size": (256, int),
        "normalization": ("RMSNorm", ("RMSNorm", "LayerNorm")), "swiglu": (True, bool),
        "position_embedding": ("rope", ("rope", "learned_absolute", "none")),
        "rotary_base": (10000, int), "untie_embeddings": (False, bool), "qk_layernorm": (False, bool),
        "init_method_std": (0.02, _NUM), "hidden_dropout": (0.0, _NUM), "attention_dropout": (0.0, _NUM),
    },
    "moe": {
        "num_experts": (8, int), "topk": (2, int), "ffn_hidden_size": (256, int),
        # int (every n-th layer is MoE) or a list of 0/1 per layer, as Megatron's --moe-layer-freq.
        "layer_freq": (1, (int, list)), "shared_expert_ffn_hidden_size": (None, int),
        "router_score_function": ("softmax", ("softmax", "sigmoid")),
        "router_topk_scaling_factor": (None, _NUM), "router_pre_softmax": (False, bool),
        "router_num_groups": (None, int), "router_group_topk": (None, int),
        "router_enable_expert_bias": (False, bool), "router_bias_update_rate": (1e-3, _NUM),
        "router_load_balancing_type": ("aux_loss", ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")),
        "aux_loss_coeff": (1e-2, _NUM), "z_loss_coeff": (None, _NUM), "router_dtype": ("fp32", ("fp32", "fp64", None)),
        "capacity_factor": (None, _NUM), "pad_expert_input_to_capacity": (False, bool),
        "token_drop_policy": ("probs", ("probs", "position")), "grouped_gemm": (False, bool),
        "permute_fusion": (False, bool), "router_padding_for_quantization": (False, bool),
    },
    "dispatcher": {
        "type": ("moe_a2a", ("moe_a2a", "flex", "alltoall", "allgather")),
        "backend": ("deepep", ("deepep", "hybridep")),
        "deepep_num_sms": (20, int), "hybridep_num_sms": (16, int),
    },
    "parallel": {
        "world_size": (None, int), "tensor": (1, int), "pipeline": (1, int), "expert": (1, int),
        "expert_tensor": (None, int), "sequence_parallel": (None, bool),
    },
    "train": {
        "device": ("cpu", ("cpu", "cuda")), "dtype": ("float32", ("float32", "bf16")),
        "steps": (100, int), "micro_batch_size": (4, int), "lr": (3e-3, _NUM), "min_lr": (3e-4, _NUM),
        "warmup_steps": (10, int), "weight_decay": (0.01, _NUM), "adam_beta1": (0.9, _NUM),
        "adam_beta2": (0.95, _NUM), "grad_clip": (1.0, _NUM), "seed": (1234, int),
        "log_interval": (10, int), "eval_interval": (50, int), "eval_batches": (4, int),
        "checkpoint_interval": (0, int), "resume": (True, bool), "threads_per_rank": (1, int),
        # Seconds any rank waits for a peer (collectives, the dispatcher's Buffer) before the run stops.
        "timeout_s": (120, _NUM),
    },
    "data": {"corpus": ("builtin", str), "valid_fraction": (0.1, _NUM)},
    "output": {"dir": (None, str), "plot": (True, bool), "progress": (True, bool)},
}
TOP_LEVEL = {"name": (None, str), "description": (None, str)}


def _check_value(key: str, value: Any, allowed) -> Any:
    if value is None:
        return None
    if isinstance(allowed, tuple) and allowed and not isinstance(allowed[0], type):
        if value not in allowed:
            raise RecipeError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")
        return value
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    if float in types and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if bool in types and isinstance(value, bool):
        return value
    if isinstance(value, bool) or not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise RecipeError(f"{key}={value!r}: expected {names}, got {type(value).__name__}")
    if float in types and isinstance(value, int):
        return float(value)
    return value


def defaults() -> Dict[str, Any]:
    """The recipe with every key at its default."""
    out: Dict[str, Any] = {k: v[0] for k, v in TOP_LEVEL.items()}
    for section, keys in SCHEMA.items():
        out[section] = {k: copy.deepcopy(v[0]) for k, v in keys.items()}
    return out


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    return value


def apply_override(recipe: Dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML: ``3``, ``1e-3``, ``true``)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected section.key=value, e.g. train.steps=20")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) == 1 and key in TOP_LEVEL:
        recipe[key] = _check_value(key, _parse_scalar(text), TOP_LEVEL[key][1])
        return
    if len(parts) != 2 or parts[0] not in SCHEMA or parts[1] not in SCHEMA[parts[0]]:
        raise RecipeError(f"unknown recipe key {key!r} in override {item!r}; sections: "
                          f"{', '.join(SCHEMA)}")
    section, name = parts
    recipe[section][name] = _check_value(key, _parse_scalar(text), SCHEMA[section][name][1])


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise RecipeError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load(path: str | Path, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a recipe file, fill defaults, apply overrides and validate it.

    Raises:
        RecipeError: unreadable file, unknown key, wrong type, or sizes that do not fit together.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except RecipeError as exc:
        raise RecipeError(f"recipe {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {str(path)!r}: expected a mapping at the top level")
    recipe = defaults()
    recipe["name"] = path.stem
    for key, value in raw.items():
        if key in TOP_LEVEL:
            recipe[key] = _check_value(key, value, TOP_LEVEL[key][1])
            continue
        if key not in SCHEMA:
            raise RecipeError(f"unknown recipe key {key!r}; expected one of "
                              f"{', '.join(list(TOP_LEVEL) + list(SCHEMA))}")
        if not isinstance(value, dict):
            raise RecipeError(f"recipe section {key!r}: expected a mapping, got {value!r}")
        for name, item in value.items():
            if name not in SCHEMA[key]:
                raise RecipeError(f"unknown recipe key '{key}.{name}'; {key} takes: "
                                  f"{', '.join(SCHEMA[key])}")
            recipe[key][name] = _check_value(f"{key}.{name}", item, SCHEMA[key][name][1])
    for item in overrides or []:
        apply_override(recipe, item)
    validate(recipe)
    return recipe


def _positive(recipe, keys: List[str]) -> None:
    for key in keys:
        section, name = key.split(".")
        value = recipe[section][name]
        if value is not None and value <= 0:
            raise RecipeError(f"{key}={value!r}: expected a positive number")


def moe_layer_pattern(recipe: Dict[str, Any]) -> List[int]:
    """Per-layer 1 (MoE) / 0 (dense) list from ``moe.layer_freq``."""
    freq, n = recipe["moe"]["layer_freq"], recipe["model"]["num_layers"]
    if isinstance(freq, int):
        if freq < 1:
            raise RecipeError(f"moe.layer_freq={freq}: expected an int >= 1 or a list of 0/1")
        return [1 if i % freq == 0 else 0 for i in range(n)]
    if len(freq) != n or any(x not in (0, 1) for x in freq):
        raise RecipeError(f"moe.layer_freq={freq!r}: expected {n} entries (model.num_layers), each 0 or 1")
    return list(freq)


def parallel_sizes(recipe: Dict[str, Any], world_size: Optional[int] = None) -> Dict[str, int]:
    """World, TP, PP, EP, ETP, DP and expert-DP sizes; raises ``RecipeError`` if they do not divide."""
    par = recipe["parallel"]
    tp, pp, ep = par["tensor"], par["pipeline"], par["expert"]
    etp = par["expert_tensor"] if par["expert_tensor"] is not None else tp
    world = world_size or par["world_size"] or tp * pp * ep
    if world % (tp * pp):
        raise RecipeError(f"parallel.world_size={world} is not divisible by parallel.tensor x "
                          f"parallel.pipeline = {tp} x {pp}")
    if world % (etp * ep * pp):
        raise RecipeError(f"parallel.world_size={world} is not divisible by parallel.expert_tensor x "
                          f"parallel.expert x parallel.pipeline = {etp} x {ep} x {pp}")
    return {"world": world, "tp": tp, "pp": pp, "ep": ep, "etp": etp,
            "dp": world // (tp * pp), "edp": world // (etp * ep * pp)}


def validate(recipe: Dict[str, Any]) -> None:
    """Check that the sizes of a recipe fit together (no imports of torch or megatron)."""
    m, moe, par, tr, disp = (recipe[k] for k in ("model", "moe", "parallel", "train", "dispatcher"))
    name = recipe["name"]
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("~"):
        raise RecipeError(f"name={name!r}: expected a plain name without path separators or '..' (the run writes "
                          f"under runs/NAME; set output.dir to write elsewhere)")
    _positive(recipe, ["model.num_layers", "model.hidden_size", "model.num_attention_heads",
                       "model.ffn_hidden_size", "model.seq_length", "model.vocab_size",
                       "model.num_query_groups", "moe.num_experts", "moe.topk", "moe.ffn_hidden_size",
                       "parallel.tensor", "parallel.pipeline", "parallel.expert", "parallel.expert_tensor",
                       "parallel.world_size", "train.steps", "train.micro_batch_size", "train.lr",
                       "train.log_interval", "train.eval_interval", "train.eval_batches",
                       "train.threads_per_rank", "moe.capacity_factor", "train.timeout_s"])
    for key in ("train.min_lr", "train.warmup_steps", "train.weight_decay", "train.checkpoint_interval",
                "moe.aux_loss_coeff"):
        section, name = key.split(".")
        if recipe[section][name] is not None and recipe[section][name] < 0:
            raise RecipeError(f"{key}={recipe[section][name]!r}: expected a number >= 0")
    if m["hidden_size"] % m["num_attention_heads"]:
        raise RecipeError(f"model.hidden_size={m['hidden_size']} is not divisible by "
                          f"model.num_attention_heads={m['num_attention_heads']}")
    groups = m["num_query_groups"] or m["num_attention_heads"]
    if m["num_attention_heads"] % groups:
        raise RecipeError(f"model.num_attention_heads={m['num_attention_heads']} is not divisible by "
                          f"model.num_query_groups={groups}")
    if moe["topk"] > moe["num_experts"]:
        raise RecipeError(f"moe.topk={moe['topk']} is larger than moe.num_experts={moe['num_experts']}")
    if moe["router_num_groups"] and moe["num_experts"] % moe["router_num_groups"]:
        raise RecipeError(f"moe.num_experts={moe['num_experts']} is not divisible by "
                          f"moe.router_num_groups={moe['router_num_groups']}")
    moe_layer_pattern(recipe)
    sizes = parallel_sizes(recipe)
    if moe["num_experts"] % sizes["ep"]:
        raise RecipeError(f"moe.num_experts={moe['num_experts']} is not divisible by "
                          f"parallel.expert={sizes['ep']}")
    if groups % sizes["tp"]:
        raise RecipeError(f"model.num_query_groups (or heads)={groups} is not divisible by "
                          f"parallel.tensor={sizes['tp']}")
    for key, value in (("model.ffn_hidden_size", m["ffn_hidden_size"]),
                       ("moe.ffn_hidden_size", moe["ffn_hidden_size"])):
        div = sizes["tp"] if key.startswith("model") else sizes["etp"]
        if value % div:
            raise RecipeError(f"{key}={value} is not divisible by the tensor-parallel size {div}")
    if m["vocab_size"] % sizes["tp"]:
        raise RecipeError(f"model.vocab_size={m['vocab_size']} is not divisible by parallel.tensor={sizes['tp']}")
    if sizes["tp"] > 1 and par["sequence_parallel"] is False:
        raise RecipeError("parallel.sequence_parallel=false with parallel.tensor > 1: megatron's MoE layer "
                          "trains only with sequence parallelism when tensor parallelism is on")
    if sizes["tp"] > 1 and m["seq_length"] % sizes["tp"]:
        raise RecipeError(f"model.seq_length={m['seq_length']} is not divisible by parallel.tensor={sizes['tp']} "
                          f"(sequence parallelism splits the sequence)")
    if disp["type"] == "flex" and sizes["tp"] * sizes["ep"] == 1:
        raise RecipeError("dispatcher.type='flex' needs parallel.tensor x parallel.expert > 1 "
                          "(megatron's flex dispatcher asserts TPxEP > 1)")
    if disp["type"] == "flex" and disp["backend"] == "deepep" and moe["pad_expert_input_to_capacity"]:
        raise RecipeError("moe.pad_expert_input_to_capacity=true is not supported by "
                          "dispatcher.type='flex' with dispatcher.backend='deepep' (megatron rejects it)")
    if moe["pad_expert_input_to_capacity"] and moe["capacity_factor"] is None:
        raise RecipeError("moe.pad_expert_input_to_capacity=true needs moe.capacity_factor")
    if moe["router_padding_for_quantization"]:
        raise RecipeError("moe.router_padding_for_quantization=true needs FP8 training, which this "
                          "runner does not set up (FP8 needs Transformer Engine)")
    if tr["min_lr"] > tr["lr"]:
        raise RecipeError(f"train.min_lr={tr['min_lr']} is larger than train.lr={tr['lr']}")
    if not 0.0 < recipe["data"]["valid_fraction"] < 1.0:
        raise RecipeError(f"data.valid_fraction={recipe['data']['valid_fraction']}: expected a number in (0, 1)")


def count_parameters(recipe: Dict[str, Any]) -> Dict[str, float]:
    """Parameter counts of the model: total, active per token, expert and dense (replicated) parts."""
    m, moe = recipe["model"], recipe["moe"]
    h, v, nl = m["hidden_size"], m["vocab_size"], m["num_layers"]
    heads, groups = m["num_attention_heads"], m["num_query_groups"] or m["num_attention_heads"]
    kv = m["kv_channels"] or h // heads
    attn = h * kv * (heads + 2 * groups) + heads * kv * h + 2 * h
    mats = 3 if m["swiglu"] else 2
    dense_mlp = mats * h * m["ffn_hidden_size"]
    expert = mats * h * moe["ffn_hidden_size"]
    shared = mats * h * (moe["shared_expert_ffn_hidden_size"] or 0)
    pattern = moe_layer_pattern(recipe)
    n_moe = sum(pattern)
    embed = v * h * (2 if m["untie_embeddings"] else 1)
    dense = embed + nl * attn + (nl - n_moe) * dense_mlp + n_moe * (shared + moe["num_experts"] * h) + h
    experts = n_moe * moe["num_experts"] * expert
    active = dense + n_moe * moe["topk"] * expert
    return {"total": dense + experts, "active": active, "experts": experts, "dense": dense}


def memory_estimate(recipe: Dict[str, Any], world_size: Optional[int] = None) -> Dict[str, float]:
    """Rough bytes per rank: weights, gradients, Adam states and activations of one micro-batch.

    Weights/grads in the training dtype plus fp32 master weights (bf16 only) and two fp32 Adam moments.
    Dense weights are split by TP and PP, expert weights by ETP, EP and PP. Activations: about
    ``34 * s * b * h`` bytes per layer (bf16, no recompute) split by TP, plus the dispatched tokens
    ``s * b * topk * h`` twice per MoE layer, plus the logits.
    """
    sizes = parallel_sizes(recipe, world_size)
    p = count_parameters(recipe)
    tr, m, moe = recipe["train"], recipe["model"], recipe["moe"]
    per_rank = p["dense"] / (sizes["tp"] * sizes["pp"]) + p["experts"] / (sizes["etp"] * sizes["ep"] * sizes["pp"])
    bf16 = tr["dtype"] == "bf16"
    weight_bytes = per_rank * (2 + 2 + 4 + 8) if bf16 else per_rank * (4 + 4 + 8)
    s, b, h = m["seq_length"], tr["micro_batch_size"], m["hidden_size"]
    elt = 2 if bf16 else 4
    layers = m["num_layers"] / sizes["pp"]
    act = layers * (34 / 2 * elt) * s * b * h / sizes["tp"]
    act += layers * 2 * s * b * moe["topk"] * h * elt
    act += s * b * m["vocab_size"] / sizes["tp"] * 4 * 2
    return {"params_per_rank": per_rank, "weights_grads_optimizer": weight_bytes, "activations": act,
            "total": weight_bytes + act}


def describe(recipe: Dict[str, Any], world_size: Optional[int] = None) -> str:
    """Human-readable summary used by ``--dry-run``."""
    sizes = parallel_sizes(recipe, world_size)
    p = count_parameters(recipe)
    mem = memory_estimate(recipe, world_size)
    m, moe, tr, disp = recipe["model"], recipe["moe"], recipe["train"], recipe["dispatcher"]
    tokens = tr["micro_batch_size"] * m["seq_length"] * sizes["dp"]
    backend = f"/{disp['backend']}" if disp["type"] in ("flex", "moe_a2a") else ""
    lines = [
        f"recipe {recipe['name']}: {recipe.get('description') or ''}".rstrip(": "),
        f"  model      {m['num_layers']} layers, hidden {m['hidden_size']}, heads {m['num_attention_heads']}"
        f" (groups {m['num_query_groups'] or m['num_attention_heads']}), seq {m['seq_length']}, vocab {m['vocab_size']}",
        f"  moe        {moe['num_experts']} experts, top-{moe['topk']}, expert ffn {moe['ffn_hidden_size']},"
        f" {sum(moe_layer_pattern(recipe))}/{m['num_layers']} MoE layers",
        f"  params     {_count(p['total'])} total, {_count(p['active'])} active per token",
        f"  parallel   world {sizes['world']} = TP {sizes['tp']} x PP {sizes['pp']} x DP {sizes['dp']};"
        f" experts ETP {sizes['etp']} x EP {sizes['ep']} x EDP {sizes['edp']}",
        f"  dispatcher {disp['type']}{backend} on {tr['device']}, {tr['dtype']}",
        f"  batch      {tr['micro_batch_size']} x {m['seq_length']} per DP rank = {tokens} tokens/step,"
        f" {tr['steps']} steps",
        f"  memory     ~{_bytes(mem['total'])} per rank (weights+grads+Adam"
        f" {_bytes(mem['weights_grads_optimizer'])}, activations {_bytes(mem['activations'])};"
        f" {_count(mem['params_per_rank'])} params per rank)",
    ]
    return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def environment_problem(recipe: Dict[str, Any], world_size: Optional[int] = None,
                        ranks_here: Optional[int] = None) -> Optional[str]:
    """What on this machine stops the recipe before any rank starts, or None: the corpus is missing or too short
    for ``model.seq_length``, the estimated memory of the ranks on this host exceeds what it has, or the output
    directory cannot be created or written. Reads only sizes and permissions: nothing is written.

    ``ranks_here``: ranks that run on this host (default: all of them, as the runner spawns them).
    """
    import os

    from .corpus import DEFAULT_CORPUS

    corpus = recipe["data"]["corpus"]
    path = DEFAULT_CORPUS if corpus in (None, "", "builtin") else Path(corpus).expanduser()
    if not path.is_file():
        return f"data.corpus={corpus!r}: file {str(path)!r} does not exist"
    valid = int(path.stat().st_size * recipe["data"]["valid_fraction"])
    train = path.stat().st_size - valid
    seq = recipe["model"]["seq_length"]
    if min(train, valid) < seq + 1:
        return (f"model.seq_length={seq}: the corpus {str(path)!r} has {train} training and {valid} validation bytes, "
                f"each split needs at least seq_length + 1")
    sizes = parallel_sizes(recipe, world_size)
    ranks_here = sizes["world"] if ranks_here is None else ranks_here
    need = memory_estimate(recipe, world_size)["total"]
    if recipe["train"]["device"] == "cpu":
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            have = None
        if have and need * ranks_here > have:
            return (f"the recipe needs about {_bytes(need)} per rank, {_bytes(need * ranks_here)} for the "
                    f"{ranks_here} ranks on this host, which has {_bytes(have)} of memory (model.seq_length, "
                    f"train.micro_batch_size or the model sizes are too large)")
    else:
        import torch

        if torch.cuda.is_available():
            have = torch.cuda.get_device_properties(0).total_memory
            if need > have:
                return (f"the recipe needs about {_bytes(need)} per rank, more than the {_bytes(have)} of "
                        f"{torch.cuda.get_device_name(0)}")
    out = output_dir(recipe)
    if out.exists() and not out.is_dir():
        return f"output directory {str(out)!r} exists and is not a directory"
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"output directory {str(out)!r} cannot be created: {str(existing)!r} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output directory {str(out)!r} is not writable ({str(existing)!r} does not allow writing)"
    return None


def output_dir(recipe: Dict[str, Any]) -> Path:
    """Where a run writes its log, plot and checkpoints (``runs/NAME`` unless ``output.dir``)."""
    return Path(recipe["output"]["dir"] or Path("runs") / recipe["name"])


__all__ = ["RecipeError", "SCHEMA", "load", "apply_override", "validate", "parallel_sizes",
           "count_parameters", "memory_estimate", "describe", "output_dir", "moe_layer_pattern",
           "defaults", "environment_problem"]
