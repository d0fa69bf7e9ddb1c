"""megatron-core MoELayer on moe_a2a vs megatron's own ``alltoall`` dispatcher (CPU, gloo).

Each spawned run builds one MoELayer per dispatcher from the same weights and inputs and checks that
output, input gradient, router gradient and every expert gradient agree (float32, 1e-6) with the
alltoall reference, for: the ``moe_a2a`` dispatcher (deepep and hybridep paths) and megatron's
``flex`` dispatcher after ``install()`` (deepep and hybridep backends); dropless, capacity with
dropping, capacity with padding, and router padding for quantization; EP only and TP x EP.
The 2-rank run first checks that ``install()`` is what routes ``flex`` to moe_a2a.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

HIDDEN, FFN, EXPERTS, TOPK, SEQ, BATCH = 32, 48, 8, 2, 24, 2

# (name, TransformerConfig overrides); each runs on every dispatcher it supports.
CASES = [
    ("dropless", {}),
    ("capacity_drop", {"moe_expert_capacity_factor": 1.0}),
    ("capacity_pad", {"moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True}),
    ("quant_padding", {"moe_router_padding_for_quantization": True}),
]
DISPATCHERS = [("moe_a2a", "deepep"), ("moe_a2a", "hybridep"), ("flex", "deepep"), ("flex", "hybridep")]


def _supported(dispatcher: str, backend: str, overrides: dict, tp: int) -> bool:
    if overrides.get("moe_pad_expert_input_to_capacity"):
        # megatron rejects flex+deepep with padding; its flex+hybridep sizes the capacity with
        # TP x num_experts, which differs from the router's capacity when TP > 1.
        return backend == "hybridep" and (dispatcher == "moe_a2a" or tp == 1)
    return True


def _layer(tp: int, ep: int, dispatcher: str, backend: str, overrides: dict, state=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer

    quant = overrides.get("moe_router_padding_for_quantization", False)
    kwargs = {k: v for k, v in overrides.items() if k != "moe_router_padding_for_quantization"}
    cfg = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_token_dispatcher_type=dispatcher,
        moe_flex_dispatcher_backend=backend, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        sequence_parallel=tp > 1, use_cpu_initialization=True, params_dtype=torch.float32,
        add_bias_linear=False, gated_linear_unit=True, moe_router_dtype="fp32", moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss", **kwargs)
    if quant:
        # FP8 itself needs Transformer Engine; the router padding only reads the alignment (16 for
        # fp8) and SequentialMLP pads per expert in plain torch, so set both after validation.
        cfg.fp8, cfg.moe_router_padding_for_quantization = "hybrid", True
    mlp = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False).submodules.mlp
    submodules = mlp.submodules if hasattr(mlp, "submodules") else mlp.keywords["submodules"]
    layer = MoELayer(cfg, submodules=submodules)
    if state is not None:
        layer.load_state_dict(state)
    return layer


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out * dy).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, type(layer.token_dispatcher).__name__


def _check_install_routes_to_moe_a2a(tp: int, ep: int) -> None:
    """Without install(): flex+deepep/hybridep need deep_ep and "moe_a2a" is unknown. With it: both
    flex backends and the "moe_a2a" type run, and their communication goes through moe_a2a's Buffer."""
    import moe_a2a.megatron as mm
    from moe_a2a.buffer import Buffer

    assert not mm.is_installed()
    for backend in ("deepep", "hybridep"):
        with pytest.raises(ImportError, match="DeepEP|HybridEP"):
            _layer(tp, ep, "flex", backend, {})
    with pytest.raises(ValueError, match="moe_a2a"):
        _layer(tp, ep, "moe_a2a", "deepep", {})
    mm.install()
    calls = []
    original = Buffer.dispatch

    def counting_dispatch(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    Buffer.dispatch = counting_dispatch
    try:
        x = torch.randn(SEQ // tp, BATCH, HIDDEN)
        for dispatcher, backend, cls in (("flex", "deepep", "MoEFlexTokenDispatcher"),
                                         ("flex", "hybridep", "MoEFlexTokenDispatcher"),
                                         ("moe_a2a", "deepep", "MoEA2ATokenDispatcher"),
                                         ("moe_a2a", "hybridep", "MoEA2ATokenDispatcher")):
            before = len(calls)
            layer = _layer(tp, ep, dispatcher, backend, {})
            assert type(layer.token_dispatcher).__name__ == cls
            assert layer.config.moe_token_dispatcher_type == dispatcher
            layer(x.clone().requires_grad_(True))[0].sum().backward()
            # forward dispatch + backward of the combine (a cached dispatch)
            assert len(calls) - before >= 2, f"{dispatcher}/{backend} did not use moe_a2a's Buffer"
    finally:
        Buffer.dispatch = original


def _check_layouts(rank: int, world_size: int, layouts, check_install: bool = False):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import moe_a2a.megatron as mm

    with mm.cpu_context(enabled=True):  # a CPU test, also where CUDA exists
        if check_install:
            tp, ep = layouts[0]
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
            model_parallel_cuda_manual_seed(7)
            _check_install_routes_to_moe_a2a(tp, ep)
            ps.destroy_model_parallel()
        mm.install()
        for tp, ep in layouts:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
            model_parallel_cuda_manual_seed(7)
            gen = torch.Generator().manual_seed(100 + rank)
            x = torch.randn(SEQ // tp, BATCH, HIDDEN, generator=gen)
            dy = torch.randn(SEQ // tp, BATCH, HIDDEN, generator=gen)
            # Skew the router so some experts overflow their capacity and tokens get dropped.
            for case, overrides in CASES:
                torch.manual_seed(11)
                ref = _layer(tp, ep, "alltoall", "deepep", overrides)
                with torch.no_grad():
                    ref.router.weight[0] += 0.5
                state = {k: v.clone() if torch.is_tensor(v) else v for k, v in ref.state_dict().items()}
                want = _run(ref, x, dy)
                checked = 0
                for dispatcher, backend in DISPATCHERS:
                    if not _supported(dispatcher, backend, overrides, tp):
                        continue
                    got = _run(_layer(tp, ep, dispatcher, backend, overrides, state), x, dy)
                    where = f"TP{tp}xEP{ep} {case} {dispatcher}/{backend} ({got[3]})"
                    assert got[3] in ("MoEA2ATokenDispatcher", "MoEFlexTokenDispatcher"), where
                    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6, msg=f"output {where}")
                    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, msg=f"input grad {where}")
                    assert got[2].keys() == want[2].keys(), where
                    assert any("router" in k for k in want[2]) and any("experts" in k for k in want[2])
                    for name in want[2]:
                        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6,
                                                   msg=f"grad of {name} {where}")
                    checked += dispatcher == "moe_a2a"
                assert checked >= 1, f"{case}: the moe_a2a dispatcher did not run"
                if case == "capacity_drop":  # the case must really drop tokens
                    _, routing_map = ref.router(x)
                    assert routing_map.sum() < routing_map.size(0) * TOPK, "no token was dropped"
            ps.destroy_model_parallel()


def test_install_and_equivalence_2_ranks():
    run_distributed(_check_layouts, 2, [(1, 2)], True)


def test_equivalence_4_ranks_ep_and_tp_x_ep():
    run_distributed(_check_layouts, 4, [(1, 4), (2, 2)])
