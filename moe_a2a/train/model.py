"""Build megatron-core's parallel state, ``TransformerConfig`` and ``GPTModel`` from a recipe."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _num_sms_kwargs(config_cls, disp: Dict[str, Any]) -> Dict[str, int]:
    """SM counts of the dispatch kernels: one ``moe_flex_dispatcher_num_sms`` in megatron-core 0.19
    (which rejects the two older knobs set differently), one per backend in 0.16."""
    if "moe_flex_dispatcher_num_sms" in config_cls.__dataclass_fields__:
        return {"moe_flex_dispatcher_num_sms": disp[f"{disp['backend']}_num_sms"]}
    return {"moe_deepep_num_sms": disp["deepep_num_sms"], "moe_hybridep_num_sms": disp["hybridep_num_sms"]}


def transformer_config(recipe: Dict[str, Any], sizes: Dict[str, int]):
    """The ``TransformerConfig`` of a recipe (see ``moe_a2a.train.recipe.SCHEMA`` for the keys)."""
    from megatron.core.transformer import TransformerConfig

    m, moe, disp, tr = recipe["model"], recipe["moe"], recipe["dispatcher"], recipe["train"]
    bf16 = tr["dtype"] == "bf16"
    seq_par = recipe["parallel"]["sequence_parallel"]
    balance = moe["router_load_balancing_type"]
    return TransformerConfig(
        num_layers=m["num_layers"], hidden_size=m["hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], kv_channels=m["kv_channels"], ffn_hidden_size=m["ffn_hidden_size"],
        normalization=m["normalization"], gated_linear_unit=m["swiglu"],
        activation_func=torch.nn.functional.silu if m["swiglu"] else torch.nn.functional.gelu,
        qk_layernorm=m["qk_layernorm"], init_method_std=m["init_method_std"],
        hidden_dropout=m["hidden_dropout"], attention_dropout=m["attention_dropout"], add_bias_linear=False,
        tensor_model_parallel_size=sizes["tp"], pipeline_model_parallel_size=sizes["pp"],
        expert_model_parallel_size=sizes["ep"], expert_tensor_parallel_size=sizes["etp"],
        sequence_parallel=sizes["tp"] > 1 if seq_par is None else seq_par,
        num_moe_experts=moe["num_experts"], moe_router_topk=moe["topk"], moe_ffn_hidden_size=moe["ffn_hidden_size"],
        moe_layer_freq=moe["layer_freq"], moe_shared_expert_intermediate_size=moe["shared_expert_ffn_hidden_size"],
        moe_router_score_function=moe["router_score_function"],
        moe_router_topk_scaling_factor=moe["router_topk_scaling_factor"], moe_router_pre_softmax=moe["router_pre_softmax"],
        moe_router_num_groups=moe["router_num_groups"], moe_router_group_topk=moe["router_group_topk"],
        moe_router_enable_expert_bias=moe["router_enable_expert_bias"],
        moe_router_bias_update_rate=moe["router_bias_update_rate"],
        moe_router_load_balancing_type=balance, moe_aux_loss_coeff=moe["aux_loss_coeff"] if balance != "none" else 0.0,
        moe_z_loss_coeff=moe["z_loss_coeff"], moe_router_dtype=moe["router_dtype"],
        moe_expert_capacity_factor=moe["capacity_factor"],
        moe_pad_expert_input_to_capacity=moe["pad_expert_input_to_capacity"],
        moe_token_drop_policy=moe["token_drop_policy"], moe_grouped_gemm=moe["grouped_gemm"],
        moe_permute_fusion=moe["permute_fusion"], moe_token_dispatcher_type=disp["type"],
        moe_flex_dispatcher_backend=disp["backend"], **_num_sms_kwargs(TransformerConfig, disp),
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=tr["device"] == "cpu", gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False,
    )


def megatron_rejects(recipe: Dict[str, Any], sizes: Dict[str, int]) -> Optional[str]:
    """megatron-core's own objection to the recipe's ``TransformerConfig``, or None.

    Runs ``TransformerConfig.__post_init__`` in the launching process (no process groups needed).
    Settings that only need Transformer Engine (fused permute, grouped GEMM) are left out here: the
    runner reports those as "cannot run here" rather than as an invalid recipe.
    """
    import copy
    import warnings

    probe = copy.deepcopy(recipe)
    probe["moe"].update(grouped_gemm=False, permute_fusion=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformer_config(probe, sizes)
    except (ValueError, AssertionError, TypeError) as exc:
        return f"megatron-core rejects this recipe: {exc}"
    return None


def initialize_parallel(sizes: Dict[str, int], seed: int, timeout_s: Optional[float] = None) -> None:
    """Create megatron's TP/PP/EP/DP groups over the initialized default group and seed its RNGs.

    ``timeout_s``: how long a collective of these groups waits for a peer before raising (megatron takes
    whole minutes, so the groups are set to the exact value afterwards).
    """
    import datetime
    import math

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    extra = {} if timeout_s is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout_s / 60))}
    ps.initialize_model_parallel(tensor_model_parallel_size=sizes["tp"], pipeline_model_parallel_size=sizes["pp"],
                                 expert_model_parallel_size=sizes["ep"],
                                 expert_tensor_parallel_size=sizes["etp"], **extra)
    set_timeout = getattr(torch.distributed, "set_timeout", None) or getattr(torch.distributed.distributed_c10d,
                                                                             "_set_pg_timeout", None)
    if timeout_s is not None and set_timeout is not None:
        for group in getattr(ps, "_global_process_group_list", None) or [None]:
            set_timeout(datetime.timedelta(seconds=timeout_s), group)
    model_parallel_cuda_manual_seed(seed)


def build_model(recipe: Dict[str, Any], config, device: torch.device):
    """A ``GPTModel`` with the recipe's MoE layers, on ``device`` (Transformer Engine layers when present on GPU)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    m = recipe["model"]
    use_te = device.type == "cuda" and have_transformer_engine()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=m["normalization"])
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=m["vocab_size"],
                     max_sequence_length=m["seq_length"], position_embedding_type=m["position_embedding"],
                     rotary_base=m["rotary_base"], share_embeddings_and_output_weights=not m["untie_embeddings"])
    return model.to(device)
