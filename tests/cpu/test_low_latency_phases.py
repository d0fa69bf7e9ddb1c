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


def test_call_numbers_wrap_within_int32():
    """The call number goes to the kernels as a 32-bit int: it wraps to 0 after 2^31 - 1, and the buffer sets
    keep alternating."""
    backend = object.__new__(ll.LowLatencyBackend)  # only the call counter, no buffer
    backend._set, backend._calls, backend._failure = 0, 2 ** 31 - 2, None
    backend.error = lambda: ""
    assert [backend._next_set() for _ in range(3)] == [(0, 2 ** 31 - 2), (1, 2 ** 31 - 1), (0, 0)]
