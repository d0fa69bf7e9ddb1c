"""Every backend class has the methods of its protocol (``moe_a2a.backends.base``), with the same arguments:
``Buffer`` calls them through the protocol alone. Checked on the classes, so the kernels' backends are
covered without a GPU."""
import inspect
import typing

import pytest

from moe_a2a.backends import base
from moe_a2a.backends.internode import InternodeBackend
from moe_a2a.backends.internode_low_latency import InternodeLowLatencyBackend
from moe_a2a.backends.intranode import IntranodeBackend
from moe_a2a.backends.low_latency import LowLatencyBackend
from moe_a2a.backends.reference import ReferenceBackend
from moe_a2a.backends.reference_low_latency import ReferenceLowLatency


def _methods(protocol):
    """The protocol's methods, its bases' included."""
    names = set()
    for cls in protocol.__mro__:
        if cls.__module__ == base.__name__:
            names |= {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}
    return sorted(names)


@pytest.mark.parametrize("cls,protocol", [
    (ReferenceBackend, base.NormalModeBackend),
    (IntranodeBackend, base.NormalModeKernels),
    (InternodeBackend, base.NormalModeKernels),
    (ReferenceLowLatency, base.LowLatencyModeBackend),
    (LowLatencyBackend, base.LowLatencyModeKernels),
    (InternodeLowLatencyBackend, base.LowLatencyModeKernels),
])
def test_backend_has_the_methods_of_its_protocol(cls, protocol):
    methods = _methods(protocol)
    assert {"dispatch", "combine"} <= set(methods)
    for name in methods:
        impl = getattr(cls, name, None)
        assert callable(impl), f"{cls.__name__} lacks {name}() of {protocol.__name__}"
        want = list(inspect.signature(getattr(protocol, name)).parameters)
        got = list(inspect.signature(impl).parameters)
        assert got == want, f"{cls.__name__}.{name}{tuple(got)}: {protocol.__name__} says {tuple(want)}"


def test_every_operation_takes_its_request():
    hints = {
        (base.NormalModeBackend, "get_dispatch_layout"): base.LayoutRequest,
        (base.NormalModeBackend, "dispatch"): base.DispatchRequest,
        (base.NormalModeBackend, "combine"): base.CombineRequest,
        (base.LowLatencyModeBackend, "dispatch"): base.LowLatencyDispatchRequest,
        (base.LowLatencyModeBackend, "combine"): base.LowLatencyCombineRequest,
    }
    for (protocol, name), request in hints.items():
        assert typing.get_type_hints(getattr(protocol, name))["request"] is request


def test_requests_are_frozen_with_named_fields():
    import dataclasses

    import torch

    from moe_a2a import Config
    request = base.DispatchRequest(torch.zeros(2, 8), Config())
    assert not request.cached and request.num_experts == 0 and request.expert_alignment == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.num_worst_tokens = 4
    routed = dataclasses.replace(request, num_tokens_per_expert=torch.zeros(6, dtype=torch.int32))
    assert routed.num_experts == 6
