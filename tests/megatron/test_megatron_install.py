"""``moe_a2a.megatron.install()`` in one process: names rebound, config annotation, argparse, uninstall,
and the CPU context's scoping. (The multi-rank routing check is in test_megatron_dispatcher.py.)"""
from __future__ import annotations

import argparse
import sys
import types
import typing

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron


@pytest.fixture
def installed():
    import moe_a2a.megatron as mm

    mm.uninstall()
    yield mm.install()
    mm.uninstall()


def test_flex_names_rebound_and_restored():
    import moe_a2a.fused_a2a as ours
    import moe_a2a.megatron as mm
    from megatron.core.transformer.moe import fused_a2a as mfused
    from megatron.core.transformer.moe import token_dispatcher as td

    mm.uninstall()
    before = {n: getattr(td, n) for n in ("fused_dispatch", "fused_combine", "hybrid_ep_dispatch",
                                          "hybrid_ep_combine", "set_deepep_num_sms")}
    summary = mm.install()
    try:
        for name in before:
            # moe_a2a's function itself, or (megatron-core >= 0.19, HybridEP) an adapter around it
            for module in (td, mfused):
                fn = getattr(module, name)
                assert fn is getattr(ours, name) or fn.__module__ == "moe_a2a.megatron.install", (module, name)
        assert mfused.get_buffer is ours.get_buffer and mfused.HAVE_DEEP_EP and mfused.HAVE_HYBRIDEP
        assert "megatron.core.transformer.moe.token_dispatcher.fused_dispatch" in summary["rebound"]
        assert mm.install() == summary  # idempotent
    finally:
        mm.uninstall()
    for name, value in before.items():
        assert getattr(td, name) is value, name


def test_transformer_config_accepts_moe_a2a(installed):
    from megatron.core.transformer import TransformerConfig

    field = TransformerConfig.__dataclass_fields__["moe_token_dispatcher_type"]
    assert "moe_a2a" in (typing.get_args(field.type) if not isinstance(field.type, str) else field.type)
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=4,
                            moe_router_topk=2, moe_token_dispatcher_type="moe_a2a", add_bias_linear=False)
    assert cfg.moe_token_dispatcher_type == "moe_a2a"


def _fake_megatron_lm(monkeypatch):
    """A stand-in for Megatron-LM's ``megatron.training.arguments`` (not part of megatron-core):
    ``_add_moe_args`` declares the option as Megatron-LM does, ``parse_args`` builds a parser."""
    import megatron

    pkg = types.ModuleType("megatron.training")
    pkg.__path__ = []
    mod = types.ModuleType("megatron.training.arguments")

    def _add_moe_args(parser):
        group = parser.add_argument_group(title="moe")
        group.add_argument("--moe-token-dispatcher-type", type=str, choices=["allgather", "alltoall", "flex"],
                           default="allgather")
        return parser

    def parse_args(argv):
        parser = argparse.ArgumentParser()
        parser = mod._add_moe_args(parser)
        return parser.parse_args(argv)

    mod._add_moe_args, mod.parse_args = _add_moe_args, parse_args
    monkeypatch.setitem(sys.modules, "megatron.training", pkg)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", mod)
    monkeypatch.setattr(megatron, "training", pkg, raising=False)
    return mod


def test_megatron_lm_argparse_accepts_moe_a2a(monkeypatch):
    import moe_a2a.megatron as mm

    mm.uninstall()
    args = _fake_megatron_lm(monkeypatch)
    with pytest.raises(SystemExit):  # without install() the choice is rejected
        args.parse_args(["--moe-token-dispatcher-type", "moe_a2a"])
    assert mm.install()["argparse"] is True
    try:
        assert args.parse_args(["--moe-token-dispatcher-type", "moe_a2a"]).moe_token_dispatcher_type == "moe_a2a"
        assert args.parse_args(["--moe-token-dispatcher-type", "flex"]).moe_token_dispatcher_type == "flex"
    finally:
        mm.uninstall()
    with pytest.raises(SystemExit):
        args.parse_args(["--moe-token-dispatcher-type", "moe_a2a"])


def test_dispatcher_rejects_unsupported_settings(installed):
    from moe_a2a.megatron.dispatcher import MoEA2ATokenDispatcher

    class Groups:  # a one-rank pg_collection (no process group needed to reach the checks)
        ep = expt_tp = tp_ep = None

    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=4, moe_router_topk=2,
                add_bias_linear=False, moe_token_dispatcher_type="moe_a2a")
    cfg = TransformerConfig(moe_flex_dispatcher_backend="deepep", moe_expert_capacity_factor=1.0,
                            moe_pad_expert_input_to_capacity=True, **base)
    with pytest.raises(NotImplementedError, match="hybridep"):
        MoEA2ATokenDispatcher(4, [0, 1, 2, 3], cfg, Groups())
    cfg = TransformerConfig(**base)
    cfg.moe_flex_dispatcher_backend = "nccl"
    with pytest.raises(ValueError, match="'nccl'"):
        MoEA2ATokenDispatcher(4, [0, 1, 2, 3], cfg, Groups())


def test_cpu_context_is_scoped():
    from megatron.core.transformer.moe import moe_utils

    from moe_a2a.megatron import cpu_context

    current_device, stream = torch.cuda.current_device, torch.cuda.Stream
    had_gemm = hasattr(moe_utils, "te_general_gemm")
    with cpu_context(enabled=False) as active:
        assert active is False and torch.cuda.current_device is current_device
    with cpu_context(enabled=True) as active:
        assert active is True
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        assert moe_utils.te_general_gemm is None or had_gemm
        with cpu_context(enabled=True):  # nested: restored only by the outer exit
            pass
        assert torch.cuda.Stream is not stream
    assert torch.cuda.current_device is current_device and torch.cuda.Stream is stream
    assert hasattr(moe_utils, "te_general_gemm") == had_gemm
    if torch.cuda.is_available():
        with cpu_context() as active:  # default: nothing changes where CUDA exists
            assert active is False and torch.cuda.current_device is current_device
