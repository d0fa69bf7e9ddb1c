"""The low-latency benchmark's phase split of the kernels' clock stamps."""
from benchmarks.low_latency import _phases


def test_low_latency_bench_phase_clock():
    """The benchmark's phase split of the kernels' clock stamps (ns), and its table row."""
    def call(start, sent, ready, end):
        return [start, sent, ready, end]

    # Two ranks on one GPU, two calls of (dispatch, combine) each.
    r0 = {"device": "cuda:0", "clocks": [[call(1000, 3000, 4000, 9000), call(10000, 20000, 21000, 30000)],
                                         [call(32000, 34000, 35000, 40000), call(41000, 51000, 52000, 61000)]]}
    r1 = {"device": "cuda:0", "clocks": [[call(3000, 5000, 6000, 11000), call(12000, 22000, 23000, 32000)],
                                         [call(36000, 38000, 39000, 44000), call(45000, 55000, 56000, 65000)]]}
    got = _phases([r0, r1])
    d, c = got["dispatch_fp8"], got["combine_bf16"]
    assert (d["send"], d["wait"], d["receive"], d["kernel"]) == (2.0, 1.0, 5.0, 8.0)
    assert d["gap"] == 3.0  # previous combine's end to the next dispatch's start: 2 us and 4 us
    assert d["spread"] == 3.0  # starts 2 us and 4 us apart
    assert (c["send"], c["wait"], c["receive"], c["kernel"], c["gap"]) == (10.0, 1.0, 9.0, 20.0, 1.0)
