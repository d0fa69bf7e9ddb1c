"""CPU checks of the pieces that keep kernels from waiting on blocks that cannot start, and of native teardown."""
import pytest

from moe_a2a import _native
from moe_a2a.backends import residency


@pytest.mark.parametrize("sms,ranks,budget", [(132, 1, 132), (132, 2, 66), (132, 4, 32), (132, 8, 16),
                                              (132, 3, 44), (114, 8, 14), (8, 8, 2), (4, 8, 2)])
def test_sm_budget_fits_every_rank_sharing_a_gpu(sms, ranks, budget):
    got = residency.sm_budget(sms, ranks)
    assert got == budget and got % 2 == 0
    assert got * ranks <= sms or got == 2  # two SMs is the least a kernel can run on


def test_most_ranks_per_device_is_the_worst_gpu():
    assert residency.most_ranks_per_device(["a"] * 8) == 8
    assert residency.most_ranks_per_device(["a", "b", "c", "d"]) == 1
    assert residency.most_ranks_per_device(["a", "a", "a", "b"]) == 3  # the same answer on every rank


class _Runtime:
    def __init__(self, log, name, fail=False):
        self.log, self.name, self.fail = log, name, fail

    def destroy(self, at_exit=False):
        self.log.append((self.name, at_exit))
        if self.fail:
            raise RuntimeError("device gone")


def test_low_latency_num_sms_defaults_to_the_share_and_refuses_more():
    eight_on_one = ["gpu0"] * 8
    assert residency.low_latency_num_sms(132, eight_on_one, None) == 16
    assert residency.low_latency_num_sms(132, ["gpu0", "gpu1"], None) == 132
    assert residency.low_latency_num_sms(132, eight_on_one, 10) == 10
    for bad in (0, 17):
        with pytest.raises(ValueError, match=r"num_sms must be in \[1, 16\] .* got " + str(bad)):
            residency.low_latency_num_sms(132, eight_on_one, bad)


def test_shutdown_destroys_live_runtimes_newest_first_and_never_raises(capsys):
    log = []
    first, second, failing = _Runtime(log, "first"), _Runtime(log, "second"), _Runtime(log, "failing", True)
    gone = _Runtime(log, "gone")
    for obj in (first, gone, failing, second):
        _native.track(obj)
    del gone  # collected: nothing to release
    _native.shutdown()
    assert log == [("second", True), ("failing", True), ("first", True)]
    assert "moe_a2a: releasing _Runtime at exit failed: device gone" in capsys.readouterr().err
    _native.shutdown()  # once only
    assert len(log) == 3


def test_module_caches_holding_process_groups_are_cleared_at_exit():
    from moe_a2a import fused_a2a
    fused_a2a._buffers["group"] = "buffer"  # what get_buffer caches: a Buffer per process group
    _native.shutdown()
    assert fused_a2a._buffers == {}


def test_missing_extension_is_reported_without_loading():
    lazy = _native.Lazy("_no_such_extension")
    assert not lazy and not _native.present("_no_such_extension")
    with pytest.raises(RuntimeError, match="moe_a2a._no_such_extension is not built"):
        lazy.Runtime
