"""How the low-latency backend splits a call into send and receive kernels (hook mode)."""
import pytest

from moe_a2a.backends import low_latency as ll


def test_low_latency_phases_and_hook():
    launched = []
    assert ll._run_phases(launched.append, False, "dispatch") is None
    assert launched == [ll._SEND | ll._RECV]  # one kernel, both phases
    launched.clear()
    hook = ll._run_phases(launched.append, True, "combine")
    assert launched == [ll._SEND]  # the receive waits for the hook
    hook()
    assert launched == [ll._SEND, ll._RECV]
    with pytest.raises(RuntimeError, match="combine hook was already called"):
        hook()
    assert launched == [ll._SEND, ll._RECV]
